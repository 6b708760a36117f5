#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: capabilities and write semantics.  Every capability is
# advertised although the backend is opened read-only (also over a
# read-only server); the backend never receives a write, zero, trim or
# flush; partial writes keep the backend's surrounding bytes, a write
# into a zeroed cluster keeps zeros around it; fast zero, FUA, cache and
# extents behave.
. "$(dirname "$0")/functions.sh"
requires nbdsh --version
requires nbdinfo --version
cd "$tmp"

M=$((1024*1024))
head -c $M /dev/urandom > base.raw
truncate -s $((4*M)) base.raw           # data 0-1M, hole 1M-4M
sum=$(md5sum < base.raw)

check_caps () {
  nbdinfo --no-content "$1" > caps.txt
  for c in can_zero can_trim can_fua can_flush can_multi_conn can_cache \
           can_fast_zero; do
    [ "$(info_field caps.txt $c)" = true ] || { cat caps.txt; fail "$2: $c is not true"; }
  done
  [ "$(info_field caps.txt is_read_only)" = false ] || { cat caps.txt; fail "$2: read-only"; }
  [ "$(info_field caps.txt block_size_minimum)" = 1 ] || fail "$2: block_size_minimum"
  [ "$(info_field caps.txt block_size_preferred)" = "$3" ] ||
    { cat caps.txt; fail "$2: block_size_preferred"; }
  [ "$(info_field caps.txt block_size_maximum)" = 4294967295 ] || fail "$2: block_size_maximum"
  grep -q "base:allocation" caps.txt || fail "$2: no extents"
}

# Over a writable file, with the log filter beneath to see what the
# backend receives.
start_nbdkit c1 --filter="$FILTER" --filter=log file base.raw \
  logfile="$tmp/backend.log" qed-copy-on-read=false
check_caps "$(uri c1)" file 65536

# Over a read-only server, reached through the nbd plugin.
start_nbdkit ro -r file base.raw
start_nbdkit c2 --filter="$FILTER" nbd socket="$tmp/ro.sock" \
  qed-cluster-size=1M
nbdinfo --no-content "$(uri ro)" > ro.txt
[ "$(info_field ro.txt is_read_only)" = true ] ||
  fail "the read-only server is writable?"
check_caps "$(uri c2)" "read-only nbd backend" 1048576
nbdsh -u "$(uri c2)" -c "
base = open('base.raw', 'rb').read()
h.pwrite(b'hello', 100)
assert h.pread(200, 0) == base[:100] + b'hello' + base[105:200]
h.zero(4096, 8192)
assert h.pread(4096, 8192) == bytes(4096)
h.trim(1024*1024, 2*1024*1024)
h.flush()
"
stop_nbdkit c2
stop_nbdkit ro

nbdsh -u "$(uri c1)" -c "
import errno
base = open('base.raw', 'rb').read()
C = 65536
def check(off, n, want):
    got = h.pread(n, off)
    assert got == want, (off, n)

# Partial writes over unallocated clusters keep the backend's bytes,
# also across a cluster boundary and next to the end of the data.
h.pwrite(b'A' * 10, C + 1000)
check(C, C, base[C:C+1000] + b'A' * 10 + base[C+1010:2*C])
h.pwrite(b'B' * 300, 3*C - 100)
check(2*C, 2*C, base[2*C:3*C-100] + b'B' * 300 + base[3*C+200:4*C])

# A write into a zeroed cluster keeps zeros around it.
h.zero(C, 5*C)
h.pwrite(b'C' * 10, 5*C + 500)
check(5*C, C, bytes(500) + b'C' * 10 + bytes(C - 510))
# The same after a trim (whole cluster: becomes a zero cluster).
h.trim(C, 6*C)
check(6*C, C, bytes(C))
h.pwrite(b'D' * 10, 6*C + 7)
check(6*C, C, bytes(7) + b'D' * 10 + bytes(C - 17))

# A partial zero over backend data keeps the rest of the cluster.
h.zero(100, 7*C + 50)
check(7*C, C, base[7*C:7*C+50] + bytes(100) + base[7*C+150:8*C])
h.zero(100, 7*C + 1000, nbd.CMD_FLAG_NO_HOLE)
check(7*C + 1000, 100, bytes(100))

# Fast zero: whole clusters are cheap; a partial cluster over backend
# data is not, and must fail with ENOTSUP (not EIO), changing nothing.
h.zero(2*C, 8*C, nbd.CMD_FLAG_FAST_ZERO)
check(8*C, 2*C, bytes(2*C))
try:
    h.zero(100, 10*C + 5, nbd.CMD_FLAG_FAST_ZERO)
    assert False, 'partial fast zero succeeded'
except nbd.Error as e:
    assert e.args[1] == errno.ENOTSUP, e
check(10*C, C, base[10*C:11*C])

# FUA writes and zeroes.
h.pwrite(b'E' * C, 11*C, nbd.CMD_FLAG_FUA)
h.zero(C, 12*C, nbd.CMD_FLAG_FUA)
check(11*C, 2*C, b'E' * C + bytes(C))
h.flush()

# Unaligned write at the very end of the disk.
size = h.get_size()
h.pwrite(b'F' * 7, size - 7)
check(size - 7, 7, b'F' * 7)
"

# The backend saw reads only.
grep -E ' (Write|Zero|Trim|Flush) ' backend.log && fail "the backend received a change"
grep -q ' Read ' backend.log || fail "the backend log shows no reads?"
[ "$(md5sum < base.raw)" = "$sum" ] || fail "base.raw was modified"

# Extents: the overlay's own clusters, the backend's for the rest.
nbdsh -u "$(uri c1)" -c "
h.zero(65536, 2*1024*1024)
h.pwrite(b'x' * 65536, 3*1024*1024)
"
nbdinfo --map "$(uri c1)" | awk '{print $1, $2, $3}' > map.txt
# 0-8C data (backend data, and the clusters written into after zero and
# trim), the fast-zeroed 8C-10C and the zeroed 12C are hole,zero; the
# write at the end of the disk allocated the last cluster.
expect="0 524288 0
524288 131072 3
655360 131072 0
786432 65536 3
851968 196608 0
1048576 1048576 3
2097152 65536 3
2162688 983040 3
3145728 65536 0
3211264 917504 3
4128768 65536 0"
/usr/bin/python3 - "$expect" <<'EOF' || { cat map.txt; fail "unexpected extents"; }
import sys
# Merge adjacent extents of one type (their split is not significant).
def norm(lines):
    out = []
    for l in lines:
        if not l.strip():
            continue
        s, n, t = map(int, l.split())
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == s:
            out[-1][1] += n
        else:
            out.append([s, n, t])
    return out
got = norm(open('map.txt').read().splitlines())
want = norm(sys.argv[1].splitlines())
assert got == want, (got, want)
EOF
stop_nbdkit c1

# Cache (copy-on-read on): prefetches into the overlay, so a later read
# does not reach the backend.
start_nbdkit c3 --filter="$FILTER" --filter=log file base.raw \
  logfile="$tmp/backend3.log" qed-overlay=ov3.qed
nbdsh -u "$(uri c3)" -c "
h.cache(512*1024, 100*1024)
"
n1=$(grep -c ' Read ' backend3.log || true)
[ "$n1" -ge 1 ] || fail "cache did not read the backend"
nbdsh -u "$(uri c3)" -c "
base = open('base.raw', 'rb').read()
assert h.pread(400*1024, 128*1024) == base[128*1024:528*1024]
"
n2=$(grep -c ' Read ' backend3.log || true)
[ "$n2" = "$n1" ] || { cat backend3.log; fail "a read after cache reached the backend"; }
stop_nbdkit c3

# A backend without extents: unallocated ranges are reported as data.
start_nbdkit c4 --filter="$FILTER" --filter=noextents file base.raw
nbdsh -u "$(uri c4)" -c "h.zero(65536, 0)"
nbdinfo --map "$(uri c4)" | awk '{print $1, $2, $3}' > map4.txt
[ "$(cat map4.txt)" = "0 65536 3
65536 4128768 0" ] || { cat map4.txt; fail "extents without backend extents"; }
stop_nbdkit c4
[ "$(md5sum < base.raw)" = "$sum" ] || fail "base.raw was modified"
echo OK
