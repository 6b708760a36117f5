#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Random operations with random injected faults (EIO, ENOSPC, no hole
# punching; on pread, pwrite, fdatasync, ftruncate, fallocate; some
# trials on a small tmpfs that fills up), then a clean stop: qemu-img
# check finds no corruption and leaks only with NEED_CHECK set; a
# writable reopen with space and a clean stop check clean, and every
# acknowledged write reads back.  See tests/fault-property.py.  Short
# form (FAULT_TRIALS, default 8); the long form is `make fault-test`.
# FAULT_SEED and FAULT_FIRST replay trials (the seed is printed first).
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires /usr/bin/python3 -c 'import nbd'
[ -f "$PLUGIN" ] || fail "the plugin is not built"
build_faultsim
/usr/bin/python3 "$TOP/tests/fault-property.py" --plugin "$PLUGIN" \
  --shim "$FAULTSIM" --trials "${FAULT_TRIALS:-8}" --tmpdir "$tmp" \
  --keep "$TOP/tests/logs" ${FAULT_SEED:+--seed "$FAULT_SEED"} \
  ${FAULT_FIRST:+--first "$FAULT_FIRST"}
