#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A backing file name so long that the free-cluster list's record has
# no room (it reaches into the last 64 bytes of the header cluster):
# the clusters freed by trim cannot be listed, so after a clean stop
# they must be compacted away (qemu-img check exits 0) or explained by
# NEED_CHECK; with compact-limit=0 too.  And the data reads back.
source "$(dirname "$0")/functions.sh"
cd "$tmp"
qemu-img create -q -f raw base.raw 4M
qemu-io -f raw -c "write -P 0x11 0 4M" base.raw >/dev/null
# 3988 bytes: past 4096 - 64 - 64 with 4K clusters.
name=$(printf './%.0s' $(seq 1994))base.raw
[ ${#name} -gt $((4096 - 128)) ] || fail "the name is too short"

for limit in 64M 0; do
  rm -f top.qed run.sock
  nbdkit -U run.sock "$PLUGIN" top.qed create=true size=4M cluster-size=4096 \
    backing="$name" backing-format=raw compact-limit=$limit \
    --run "nbdsh -u \"\$uri\" -c '
h.pwrite(b\"x\" * (2 << 20), 0)
h.flush()
h.trim(1 << 20, 512 * 1024)
h.flush()
'" || fail "limit $limit: nbdkit"
  if [ "$(need_check top.qed)" = 0 ]; then
    qemu-img check top.qed >check.out 2>&1 \
      || { cat check.out; fail "limit $limit: leaks with NEED_CHECK clear"; }
  fi
  echo "compact-limit=$limit: NEED_CHECK $(need_check top.qed)," \
    "file $(stat -c %s top.qed) bytes"
  # The disk reads as expected (written, and the backing file beyond;
  # the trimmed range is what QEMU reads), by QEMU and a second open.
  qemu-io -f qed -c "read -P 0x78 0 512k" \
    -c "read -P 0x78 1536k 512k" -c "read -P 0x11 2M 2M" top.qed \
    >read.out 2>&1 || fail "limit $limit: qemu-io"
  ! grep -i "fail" read.out || fail "limit $limit: data"
  rm -f run.sock
  nbdkit -U run.sock "$PLUGIN" top.qed --run "nbdcopy \"\$uri\" out.raw" \
    || fail "limit $limit: reopen"
  qemu-img convert -O raw top.qed expect.raw
  cmp out.raw expect.raw || fail "limit $limit: reopened data"
  if [ "$(need_check top.qed)" = 0 ]; then
    qemu-img check top.qed >check.out 2>&1 \
      || { cat check.out; fail "limit $limit: reopen left leaks"; }
  fi
done
echo PASS
