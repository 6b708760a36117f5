#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Build the libFuzzer target tests/fuzz-open and run it for SECONDS
# (default 300) with the hostile-image catalogue as the seed corpus.
# Prints the executions and the crashes found (saved as
# tests/fuzz-crash-*, reproducible with: ./tests/fuzz-open FILE).
# The seeds (tests/fuzz-corpus/, regenerated each run) stay as they
# are; inputs libFuzzer finds interesting go to tests/fuzz-work/, which
# is kept between runs.
#   bash tests/fuzz.sh [SECONDS] [extra libFuzzer options...]
# Environment: JOBS=N runs N fuzzing processes in parallel (default 1).
set -u
cd "$(dirname "$0")/.."
secs=${1:-300}; shift || true
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
CLANG=${CLANG:-clang}
command -v "$CLANG" >/dev/null || { echo "SKIP: $CLANG not found"; exit 77; }

CORE=$(make -s --no-print-directory print-core-srcs) ||
  { echo "FAIL: make print-core-srcs"; exit 1; }
echo "building tests/fuzz-open"
$CLANG -g -O1 -std=gnu11 -D_GNU_SOURCE -pthread -Icommon \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -fno-omit-frame-pointer -o tests/fuzz-open tests/fuzz-open.c $CORE ||
  { echo "FAIL: build"; exit 1; }

corpus=tests/fuzz-corpus
if command -v qemu-img >/dev/null && command -v qemu-io >/dev/null; then
  cat=$(mktemp -d /tmp/qed-hostile.XXXXXX)
  /usr/bin/python3 tests/make-hostile.py "$cat" --corpus "$corpus" ||
    { rm -rf "$cat"; echo "FAIL: make-hostile.py"; exit 1; }
  rm -rf "$cat"
else
  echo "qemu-img/qemu-io missing: using the existing corpus only"
  mkdir -p "$corpus"
fi
work=tests/fuzz-work
mkdir -p "$work"
echo "seed corpus: $(ls "$corpus" | wc -l) files, work corpus: $(ls "$work" | wc -l) files"

log=tests/logs/fuzz.log
mkdir -p tests/logs
before=$(ls tests/fuzz-crash-* tests/fuzz-leak-* tests/fuzz-timeout-* \
         tests/fuzz-oom-* 2>/dev/null | wc -l)
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
./tests/fuzz-open -max_len=131072 -max_total_time="$secs" -timeout=20 \
  -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix=tests/fuzz- \
  ${JOBS:+-jobs=$JOBS -workers=$JOBS} "$@" "$work" "$corpus" >"$log" 2>&1
rc=$?
after=$(ls tests/fuzz-crash-* tests/fuzz-leak-* tests/fuzz-timeout-* \
        tests/fuzz-oom-* 2>/dev/null | wc -l)
execs=$(grep -h 'stat::number_of_executed_units' "$log" tests/logs/fuzz-*.log \
          fuzz-*.log 2>/dev/null | awk '{s+=$2} END {print s+0}')
grep -E '^#[0-9]+ +DONE|stat::' "$log" | tail -n 8
echo "executions: $execs, new crashes: $((after - before)), libFuzzer exit $rc"
ls tests/fuzz-crash-* tests/fuzz-leak-* tests/fuzz-timeout-* \
   tests/fuzz-oom-* 2>/dev/null
[ $rc = 0 ] && [ $after = $before ]
