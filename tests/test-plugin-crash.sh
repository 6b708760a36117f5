#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# NEED_CHECK and crashes: after writes and a kill -9 of the server the
# file has NEED_CHECK set and is consistent for QEMU (no corruption,
# at most leaks); a -r restart serves the flushed data and leaves the
# file byte-identical; a writable restart repairs it (NEED_CHECK clear
# after a clean stop, qemu-img check exit 0, flushed data intact).  A
# crash in the middle of a stream of writes and flushes loses nothing
# that was flushed.  With idle-clean=1 the running server clears
# NEED_CHECK after a few idle seconds, leaving a clean file on disk.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'

K=1024 M=$((1024 * 1024))

# qemu_consistent FILE: qemu-img check finds no corruption (0, or 3 =
# leaks only, which a crash may leave).
qemu_consistent () {
  local rc=0
  qemu-img check "$1" >"$tmp/check.out" 2>&1 || rc=$?
  [ $rc = 0 ] || [ $rc = 3 ] || { cat "$tmp/check.out"; fail "qemu-img check $1: rc $rc"; }
}

# ---- 1. Write, flush, write more, crash.
img=$tmp/c.qed
qemu-img create -q -f qed "$img" 16M
[ "$(need_check "$img")" = 0 ] || fail "new image has NEED_CHECK"
start_nbdkit c "$PLUGIN" "$img" idle-clean=0
/usr/bin/python3 - "$(uri c)" <<'EOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
K, M = 1024, 1 << 20
h.pwrite(b"\x11" * M, 0)
h.pwrite(b"\x12" * 5000, 3 * M + 100)
h.trim(128 * K, 256 * K)                       # freed cluster (a leak if lost)
h.flush()
h.pwrite(b"\x13" * (2 * M), 8 * M)              # not flushed
h.pwrite(b"\x14" * 100, 50)                     # in place, not flushed
EOF
[ "$(need_check "$img")" = 1 ] || fail "NEED_CHECK not set while writing"
kill9_nbdkit c
[ "$(need_check "$img")" = 1 ] || fail "NEED_CHECK not set after the crash"
qemu_consistent "$img"
cat "$tmp/check.out"

# The flushed data, as a -r restart must serve it (bytes 50..150 may
# hold either the old or the new data: that write was not flushed).
cat > "$tmp/flushed.py" <<'EOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
K, M = 1024, 1 << 20
d = h.pread(M, 0)
assert d[50:150] in (b"\x11" * 100, b"\x14" * 100), "bytes 50..150"
assert d[:50] + d[150:256*K] + d[384*K:] == b"\x11" * (M - 128*K - 100), "first 1M"
assert d[256*K:384*K] == bytes(128 * K), "trimmed range"
assert h.pread(5000, 3 * M + 100) == b"\x12" * 5000
assert h.pread(100, 3 * M) == bytes(100)
EOF
sum=$(md5sum < "$img")
start_nbdkit c -r "$PLUGIN" "$img"
/usr/bin/python3 "$tmp/flushed.py" "$(uri c)" || fail "-r: flushed data"
stop_nbdkit c
[ "$(md5sum < "$img")" = "$sum" ] || fail "-r restart modified the file"
[ "$(need_check "$img")" = 1 ] || fail "-r restart cleared NEED_CHECK"

# A writable restart repairs at open.
start_nbdkit c "$PLUGIN" "$img" idle-clean=0
/usr/bin/python3 "$tmp/flushed.py" "$(uri c)" || fail "rw: flushed data"
stop_nbdkit c
[ "$(need_check "$img")" = 0 ] || fail "NEED_CHECK still set after repair"
qemu_check "$img"
out=$(qemu-io -r -f qed -c "read -P 0x11 256 128k" -c "read -P 0x12 $((3*M+100)) 5000" \
  "$img") || fail "QEMU reads: $out"
echo "ok: crash, -r restart, repair"

# ---- 2. Crash in the middle of a stream of writes: every round that
# was acknowledged as flushed is intact after the repair.
img=$tmp/s.qed
qemu-img create -q -f qed -o cluster_size=4k,table_size=2 "$img" 64M
start_nbdkit s "$PLUGIN" "$img" idle-clean=0
/usr/bin/python3 - "$(uri s)" "$tmp/acked" <<'EOF' &
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
K = 1024
try:
    for r in range(1, 10000):
        # Round r: its own 40K region (unaligned, across clusters and
        # L2 tables), several requests, then a flush.
        base = (r * 6151 * K) % (60 << 20) // 4096 * 4096 + 1000
        for i in range(4):
            h.pwrite(bytes([r % 251 + 1]) * 10 * K, base + i * 10 * K)
        h.flush()
        open(sys.argv[2], "a").write("%d\n" % r)
except Exception:
    pass
EOF
writer=$!
# At least 400 rounds: the file then holds more than cluster_size-1
# clusters, where qemu-img check counts phantom leaks (how many rounds
# ran before the crash used to depend on the machine's load).
for _ in $(seq 1 1200); do [ -s "$tmp/acked" ] && [ $(wc -l < "$tmp/acked") -ge 400 ] && break; sleep 0.05; done
kill9_nbdkit s
wait $writer || true
acked=$(tail -n1 "$tmp/acked")
[ "$acked" -ge 400 ] || fail "too few rounds before the crash ($acked)"
[ "$(need_check "$img")" = 1 ] || fail "stream: NEED_CHECK not set"
qemu_consistent "$img"
start_nbdkit s "$PLUGIN" "$img" idle-clean=0
/usr/bin/python3 - "$(uri s)" "$acked" <<'EOF' || fail "stream: flushed rounds lost"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
K = 1024
acked = int(sys.argv[2])
def region(r):
    return (r * 6151 * K) % (60 << 20) // 4096 * 4096 + 1000
# A byte of an acknowledged round holds that round's value, or the value
# of a later round (acknowledged or in flight) whose region overlaps.
for r in range(1, acked + 1):
    base = region(r)
    ok = {q % 251 + 1 for q in range(r, acked + 3)
          if q == r or abs(region(q) - base) < 40 * K}
    data = h.pread(40 * K, base)
    assert set(data) <= ok, "round %d: found %s" % (r, set(data) - ok)
print("checked", acked, "acknowledged rounds")
EOF
stop_nbdkit s
[ "$(need_check "$img")" = 0 ] || fail "stream: NEED_CHECK after repair"
[ $(stat -c %s "$img") -ge $((4095 * 4096)) ] || fail "stream: file too small"
qemu_check_phantom "$img"
echo "ok: crash during a write stream ($acked rounds acknowledged)"

# ---- 3. The idle timer clears NEED_CHECK in a running server.  With
# idle-clean=3 the flag is surely still set just after the writes (with
# idle-clean=1 the timer may already have run by then).
for idle in 3 1; do
  img=$tmp/i$idle.qed
  qemu-img create -q -f qed "$img" 8M
  start_nbdkit i "$PLUGIN" "$img" idle-clean=$idle
  /usr/bin/python3 - "$(uri i)" <<'EOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\x21" * 300000, 12345)
h.pwrite(b"\x22" * 4096, 5 << 20)
h.shutdown()
EOF
  if [ $idle = 3 ]; then
    [ "$(need_check "$img")" = 1 ] || fail "idle: NEED_CHECK not set after writes"
  fi
  clean () { [ "$(need_check "$img")" = 0 ]; }
  wait_until 120 clean || fail "idle-clean=$idle: NEED_CHECK still set after 120 s"
  _alive "$(cat "$tmp/i.pid")" || fail "idle: the server is gone"
  # The file on disk is clean and complete while the server still runs:
  # QEMU can read it, and a crash now loses nothing.
  qemu-img check -U "$img" || fail "idle: qemu-img check of the live file"
  out=$(qemu-io -r -U -f qed -c "read -P 0x21 12345 300000" -c "read -P 0x22 5M 4k" \
    "$img") || fail "idle: QEMU reads: $out"
  kill9_nbdkit i
  [ "$(need_check "$img")" = 0 ] || fail "idle: NEED_CHECK set by nothing"
  qemu_check "$img"
  echo "ok: idle-clean=$idle"
done
echo PASS
