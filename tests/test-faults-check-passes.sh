#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# NEED_CHECK is cleared only when every pass of a check ended clean.
# The image below needs two passes: the only hole lies below its L2
# table but is one cluster, so the first pass parks the table after the
# end of the file and a second pass moves it down.  When the second
# pass cannot read the parked table (EIO), the first pass's clean result
# must not clear NEED_CHECK: the open fails as for any check error, the
# flag stays set, and a later open without the fault repairs the image.
# The same at a clean stop: when the compaction cannot read a table,
# the trimmed clusters stay leaked and NEED_CHECK must stay set.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdinfo --version
requires /usr/bin/python3 -c "import nbd"
[ -f "$PLUGIN" ] || skip "the plugin is not built"
build_faultsim
cd "$tmp"

# 4K clusters, table size 2, 4M disk:
# [header][L1 L1][data 0xab][leak][T0 T0], NEED_CHECK set.
make_image () {
  /usr/bin/python3 - "$1" <<'EOF'
import struct, sys
cs = 4096
f = bytearray(7 * cs)
struct.pack_into("<IIIIQQQQQII", f, 0, 0x00444551, cs, 2, 1, 2, 0, 0,
                 cs, 4 << 20, 0, 0)
struct.pack_into("<Q", f, cs, 5 * cs)           # L1[0]: T0
struct.pack_into("<Q", f, 5 * cs, 3 * cs)       # T0[0]: the data
f[3 * cs:4 * cs] = b"\xab" * cs
f[4 * cs:5 * cs] = b"\xee" * cs                 # leaked
open(sys.argv[1], "wb").write(f)
EOF
  export FAULTSIM_FILE=$tmp/$1
}
# serve LOG ARGS...: open the image writable once (nbdinfo), then stop.
serve () {
  local log=$1; shift
  LD_PRELOAD=$FAULTSIM nbdkit -f -v -U - "$PLUGIN" disk.qed idle-clean=0 "$@" \
    --run 'nbdinfo --size "$uri"' > "$log" 2>&1
}
data_intact () {
  out=$(qemu-io -r -f qed -c "read -P 0xab 0 4k" -c "read -P 0 4096 $((4 * 1024 * 1024 - 4096))" \
        disk.qed) || fail "$1: QEMU reads: $out"
  case "$out" in *failed*) fail "$1: QEMU reads other data: $out";; esac
}

# Without a fault: two passes, a clean image.
make_image disk.qed
rc=0; qemu-img check disk.qed > check.out 2>&1 || rc=$?
[ $rc = 3 ] || { cat check.out; fail "the image is not leaking (rc $rc)"; }
serve plain.log || { cat plain.log; fail "repair without a fault failed"; }
[ "$(grep -cE 'debug: .*: [0-9]+ leaked clusters$' plain.log)" = 2 ] ||
  { cat plain.log; fail "the repair did not take two passes"; }
[ "$(need_check disk.qed)" = 0 ] || fail "NEED_CHECK set after the repair"
qemu_check disk.qed
data_intact "no fault"
echo "ok: two passes, clean"

# The second pass's first table read fails (the first pass read the
# table twice: its walk, then the relink of the parked copy), and so
# does every table read after it: the maintenance at exit (which
# repairs an image no connection could open) fails too, instead of
# repairing after the fault has passed.
for fl in false true; do
  make_image disk.qed
  rm -f "$FAULTSIM_DIR"/*
  inject pread "EIO 2 -1 len>=8192 len<8193"
  if serve fault.log freelist=$fl; then
    cat fault.log; echo "fault.log above"
    [ "$(need_check disk.qed)" = 1 ] || fail "freelist=$fl: NEED_CHECK cleared" \
      "although the second pass of the check failed"
    fail "freelist=$fl: the open succeeded although the check failed"
  fi
  uninject pread
  [ "$(fault_hits pread)" -ge 1 ] || fail "freelist=$fl: the fault was not hit"
  # It hit the second pass: after the first pass's moves and truncation.
  grep -q "reclaimed 0 leaked clusters (2 moved)" fault.log &&
    grep -A100 "reclaimed 0 leaked clusters (2 moved)" fault.log |
      grep -q "cannot read L2 table at 0x7000" ||
    { cat fault.log; fail "freelist=$fl: the fault did not hit the second pass"; }
  [ "$(need_check disk.qed)" = 1 ] || fail "freelist=$fl: NEED_CHECK cleared"
  rc=0; qemu-img check disk.qed > check.out 2>&1 || rc=$?
  [ $rc = 0 ] || [ $rc = 3 ] || { cat check.out; fail "freelist=$fl: rc $rc"; }
  data_intact "freelist=$fl, after the fault"
  # Without the fault the next open repairs it.
  serve again.log freelist=$fl || { cat again.log; fail "freelist=$fl: reopen"; }
  [ "$(need_check disk.qed)" = 0 ] || fail "freelist=$fl: NEED_CHECK after reopen"
  qemu_check disk.qed
  data_intact "freelist=$fl, reopened"
  echo "ok: freelist=$fl: a failed second pass keeps NEED_CHECK"
done

# The compaction at a clean stop cannot read the L2 tables (8K reads:
# served requests read 4K pages).
rm -f disk.qed "$FAULTSIM_DIR"/log "$FAULTSIM_DIR"/pread
qemu-img create -q -f qed -o cluster_size=4k,table_size=2 disk.qed 8M
export FAULTSIM_FILE=$tmp/disk.qed
LD_PRELOAD=$FAULTSIM start_nbdkit p "$PLUGIN" disk.qed idle-clean=0 freelist=false
/usr/bin/python3 - "$(uri p)" <<'EOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"A" * 65536, 0)
h.pwrite(b"B" * 65536, 4 << 20)
h.flush()
h.trim(32768, 0)
h.flush()
EOF
inject pread "EIO 0 -1 len>=8192 len<8193"
stop_nbdkit p
uninject pread
[ "$(fault_hits pread)" -ge 1 ] || fail "stop: the fault was not hit"
rc=0; qemu-img check disk.qed > check.out 2>&1 || rc=$?
[ $rc = 3 ] || { cat check.out; fail "stop: expected leaks (rc $rc)"; }
[ "$(need_check disk.qed)" = 1 ] ||
  fail "stop: NEED_CHECK cleared with leaked clusters after a failed check"
nbdkit -U - "$PLUGIN" disk.qed freelist=false \
  --run 'nbdinfo --size "$uri" >/dev/null' || fail "stop: reopen failed"
[ "$(need_check disk.qed)" = 0 ] || fail "stop: NEED_CHECK after reopen"
qemu_check disk.qed
echo "ok: a compaction that cannot read a table keeps NEED_CHECK"
echo PASS
