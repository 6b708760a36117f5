#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Build a libFuzzer target over open/validate/map/check of a QED image
# and run it for SECONDS (default 300) from the checked-in seed corpus.
#   bash tests/fuzz.sh [--file] [SECONDS] [extra libFuzzer options...]
# The default target, tests/fuzz-open, is the fast one (-DFUZZ_FAST
# -DFUZZ_MEM): the image files are in memory (tests/fuzz-io-mem.c in
# place of common/io-file.c, so an input costs no system call), -O2,
# ASan, UBSan in trap mode, no comparison tracing, lookups of at most
# 1024 clusters, the writable pass (repair, writes, compaction,
# reopen) on one input in 8, and on one trusted input in 4 the same
# with injected I/O failures, then the fault-property oracle (step 5 in
# tests/fuzz-open.c).
# --file builds tests/fuzz-open-file instead: each input written to a
# file in /dev/shm and opened through the kernel (common/io-file.c),
# every input through the full read-only and writable passes, -O1,
# comparison tracing.
# Prints the executions and the crashes found (saved as
# tests/fuzz-crash-*, reproducible with: ./tests/fuzz-open FILE).
# Seeds: tests/fuzz-seeds.tar.xz, the first 128 KiB of every image of
# the hostile catalogue, unpacked into tests/fuzz-corpus/ each run.
# Regenerate it with:
#   /usr/bin/python3 tests/make-hostile.py /tmp/cat --corpus /tmp/seeds
#   tar --sort=name --owner=0 --group=0 --mtime=@0 -C /tmp/seeds -cf - . |
#     xz -9e > tests/fuzz-seeds.tar.xz
# Inputs libFuzzer finds interesting go to tests/fuzz-work/, which is
# kept between runs.
# Environment: JOBS=N runs N fuzzing processes in parallel (default 1).
set -u
cd "$(dirname "$0")/.."
target=tests/fuzz-open
cflags="-O2 -DFUZZ_FAST -DFUZZ_MEM -fsanitize=fuzzer,address,undefined
  -fsanitize-trap=undefined -fno-sanitize-coverage=trace-cmp"
io=tests/fuzz-io-mem.c
if [ "${1:-}" = --file ]; then
  shift
  target=tests/fuzz-open-file
  cflags="-O1 -fsanitize=fuzzer,address,undefined
    -fno-sanitize-recover=undefined"
  io=common/io-file.c
fi
secs=${1:-300}; shift || true
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
CLANG=${CLANG:-clang}
command -v "$CLANG" >/dev/null || { echo "SKIP: $CLANG not found"; exit 77; }

CORE=$(make -s --no-print-directory print-core-srcs) ||
  { echo "FAIL: make print-core-srcs"; exit 1; }
# The I/O seam: the kernel's (common/io-file.c) or memory's.
CORE="$(echo " $CORE " | sed 's| common/io-file.c | |') $io"
echo "building $target"
# shellcheck disable=SC2086
$CLANG -g $cflags -std=gnu11 -D_GNU_SOURCE -pthread -Icommon \
  -fno-omit-frame-pointer -Itests -o $target tests/fuzz-open.c $CORE ||
  { echo "FAIL: build"; exit 1; }

corpus=tests/fuzz-corpus
rm -rf "$corpus" && mkdir -p "$corpus" &&
  tar -C "$corpus" -xJf tests/fuzz-seeds.tar.xz ||
  { echo "FAIL: unpack tests/fuzz-seeds.tar.xz"; exit 1; }
work=tests/fuzz-work
mkdir -p "$work"
echo "seed corpus: $(ls "$corpus" | wc -l) files, work corpus: $(ls "$work" | wc -l) files"

log=tests/logs/fuzz.log
mkdir -p tests/logs
rm -f tests/logs/fuzz-[0-9]*.log
before=$(ls tests/fuzz-crash-* tests/fuzz-leak-* tests/fuzz-timeout-* \
         tests/fuzz-oom-* 2>/dev/null | wc -l)
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
./$target -max_len=131072 -max_total_time="$secs" -timeout=20 \
  -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix=tests/fuzz- \
  ${JOBS:+-jobs=$JOBS -workers=$JOBS} "$@" "$work" "$corpus" >"$log" 2>&1
rc=$?
after=$(ls tests/fuzz-crash-* tests/fuzz-leak-* tests/fuzz-timeout-* \
        tests/fuzz-oom-* 2>/dev/null | wc -l)
# With JOBS the jobs write fuzz-N.log here and the main log repeats
# their stats: count the job logs only (moved to tests/logs/).
if [ -n "${JOBS:-}" ]; then
  mv fuzz-[0-9]*.log tests/logs/ 2>/dev/null
  log=$(ls tests/logs/fuzz-[0-9]*.log)
fi
# shellcheck disable=SC2086
execs=$(grep -h 'stat::number_of_executed_units' $log 2>/dev/null |
          awk '{s+=$2} END {print s+0}')
# shellcheck disable=SC2086
grep -hE '^#[0-9]+ +DONE|stat::' $log | tail -n 8
echo "target: $target, seconds: $secs, executions/s: $((execs / (secs > 0 ? secs : 1)))"
echo "executions: $execs, new crashes: $((after - before)), libFuzzer exit $rc"
ls tests/fuzz-crash-* tests/fuzz-leak-* tests/fuzz-timeout-* \
   tests/fuzz-oom-* 2>/dev/null
[ $rc = 0 ] && [ $after = $before ]
