#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter, end to end with a real client (libguestfs, TCG):
#   1. guestfish makes a filesystem and writes /hello.txt on an export
#      served by the QED plugin over a fresh image (create=true);
#   2. qemu-img converts that image to raw (copy.raw);
#   3. guestfish reads /hello.txt back through the FILTER over copy.raw
#      (qed-overlay=ov.qed qed-backing-name=copy.raw) and writes
#      /second.txt, which must land in the overlay only;
#   4. the overlay alone, served by the plugin (which follows the
#      recorded backing file name), shows both files (guestfish --ro).
. "$(dirname "$0")/functions.sh"
command -v guestfish >/dev/null ||
  skip "guestfish is not installed (apt-get install libguestfs-tools)"
ls /boot/vmlinuz-* >/dev/null 2>&1 ||
  skip "no kernel in /boot for the libguestfs appliance (apt-get install linux-image-amd64)"
requires qemu-img --version
# Nested KVM is broken on some CI machines: force TCG.
export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg
cd "$tmp"

gf_uri () { echo "nbd://?socket=$tmp/$1.sock"; }

# 1. The plugin over a fresh QED image.
start_nbdkit p1 "$PLUGIN" disk.qed create=true size=64M
guestfish --format=raw -a "$(gf_uri p1)" <<'EOF'
run
part-disk /dev/sda mbr
mkfs ext4 /dev/sda1
mount /dev/sda1 /
write /hello.txt "hello from the plugin\n"
umount-all
EOF
stop_nbdkit p1
qemu_check disk.qed

# 2. To raw.
qemu-img convert -f qed -O raw disk.qed copy.raw
sum=$(md5sum < copy.raw)

# 3. Through the filter over the raw copy.
start_nbdkit f1 --filter="$FILTER" file copy.raw qed-overlay="$tmp/ov.qed" \
  qed-backing-name=copy.raw
out=$(guestfish --format=raw -a "$(gf_uri f1)" <<'EOF'
run
mount /dev/sda1 /
cat /hello.txt
write /second.txt "written through the filter\n"
umount-all
EOF
)
[ "$out" = "hello from the plugin" ] || fail "filter: read back '$out'"
stop_nbdkit f1
[ "$(md5sum < copy.raw)" = "$sum" ] || fail "copy.raw was modified"
[ "$(need_check ov.qed)" = 0 ] || fail "NEED_CHECK set after a clean stop"
qemu_check ov.qed

# 4. The overlay alone, through the plugin (backing file copy.raw).
start_nbdkit p2 -r "$PLUGIN" ov.qed
out=$(guestfish --ro --format=raw -a "$(gf_uri p2)" -m /dev/sda1:/:ro <<'EOF'
cat /hello.txt
cat /second.txt
EOF
)
out=$(echo "$out" | grep -v '^$')     # each cat adds a newline
[ "$out" = "hello from the plugin
written through the filter" ] || fail "plugin over the overlay: read '$out'"
stop_nbdkit p2

# And qemu-img agrees that the overlay differs from its base.
# (exit 1: they differ; 0: equal; 2 or more: compare itself failed).
rc=0; qemu-img compare -q ov.qed copy.raw || rc=$?
[ $rc = 1 ] || fail "qemu-img compare ov.qed copy.raw: exit $rc, expected 1 (differ)"
echo OK
