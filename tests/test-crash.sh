#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Crash safety, short form (the long form is tests/crash-long.sh):
# - SIGKILL trials: a seeded multi-connection workload of writes, FUA
#   writes, zeroes (with and without MAY_TRIM), trims and flushes against
#   a client-side model; nbdkit is killed with -9 at a random point.
# - power-loss trials: the same workload with tests/crashsim.so preloaded
#   journals every mutation and fdatasync of the image; images a power
#   loss could leave (unflushed writes dropped, reordered or torn) are
#   rebuilt from the journal, including crashes inside the repair.
# - hand-made scenarios (clusters freed below the last L2 table, a clean
#   close): for every fdatasync, a power loss just before it keeping
#   every subset of the unsynced mutations (up to 2; else a sample).
# - data before tables, directly: in every journal no table write makes
#   an L2 entry point at data that no completed fdatasync covers.
# - SIGKILL trials through the filter (which must be built).
# Each crashed image must: keep every write acknowledged before a
# completed flush (or with FUA); be left byte-identical by a -r open;
# repair at a writable open; and after a clean stop have NEED_CHECK clear
# and pass `qemu-img check`.  See tests/crash-harness.py.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires gcc --version
requires /usr/bin/python3 -c 'import nbd'
[ -f "$PLUGIN" ] || skip "the plugin is not built"

build_helper crashsim.so

[ -f "$FILTER" ] || fail "the filter is not built (make builds both)"
# --min: the time limit stops starting trials, but never below these
# counts (a loaded machine runs fewer trials, never none).
/usr/bin/python3 "$TOP/tests/crash-harness.py" \
  --kill 10 --power-runs 2 --power 20 --nested 3 --filter-kill 3 \
  --scenario-power 2 --exhaustive 2 \
  --min plugin_SIGKILL=5,plugin_power-loss=10,crash_in_repair=1,filter_SIGKILL=2,exhaustive=20,scenario=4,ordering=4 \
  --time-limit 45 --keep "$TOP/tests/logs" --tmpdir "$tmp" \
  ${CRASH_SEED:+--seed $CRASH_SEED}
