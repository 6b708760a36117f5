#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A repair that moves an L2 table and then cannot write the L1 (EIO)
# must lose nothing.  Before the L1 is written, the L1 in memory points
# at the moved table and the file's at the old one: serving from there
# put new writes where the file does not reach, and the compaction at
# the clean stop cut the old table away (the acknowledged write was
# lost and QEMU could no longer read the image).  Whatever the plugin
# does with the failure, every acknowledged write must be in the file
# after a clean stop, the file must have no corruption (leaks only with
# NEED_CHECK set), and an open without the fault must repair it clean.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c "import nbd"
[ -f "$PLUGIN" ] || skip "the plugin is not built"
build_faultsim
cd "$tmp"

# 4K clusters, table size 2, 4M disk, NEED_CHECK set:
# [header][L1 L1][data 0xab][leak leak][T0 T0].  The repair moves T0
# down into the two leaked clusters and then writes L1[0] (at 0x1000).
/usr/bin/python3 - disk.qed <<'PY'
import struct, sys
cs = 4096
f = bytearray(8 * cs)
struct.pack_into("<IIIIQQQQQII", f, 0, 0x00444551, cs, 2, 1, 2, 0, 0,
                 cs, 4 << 20, 0, 0)
struct.pack_into("<Q", f, cs, 6 * cs)           # L1[0]: T0
struct.pack_into("<Q", f, 6 * cs, 3 * cs)       # T0[0]: the data
f[3 * cs:4 * cs] = b"\xab" * cs
f[4 * cs:6 * cs] = b"\xee" * (2 * cs)           # leaked
open(sys.argv[1], "wb").write(f)
PY
cp disk.qed orig.qed
export FAULTSIM_FILE=$tmp/disk.qed

# serve LOG: open writable, write 0xcd at 4K and flush; the exit status
# says whether the write was acknowledged.
serve () {
  LD_PRELOAD=$FAULTSIM nbdkit -f -v -U - "$PLUGIN" disk.qed idle-clean=0 \
    freelist=false --run 'nbdsh -u "$uri" -c "h.pwrite(b\"\\xcd\" * 4096, 4096)" -c "h.flush()"' \
    > "$1" 2>&1
}
# reads PATTERN-AT-4K: what QEMU reads must be 0xab at 0 and this at 4K.
reads () {
  out=$(qemu-io -r -f qed -c "read -P 0xab 0 4k" -c "read -P $1 4k 4k" \
        disk.qed 2>&1) || fail "QEMU cannot read the image: $out"
  case "$out" in *failed*|*rror*) fail "QEMU reads other data: $out";; esac
}
no_corruption () {
  local rc=0
  qemu-img check disk.qed > check.out 2>&1 || rc=$?
  [ $rc = 0 ] || { [ $rc = 3 ] && [ "$(need_check disk.qed)" = 1 ]; } ||
    { cat check.out; fail "$1: qemu-img check rc $rc, NEED_CHECK $(need_check disk.qed)"; }
}

# Without a fault: the repair moves the table, the write lands.
serve plain.log || { cat plain.log; fail "serving without a fault failed"; }
grep -q "(2 moved)" plain.log || { cat plain.log; fail "the repair moved no table"; }
reads 0xcd
qemu_check disk.qed
echo "ok: no fault"

# The L1 write of the repair fails once.
cp orig.qed disk.qed
inject pwrite "EIO 0 1 off>=4096 off<4104"
acked=yes
serve fault.log || acked=no
uninject pwrite
[ "$(fault_hits pwrite)" = 1 ] || { cat fault.log; fail "the L1 write fault was not hit"; }
no_corruption "after the fault"
if [ $acked = yes ]; then
  reads 0xcd            # acknowledged, so it must be there
else
  reads 0               # refused: the old data must be intact
  grep -q "cannot open the image: .*L1" fault.log ||
    { cat fault.log; fail "the refused open did not say why"; }
fi
echo "ok: the L1 write failed, write acknowledged: $acked, nothing lost"

# Without the fault the image is repaired and serves.
serve again.log || { cat again.log; fail "serving after the fault failed"; }
reads 0xcd
qemu_check disk.qed
[ "$(need_check disk.qed)" = 0 ] || fail "NEED_CHECK set after a clean stop"
echo "ok: repaired clean after the fault"
