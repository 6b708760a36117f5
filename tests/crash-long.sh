#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Crash safety, long form: bash tests/crash-long.sh [TRIALS] (default 600)
# Splits TRIALS between SIGKILL trials, power-loss reconstructions,
# crashes inside the repair and (if the filter is built) SIGKILL and
# power-loss trials through the filter.  Before those, the hand-made
# scenarios run with every subset of up to 4 unsynced mutations before
# each fdatasync (about 400 more trials).  About 7 minutes for the
# default (it stops starting trials after 14 minutes); ends with
# "trials N, failures M".  CRASH_SEED=S repeats a run's choices (not its
# thread timing).
set -u
cd "$(dirname "$0")/.."
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
top=$(pwd)
trials=${1:-600}
plugin=$top/plugin/nbdkit-qed-plugin.so
filter=$top/filter/nbdkit-qed-filter.so
[ -f "$plugin" ] || { echo "build the plugin first (make)"; exit 1; }
make -s tests/crashsim.so >/dev/null || exit 1

nested=$((trials / 10))
[ -f "$filter" ] || { echo "crash-long: the filter is not built"; exit 1; }
fkill=$((trials * 15 / 100)); fpower=$((trials * 10 / 100))
kill=$((trials * 30 / 100))
power=$((trials - kill - nested - fkill - fpower))
runs=$(( (power + 11) / 12 ))
fruns=$(( (fpower + 11) / 12 ))
mkdir -p tests/logs
exec /usr/bin/python3 tests/crash-harness.py --idle --scenario-power 8 \
  --exhaustive 4 \
  --kill $kill --power-runs $runs --power $power --nested $nested \
  --filter-kill $fkill --filter-power-runs $fruns --filter-power $fpower \
  --min plugin_SIGKILL=$((kill / 2)),plugin_power-loss=$((power / 2)),filter_SIGKILL=$((fkill / 2)),filter_power-loss=$((fpower / 2)),crash_in_repair=1,ordering=$runs \
  --time-limit 840 --keep tests/logs ${CRASH_SEED:+--seed $CRASH_SEED}
