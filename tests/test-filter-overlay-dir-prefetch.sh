#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: qed-prefetch=true with qed-overlay-dir and no shared cache
# warms each open per-export overlay, through its own plugin context:
# with two exports open, each overlay ends complete (every cluster
# allocated, qemu-img check clean, equal to the disk) and the plugin
# reads at most 1.05x the data per overlay (nbdkit's log filter).
# Events are waited for (the "done" lines), never times.
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
cd "$tmp"

M=$((1024*1024))
# 24M: 16M data, a 4M hole, 4M data.
head -c $((16*M)) /dev/urandom > base.raw
truncate -s $((20*M)) base.raw
head -c $((4*M)) /dev/urandom >> base.raw
DATA=$((20*M))
mkdir ov

log_read_bytes () {
  /usr/bin/python3 -c '
import re, sys
n = 0
for line in open(sys.argv[1]):
    m = re.search(r" Read id=\d+ offset=\S+ count=(0x[0-9a-f]+|\d+)", line)
    if m:
        n += int(m.group(1), 0)
print(n)' "$1"; }

start_nbdkit s --log=stderr --filter="$FILTER" --filter=log file base.raw \
  logfile=reads.log qed-overlay-dir=ov qed-backing-name="$tmp/base.raw" \
  qed-prefetch=true
u () { echo "nbd+unix:///$1?socket=$tmp/s.sock"; }
# Both exports open until both overlays are warm.
nbdsh -u "$(u a)" -c "
import os, time
h2 = nbd.NBD()
h2.connect_uri('$(u b)')
h.pread(4096, 0)
h2.pread(4096, 5*$M)
open('open', 'w').close()
while not os.path.exists('release'):
    time.sleep(0.1)
" &
client=$!
until [ -e open ]; do sleep 0.1; done
pid=$(cat s.pid)
until [ "$(grep -c 'qed-prefetch: done' s.log)" -ge 2 ]; do
  kill -0 "$pid" || { cat s.log; fail "nbdkit exited"; }
  kill -0 "$client" || { cat s.log; fail "the client exited"; }
  sleep 0.1
done
touch release
wait "$client" || fail "the client failed"
stop_nbdkit s
grep -q "qed-prefetch: started: warming $tmp/ov/a.qed" s.log ||
  { cat s.log; fail "ov/a.qed was not warmed"; }
grep -q "qed-prefetch: started: warming $tmp/ov/b.qed" s.log ||
  { cat s.log; fail "ov/b.qed was not warmed"; }

n=$(log_read_bytes reads.log)
echo "plugin bytes read: $n for 2 x $DATA"
[ "$n" -le $((2 * DATA * 105 / 100)) ] ||
  fail "plugin bytes read $n > 1.05 x $DATA per overlay"
for e in a b; do
  qemu_check ov/$e.qed
  qemu-img compare -f qed -F raw ov/$e.qed base.raw ||
    fail "ov/$e.qed differs from the disk"
  # Every cluster is in the overlay (the hole as zero clusters).
  if qemu-img map --output=json ov/$e.qed | grep -q '"depth": 1'; then
    qemu-img map --output=json ov/$e.qed
    fail "ov/$e.qed is not complete"
  fi
done
echo PASS
