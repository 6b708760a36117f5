#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# NEED_CHECK is cleared only when every pass of the repair ended clean.
# The image below needs two passes: the only hole lies below its L2
# table but is one cluster, so the first pass parks the table after the
# end of the file and a second pass moves it down.  When the second
# pass cannot read the parked table (EIO), the first pass's clean result
# must not clear NEED_CHECK: the open fails as for any check error, the
# flag stays set, and a later open without the fault repairs the image.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdinfo --version
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
# table twice: its walk, then the relink of the parked copy).
for fl in false true; do
  make_image disk.qed
  rm -f "$FAULTSIM_DIR"/*
  inject pread "EIO 2 1 len>=8192 len<8193"
  if serve fault.log freelist=$fl; then
    cat fault.log; echo "fault.log above"
    [ "$(need_check disk.qed)" = 1 ] || fail "freelist=$fl: NEED_CHECK cleared" \
      "although the second pass of the check failed"
    fail "freelist=$fl: the open succeeded although the check failed"
  fi
  uninject pread
  [ "$(fault_hits pread)" = 1 ] || fail "freelist=$fl: the fault was not hit"
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
echo PASS
