#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# nbdkit-qed: four VMs over one origin (manual, "An overlay per
# export").  The origin is a SIZE (default 128 MiB) random file under
# nbdkit's delay filter (rdelay=1ms, a remote disk as in run.sh's
# workload 9), with the stats filter above it counting what reaches
# it.  Four clients copy a whole disk each (nbdcopy, at the same time)
# from:
#
#   one-server   one nbdkit, --filter=qed qed-overlay-dir=D
#                qed-shared-cache=D/shared.qed, exports e0..e3;
#   cache-x4     four nbdkit processes with nbdkit's cache filter
#                (cache-on-read=true), one per client;
#   qed-x4       four nbdkit processes with our filter, one overlay
#                each (qed-overlay=).
#
# Printed per setup: the bytes the origin served (all processes) as
# MiB and as a multiple of SIZE, the wall time of the four copies, and
# the aggregate first-pass throughput (4 x SIZE / time).  Medians of
# --reps (default 3) runs.  The machine is shared: times are noisy.
#
# Usage: bench/shared-cache.sh [--reps N] [--size MiB]
set -euo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH LC_ALL=C
TOP=$(cd "$(dirname "$0")/.." && pwd)
FILTER=$TOP/filter/nbdkit-qed-filter.so
reps=3 size_mb=128
while [ $# -gt 0 ]; do
  case $1 in
    --reps) reps=$2; shift 2 ;;
    --size) size_mb=$2; shift 2 ;;
    *) echo "usage: $0 [--reps N] [--size MiB]" >&2; exit 2 ;;
  esac
done
make -C "$TOP" -s all >/dev/null
tmp=$(mktemp -d /var/tmp/nbdkit-qed-shared.XXXXXX)
pids=()
cleanup () {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
size=$((size_mb << 20))
head -c "$size" /dev/urandom > "$tmp/remote.raw"

# start N FILTER PARAMS...: nbdkit with FILTER over the origin on
# $tmp/sN.sock, stats in $tmp/sN.stats.
start () {
  local n=$1 f=$2; shift 2
  rm -f "$tmp/s$n.sock" "$tmp/s$n.pid"
  nbdkit -U "$tmp/s$n.sock" -P "$tmp/s$n.pid" "$f" \
    --filter=stats --filter=delay file "$tmp/remote.raw" rdelay=1ms \
    statsfile="$tmp/s$n.stats" "$@"
  for _ in $(seq 1 200); do [ -s "$tmp/s$n.pid" ] && break; sleep 0.05; done
  pids+=("$(cat "$tmp/s$n.pid")")
}
stop_all () {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
  done
  pids=()
}
# origin_bytes: what the stats filters saw read, summed.
origin_bytes () {
  /usr/bin/python3 - "$tmp"/s*.stats <<'PY'
import re, sys
unit = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
total = 0
for f in sys.argv[1:]:
    for line in open(f):
        m = re.match(r"read: \d+ ops, [\d.]+ s, ([\d.]+) (\w+),", line)
        if m:
            total += float(m.group(1)) * unit[m.group(2)]
print(int(total))
PY
}
now () { date +%s.%N; }

# run SETUP: one repetition; prints "origin_bytes seconds".
run () {
  local setup=$1 t0 t1 i cp=()
  rm -rf "$tmp"/d "$tmp"/*.qed "$tmp"/s*.stats "$tmp"/cache
  mkdir "$tmp/d" "$tmp/cache"
  case $setup in
    one-server)
      start 0 --filter="$FILTER" qed-overlay-dir="$tmp/d" \
        qed-shared-cache="$tmp/d/shared.qed"
      for i in 0 1 2 3; do cp+=("nbd+unix:///e$i?socket=$tmp/s0.sock"); done ;;
    cache-x4)
      for i in 0 1 2 3; do
        TMPDIR=$tmp/cache start $i --filter=cache cache-on-read=true
        cp+=("nbd+unix:///?socket=$tmp/s$i.sock")
      done ;;
    qed-x4)
      for i in 0 1 2 3; do
        start $i --filter="$FILTER" qed-overlay="$tmp/ov$i.qed"
        cp+=("nbd+unix:///?socket=$tmp/s$i.sock")
      done ;;
  esac
  t0=$(now)
  local cps=()
  for i in 0 1 2 3; do nbdcopy "${cp[$i]}" null: & cps+=($!); done
  wait "${cps[@]}"
  t1=$(now)
  stop_all
  echo "$(origin_bytes) $(echo "$t1 - $t0" | bc -l)"
}

median () { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

echo "shared-cache benchmark: 4 clients x $size_mb MiB, rdelay=1ms, $reps reps, medians"
printf '%-12s %12s %8s %10s %14s\n' setup origin_MiB x_size seconds aggr_MiB/s
for setup in one-server cache-x4 qed-x4; do
  : > "$tmp/res"
  for ((r = 0; r < reps; r++)); do run "$setup" >> "$tmp/res"; done
  ob=$(awk '{ print $1 }' "$tmp/res" | median)
  sec=$(awk '{ print $2 }' "$tmp/res" | median)
  printf '%-12s %12.1f %8.2f %10.2f %14.1f\n' "$setup" \
    "$(echo "$ob / 1048576" | bc -l)" "$(echo "$ob / $size" | bc -l)" \
    "$sec" "$(echo "4 * $size_mb / $sec" | bc -l)"
done
