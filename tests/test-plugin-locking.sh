#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Image locking, against QEMU: the plugin (and the filter's overlay)
# must hold the same lock bytes as qemu-nbd in the same mode, so that
# QEMU's tools refuse an image we write and we refuse one QEMU writes;
# readers share with readers; a backing file is shared; locking=off
# turns it all off; a killed server leaves no lock behind.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires qemu-nbd --version

# lock_bytes FILE: the OFD lock ranges on FILE, as "type start-end ...",
# each range once: qemu-nbd sometimes still holds a second descriptor's
# copy of the same locks just after --fork returns, which changes nothing
# about what it refuses.
# /proc/locks is the whole machine's: a file is its device (major and
# minor in hex, as the kernel prints them) and inode, not the inode
# alone, which files of other file systems (tmpfs mounts of other
# tests) share.
lock_bytes () {
  local d id
  d=$((16#$(stat -c %D "$1")))
  id=$(printf '%02x:%02x:%s' $(( ((d >> 8) & 0xfff) | ((d >> 32) & ~0xfff) )) \
         $(( (d & 0xff) | ((d >> 12) & ~0xff) )) "$(stat -c %i "$1")")
  awk -v id="$id" '$2 == "OFDLCK" && $6 == id { print $4, $7 "-" $8 }' \
    /proc/locks | sort -u | sort -t' ' -k2n | tr '\n' ' '
}
# qemu_nbd_locks IMAGE [qemu-nbd args]: the lock bytes qemu-nbd holds.
# unlocked FILE: no process holds a lock byte of FILE.
unlocked () { [ -z "$(lock_bytes "$1")" ]; }
# stop_qemu_nbd FILE: stop the qemu-nbd of $tmp/q.pid, wait until it
# has exited and FILE's locks are gone (each failure said apart).  On a
# loaded machine qemu-nbd 7.2 sometimes ignores a SIGTERM that comes
# just after --fork returned (seen twice in ten runs beside four other
# test suites; its state is logged): SIGKILL then, which the test may
# do, since what it checks was read before.
stop_qemu_nbd () {
  local pid
  pid=$(cat "$tmp/q.pid")
  kill "$pid"
  if ! wait_until 30 _gone "$pid"; then
    echo "qemu-nbd $pid ignored SIGTERM for 30 s:" >&2
    grep -E '^(State|Sig|Shd)' "/proc/$pid/status" >&2 || true
    kill -9 "$pid" 2>/dev/null || true
    wait_until 120 _gone "$pid" || fail "qemu-nbd $pid did not exit"
  fi
  wait_until 120 unlocked "$1" ||
    fail "$1: still locked after qemu-nbd exited: [$(lock_bytes "$1")]"
}
qemu_nbd_locks () {
  local img=$1; shift
  qemu-nbd -t --fork --pid-file="$tmp/q.pid" -k "$tmp/q.sock" "$@" "$img"
  lock_bytes "$img"
  stop_qemu_nbd "$img"
}
expect_refused () {             # expect_refused WHAT PATTERN CMD...
  local what=$1 pat=$2 out; shift 2
  if out=$("$@" 2>&1); then fail "$what: succeeded while it should be refused"; fi
  grep -q "$pat" <<<"$out" || fail "$what: unexpected message: $out"
}

qemu-img create -q -f qed "$tmp/a.qed" 16M
qemu-io -f qed -c "write -P 0x5a 0 1M" "$tmp/a.qed" >/dev/null
sum=$(md5sum < "$tmp/a.qed")

# ---- 1. The same bytes as qemu-nbd, writable and read-only.
want_rw=$(qemu_nbd_locks "$tmp/a.qed" -f qed)
want_ro=$(qemu_nbd_locks "$tmp/a.qed" -f qed -r)
[ -n "$want_rw" ] && [ -n "$want_ro" ] || skip "no OFD locks on $tmp"
echo "qemu-nbd holds: writable [$want_rw], read-only [$want_ro]"

start_nbdkit rw "$PLUGIN" "$tmp/a.qed"
nbdinfo --size "$(uri rw)" >/dev/null     # the first connection opens it
got=$(lock_bytes "$tmp/a.qed")
[ "$got" = "$want_rw" ] || fail "writable: we hold [$got], qemu-nbd [$want_rw]"

# ---- 2. QEMU refuses it while we write it, as it would for qemu-nbd.
expect_refused "qemu-img info" 'Failed to get shared "write" lock' \
  qemu-img info "$tmp/a.qed"
expect_refused "qemu-io write" 'Failed to get "write" lock' \
  qemu-io -f qed -c "write 0 4k" "$tmp/a.qed"
expect_refused "qemu-nbd" 'Failed to get "write" lock' \
  qemu-nbd -t --fork -k "$tmp/q2.sock" -f qed "$tmp/a.qed"
qemu-img info -U "$tmp/a.qed" >/dev/null || fail "qemu-img info -U refused"
# A second nbdkit on the same image: refused at start-up.
expect_refused "second nbdkit" 'failed to get the shared "write" lock' \
  nbdkit -U "$tmp/x.sock" "$PLUGIN" "$tmp/a.qed" --run true
stop_nbdkit rw
[ -z "$(lock_bytes "$tmp/a.qed")" ] || fail "locks left after exit"
echo "ok: writable: same lock bytes as qemu-nbd, QEMU refuses"

# ---- 3. Locked from start-up (before any connection) as a reader.
start_nbdkit early "$PLUGIN" "$tmp/a.qed"
got=$(lock_bytes "$tmp/a.qed")
[ "$got" = "$want_ro" ] || fail "before the first connection: [$got], want [$want_ro]"
expect_refused "qemu-io write before the first connection" 'Failed to get "write" lock' \
  qemu-io -f qed -c "write 0 4k" "$tmp/a.qed"
qemu-img info "$tmp/a.qed" >/dev/null || fail "a reader refused before the first connection"
nbdinfo --size "$(uri early)" >/dev/null
[ "$(lock_bytes "$tmp/a.qed")" = "$want_rw" ] || fail "no writer locks after the first connection"
kill9_nbdkit early
[ -z "$(lock_bytes "$tmp/a.qed")" ] || fail "locks left after kill -9"
echo "ok: locked as a reader from start-up, as a writer from the first connection"

# ---- 4. Read-only (-r): readers share, writers are refused.
start_nbdkit ro -r "$PLUGIN" "$tmp/a.qed"
nbdinfo --size "$(uri ro)" >/dev/null
got=$(lock_bytes "$tmp/a.qed")
[ "$got" = "$want_ro" ] || fail "-r: we hold [$got], qemu-nbd -r [$want_ro]"
qemu-img info "$tmp/a.qed" >/dev/null || fail "-r: qemu-img info refused"
qemu-io -r -f qed -c "read -P 0x5a 0 1M" "$tmp/a.qed" >/dev/null ||
  fail "-r: qemu-io -r refused"
expect_refused "qemu-io write under -r" 'Failed to get "write" lock' \
  qemu-io -f qed -c "write 0 4k" "$tmp/a.qed"
stop_nbdkit ro
echo "ok: -r: same lock bytes as qemu-nbd -r"

# ---- 5. We refuse an image QEMU writes; we share one QEMU reads.
qemu-nbd -t --fork --pid-file="$tmp/q.pid" -k "$tmp/q.sock" -f qed "$tmp/a.qed"
cleanup_fn 'kill $(cat "$tmp/q.pid") 2>/dev/null'
expect_refused "nbdkit on an image qemu-nbd writes" \
  'failed to get the shared "write" lock: another process' \
  nbdkit -U "$tmp/x.sock" "$PLUGIN" "$tmp/a.qed" --run true
expect_refused "nbdkit -r on an image qemu-nbd writes" 'lock' \
  nbdkit -r -U "$tmp/x.sock" "$PLUGIN" "$tmp/a.qed" --run true
# locking=off: served anyway (the user's call).
run_nbdkit -r "$PLUGIN" "$tmp/a.qed" locking=off \
  --run 'nbdinfo --size "$uri"' >/dev/null || fail "locking=off refused"
stop_qemu_nbd "$tmp/a.qed"

qemu-nbd -r -t --fork --pid-file="$tmp/q.pid" -k "$tmp/q.sock" -f qed "$tmp/a.qed"
run_nbdkit -r "$PLUGIN" "$tmp/a.qed" --run 'nbdinfo --size "$uri"' >/dev/null ||
  fail "nbdkit -r refused next to qemu-nbd -r"
# Writable: start-up passes (it only reads), the first connection fails.
if out=$(run_nbdkit "$PLUGIN" "$tmp/a.qed" --run 'nbdinfo --size "$uri"' 2>&1); then
  fail "writable open next to qemu-nbd -r succeeded"
fi
grep -q 'failed to get the "write" lock' <<<"$out" ||
  fail "writable open next to qemu-nbd -r: unexpected message: $out"
stop_qemu_nbd "$tmp/a.qed"
[ "$(md5sum < "$tmp/a.qed")" = "$sum" ] || fail "refused opens modified the image"
echo "ok: QEMU's locks are honoured"

# ---- 6. locking=off holds nothing.
start_nbdkit off "$PLUGIN" "$tmp/a.qed" locking=off
nbdinfo --size "$(uri off)" >/dev/null
[ -z "$(lock_bytes "$tmp/a.qed")" ] || fail "locking=off holds locks"
qemu-img info "$tmp/a.qed" >/dev/null || fail "locking=off: qemu-img info refused"
stop_nbdkit off
echo "ok: locking=off"

# ---- 7. A backing file is shared, as QEMU shares it.
qemu-img create -q -f raw "$tmp/base.raw" 16M
qemu-img create -q -f qed -b base.raw -F raw "$tmp/o.qed" 16M
want_base=$(qemu-nbd -t --fork --pid-file="$tmp/q.pid" -k "$tmp/q.sock" \
              -f qed "$tmp/o.qed" && lock_bytes "$tmp/base.raw"
)
stop_qemu_nbd "$tmp/base.raw"
start_nbdkit ob "$PLUGIN" "$tmp/o.qed"
nbdinfo --size "$(uri ob)" >/dev/null
got=$(lock_bytes "$tmp/base.raw")
[ "$got" = "$want_base" ] || fail "backing file: we hold [$got], qemu-nbd [$want_base]"
qemu-io -f raw -c "write -P 0x11 0 4k" "$tmp/base.raw" >/dev/null ||
  fail "backing file: QEMU may not write it (qemu-nbd lets it)"
stop_nbdkit ob
echo "ok: backing file locks as qemu-nbd's [$want_base]"

# ---- 8. The filter's overlay is locked like a writable image.
qemu-img create -q -f raw "$tmp/plain.raw" 16M
start_nbdkit f --filter="$FILTER" file "$tmp/plain.raw" qed-overlay="$tmp/ov.qed"
nbdinfo --size "$(uri f)" >/dev/null
got=$(lock_bytes "$tmp/ov.qed")
[ "$got" = "$want_rw" ] || fail "filter overlay: we hold [$got], want [$want_rw]"
expect_refused "qemu-img info of a live overlay" 'Failed to get shared "write" lock' \
  qemu-img info "$tmp/ov.qed"
expect_refused "a second filter on the same overlay" 'lock' \
  nbdkit -U "$tmp/x.sock" --filter="$FILTER" file "$tmp/plain.raw" \
    qed-overlay="$tmp/ov.qed" --run true
stop_nbdkit f
run_nbdkit --filter="$FILTER" file "$tmp/plain.raw" qed-overlay="$tmp/ov.qed" \
  qed-locking=off --run 'nbdinfo --size "$uri" && qemu-img info "'"$tmp/ov.qed"'"' \
  >/dev/null || fail "qed-locking=off"
qemu_check "$tmp/ov.qed"
echo "ok: filter overlay"

# ---- 9. Bad values.
expect_refused "locking=maybe" "locking: expected on, off or auto" \
  nbdkit -U "$tmp/x.sock" "$PLUGIN" "$tmp/a.qed" locking=maybe --run true
echo PASS
