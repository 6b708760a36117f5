#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The filter's overlay is ours or it is refused, as root in a directory
# the user nobody can write: a symlink nobody planted (to root's own
# image) or one in a world-writable directory is not followed, an
# overlay nobody owns or others can write is refused, and the target is
# untouched; new overlays (persistent and temporary) are 0600 whatever
# the umask; the temporary overlay's directory exists only while a
# client needs it.  Also: locking=off and a file system without OFD
# locks each log one warning line.
source "$(dirname "$0")/functions.sh"
[ "$(id -u)" = 0 ] || skip "must run as root (the attacks need an owner)"
id nobody >/dev/null 2>&1 || skip "requires the user nobody"

chmod 755 "$tmp"
qemu-img create -q -f raw "$tmp/src.raw" 1M
qemu-io -f raw -c "write -P 0x11 0 1M" "$tmp/src.raw" >/dev/null
# root's private image, an overlay of a disk the size of src.raw.
qemu-img create -q -f qed "$tmp/private.qed" 1M
qemu-io -f qed -c "write -P 0x77 0 64k" "$tmp/private.qed" >/dev/null
chmod 600 "$tmp/private.qed"
sum=$(md5sum < "$tmp/private.qed")

# refused NAME PATTERN ARGS...: the filter over src.raw with ARGS does
# not start (or serves nothing), saying PATTERN; private.qed untouched.
refused () {
  local name=$1 pat=$2; shift 2
  rm -f "$tmp/run.sock" "$tmp/$name.out"
  nbdkit -U "$tmp/run.sock" --filter="$FILTER" file "$tmp/src.raw" "$@" \
    --run "nbdsh -u \"\$uri\" -c 'h.pwrite(b\"W\" * 512, 0)' && nbdcopy \"\$uri\" $tmp/$name.out" \
    >"$tmp/$name.err" 2>&1 && fail "$name: the filter served it"
  grep -Eq "$pat" "$tmp/$name.err" || { cat "$tmp/$name.err"; fail "$name: no '$pat'"; }
  [ ! -s "$tmp/$name.out" ] || fail "$name: the client read data"
  [ "$(md5sum < "$tmp/private.qed")" = "$sum" ] || fail "$name: private.qed changed"
}

# ---- 1. A shared directory nobody owns (sticky, world-writable).
mkdir "$tmp/shared"
chown nobody: "$tmp/shared"
chmod 1777 "$tmp/shared"
as_nobody ln -s "$tmp/private.qed" "$tmp/shared/ov.qed"
refused planted "symbolic link owned by another user" \
  qed-overlay="$tmp/shared/ov.qed"
# Even root's own symlink is not followed in a world-writable directory.
ln -s "$tmp/private.qed" "$tmp/shared/root-link.qed"
refused wwlink "symbolic link in a world-writable directory" \
  qed-overlay="$tmp/shared/root-link.qed"
# An overlay nobody made: they could read and change the guest's disk.
as_nobody qemu-img create -q -f qed "$tmp/shared/theirs.qed" 1M
chmod 666 "$tmp/shared/theirs.qed"
theirs=$(md5sum < "$tmp/shared/theirs.qed")
refused foreign "owned by another user \(uid [0-9]+\)" \
  qed-overlay="$tmp/shared/theirs.qed"
[ "$(md5sum < "$tmp/shared/theirs.qed")" = "$theirs" ] || fail "theirs.qed changed"
# Ours, but others may write it.
qemu-img create -q -f qed "$tmp/gw.qed" 1M
chmod 664 "$tmp/gw.qed"
gw=$(md5sum < "$tmp/gw.qed")
refused writable "can be written by other users \(mode 0664\)" \
  qed-overlay="$tmp/gw.qed"
[ "$(md5sum < "$tmp/gw.qed")" = "$gw" ] || fail "gw.qed changed"
echo "ok: planted symlinks and foreign overlays refused"

# ---- 2. Our own symlink in our own directory is fine.
mkdir "$tmp/mine"
ln -s "$tmp/mine/real.qed" "$tmp/mine/link.qed"
qemu-img create -q -f qed "$tmp/mine/real.qed" 1M
chmod 600 "$tmp/mine/real.qed"
run_nbdkit --filter="$FILTER" file "$tmp/src.raw" qed-overlay="$tmp/mine/link.qed" \
  --run "nbdsh -u \"\$uri\" -c 'h.pwrite(b\"W\" * 512, 0)'" \
  || fail "our own symlink was refused"
qemu-io -f qed -c "read -P 0x57 0 512" "$tmp/mine/real.qed" | grep -q "read 512" \
  || fail "the write did not reach real.qed"
echo "ok: our own symlink"

# ---- 3. New overlays are 0600 whatever the umask.
( umask 000
  run_nbdkit --filter="$FILTER" file "$tmp/src.raw" qed-overlay="$tmp/new.qed" \
    --run 'nbdinfo --size "$uri"' >/dev/null ) || fail "new overlay"
[ "$(stat -c %a "$tmp/new.qed")" = 600 ] \
  || fail "new overlay has mode $(stat -c %a "$tmp/new.qed"), want 600"
qemu_check "$tmp/new.qed"
# The temporary overlay: no directory until a client comes, mode 0600,
# and nothing left afterwards (also after a failed start).
mkdir "$tmp/t"
( umask 000
  export TMPDIR=$tmp/t
  start_nbdkit temp --filter="$FILTER" file "$tmp/src.raw"
  [ -z "$(ls -A "$tmp/t")" ] || fail "temporary directory made before a client"
  pid=$(cat "$tmp/temp.pid")
  /usr/bin/python3 - "$(uri temp)" "$pid" <<'EOF'
import nbd, os, stat, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pread(512, 0)
fds = "/proc/%s/fd" % sys.argv[2]
modes = [stat.S_IMODE(os.stat(os.path.join(fds, f)).st_mode)
         for f in os.listdir(fds)
         if "overlay.qed" in os.readlink(os.path.join(fds, f))]
assert modes, "no overlay open"
assert all(m == 0o600 for m in modes), "temporary overlay modes %s" % modes
EOF
  stop_nbdkit temp ) || fail "temporary overlay"
[ -z "$(ls -A "$tmp/t")" ] || fail "temporary overlay left $(ls -A "$tmp/t")"
rm -f "$tmp/run.sock"
TMPDIR=$tmp/t nbdkit -U "$tmp/run.sock" --filter="$FILTER" "$PLUGIN" \
  "$tmp/missing.qed" --run true 2>/dev/null && fail "a missing image served"
[ -z "$(ls -A "$tmp/t")" ] || fail "a failed start left $(ls -A "$tmp/t")"
echo "ok: overlay modes, temporary directory"

# ---- 4. Locking that silently protects nothing is said, once.
qemu-img create -q -f qed "$tmp/a.qed" 1M
run_nbdkit -r "$PLUGIN" "$tmp/a.qed" locking=off --run 'nbdinfo --size "$uri"' \
  >/dev/null 2>"$tmp/off.err" || fail "locking=off"
[ "$(grep -c 'warning: .*locking is off: another writer .* can corrupt' \
      "$tmp/off.err")" = 1 ] || { cat "$tmp/off.err"; fail "locking=off: no warning"; }
# A file system without OFD locks (a shim makes them fail with ENOLCK).
build_helper nolock.so
rm -f "$tmp/run.sock"
LD_PRELOAD=$TOP/tests/nolock.so nbdkit -U "$tmp/run.sock" "$PLUGIN" "$tmp/a.qed" \
  --run 'nbdsh -u "$uri" -c "h.pwrite(b\"x\" * 512, 0)"' \
  >/dev/null 2>"$tmp/auto.err" || { cat "$tmp/auto.err"; fail "locking=auto without locks"; }
[ "$(grep -c 'warning: .*no OFD locks' "$tmp/auto.err")" = 1 ] \
  || { cat "$tmp/auto.err"; fail "locking=auto without locks: not one warning"; }
rm -f "$tmp/run.sock"
LD_PRELOAD=$TOP/tests/nolock.so nbdkit -U "$tmp/run.sock" "$PLUGIN" "$tmp/a.qed" \
  locking=on --run true 2>"$tmp/on.err" && fail "locking=on without locks served"
grep -q "cannot lock the image" "$tmp/on.err" || { cat "$tmp/on.err"; fail "locking=on message"; }
echo "ok: locking warnings"
echo PASS
