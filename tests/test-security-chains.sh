#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Many owners on one host, as root serving files of the users nobody
# and daemon: the identity only drops down a backing chain (root's
# overlay and root's raw disk below nobody's image are read as nobody,
# and so are the names inside them); symbolic links are followed only
# if the server's user or the owner of their target planted them (the
# plugin's image, a directory on the filter's overlay path); the
# owner's groups come from the user database, not from a setgid
# directory.  And what users really have keeps working: a user's chain
# through their own symlinks (relative names resolve in the real
# directory), root's golden raw image under a user's overlay (-F raw),
# root's own chains and links.
source "$(dirname "$0")/functions.sh"
[ "$(id -u)" = 0 ] || skip "must run as root (the attacks need owners)"
id nobody >/dev/null 2>&1 || skip "requires the user nobody"
id daemon >/dev/null 2>&1 || skip "requires the user daemon"
id -Gn nobody | grep -qw daemon && skip "nobody is in the group daemon"

chmod 755 "$tmp"
secret=$tmp/secret
/usr/bin/python3 -c 'import sys; sys.stdout.write("TOPSECRET-" * 104858)' \
  > "$secret"
chmod 600 "$secret"
as_nobody () { runuser -u nobody -- "$@"; }
as_daemon () { runuser -u daemon -- "$@"; }

# no_secret NAME ARGS...: nbdkit ARGS (writing one sector first, unless
# -r) must not start, or must serve no byte of the secret; its log is
# $tmp/NAME.err.
no_secret () {
  local name=$1; shift
  rm -f "$tmp/run.sock" "$tmp/$name.out"
  nbdkit -U "$tmp/run.sock" "$@" \
    --run "nbdcopy \"\$uri\" $tmp/$name.out" >"$tmp/$name.err" 2>&1 || true
  if [ -s "$tmp/$name.out" ] && grep -q TOPSECRET "$tmp/$name.out"; then
    fail "$name: the client read a file its owner cannot"
  fi
}
# refused NAME PATTERN: that nbdkit did not start, saying PATTERN.
refused () {
  grep -Eq "$2" "$tmp/$1.err" || { cat "$tmp/$1.err"; fail "$1: no '$2'"; }
  [ ! -s "$tmp/$1.out" ] || fail "$1: nbdkit served the image"
}
# served NAME EXPECT ARGS...: nbdkit ARGS serves exactly the file EXPECT.
served () {
  local name=$1 expect=$2; shift 2
  rm -f "$tmp/run.sock" "$tmp/$name.out"
  nbdkit -U "$tmp/run.sock" "$@" \
    --run "nbdcopy \"\$uri\" $tmp/$name.out" >"$tmp/$name.err" 2>&1 \
    || { cat "$tmp/$name.err"; fail "$name: refused"; }
  cmp "$tmp/$name.out" "$expect" || fail "$name: wrong data"
}

# root's VM directory, as the manual's example makes it: a raw disk
# (root's alone) and an overlay naming it relatively.
mkdir "$tmp/vm"
qemu-img create -q -f raw "$tmp/vm/base.raw" 1M
qemu-io -f raw -c "write -P 0x42 0 1M" "$tmp/vm/base.raw" >/dev/null
chmod 600 "$tmp/vm/base.raw"
qemu-img create -q -f qed -b base.raw -F raw "$tmp/vm/vm.qed" 1M
chmod 644 "$tmp/vm/vm.qed"
mkdir "$tmp/u"
chown nobody: "$tmp/u"

# ---- 1. The identity rises again below root's overlay.
# nobody's mid.qed is a symlink to root's overlay, and base.raw beside
# it nobody's symlink to the secret: resolved against the path string
# and opened as root, the secret was served.
as_nobody ln -s "$tmp/vm/vm.qed" "$tmp/u/mid.qed"
as_nobody ln -s "$secret" "$tmp/u/base.raw"
as_nobody qemu-img create -q -u -f qed -b mid.qed -F qed "$tmp/u/top.qed" 1M
no_secret via-link -r "$PLUGIN" "$tmp/u/top.qed"
refused via-link "mid.qed is a symbolic link owned by uid 65534 to a file of uid 0: refused"
no_secret via-link-rw "$PLUGIN" "$tmp/u/top.qed"
refused via-link-rw "symbolic link owned by uid 65534"
# Named directly: root's overlay is read as nobody, and so is the
# name inside it (root's own base.raw, which nobody cannot read).
as_nobody qemu-img create -q -u -f qed -b "$tmp/vm/vm.qed" -F qed \
  "$tmp/u/direct.qed" 1M
no_secret direct -r "$PLUGIN" "$tmp/u/direct.qed"
refused direct "cannot open backing file $tmp/vm/base.raw as the image's owner \(uid 65534\): Permission denied"
# A guest of root's raw disk writes a QED header naming the secret; a
# probe of that disk below nobody's image follows it only as nobody.
qemu-img create -q -u -f qed -b "$secret" -F raw "$tmp/hdr.qed" 64M
qemu-img create -q -f raw "$tmp/vm/guest.raw" 64M
dd if="$tmp/hdr.qed" of="$tmp/vm/guest.raw" bs=64k count=5 conv=notrunc \
  status=none
chmod 644 "$tmp/vm/guest.raw"
as_nobody qemu-img create -q -u -f qed -b "$tmp/vm/guest.raw" -F qed \
  "$tmp/u/guest.qed" 64M
no_secret guest -r "$PLUGIN" "$tmp/u/guest.qed"
refused guest "cannot open backing file $secret as the image's owner \(uid 65534\): Permission denied"
no_secret guest-rw "$PLUGIN" "$tmp/u/guest.qed"
refused guest-rw "as the image's owner \(uid 65534\)"
echo "ok: the identity only drops (root's overlay, root's guest disk)"

# ---- 2. The plugin's image is a symlink nobody planted to daemon's
# private image: neither served nor written.
mkdir "$tmp/d"
chown daemon: "$tmp/d"
as_daemon qemu-img create -q -f qed "$tmp/d/priv.qed" 1M
as_daemon qemu-io -f qed -c "write -P 0x77 0 64k" "$tmp/d/priv.qed" >/dev/null
as_daemon chmod 600 "$tmp/d/priv.qed"
chmod 711 "$tmp/d"
sum=$(md5sum < "$tmp/d/priv.qed")
as_nobody ln -s "$tmp/d/priv.qed" "$tmp/u/disk.qed"
for ro in -r ""; do
  rm -f "$tmp/run.sock" "$tmp/top$ro.out"
  nbdkit -U "$tmp/run.sock" $ro "$PLUGIN" "$tmp/u/disk.qed" \
    --run "nbdsh -u \"\$uri\" -c 'h.pwrite(b\"W\" * 512, 0)' ; nbdcopy \"\$uri\" $tmp/top$ro.out" \
    >"$tmp/top$ro.err" 2>&1 || true
  refused "top$ro" "disk.qed is a symbolic link owned by uid 65534 to a file of uid 1: refused"
done
# The same through a directory nobody links to daemon's.
as_nobody ln -s "$tmp/d" "$tmp/u/dir"
no_secret topdir "$PLUGIN" "$tmp/u/dir/priv.qed"
refused topdir "dir is a symbolic link owned by uid 65534 to a file of uid 1"
[ "$(md5sum < "$tmp/d/priv.qed")" = "$sum" ] || fail "daemon's image changed"
# A world-writable directory: only the server's own links.
mkdir -m 1777 "$tmp/ww"
as_daemon ln -s "$tmp/d/priv.qed" "$tmp/ww/own.qed"
no_secret ww "$PLUGIN" "$tmp/ww/own.qed"
refused ww "own.qed is a symbolic link owned by uid 1 in a world-writable directory: refused"
echo "ok: a planted symlink as the plugin's image"

# ---- 3. A setgid directory: nobody's image gets the group daemon,
# which may read a file nobody may not; the owner's groups come from
# the user database.
mkdir "$tmp/sg"
chown nobody:daemon "$tmp/sg"
chmod 2775 "$tmp/sg"
cp "$secret" "$tmp/gsecret"
chown root:daemon "$tmp/gsecret"
chmod 640 "$tmp/gsecret"
as_nobody qemu-img create -q -u -f qed -b "$tmp/gsecret" -F raw \
  "$tmp/sg/top.qed" 1M
[ "$(stat -c %G "$tmp/sg/top.qed")" = daemon ] || fail "setgid: not daemon's group"
no_secret setgid -r "$PLUGIN" "$tmp/sg/top.qed"
refused setgid "as the image's owner \(uid 65534\): Permission denied"
echo "ok: a setgid directory's group is not the owner's"

# ---- 4. A symlink in a parent directory of the filter's overlay:
# sub is nobody's link to root's VM directory.
qemu-img create -q -f raw "$tmp/src.raw" 1M
qemu-img create -q -f qed "$tmp/vm/plain.qed" 1M
qemu-io -f qed -c "write -P 0x66 0 64k" "$tmp/vm/plain.qed" >/dev/null
chmod 600 "$tmp/vm/plain.qed"
psum=$(md5sum < "$tmp/vm/plain.qed")
as_nobody mkdir "$tmp/u/ov"
as_nobody ln -s "$tmp/vm" "$tmp/u/ov/sub"
for n in plain new; do
  rm -f "$tmp/run.sock" "$tmp/parent-$n.out"
  nbdkit -U "$tmp/run.sock" --filter="$FILTER" file "$tmp/src.raw" \
    qed-overlay="$tmp/u/ov/sub/$n.qed" \
    --run "nbdsh -u \"\$uri\" -c 'h.pwrite(b\"W\" * 512, 0)' && nbdcopy \"\$uri\" $tmp/parent-$n.out" \
    >"$tmp/parent-$n.err" 2>&1 && fail "parent-$n: the filter served it"
  refused "parent-$n" "sub is a symbolic link owned by uid 65534 to a file of uid 0: refused"
done
[ "$(md5sum < "$tmp/vm/plain.qed")" = "$psum" ] || fail "root's plain.qed changed"
[ ! -e "$tmp/vm/new.qed" ] || fail "a new overlay was made in root's directory"
ls -a "$tmp/vm" | grep -q qed-create && fail "a temporary file was left in root's directory"
echo "ok: a planted parent directory of the overlay"

# ---- 5. What users really have keeps working.
# nobody's chain through nobody's own symlinks: relative names resolve
# in the real directory of the file opened.
d=$tmp/u/real
as_nobody mkdir "$d"
as_nobody qemu-img create -q -f raw "$d/base.raw" 2M
as_nobody qemu-io -f raw -c "write -P 0x11 0 2M" "$d/base.raw" >/dev/null
as_nobody qemu-img create -q -f qed -b base.raw -F raw "$d/mid.qed" 2M
as_nobody qemu-io -f qed -c "write -P 0x22 1M 64k" "$d/mid.qed" >/dev/null
as_nobody mkdir "$tmp/u/view"
as_nobody ln -s ../real/mid.qed "$tmp/u/view/mid.qed"
as_nobody qemu-img create -q -u -f qed -b mid.qed -F qed "$tmp/u/view/top.qed" 2M
qemu-img convert -O raw "$d/mid.qed" "$tmp/expect-mid.raw"
served own-links "$tmp/expect-mid.raw" -r "$PLUGIN" "$tmp/u/view/top.qed"
# root's golden raw image (readable by all) under nobody's overlay.
qemu-img create -q -f raw "$tmp/golden.raw" 1M
qemu-io -f raw -c "write -P 0x33 0 1M" "$tmp/golden.raw" >/dev/null
chmod 644 "$tmp/golden.raw"
as_nobody qemu-img create -q -f qed -b "$tmp/golden.raw" -F raw \
  "$tmp/u/gold.qed" 1M
served golden "$tmp/golden.raw" -r "$PLUGIN" "$tmp/u/gold.qed"
rm -f "$tmp/run.sock"
nbdkit -U "$tmp/run.sock" "$PLUGIN" "$tmp/u/gold.qed" \
  --run "nbdsh -u \"\$uri\" -c 'h.pwrite(b\"x\" * 512, 0)'" \
  || fail "golden: write"
qemu_check "$tmp/u/gold.qed"
# root's own chain through root's own links, and root's VM overlay.
qemu-img convert -O raw "$tmp/vm/vm.qed" "$tmp/expect-vm.raw"
ln -s vm/vm.qed "$tmp/vm-link.qed"
served root-link "$tmp/expect-vm.raw" -r "$PLUGIN" "$tmp/vm-link.qed"
qemu-img create -q -u -f qed -b vm-link.qed -F qed "$tmp/roottop.qed" 1M
served root-chain "$tmp/expect-vm.raw" -r "$PLUGIN" "$tmp/roottop.qed"
# root's image may name nobody's files (read as nobody from there on).
qemu-img create -q -f qed -b "$d/mid.qed" -F qed "$tmp/root-on-user.qed" 2M
served root-on-user "$tmp/expect-mid.raw" -r "$PLUGIN" "$tmp/root-on-user.qed"
echo "ok: users' and root's chains"

# ---- 6. Link loops end; a link to nothing of another user is refused.
as_nobody ln -s loop2 "$tmp/u/loop1"
as_nobody ln -s loop1 "$tmp/u/loop2"
as_nobody qemu-img create -q -u -f qed -b loop1 -F raw "$tmp/u/loop.qed" 1M
no_secret loop -r "$PLUGIN" "$tmp/u/loop.qed"
refused loop "too many levels of symbolic links"
mkdir -m 1777 "$tmp/ww2"
as_nobody ln -s "$tmp/vm/none.qed" "$tmp/ww2/none.qed"
no_secret dangling "$PLUGIN" "$tmp/ww2/none.qed"
refused dangling "none.qed is a symbolic link owned by uid 65534 in a world-writable directory"
no_secret dangling-ov --filter="$FILTER" file "$tmp/src.raw" \
  qed-overlay="$tmp/ww2/none.qed"
refused dangling-ov "symbolic link owned by another user"
[ ! -e "$tmp/vm/none.qed" ] || fail "a file was made through nobody's dangling link"
echo "ok: loops and dangling links"
echo PASS
