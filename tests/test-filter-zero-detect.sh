#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: zero detection.  All-zero writes and all-zero clusters inside
# bigger writes become zero clusters (the overlay does not grow), zero
# requests are metadata only, backend holes become zero clusters when
# read (even with qed-zero-detect=false: the backend's extents say so),
# and explicit zeros read from the backend become zero clusters only
# with zero detection.
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
cd "$tmp"

K=1024; M=$((1024*1024))
head -c $((8*M)) /dev/urandom > base.raw
sum=$(md5sum < base.raw)

# Sizes are allocated bytes (functions.sh): the overlay's length grows
# in sparse chunks while served.  own_map prints "start length kind"
# lines for the overlay's own clusters (kind = data or zero).
own_map () {
  qemu-img map --output=json "$1" | /usr/bin/python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    if e["depth"] == 0 and e["present"]:
        k = "data" if e["data"] else "zero"
        if out and out[-1][2] == k and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], k])
for o in out:
    print(*o)'
}

start_nbdkit z1 --filter="$FILTER" file base.raw qed-overlay=ov.qed \
  qed-copy-on-read=false
nbdinfo --size "$(uri z1)" >/dev/null
s0=$(allocated ov.qed)
nbdsh -u "$(uri z1)" -c "
base = open('base.raw', 'rb').read()
# 2M of zeros written as data, aligned.
h.pwrite(bytes(2*$M), 2*$M)
# A 1M write whose clusters 1 and 2 are all zeros.
buf = bytearray(base[6*$M:7*$M])
buf[64*1024:192*1024] = bytes(128*1024)
h.pwrite(bytes(buf), 6*$M)
# A write-zeroes request of 1M.
h.zero($M, 4*$M)
h.flush()
assert h.pread(2*$M, 2*$M) == bytes(2*$M)
assert h.pread($M, 6*$M) == bytes(buf)
assert h.pread($M, 4*$M) == bytes($M)
assert h.pread(64*1024, 5*$M) == base[5*$M:5*$M+64*1024]
"
s1=$(allocated ov.qed)
# Growth: one L2 table (4 x 64K) and the 14 data clusters of the 1M write.
grow=$((s1 - s0))
[ $grow -le $((256*K + 14*64*K)) ] ||
  fail "zero detection: the overlay grew by $grow bytes"
# Partial zero writes over backend data must not lose the rest.
nbdsh -u "$(uri z1)" -c "
base = open('base.raw', 'rb').read()
h.pwrite(bytes(100), 7*$M + 1000)
want = base[7*$M:7*$M+64*1024]
want = want[:1000] + bytes(100) + want[1100:]
assert h.pread(64*1024, 7*$M) == want
"
stop_nbdkit z1
qemu_check ov.qed
own_map ov.qed > map1.txt
cat map1.txt
expect="2097152 3145728 zero
6291456 65536 data
6356992 131072 zero
6488064 917504 data"
[ "$(cat map1.txt)" = "$expect" ] || fail "unexpected overlay map (see above)"

# Without zero detection, zeros written as data are allocated.
start_nbdkit z2 --filter="$FILTER" file base.raw qed-overlay=ov2.qed \
  qed-zero-detect=false qed-copy-on-read=false
nbdinfo --size "$(uri z2)" >/dev/null
s0=$(allocated ov2.qed)
nbdsh -u "$(uri z2)" -c "h.pwrite(bytes(2*$M), 2*$M); h.flush()"
stop_nbdkit z2
[ $(( $(allocated ov2.qed) - s0 )) -ge $((2*M)) ] ||
  fail "qed-zero-detect=false: zeros were not written as data"

# Copy-on-read over a sparse backend: holes become zero clusters without
# allocation, with or without zero detection.  Explicit zeros (data to
# the backend's extents) become zero clusters only with zero detection.
head -c $M /dev/urandom > sparse.raw
truncate -s $((5*M)) sparse.raw
head -c $M /dev/zero >> sparse.raw           # written zeros: data extent
head -c $M /dev/urandom >> sparse.raw
truncate -s $((8*M)) sparse.raw
ssum=$(md5sum < sparse.raw)
for zd in true false; do
  rm -f ov3.qed
  start_nbdkit z3 --filter="$FILTER" file sparse.raw qed-overlay=ov3.qed \
    qed-zero-detect=$zd
  # Read everything (nbdcopy would skip the holes by their extents).
  nbdsh -u "$(uri z3)" -c "
base = open('sparse.raw', 'rb').read()
for off in range(0, 8*$M, 512*1024):
    assert h.pread(512*1024, off) == base[off:off+512*1024], off
"
  stop_nbdkit z3
  qemu_check ov3.qed
  own_map ov3.qed > map3.txt
  if [ $zd = true ]; then
    expect="0 1048576 data
1048576 5242880 zero
6291456 1048576 data
7340032 1048576 zero"
    maxsize=$((64*K + 2*256*K + 2*M))   # header, L1, one L2, data
  else
    expect="0 1048576 data
1048576 4194304 zero
5242880 2097152 data
7340032 1048576 zero"
    maxsize=$((64*K + 2*256*K + 3*M))
  fi
  [ "$(cat map3.txt)" = "$expect" ] ||
    { cat map3.txt; fail "qed-zero-detect=$zd: unexpected overlay map"; }
  [ "$(allocated ov3.qed)" -le $maxsize ] ||
    fail "qed-zero-detect=$zd: overlay too large ($(allocated ov3.qed))"
done

[ "$(md5sum < base.raw)" = "$sum" ] || fail "base.raw was modified"
[ "$(md5sum < sparse.raw)" = "$ssum" ] || fail "sparse.raw was modified"
echo OK
