#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
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
echo "ok: 16 TiB image, bounded memory and descriptors"

# A valid image of the largest geometry (64M clusters, table size 16)
# has a 1 GiB L1 table; a 1 TiB disk reaches its first 64 bytes.  Only
# that head is kept in memory (the rest is zero on disk), so serving
# such a file (a small sparse one, possibly hostile) costs no 1 GiB.
# QEMU cannot open this geometry (its size limit overflows), so the
# oracle here is the content.
g=$tmp/geo.qed
/usr/bin/python3 - "$g" <<'PY'
import struct, sys
cs, ts = 64 << 20, 16
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<4sIIIQQQQQII", b"QED\0", cs, ts, 1, 0, 0, 0,
                        cs, 1 << 40, 0, 0))
    f.truncate(cs + ts * cs)          # header cluster + the L1, sparse
PY
start_nbdkit geo "$PLUGIN" "$g"
pid=$(cat "$tmp/geo.pid")
nbdsh -u "$(uri geo)" -c '
h.pwrite(b"\x5a" * 65536, 100 << 30)
h.pwrite(b"\xa5" * 4096, (1 << 40) - 4096)
assert h.pread(65536, 100 << 30) == b"\x5a" * 65536
assert h.pread(4096, (1 << 40) - 4096) == b"\xa5" * 4096
assert h.pread(4096, 5 << 30) == bytes(4096)
h.flush()
'
hwm_kb=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
echo "peak RSS: $hwm_kb KiB serving a 64M-cluster, table-size-16 image"
[ "$hwm_kb" -lt $((64 * 1024)) ] || fail "peak RSS $hwm_kb KiB: the whole L1 is resident"
stop_nbdkit geo
run_nbdkit -r "$PLUGIN" "$g" --run 'nbdsh -u "$uri" -c "
assert h.pread(65536, 100 << 30) == b\"\x5a\" * 65536
assert h.pread(4096, (1 << 40) - 4096) == b\"\xa5\" * 4096
"' || fail "64M/16 image: data not there after a restart"
echo "ok: only the reachable head of a 1 GiB L1 is resident"

# An L1 entry past the disk's reach (QEMU never makes one, a hostile or
# foreign file may) is never loaded or followed: -r leaves the file as
# it is; a writable open clears the entry (with NEED_CHECK set, so the
# check reclaims the table and data it pointed at), and the image then
# checks clean in QEMU's eyes too.
f=$tmp/far.qed
qemu-img create -q -f qed -o cluster_size=64k,table_size=4 "$f" 1M
qemu-io -f qed -c "write -P 0x11 0 64k" "$f" >/dev/null
/usr/bin/python3 - "$f" <<'PY'
import os, struct, sys
cs, ts = 65536, 4
with open(sys.argv[1], "r+b") as f:
    end = os.fstat(f.fileno()).st_size
    l2, data = end, end + ts * cs
    f.truncate(data + cs)
    f.seek(l2); f.write(struct.pack("<Q", data))
    f.seek(data); f.write(b"\x77" * cs)
    f.seek(cs + 1000 * 8); f.write(struct.pack("<Q", l2))   # L1 at cluster 1
    f.seek(16); f.write(struct.pack("<Q", 2))     # NEED_CHECK: check at open
PY
before=$(qemu-img check --output=json "$f" | /usr/bin/python3 -c \
  'import json,sys; j=json.load(sys.stdin); print(j.get("leaks",0), j.get("corruptions",0), j["allocated-clusters"])')
sum0=$(od -An -tx8 -j $((65536 + 8000)) -N8 "$f")
md0=$(md5sum < "$f")
run_nbdkit -r "$PLUGIN" "$f" --run 'nbdsh -u "$uri" -c "h.pread(65536, 0)"' ||
  fail "far L1 entry: serving read-only failed"
[ "$(md5sum < "$f")" = "$md0" ] || fail "far L1 entry: -r changed the file"
run_nbdkit "$PLUGIN" "$f" --run 'nbdsh -u "$uri" -c "h.pwrite(b\"\x22\" * 4096, 65536)"' ||
  fail "far L1 entry: serving failed"
after=$( (qemu-img check --output=json "$f" || true) | /usr/bin/python3 -c \
  'import json,sys; j=json.load(sys.stdin); print(j.get("leaks",0), j.get("corruptions",0), j["allocated-clusters"])')
sum1=$(od -An -tx8 -j $((65536 + 8000)) -N8 "$f")
[ "$sum1" = " 0000000000000000" ] || fail "far L1 entry not cleared: $sum0 -> $sum1"
[ "$before" = "0 0 2" ] || fail "far L1 entry: qemu-img check before: $before"
[ "$after" = "0 0 2" ] || fail "far L1 entry: qemu-img check after a write: $after"
qemu_check "$f"
[ "$(need_check "$f")" = 0 ] || fail "far L1 entry: NEED_CHECK left set"
echo "ok: an L1 entry past the disk is ignored (-r) and cleared (writable)"
