#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: copy-on-read stores whole clusters in the overlay, so the data
# read once survives a change of the backend; backend zero extents
# become zero clusters; the second read never reaches the backend; and
# with qed-copy-on-read=false reads allocate nothing.
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
cd "$tmp"

K=1024; M=$((1024*1024))
# 4M base: random data, with a 1M hole (sparse) at 2M.
head -c $((2*M)) /dev/urandom > base.raw
truncate -s $((3*M)) base.raw
head -c $((1*M)) /dev/urandom >> base.raw
cp base.raw first.raw

# Run 1: read an aligned range, an unaligned range, the hole and the
# last bytes.  The log filter beneath shows what reached the plugin.
start_nbdkit f1 --filter="$FILTER" --filter=log file base.raw \
  logfile="$tmp/backend1.log" qed-overlay=ov.qed qed-backing-name=base.raw
nbdsh -u "$(uri f1)" -c "
base = open('first.raw', 'rb').read()
for (off, n) in [(64*1024, 128*1024), ($M + 100, 5000), (2*$M + 4096, 8192),
                 (4*$M - 10, 10)]:
    assert h.pread(n, off) == base[off:off+n], off
    # The second read is served from the overlay.
    assert h.pread(n, off) == base[off:off+n], off
"
stop_nbdkit f1

# Each range reached the plugin once, widened to whole clusters: reads
# of 64K (the unaligned one widened), none of the hole (zero extent).
reads=$(grep -c ' Read ' backend1.log || true)
[ "$reads" = 3 ] || { cat backend1.log; fail "expected 3 plugin reads, got $reads"; }
grep -q 'Read id=[0-9]* offset=0x100000 count=0x10000 ' backend1.log ||
  { cat backend1.log; fail "the unaligned read was not widened to its cluster"; }
grep -q 'Read id=[0-9]* offset=0x200000 ' backend1.log &&
  fail "the backend's hole was read instead of recorded as zero"

# (b) qemu-img sees the clusters read as allocated in the overlay (data,
# or zero for the hole) and the rest as coming from base.raw.
qemu_check ov.qed
qemu-img map --output=json ov.qed > map.json
/usr/bin/python3 - <<EOF
import json
m = json.load(open('map.json'))
def at(off):
    for e in m:
        if e['start'] <= off < e['start'] + e['length']:
            return e
    raise Exception('no map entry at %d' % off)
K, M = 1024, 1024*1024
for off in [64*K, 128*K, M, 4*M - 64*K]:
    e = at(off)
    assert e['depth'] == 0 and e['data'], (off, e)
e = at(2*M)
assert e['depth'] == 0 and e['zero'] and not e['data'], e
for off in [0, 192*K, M + 64*K, 3*M]:
    assert at(off)['depth'] == 1, (off, at(off))
EOF

# (a) Change the backend completely (the origin guard refuses that by
# default, test-filter-origin.sh; qed-origin-changed=keep serves it):
# what was read before still reads as the first run's bytes (whole
# clusters), the rest as the new data.
head -c $((4*M)) /dev/urandom > base.raw
cp base.raw second.raw
start_nbdkit f2 --filter="$FILTER" file base.raw qed-overlay=ov.qed \
  qed-backing-name=base.raw qed-origin-changed=keep
nbdsh -u "$(uri f2)" -c "
first = open('first.raw', 'rb').read()
second = open('second.raw', 'rb').read()
def same(off, n, src):
    assert h.pread(n, off) == src[off:off+n], (off, n)
same(64*1024, 128*1024, first)
same($M, 64*1024, first)            # the whole cluster of the unaligned read
same(2*$M, 64*1024, first)          # the hole, now a zero cluster
assert h.pread(4096, 2*$M) == bytes(4096)
same(4*$M - 64*1024, 64*1024, first)
same(0, 64*1024, second)            # never read: the plugin's new data
same(192*1024, 4096, second)
same(3*$M, 64*1024, second)
"
stop_nbdkit f2
cmp -s base.raw second.raw || fail "the backend file was modified"

# (c) qed-copy-on-read=false: reading everything allocates nothing.
cp first.raw base.raw
start_nbdkit f3 --filter="$FILTER" file base.raw qed-overlay=ov2.qed \
  qed-copy-on-read=false
nbdinfo --size "$(uri f3)" >/dev/null     # the overlay is created now
size0=$(stat -c %s ov2.qed)
nbdsh -u "$(uri f3)" -c "
base = open('first.raw', 'rb').read()
for off in range(0, 4*$M, $M):
    assert h.pread($M, off) == base[off:off+$M]
"
stop_nbdkit f3
[ "$(stat -c %s ov2.qed)" = "$size0" ] ||
  fail "qed-copy-on-read=false: the overlay grew from $size0 to $(stat -c %s ov2.qed)"
qemu-img map --output=json ov2.qed > map2.json
/usr/bin/python3 -c "
import json
m = json.load(open('map2.json'))
assert all(not e['data'] and not e['present'] for e in m), m
"
echo OK
