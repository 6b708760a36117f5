#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Leak accounting that cannot lie: a cluster that leaves the allocator
# without reaching a table is returned to a free list or marks the
# image as leaking, and NEED_CHECK is cleared only on a clean image.
# After each failure below, while served (idle timer), after a clean
# stop and after a reopen: `qemu-img check` may report leaks only while
# NEED_CHECK is set, never corruption.
#   1. a data write fails with EIO on a file system that cannot punch;
#   2. the data write succeeds, allocating its new L2 table fails;
#   3. re-punching a recycled free cluster fails;
#   4. copy-on-read fills in the filter fail with ENOSPC (20 MiB tmpfs).
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
[ -f "$PLUGIN" ] || skip "the plugin is not built"
build_faultsim
cd "$tmp"

# CASES="2 4" runs only those cases (debugging).
want () { [[ " ${CASES:-1 2 3 4} " == *" $1 "* ]]; }
# leaks_only_with_need_check FILE WHEN [-U]
leaks_only_with_need_check () {
  local rc=0
  qemu-img check ${3:-} "$1" > check.out 2>&1 || rc=$?
  case $rc in
    0) ;;
    3) [ "$(need_check "$1")" = 1 ] || {
         cat check.out; fail "$2: leaked clusters with NEED_CHECK clear"; } ;;
    *) cat check.out; fail "$2: qemu-img check exit $rc" ;;
  esac
}
# fresh: a new image for the shim; after_fault WHAT: the checks.
fresh () {
  rm -f disk.qed "$FAULTSIM_DIR"/*
  qemu-img create -q -f qed disk.qed 64M
  export FAULTSIM_FILE=$tmp/disk.qed
}
after_fault () {
  local what=$1
  sleep 2.5                     # idle-clean=1
  leaks_only_with_need_check disk.qed "$what (idle)" -U
  stop_nbdkit p
  leaks_only_with_need_check disk.qed "$what (clean stop)"
  nbdkit -U - "$PLUGIN" disk.qed freelist=false --run 'nbdsh -u "$uri" -c "h.flush()"' ||
    fail "$what: reopen failed"
  [ "$(need_check disk.qed)" = 0 ] || fail "$what: NEED_CHECK set after a reopen"
  qemu_check disk.qed
}

# 1. No hole punching, and the data write fails.
if want 1; then
fresh
inject fallocate "EOPNOTSUPP 0 -1 punch"
LD_PRELOAD=$FAULTSIM start_nbdkit p "$PLUGIN" disk.qed idle-clean=1 freelist=false
nbdsh -u "$(uri p)" -c '
h.pwrite(b"A" * 65536, 0)
import os
open(os.environ["FAULTSIM_DIR"] + "/pwrite", "w").write("EIO 0 1 len>=65536\n")
try:
    h.pwrite(b"B" * 65536, 8 << 20)
    raise SystemExit("FAIL: the failing write succeeded")
except nbd.Error as e:
    print("write failed as it must:", e)
'
[ "$(fault_hits pwrite)" = 1 ] || fail "1: the write fault was not hit"
uninject pwrite
after_fault "1 (EIO, no punch)"
fi

# 2. The data is written, its new L2 table cannot be allocated: the
#    data fills the 8 MiB the file grows by first, so the table needs
#    the second growth, which fails.
if want 2; then
fresh
inject ftruncate "EIO 1 -1 grow"
LD_PRELOAD=$FAULTSIM start_nbdkit p "$PLUGIN" disk.qed idle-clean=1 freelist=false
nbdsh -u "$(uri p)" -c '
try:
    h.pwrite(b"C" * ((8 << 20) - (320 << 10)), 0)
    raise SystemExit("FAIL: the write whose table failed succeeded")
except nbd.Error as e:
    print("write failed as it must:", e)
'
[ "$(fault_hits ftruncate)" -ge 1 ] || fail "2: the ftruncate fault was not hit"
uninject ftruncate
after_fault "2 (L2 table allocation)"
fi

# 3. Trimmed clusters are recycled; re-punching one fails.
if want 3; then
fresh
LD_PRELOAD=$FAULTSIM start_nbdkit p "$PLUGIN" disk.qed idle-clean=1 freelist=false
nbdsh -u "$(uri p)" -c '
import os
h.pwrite(b"D" * (1 << 20), 0)
h.pwrite(b"E" * 65536, 4 << 20)
h.flush()
h.trim(1 << 20, 0)
h.flush()
open(os.environ["FAULTSIM_DIR"] + "/fallocate", "w").write("EIO 0 1 punch\n")
h.pwrite(b"F" * 65536, 8 << 20)   # one cluster: from the free list
h.flush()
'
[ "$(fault_hits fallocate)" = 1 ] || fail "3: the re-punch fault was not hit"
uninject fallocate
after_fault "3 (re-punch)"
fi
want 4 || { echo OK; exit 0; }

# 4. The filter: copy-on-read fills into an overlay on a full tmpfs.
#    First 8 MiB are read and the idle timer writes them back and
#    clears NEED_CHECK: the L2 table page covering the first 32 MiB then
#    has its block on the tmpfs, so its later writebacks succeed on the
#    full file system.  Then the reads up to 32 MiB fill the tmpfs and
#    the fills after that fail with ENOSPC: their clusters leak, and the
#    next idle writeback must not clear NEED_CHECK (the old code did:
#    leaks with NEED_CHECK clear, also after a clean stop and a reopen).
[ -f "$FILTER" ] || skip "the filter is not built"
small_fs "$tmp/small" 20M
LD_PRELOAD=$FAULTSIM FAULTSIM_FILE=$tmp/small/ov.qed \
  start_nbdkit f --log=stderr --filter="$FILTER" pattern 64M qed-overlay="$tmp/small/ov.qed" \
  qed-freelist=false
OV=$tmp/small/ov.qed nbdsh -u "$(uri f)" -c '
import os, time
def read(start, end):
    for off in range(start, end, 1 << 20):
        buf = h.pread(1 << 20, off)
        # pattern: each 8 bytes hold their own offset (big-endian)
        assert int.from_bytes(buf[:8], "big") == off, "wrong data at %d" % off
def need_check():
    with open(os.environ["OV"], "rb") as f:
        f.seek(16)
        return int.from_bytes(f.read(8), "little") & 2
read(0, 8 << 20)
# The filter cleans after 5 s idle (a loaded machine may take longer).
for i in range(60):
    if not need_check():
        break
    time.sleep(0.5)
else:
    raise SystemExit("FAIL: 4: the idle writeback did not clear NEED_CHECK")
read(8 << 20, 32 << 20)
'
df -k "$tmp/small" | tail -1
grep -q "No space left on device" "$tmp/f.log" ||
  fail "4: no copy-on-read fill failed with ENOSPC"
sleep 7                         # the filter cleans after 5 s idle
leaks_only_with_need_check "$tmp/small/ov.qed" "4 (fill ENOSPC, idle)" -U
stop_nbdkit f
leaks_only_with_need_check "$tmp/small/ov.qed" "4 (fill ENOSPC, clean stop)"
start_nbdkit f2 --filter="$FILTER" pattern 64M qed-overlay="$tmp/small/ov.qed" qed-freelist=false \
  qed-copy-on-read=false
nbdinfo --size "$(uri f2)" >/dev/null
stop_nbdkit f2
leaks_only_with_need_check "$tmp/small/ov.qed" "4 (fill ENOSPC, reopen)"
echo OK
