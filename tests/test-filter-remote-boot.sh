#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter over a remote disk, end to end with a real client: a
# libguestfs appliance (TCG) boots with an ext4 disk served by the
# filter over nbdkit's curl plugin from nginx on 127.0.0.1, mounts it
# and reads files; a second boot, through a second nbdkit with the same
# overlay, gets nothing from the HTTP server but the origin guard's
# sample of at most 64 clusters.
. "$(dirname "$0")/functions.sh"
command -v guestfish >/dev/null ||
  skip "guestfish is not installed (apt-get install libguestfs-tools)"
ls /boot/vmlinuz-* >/dev/null 2>&1 ||
  skip "no kernel in /boot for the libguestfs appliance (apt-get install linux-image-amd64)"
command -v mkfs.ext4 >/dev/null || skip "mkfs.ext4 is not installed"
nbdkit curl --version >/dev/null 2>&1 ||
  fail "nbdkit's curl plugin is missing (Debian's nbdkit package has it)"
# Nested KVM is broken on some CI machines: force TCG.
export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg
cd "$tmp"
M=$((1024*1024))

# The remote disk: an ext4 filesystem with a text file and 6M of data.
mkdir -p src www
echo "hello over http" > src/hello.txt
head -c $((6*M)) /dev/urandom > src/big.bin
sha=$(sha256sum < src/big.bin | cut -d' ' -f1)
mkfs.ext4 -q -F -d src www/disk.img 64M
start_nginx "$tmp/www"

boot () {           # boot NAME: guestfish through the filter over curl
  start_nbdkit "$1" --filter="$FILTER" curl "$NGINX_URL/disk.img" \
    qed-overlay="$tmp/cache.qed"
  out=$(guestfish --ro --format=raw -a "nbd://?socket=$tmp/$1.sock" \
          -m /dev/sda:/:ro <<'GF'
cat /hello.txt
checksum sha256 /big.bin
GF
)
  stop_nbdkit "$1"
  out=$(echo "$out" | grep -v '^$')
  [ "$out" = "hello over http
$sha" ] || fail "$1: read '$out'"
}

boot first
first=$(http_body_bytes)
echo "first boot: $first bytes over HTTP"
[ "$first" -gt $((6*M)) ] || fail "the first boot read only $first bytes?"
qemu_check cache.qed
boot second
second=$(http_body_bytes)
echo "second boot: $((second - first)) bytes over HTTP"
# Nothing but the origin guard's sample (at most 64 clusters of 64K,
# read once when the overlay opens, and the plugin's probe at open).
[ "$((second - first))" -le $((64 * 65536 + 4096)) ] ||
  fail "the second boot read from the server"
qemu_check cache.qed
echo OK
