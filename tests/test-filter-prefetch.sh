#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: qed-prefetch=true warms the overlay in the background, through
# its own plugin context: every cluster once (origin bytes read <= 1.05x
# the data extents, nothing read in holes, over nbdkit's stats and log
# filters), resuming after SIGKILL without fetching clusters again
# beyond the flush window, never over a guest's write, and over the
# curl plugin against a local HTTP server.  Events are waited for (the
# "done" line), never times.
# test-timeout: 400
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
cd "$tmp"

M=$((1024*1024))
# 104M: 64M data, a 24M hole, 16M data.
head -c $((64*M)) /dev/urandom > base.raw
truncate -s $((88*M)) base.raw
head -c $((16*M)) /dev/urandom >> base.raw
DATA=$((80*M))
HOLE_START=$((64*M)) HOLE_END=$((88*M))

# log_read_bytes FILE: bytes of the Read requests in a log filter file.
log_read_bytes () {
  /usr/bin/python3 -c '
import re, sys
n = 0
for line in open(sys.argv[1]):
    m = re.search(r" Read id=\d+ offset=\S+ count=(0x[0-9a-f]+|\d+)", line)
    if m:
        n += int(m.group(1), 0)
print(n)' "$1"; }

# 1. Stats: each data byte once, no byte of the hole.
start_nbdkit a --log=stderr --filter="$FILTER" --filter=stats --filter=log \
  file base.raw statsfile=stats.txt logfile=a.reads \
  qed-overlay=ov.qed qed-backing-name=base.raw qed-prefetch=true
nbdinfo --size "$(uri a)" >/dev/null          # the first connection
wait_log a "qed-prefetch: done: $DATA bytes fetched, $((24*M)) bytes found as holes"
stop_nbdkit a
read_bytes=$(awk '/^read:/ { print $0 }' stats.txt)
echo "stats: $read_bytes"
n=$(log_read_bytes a.reads)
[ "$n" -le $((DATA * 105 / 100)) ] || fail "origin bytes read $n > 1.05 x $DATA"
/usr/bin/python3 - a.reads $HOLE_START $HOLE_END <<'EOF'
import re, sys
lo, hi = int(sys.argv[2]), int(sys.argv[3])
for line in open(sys.argv[1]):
    if " Read " not in line:
        continue
    off = int(re.search(r"offset=(0x[0-9a-f]+|\d+)", line).group(1), 0)
    n = int(re.search(r"count=(0x[0-9a-f]+|\d+)", line).group(1), 0)
    assert off + n <= lo or off >= hi, "read in the hole: " + line
EOF
grep -q "^read: .* 80.00 MiB" stats.txt || fail "stats: not 80 MiB read: $read_bytes"
qemu_check ov.qed
qemu-img compare -f qed -F raw ov.qed base.raw
# Every cluster is in the overlay (the hole as zero clusters).
qemu-img map --output=json ov.qed | grep -q '"depth": 1' &&
  fail "the overlay lacks clusters after prefetch"

# 2. SIGKILL after the first flush (at 32M), then a restart: nothing
# fetched twice beyond the flush window (32M) and the chunk in flight
# (2M).  The old filter had
# no prefetch at all: the "done" line never comes (and qed-prefetch is
# an unknown parameter).
rm -f ov.qed
start_nbdkit b --log=stderr --filter="$FILTER" --filter=log --filter=delay \
  file base.raw logfile=b.reads rdelay=100ms \
  qed-overlay=ov.qed qed-backing-name=base.raw qed-prefetch=true
nbdinfo --size "$(uri b)" >/dev/null
until [ "$(grep -c '\.\.\.Read .*return=0' b.reads 2>/dev/null)" -ge 24 ]; do
  sleep 0.1
done
kill9_nbdkit b
first=$(log_read_bytes b.reads)
echo "before the kill: $first bytes"
[ "$first" -lt $DATA ] || fail "the prefetch finished before the kill"
start_nbdkit c --log=stderr --filter="$FILTER" --filter=log \
  file base.raw logfile=c.reads \
  qed-overlay=ov.qed qed-backing-name=base.raw qed-prefetch=true
nbdinfo --size "$(uri c)" >/dev/null
wait_log c "qed-prefetch: done"
stop_nbdkit c
second=$(log_read_bytes c.reads)
echo "after the restart: $second bytes"
# (The restart's origin guard also reads its sample again: at most 64
# clusters of 64K.)
[ $((first + second)) -le $((DATA + 34*M + 4*M)) ] ||
  fail "fetched $((first + second)) bytes for $DATA of data"
qemu_check ov.qed
qemu-img compare -f qed -F raw ov.qed base.raw

# 3. Guest writes racing the prefetch always win: write every 3rd
# cluster (whole and partial) while a slow prefetch runs.
rm -f ov.qed
start_nbdkit d --log=stderr --filter="$FILTER" --filter=delay \
  file base.raw rdelay=20ms \
  qed-overlay=ov.qed qed-backing-name=base.raw qed-prefetch=true
nbdsh -u "$(uri d)" -c "
import os
model = bytearray(open('base.raw', 'rb').read())
C = 65536
for c in range(0, len(model) // C, 3):
    off = c * C + (0 if c % 2 else 1000)
    n = C if c % 2 else 3000
    buf = os.urandom(n)
    h.pwrite(buf, off)
    model[off:off+n] = buf
h.flush()
open('model.raw', 'wb').write(model)
"
wait_log d "qed-prefetch: done"
nbdcopy "$(uri d)" d.raw
cmp d.raw model.raw || fail "the prefetch stored over a guest write"
stop_nbdkit d
qemu_check ov.qed

# 4. Over curl against a local HTTP server (no extents: all read once,
# zero clusters by detection).
mkdir www
cp base.raw www/disk.img
start_nginx "$tmp/www"
rm -f ov.qed
start_nbdkit e --log=stderr --filter="$FILTER" curl "$NGINX_URL/disk.img" \
  qed-overlay=ov.qed qed-backing-name=base.raw qed-prefetch=true
nbdinfo --size "$(uri e)" >/dev/null
wait_log e "qed-prefetch: done"
got=$(http_body_bytes)
[ "$got" -le $((104*M * 105 / 100)) ] || fail "curl: $got bytes over HTTP for 104M"
nbdcopy "$(uri e)" e.raw
cmp e.raw base.raw || fail "curl: different data"
[ "$(http_body_bytes)" = "$got" ] || fail "curl: reading a warm overlay reached the origin"
stop_nbdkit e
qemu_check ov.qed
echo OK
