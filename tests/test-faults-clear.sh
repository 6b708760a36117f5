#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Clearing NEED_CHECK is ordered so that memory and disk agree when the
# header's fdatasync fails: the cleared flag may be in the page cache,
# so the image must not go on believing the flag is set on disk.  Here
# the fdatasync after the header update fails (idle timer); a later
# allocating write must find NEED_CHECK set in the file, and after a
# crash (kill -9) the next open must check and reclaim the leaks.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
[ -f "$PLUGIN" ] || skip "the plugin is not built"
build_faultsim
cd "$tmp"

qemu-img create -q -f qed disk.qed 16M
export FAULTSIM_FILE=$tmp/disk.qed
LD_PRELOAD=$FAULTSIM start_nbdkit p "$PLUGIN" disk.qed idle-clean=1
nbdsh -u "$(uri p)" -c 'h.pwrite(b"A" * 65536, 0); h.flush()'
[ "$(need_check disk.qed)" = 1 ] || fail "NEED_CHECK not set by a write"
# The next fdatasync after a header update (the clear) fails, once.
inject fdatasync "EIO 0 1 lastwrite=16"
# The idle timer (1 s) tries the clear; wait for it to reach the fault.
hit_once () { [ "$(fault_hits fdatasync)" = 1 ]; }
wait_until 120 hit_once || fail "the header fdatasync fault was not hit"
uninject fdatasync

# An allocating write: NEED_CHECK must be set in the file before it.
nbdsh -u "$(uri p)" -c 'h.pwrite(b"B" * 65536, 4 << 20)'
[ "$(need_check disk.qed)" = 1 ] ||
  fail "an allocating write left NEED_CHECK clear in the file"
kill9_nbdkit p

# Leaks are allowed only with NEED_CHECK set.
rc=0; qemu-img check disk.qed > check.out 2>&1 || rc=$?
cat check.out
case $rc in
  0) ;;
  3) [ "$(need_check disk.qed)" = 1 ] || fail "leaks with NEED_CHECK clear" ;;
  *) fail "qemu-img check: exit $rc" ;;
esac
nbdkit -U - "$PLUGIN" disk.qed --run 'nbdsh -u "$uri" -c "h.flush()"' ||
  fail "reopen failed"
[ "$(need_check disk.qed)" = 0 ] || fail "NEED_CHECK set after a clean reopen"
qemu_check disk.qed
echo OK
