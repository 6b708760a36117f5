#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A full file system:
#   1. an image with only leaks (a crash after trims, NEED_CHECK set)
#      opens writable and serves on a full file system: the repair
#      reclaims what needs no new space and leaves the rest for later
#      (NEED_CHECK stays set), it never fails the open over leaks;
#   2. writes that need space fail with ENOSPC (not EIO), so that a
#      QEMU client with werror=enospc can pause its guest;
#   3. when space comes back, the same server accepts writes again, and
#      a clean stop leaves a clean image (qemu-img check exit 0).
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
[ -f "$PLUGIN" ] || skip "the plugin is not built"
# FULLFS_FREELIST= (empty) runs it with the free-cluster list (the
# default), as test-faults-fullfs-freelist.sh does.
fl=${FULLFS_FREELIST-freelist=false}
small_fs "$tmp/small" 8M
cd "$tmp/small"

# Data at 0-2M, 6M and 7M; trim 0-1M; crash after the trim is durable.
qemu-img create -q -f qed disk.qed 64M
start_nbdkit p "$PLUGIN" disk.qed idle-clean=0 $fl
nbdsh -u "$(uri p)" -c '
h.pwrite(b"A" * (2 << 20), 0)
h.pwrite(b"B" * (1 << 20), 6 << 20)
h.pwrite(b"C" * (1 << 20), 7 << 20)
h.flush()
h.trim(1 << 20, 0)
h.flush()
'
kill9_nbdkit p
[ "$(need_check disk.qed)" = 1 ] || fail "NEED_CHECK not set after the crash"
rc=0; qemu-img check disk.qed > check.out 2>&1 || rc=$?
[ $rc = 3 ] || { cat check.out; fail "expected leaks only (exit 3), got $rc"; }
fill_fs "$tmp/small"
df -k . | tail -1

# 1. Opens writable and serves, although the repair has no room.
start_nbdkit p2 "$PLUGIN" disk.qed idle-clean=1 $fl
check_data='
assert h.pread(1 << 20, 0) == bytes(1 << 20), "0-1M"
assert h.pread(1 << 20, 1 << 20) == b"A" * (1 << 20), "1-2M"
assert h.pread(1 << 20, 6 << 20) == b"B" * (1 << 20), "6M"
assert h.pread(1 << 20, 7 << 20) == b"C" * (1 << 20), "7M"
'
nbdsh -u "$(uri p2)" -c "$check_data" ||
  { cat "$tmp/p2.log"; fail "a leaking image on a full file system did not serve"; }
rc=0; qemu-img check -U disk.qed > check.out 2>&1 || rc=$?
case $rc in
  0) ;;
  3) [ "$(need_check disk.qed)" = 1 ] || fail "leaks left with NEED_CHECK clear" ;;
  *) cat check.out; fail "qemu-img check after the repair on a full fs: exit $rc" ;;
esac

# 2. Writes that need space: ENOSPC.
nbdsh -u "$(uri p2)" -c '
import errno
import errno
for i in range(64):
    try:
        h.pwrite(b"D" * 65536, (16 << 20) + i * 65536)
        h.flush()
    except nbd.Error as e:
        assert e.errnum == errno.ENOSPC, "write failed with %s, not ENOSPC" % e
        print("full, as expected:", e)
        break
else:
    raise SystemExit("FAIL: 4 MiB written to a full file system")
' || fail "a write on a full file system did not fail with ENOSPC"

# 3. Space comes back: the same server writes again.
rm -f "$tmp/small/filler"
nbdsh -u "$(uri p2)" -c '
h.pwrite(b"E" * (1 << 20), 20 << 20)
h.flush()
assert h.pread(1 << 20, 20 << 20) == b"E" * (1 << 20)
' || fail "writes failed after space came back"
nbdsh -u "$(uri p2)" -c "$check_data" || fail "data changed"
stop_nbdkit p2
[ "$(need_check disk.qed)" = 0 ] || fail "NEED_CHECK set after a clean stop"
qemu_check disk.qed
echo OK
