#!/usr/bin/env bash
# Resource bounds: a 16 TiB sparse image touched in every one of its
# 8192 L2 tables keeps the server's memory bounded by l2-cache (dirty
# table pages are written back when they fill half the cache), and
# file descriptors do not leak across many connections.
source "$(dirname "$0")/functions.sh"

img=$tmp/big.qed
qemu-img create -f qed "$img" 16T >/dev/null
start_nbdkit big "$PLUGIN" "$img" l2-cache=8M
pid=$(cat "$tmp/big.pid")

# One 4K write in each 2 GiB region (a new L2 table each), then reads
# of all of them in a different order, then a flush.
nbdsh -u "$(uri big)" -c '
import random
n = 8192
for i in range(n):
    h.pwrite(i.to_bytes(4, "little") * 1024, i << 31)
order = list(range(n))
random.seed(7)
random.shuffle(order)
for i in order:
    assert h.pread(4096, (i << 31)) == i.to_bytes(4, "little") * 1024, i
    assert h.pread(4096, (i << 31) + 65536) == bytes(4096)
h.flush()
'
hwm_kb=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
echo "peak RSS: $hwm_kb KiB with l2-cache=8M"
# nbdkit itself (~4M), 8M of cache, the L1 (256K) and the copies of up
# to half the cache taken by writeback: under 24 MiB.
[ "$hwm_kb" -lt $((24 * 1024)) ] || fail "peak RSS $hwm_kb KiB is too high"

# 200 connections, some of them writing: no descriptor may leak.  (The
# image is opened by the first connection, so count from here.)
fds_before=$(ls /proc/$pid/fd | wc -l)
for i in $(seq 200); do
  nbdsh -u "$(uri big)" -c "h.pwrite(b'x' * 512, $i * 4096)" 2>/dev/null ||
    fail "connection $i failed"
done
fds_after=$(ls /proc/$pid/fd | wc -l)
echo "fds: $fds_before before, $fds_after after 200 connections"
[ "$fds_after" -le "$fds_before" ] || fail "file descriptors leaked"

stop_nbdkit big
[ "$(need_check "$img")" = 0 ] || fail "NEED_CHECK still set"
qemu_check "$img"
