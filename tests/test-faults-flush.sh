#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A failed fdatasync sticks.  After Linux reports a writeback error it
# may have dropped the unsynced pages, so a later fdatasync that
# succeeds proves nothing about the data written before: every later
# flush must fail (as QEMU's file driver does) until the image is
# reopened, and NEED_CHECK must never be cleared in that state (idle
# timer or clean stop), so the next open checks the image.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
[ -f "$PLUGIN" ] || skip "the plugin is not built"
build_faultsim
cd "$tmp"

qemu-img create -q -f qed disk.qed 16M
export FAULTSIM_FILE=$tmp/disk.qed
LD_PRELOAD=$FAULTSIM start_nbdkit p "$PLUGIN" disk.qed idle-clean=1

nbdsh -u "$(uri p)" -c '
import errno, os, subprocess, time
h.pwrite(b"A" * 65536, 0)
h.flush()
def need_check():
    with open(os.environ["FAULTSIM_FILE"], "rb") as f:
        f.seek(16)
        return int.from_bytes(f.read(8), "little") & 2
for i in range(2400):           # the idle timer (1 s) cleans it
    if not need_check():
        break
    time.sleep(0.05)
else:
    raise SystemExit("FAIL: the idle timer did not clear NEED_CHECK")
def inject(kind, spec):
    with open(os.environ["FAULTSIM_DIR"] + "/" + kind + ".new", "w") as f:
        f.write(spec + "\n")
    os.rename(os.environ["FAULTSIM_DIR"] + "/" + kind + ".new",
              os.environ["FAULTSIM_DIR"] + "/" + kind)
h.pwrite(b"B" * 65536, 1 << 20)
inject("fdatasync", "EIO 0 1")  # the next fdatasync fails, once
try:
    h.flush()
    raise SystemExit("FAIL: the flush with a failing fdatasync succeeded")
except nbd.Error as e:
    print("first flush failed as it must:", e)
for i in range(3):
    try:
        h.flush()
        raise SystemExit("FAIL: a flush after a failed fdatasync succeeded")
    except nbd.Error as e:
        print("later flush failed:", e)
try:
    h.pwrite(b"C" * 512, 0, nbd.CMD_FLAG_FUA)
    raise SystemExit("FAIL: a FUA write after a failed fdatasync succeeded")
except nbd.Error as e:
    print("FUA write failed:", e)
time.sleep(2.5)                 # the idle timer must not clear NEED_CHECK
'
[ "$(fault_hits fdatasync)" = 1 ] || fail "the fdatasync fault was not hit once"
[ "$(need_check disk.qed)" = 1 ] ||
  fail "NEED_CHECK was cleared after a failed fdatasync (idle timer)"
stop_nbdkit p
[ "$(need_check disk.qed)" = 1 ] ||
  fail "NEED_CHECK was cleared after a failed fdatasync (clean stop)"

# A reopen checks the image and starts afresh: flushes work again.
nbdkit -U - "$PLUGIN" disk.qed --run 'nbdsh -u "$uri" -c "h.flush()"' ||
  fail "flush after a reopen failed"
[ "$(need_check disk.qed)" = 0 ] || fail "NEED_CHECK set after a clean reopen"
qemu_check disk.qed
echo OK
