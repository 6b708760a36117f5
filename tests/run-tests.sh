#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# nbdkit-qed test runner: runs the unit tests and every tests/test-*.sh,
# each with a time limit, and ends with "N passed, M failed".
# Usage: tests/run-tests.sh [PATTERN...]   (substring filters on names)
# With CI=true a skipped test counts as failed.
# QED_EXCLUDE_TESTS="NAME..." leaves those tests out (counted as skipped,
# even with CI=true: they are left out on purpose, and say why):
# check-debian13.sh uses it for what cannot run in a chroot.
set -u
cd "$(dirname "$0")/.."
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH   # nbdsh needs Debian's python3
top=$(pwd)
logs=$top/tests/logs
mkdir -p "$logs"
pass=0 fail=0 skip=0 failed=()

tests=()
for t in tests/unit-tests tests/unit-tests-asan tests/test-*.sh; do
  [ -e "$t" ] || continue
  if [ $# -gt 0 ]; then
    m=0; for p in "$@"; do case "$t" in *"$p"*) m=1;; esac; done
    [ $m = 1 ] || continue
  fi
  tests+=("$t")
done

for t in "${tests[@]}"; do
  name=$(basename "$t" .sh)
  case " ${QED_EXCLUDE_TESTS:-} " in
    *" $name "*) skip=$((skip+1)); echo "SKIP: $name (excluded here)"; continue ;;
  esac
  echo "RUN:  $name"
  log=$logs/$name.log
  start=$(date +%s.%N)
  # A script may ask for more time with a "# test-timeout: SECONDS" line.
  limit=${TEST_TIMEOUT:-$(sed -n 's/^# test-timeout: \([0-9]*\)$/\1/p' "$t" 2>/dev/null | head -n1)}
  limit=${limit:-300}
  case "$t" in
    *.sh) TOP=$top timeout -k 10 $limit bash "$t" >"$log" 2>&1 ;;
    *)    TOP=$top timeout -k 10 $limit "./$t" >"$log" 2>&1 ;;
  esac
  rc=$?
  secs=$(printf '%.1f' "$(echo "$(date +%s.%N) - $start" | bc)")
  if [ $rc = 0 ]; then
    pass=$((pass+1)); echo "PASS: $name (${secs}s)"
  elif [ $rc = 77 ] && [ "${CI:-}" = true ]; then
    # CI installs everything: a skip there means something is broken.
    fail=$((fail+1)); failed+=("$name")
    echo "FAIL: $name (skipped in CI: $(tail -n1 "$log"))"
  elif [ $rc = 77 ]; then
    skip=$((skip+1)); echo "SKIP: $name ($(tail -n1 "$log"))"
  else
    fail=$((fail+1)); failed+=("$name"); echo "FAIL: $name (rc=$rc, ${secs}s)"
    tail -n 25 "$log" | sed 's/^/    | /'
  fi
done

[ ${#failed[@]} -gt 0 ] && echo "failed: ${failed[*]}"
echo "$pass passed, $fail failed, $skip skipped"
[ $fail = 0 ]
