#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: read-ahead on copy-on-read misses (qed-readahead), measured
# with nbdkit's stats filter beneath the filter.
#  - sequential 64K reads cost a few large backend reads, not one per
#    cluster; with qed-readahead=0, one per cluster;
#  - random 4K reads fetch at most 1.25x the cluster-rounded bytes they
#    need;
#  - a write that lands while a read-ahead is in flight is kept;
#  - a read-ahead the backend refuses fails no client read and stores
#    nothing beyond what the client read;
#  - several requests in flight on one stream fetch each cluster once,
#    and get no read-ahead;
#  - the backend's extents are asked for once per 64M window, not at
#    every fill; zero ranges still become zero clusters;
#  - bad qed-readahead values are refused.
. "$(dirname "$0")/functions.sh"
requires nbdsh --version
requires qemu-img --version
cd "$tmp"
M=$((1024*1024))
head -c $((32*M)) /dev/urandom > base.raw
truncate -s $((256*M)) base.raw           # 224M of zeros after the data
sum=$(md5sum < base.raw)

# bytes STATSFILE: bytes read from the backend ("read: N ops, T s, X
# UNIT, ..." in the stats filter's output).
bytes () {
  # (No line breaks inside ?: : mawk, Debian 13's awk, refuses them.)
  awk '/^read:/ { v = $6; u = $7; sub(/,$/, "", u); m = -1;
         if (u == "bytes") m = 1; else if (u == "KiB") m = 1024;
         else if (u == "MiB") m = 1048576; else if (u == "GiB") m = 1073741824;
         printf "%d\n", v * m }' "$1"; }
ops () { awk '/^read:/ { print $2 }' "$1"; }


# serve NAME ARGS...: the filter over stats over the file plugin.
serve () {
  local name=$1; shift
  start_nbdkit "$name" --filter="$FILTER" --filter=stats "$@" \
    statsfile="$tmp/$name.stats" qed-overlay="$tmp/$name.qed"
}

# 1. Sequential 64K reads of the 32M of data, queue depth 1.
seq_read () {
  nbdsh -u "$(uri "$1")" -c "
import hashlib
want = open('base.raw', 'rb').read($((32*M)))
got = b''.join(h.pread(65536, o) for o in range(0, $((32*M)), 65536))
assert got == want, 'data differs'
"
}
serve seq file base.raw
seq_read seq
stop_nbdkit seq
serve seq0 file base.raw qed-readahead=0
seq_read seq0
stop_nbdkit seq0
echo "sequential: readahead $(ops seq.stats) ops $(bytes seq.stats) bytes;" \
     "qed-readahead=0: $(ops seq0.stats) ops $(bytes seq0.stats) bytes"
[ "$(ops seq0.stats)" = 512 ] || fail "qed-readahead=0 should read per cluster"
[ "$(ops seq.stats)" -le 20 ] || fail "read-ahead made $(ops seq.stats) reads"
# Never past the data read plus one window.
[ "$(bytes seq.stats)" -le $((40*M)) ] || fail "read-ahead over-fetched"
qemu_check seq.qed
# 512 fills, one extents request (the first 64M window).
eops=$(awk '/^extents:/ { print $2 }' seq0.stats)
echo "qed-readahead=0: $eops extents requests for 512 fills"
[ "$eops" = 1 ] || fail "the backend's extents were not cached"

# 2. Random 4K reads over 1G of data (the pattern plugin: each 8
# bytes hold their offset): at most 1.25x the clusters they touch.
serve rand pattern 1G
need=$(nbdsh -u "$(uri rand)" -c "
import random, struct
r = random.Random(7)
clusters = set()
for _ in range(2000):
    o = r.randrange(0, (1 << 30) // 4096) * 4096
    want = b''.join(struct.pack('>Q', o + i) for i in range(0, 4096, 8))
    assert h.pread(4096, o) == want, o
    clusters.add(o // 65536)
print(len(clusters) * 65536)
")
stop_nbdkit rand
got=$(bytes rand.stats)
echo "random 4K: needed $need cluster-rounded bytes, read $got"
[ "$got" -le $((need * 5 / 4)) ] || fail "random reads over-fetched ($got > 1.25 x $need)"
[ "$got" -ge "$need" ] || fail "stats: fewer bytes than needed?"

# 3. A write during a read-ahead in flight wins: the backend takes 1s
# per read.  Reads at 0 and 64K start a run (the second fetches
# 64K-256K); a read at 256K continues it and fetches 256K-576K, and a
# second connection writes 320K-384K while that fetch is in flight.
# The log filter beneath the QED filter logs each plugin read as it
# starts (before the delay): the write waits for the fetch to be
# logged, and the last read must log no plugin read at all.
start_nbdkit race --filter="$FILTER" --filter=log --filter=delay file \
  base.raw rdelay=1 logfile="$tmp/race.log" qed-overlay="$tmp/race.qed"
nbdsh -u "$(uri race)" -c "
import threading, time, nbd
K = 1024
want = open('base.raw', 'rb').read($((4*M)))
def plugin_reads(offset=None):
    return [l for l in open('$tmp/race.log')
            if ' Read id=' in l and
            (offset is None or ' offset=%#x ' % offset in l)]
for o in (0, 64*K, 192*K):
    assert h.pread(64*K, o) == want[o:o+64*K]
h2 = nbd.NBD(); h2.connect_uri('$(uri race)')
done = []
def reader():
    t = time.monotonic()
    done.append(h.pread(64*K, 256*K) == want[256*K:320*K])
    done.append(time.monotonic() - t)
t = threading.Thread(target=reader); t.start()
for _ in range(12000):                  # the fetch is in flight
    if plugin_reads(256*K):
        break
    time.sleep(0.01)
else:
    raise SystemExit('FAIL: no plugin read at 256K')
h2.pwrite(b'W' * 64*K, 320*K)
t.join()
assert done[0] is True and done[1] > 0.9, done
assert h.pread(64*K, 320*K) == b'W' * 64*K, 'the read-ahead lost a write'
n = len(plugin_reads())
print('plugin reads so far:', n)
assert h.pread(192*K, 384*K) == want[384*K:576*K]
assert len(plugin_reads()) == n, 'the read-ahead was not stored'
h2.shutdown()
"
stop_nbdkit race
qemu_check race.qed

# 4. The backend refuses reads over 1M: the read-ahead that grows past
# that fails, the client's reads do not, and the failed fetch stores
# nothing (the overlay ends where the client stopped reading).
start_nbdkit refuse --filter="$FILTER" --filter=blocksize-policy file base.raw \
  blocksize-maximum=1M blocksize-error-policy=error qed-overlay="$tmp/refuse.qed"
nbdsh -u "$(uri refuse)" -c "
want = open('base.raw', 'rb').read($((4*M)))
# 64K reads up to 1216K: the miss at 1152K plans [1152K, 2240K) (> 1M).
for o in range(0, 1216 * 1024, 65536):
    assert h.pread(65536, o) == want[o:o+65536], o
"
stop_nbdkit refuse
grep -q "read-ahead of .* failed" "$tmp/refuse.log" ||
  fail "the read-ahead did not fail as planned"
qemu-img map --output=json refuse.qed > refuse.map
/usr/bin/python3 - refuse.map $((1216*1024)) <<'PY'
import json, sys
end = max((e['start'] + e['length'] for e in json.load(open(sys.argv[1]))
           if e['data']), default=0)
assert end == int(sys.argv[2]), ('overlay data ends at', end)
PY
qemu_check refuse.qed

# 5. nbdcopy (several requests in flight): every byte once.
serve copy file base.raw
nbdcopy "$(uri copy)" copy.raw
stop_nbdkit copy
cmp -s copy.raw base.raw || fail "nbdcopy through the filter: data differs"
echo "nbdcopy: $(ops copy.stats) ops $(bytes copy.stats) bytes"
# The 224M of zeros are extents, not reads.
[ "$(bytes copy.stats)" -le $((33*M)) ] || fail "nbdcopy fetched data twice"
# nbdcopy keeps many reads in flight: they get no read-ahead (it would
# make them wait for one large fetch in turn).  Its first few reads may
# come one at a time (libnbd 1.22's nbdcopy: 4 of 112); read ahead on
# every miss would be about 100.
seqn=$(sed -n 's/.*read-ahead: [0-9]* misses, \([0-9]*\) sequential.*/\1/p' copy.log)
echo "nbdcopy: $seqn misses read ahead"
[ -n "$seqn" ] && [ "$seqn" -le 8 ] || fail "nbdcopy's reads were read ahead"
qemu-img map --output=json copy.qed | grep -q '"zero": true, "data": false' ||
  fail "zero extents did not become zero clusters"
qemu_check copy.qed

# 6. Bad values are refused with a message naming the parameter.
for v in 64M abc -1; do
  if nbdkit -U - --filter="$FILTER" file base.raw qed-readahead=$v \
       --run true 2>bad.err; then
    fail "qed-readahead=$v was accepted"
  fi
  grep -q "qed-readahead" bad.err || { cat bad.err; fail "no message for $v"; }
done

[ "$(md5sum < base.raw)" = "$sum" ] || fail "the backend file was modified"
echo OK
