#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Untrusted images and their backing files, as root with an image owned
# by the user nobody: names of root-only files (absolute and relative)
# yield no byte of them; devices, procfs and magic links are refused;
# follow-backing=beneath keeps names beneath the image's directory; a
# raw disk holding a QED header (as a guest can write) is never probed
# by create=true or backing-override; and chains a legitimate owner
# built with QEMU (relative and absolute names, raw and QED, depth 3)
# still read as qemu-img reads them.
source "$(dirname "$0")/functions.sh"
[ "$(id -u)" = 0 ] || skip "must run as root (the attacks need an owner)"
id nobody >/dev/null 2>&1 || skip "requires the user nobody"

chmod 755 "$tmp"
secret=$tmp/secret
/usr/bin/python3 -c 'import sys; sys.stdout.write("TOPSECRET-" * 104858)' \
  > "$secret"
chmod 600 "$secret"
mkdir "$tmp/u"
chown nobody: "$tmp/u"

# no_secret NAME ARGS...: nbdkit ARGS must not start, or must serve no
# byte of the secret; its log is $tmp/NAME.err.
no_secret () {
  local name=$1; shift
  rm -f "$tmp/run.sock" "$tmp/$name.out"
  nbdkit -U "$tmp/run.sock" "$@" \
    --run "nbdcopy \"\$uri\" $tmp/$name.out" >"$tmp/$name.err" 2>&1 || true
  if [ -s "$tmp/$name.out" ] && grep -q TOPSECRET "$tmp/$name.out"; then
    fail "$name: the client read the root-only file"
  fi
}
# refused NAME PATTERN: that nbdkit did not start, saying PATTERN.
refused () {
  grep -Eq "$2" "$tmp/$1.err" || { cat "$tmp/$1.err"; fail "$1: no '$2'"; }
  [ ! -s "$tmp/$1.out" ] || fail "$1: nbdkit served the image"
}

# ---- 1. An image owned by nobody names a root-only file.
as_nobody qemu-img create -q -u -f qed -b "$secret" -F raw "$tmp/u/abs.qed" 1M
as_nobody qemu-img create -q -u -f qed -b ../secret -F raw "$tmp/u/rel.qed" 1M
as_nobody qemu-img create -q -u -f qed -b "$secret" -F qed "$tmp/u/probe.qed" 1M
for n in abs rel probe; do
  no_secret "$n" -r "$PLUGIN" "$tmp/u/$n.qed"
  refused "$n" "as the image's owner \(uid [0-9]+\): Permission denied"
  no_secret "$n-rw" "$PLUGIN" "$tmp/u/$n.qed"
  refused "$n-rw" "Permission denied"
done
# Through a QED layer that nobody owns, beneath a root-owned top image.
as_nobody qemu-img create -q -u -f qed -b ../secret -F raw "$tmp/u/mid.qed" 1M
qemu-img create -q -f qed -b u/mid.qed -F qed "$tmp/roottop.qed" 1M
no_secret deep -r "$PLUGIN" "$tmp/roottop.qed"
refused deep "as the image's owner"
# A symlink nobody plants beside the image does not help (not followed:
# nobody owns it, root owns its target).
as_nobody ln -s "$secret" "$tmp/u/link.raw"
as_nobody qemu-img create -q -u -f qed -b link.raw -F raw "$tmp/u/sym.qed" 1M
no_secret sym -r "$PLUGIN" "$tmp/u/sym.qed"
refused sym "link.raw is a symbolic link owned by uid [0-9]+ to a file of uid 0: refused"
echo "ok: root-only backing files (absolute, relative, deep, symlink)"

# ---- 2. Devices, procfs, magic links (even in root's own images).
qemu-img create -q -u -f qed -b /dev/zero -F raw "$tmp/chr.qed" 1M
no_secret chr -r "$PLUGIN" "$tmp/chr.qed" backing-devices=true
refused chr "not a regular file or a block device"
qemu-img create -q -u -f qed -b /proc/self/environ -F raw "$tmp/proc.qed" 1M
no_secret proc -r "$PLUGIN" "$tmp/proc.qed"
refused proc "on procfs"
qemu-img create -q -u -f qed -b /sys/kernel/notes -F raw "$tmp/sys.qed" 1M
no_secret sys -r "$PLUGIN" "$tmp/sys.qed"
refused sys "on sysfs"
exec 7<"$secret"
qemu-img create -q -u -f qed -b /proc/self/fd/7 -F raw "$tmp/magic.qed" 1M
no_secret magic -r "$PLUGIN" "$tmp/magic.qed"
refused magic "magic link"
exec 7<&-
loop=$(losetup -f --show "$secret" 2>/dev/null) || loop=
if [ -n "$loop" ]; then
  cleanup_fn losetup -d "$loop"
  qemu-img create -q -u -f qed -b "$loop" -F raw "$tmp/blk.qed" 1M
  no_secret blk -r "$PLUGIN" "$tmp/blk.qed"
  refused blk "is a block device: refused unless backing-devices=true"
  # One key away: root's own image may use it.
  rm -f "$tmp/run.sock"
  nbdkit -U "$tmp/run.sock" -r "$PLUGIN" "$tmp/blk.qed" backing-devices=true \
    --run "nbdcopy \"\$uri\" - 2>/dev/null | head -c 20 | grep -q TOPSECRET" \
    || fail "backing-devices=true: the block device was not read"
  echo "ok: devices, procfs, sysfs, magic links (block device $loop)"
else
  echo "note: no loop device here: backing-devices=true not exercised"
  echo "ok: devices, procfs, sysfs, magic links"
fi

# ---- 3. follow-backing=beneath (root's own image in $tmp/b).
mkdir -p "$tmp/b/sub"
qemu-img create -q -f raw "$tmp/b/sub/base.raw" 1M
qemu-io -f raw -c "write -P 0x5a 0 1M" "$tmp/b/sub/base.raw" >/dev/null
qemu-img create -q -f qed -b base.raw -F raw "$tmp/b/sub/mid.qed" 1M
qemu-img create -q -f qed -b sub/mid.qed -F qed "$tmp/b/ok.qed" 1M
qemu-img create -q -f qed -b "$tmp/b/sub/mid.qed" -F qed "$tmp/b/okabs.qed" 1M
qemu-img create -q -u -f qed -b ../secret -F raw "$tmp/b/up.qed" 1M
qemu-img create -q -u -f qed -b "$secret" -F raw "$tmp/b/abs.qed" 1M
qemu-img create -q -u -f qed -b ../../secret -F raw "$tmp/b/sub/up2.qed" 1M
qemu-img create -q -u -f qed -b sub/up2.qed -F qed "$tmp/b/deep.qed" 1M
ln -s "$secret" "$tmp/b/link.raw"
qemu-img create -q -u -f qed -b link.raw -F raw "$tmp/b/link.qed" 1M
for n in ok okabs; do
  rm -f "$tmp/run.sock"
  nbdkit -U "$tmp/run.sock" -r "$PLUGIN" "$tmp/b/$n.qed" \
    follow-backing=beneath --run "nbdcopy \"\$uri\" $tmp/beneath.out" \
    || fail "beneath: $n refused"
  cmp "$tmp/beneath.out" "$tmp/b/sub/base.raw" || fail "beneath: $n data"
done
for n in up abs deep link; do
  no_secret "beneath-$n" -r "$PLUGIN" "$tmp/b/$n.qed" follow-backing=beneath
  refused "beneath-$n" "not beneath the top image's directory"
done
# ... and the same images are followed without it (root owns them).
for n in up abs deep link; do
  rm -f "$tmp/run.sock"
  nbdkit -U "$tmp/run.sock" -r "$PLUGIN" "$tmp/b/$n.qed" \
    --run "nbdcopy \"\$uri\" - 2>/dev/null | head -c 20 | grep -q TOPSECRET" \
    || fail "follow-backing=true: $n not followed"
done
echo "ok: follow-backing=beneath"

# ---- 4. A guest writes a QED header naming the secret into its disk.
qemu-img create -q -u -f qed -b "$secret" -F raw "$tmp/hdr.qed" 64M
qemu-img create -q -f raw "$tmp/guest.raw" 64M
dd if="$tmp/hdr.qed" of="$tmp/guest.raw" bs=64k count=5 conv=notrunc \
  status=none
no_secret create "$PLUGIN" "$tmp/top.qed" create=true size=64M \
  backing=guest.raw
refused create "needs backing-format=raw.qed"
[ ! -e "$tmp/top.qed" ] || fail "create=true without backing-format created it"
no_secret override -r "$PLUGIN" "$tmp/b/sub/mid.qed" \
  backing-override="$tmp/guest.raw"
refused override "needs backing-override-format=raw.qed"
# With the format given, the guest's bytes are just data.
rm -f "$tmp/run.sock"
nbdkit -U "$tmp/run.sock" "$PLUGIN" "$tmp/top.qed" create=true size=64M \
  backing=guest.raw backing-format=raw \
  --run "nbdcopy \"\$uri\" $tmp/create.out" || fail "backing-format=raw"
cmp "$tmp/create.out" "$tmp/guest.raw" || fail "backing-format=raw: data"
# An existing image that probes the guest's disk (as QEMU would): one
# warning, and the name is followed only as the disk's owner.
chown nobody: "$tmp/guest.raw"
qemu-img create -q -u -f qed -b guest.raw -F qed "$tmp/old.qed" 64M
no_secret old -r "$PLUGIN" "$tmp/old.qed"
refused old "as the image's owner"
[ "$(grep -c 'warning: .*probed as QED.*qemu-img rebase -u -f qed -F raw' \
      "$tmp/old.err")" = 1 ] || { cat "$tmp/old.err"; fail "old: no warning"; }
echo "ok: guest-written QED header"

# ---- 5. Chains nobody built with QEMU, served by root, still work:
# raw <- QED (relative) <- QED (absolute) <- QED (relative), and raw.
d=$tmp/u/chain
as_nobody mkdir "$d"
as_nobody qemu-img create -q -f raw "$d/base.raw" 4M
as_nobody qemu-io -f raw -c "write -P 0x11 0 4M" "$d/base.raw" >/dev/null
as_nobody qemu-img create -q -f qed -b base.raw -F raw "$d/l1.qed" 4M
as_nobody qemu-io -f qed -c "write -P 0x22 1M 1M" "$d/l1.qed" >/dev/null
as_nobody qemu-img create -q -f qed -b "$d/l1.qed" -F qed "$d/l2.qed" 4M
as_nobody qemu-io -f qed -c "write -P 0x33 2M 512k" "$d/l2.qed" >/dev/null
as_nobody qemu-img create -q -f qed -b l2.qed -F qed "$d/top.qed" 4M
as_nobody qemu-io -f qed -c "write -P 0x44 3M 64k" "$d/top.qed" >/dev/null
qemu-img convert -O raw "$d/top.qed" "$tmp/expect.raw"
for mode in true beneath; do
  rm -f "$tmp/run.sock"
  nbdkit -U "$tmp/run.sock" -r "$PLUGIN" "$d/top.qed" follow-backing=$mode \
    --run "nbdcopy \"\$uri\" $tmp/chain.out" 2>"$tmp/chain.err" \
    || { cat "$tmp/chain.err"; fail "nobody's chain ($mode) refused"; }
  cmp "$tmp/chain.out" "$tmp/expect.raw" || fail "nobody's chain ($mode): data"
done
# Writable too: the top image takes the write, the chain is untouched.
before=$(md5sum "$d"/base.raw "$d"/l1.qed "$d"/l2.qed)
rm -f "$tmp/run.sock"
nbdkit -U "$tmp/run.sock" "$PLUGIN" "$d/top.qed" \
  --run "nbdsh -u \"\$uri\" -c 'h.pwrite(b\"x\" * 512, 0)'" \
  || fail "nobody's chain: write"
[ "$(md5sum "$d"/base.raw "$d"/l1.qed "$d"/l2.qed)" = "$before" ] \
  || fail "nobody's chain: a backing file changed"
qemu_check "$d/top.qed"
echo "ok: QEMU-made chains of an unprivileged owner"
echo PASS
