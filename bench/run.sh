#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# nbdkit-qed benchmarks: our plugin (and filter) against qemu-nbd and
# nbdkit's file plugin, on the same data.  See bench/README.md.
#
#   bench/run.sh [--quick] [--reps N] [--runtime SECONDS] [--only REGEX]
#                [--keep] [--zero-all]
#
# Writes the table to stdout and to bench/results-latest.txt; the raw
# measurements (one line per run) go to bench/results-latest.tsv.
#
# Environment:
#   QEMU_NBD_OPTS    qemu-nbd cache/aio options
#                    (default: "--cache=writeback --aio=io_uring", falling
#                    back to --aio=threads if io_uring does not work)
#   NBDKIT_OPTS      extra nbdkit server options, given to every nbdkit
#                    server alike (ours, raw file, filters), e.g. "-t 1"
#   BENCH_TMPDIR     parent of the scratch directory (default /var/tmp)
#   QED_FILTER_ARGS  filter arguments for workload 6; @OVERLAY@ is
#                    replaced by the overlay's path (default:
#                    "qed-overlay=@OVERLAY@ qed-copy-on-read=true")

set -euo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
export LANG=C LC_ALL=C

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP=$(dirname "$BENCH")
PLUGIN=$TOP/plugin/nbdkit-qed-plugin.so
FILTER=$TOP/filter/nbdkit-qed-filter.so
PY=/usr/bin/python3

quick=0 reps= runtime= only= keep=0 zero_all=0
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --reps) reps=$2; shift ;;
    --runtime) runtime=$2; shift ;;
    --only) only=$2; shift ;;
    --keep) keep=1 ;;
    --zero-all) zero_all=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "$0: unknown option $1" >&2; exit 1 ;;
  esac
  shift
done

if [ $quick = 1 ]; then
  : "${reps:=1}" "${runtime:=1}"
  SIZE_MB=256                   # the data image
  ZERO_MB=256                   # workload 7
  RSIZE_MB=64                   # workload 9
else
  : "${reps:=3}" "${runtime:=2}"
  SIZE_MB=1024
  ZERO_MB=1024
  RSIZE_MB=128
fi
SIZE=$((SIZE_MB << 20))
section () { echo "== [${SECONDS}s] $*" >&2; }
CLUSTER=65536

for t in nbdkit qemu-nbd qemu-img qemu-io fio nbdinfo nbdcopy; do
  command -v $t >/dev/null || { echo "$0: $t is required" >&2; exit 1; }
done

# ---------------------------------------------------------------- build
section "building"
make -s -C "$TOP" plugin/nbdkit-qed-plugin.so >&2
have_filter=0
if make -s -C "$TOP" filter/nbdkit-qed-filter.so >&2 2>"$BENCH/.filter-build.log" &&
   [ -f "$FILTER" ]; then
  have_filter=1
else
  echo "note: the filter does not build; workload 6 is skipped" >&2
  tail -3 "$BENCH/.filter-build.log" >&2 || true
fi
rm -f "$BENCH/.filter-build.log"

# ---------------------------------------------------------- scratch dir
tmp=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/nbdkit-qed-bench.XXXXXX")
declare -a started=()           # PIDs of the servers we started
cleanup () {
  local rc=$? p
  for p in "${started[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  for p in "${started[@]}"; do
    for _ in $(seq 1 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
  done
  if [ $keep = 1 ]; then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

TSV=$tmp/results.tsv
: > "$TSV"
TICK=$(getconf CLK_TCK)

# ------------------------------------------------------ qemu-nbd options
if [ -z "${QEMU_NBD_OPTS:-}" ]; then
  QEMU_NBD_OPTS="--cache=writeback --aio=io_uring"
  qemu-img create -q -f qed "$tmp/probe.qed" 1M
  if ! qemu-nbd -t --fork --pid-file="$tmp/probe.pid" -k "$tmp/probe.sock" \
       -f qed $QEMU_NBD_OPTS "$tmp/probe.qed" 2>/dev/null; then
    QEMU_NBD_OPTS="--cache=writeback --aio=threads"
  else
    kill "$(cat "$tmp/probe.pid")"
  fi
  sleep 0.2
  rm -f "$tmp"/probe.*
fi

NBDKIT_OPTS=${NBDKIT_OPTS:-}

# -------------------------------------------------------------- servers
# start_server KIND IMAGE [EXTRA ARGS...]: start one server on $tmp/S.sock
# and set SPID.  KIND: ours | qemu | raw | filter (nbdkit file plugin
# under the filters given as EXTRA, e.g. --filter=cache ... key=value).
SOCK=$tmp/S.sock
URI="nbd+unix:///?socket=$SOCK"
SPID=
start_server () {
  local kind=$1 img=$2; shift 2
  rm -f "$SOCK" "$tmp/S.pid"
  case $kind in
    ours)   nbdkit $NBDKIT_OPTS -U "$SOCK" -P "$tmp/S.pid" "$PLUGIN" "$img" "$@" ;;
    qemu)   qemu-nbd -t --fork --pid-file="$tmp/S.pid" -k "$SOCK" \
              $QEMU_NBD_OPTS "$@" "$img" ;;
    raw)    nbdkit $NBDKIT_OPTS -U "$SOCK" -P "$tmp/S.pid" file "$img" "$@" ;;
    filter) nbdkit $NBDKIT_OPTS -U "$SOCK" -P "$tmp/S.pid" "$1" file "$img" "${@:2}" ;;
    # stack IMAGE OPTIONS... -- PARAMS...: filters (options) over the
    # file plugin.
    stack)  local pre=()
            while [ "$1" != -- ]; do pre+=("$1"); shift; done; shift
            nbdkit $NBDKIT_OPTS -U "$SOCK" -P "$tmp/S.pid" "${pre[@]}" \
              file "$img" "$@" ;;
  esac 2>>"$tmp/servers.log" || {
    echo "server $kind $img $* failed to start:" >&2
    tail -5 "$tmp/servers.log" >&2; return 1; }
  for _ in $(seq 1 1000); do [ -s "$tmp/S.pid" ] && break; sleep 0.005; done
  SPID=$(cat "$tmp/S.pid") || return 1
  started+=("$SPID")
}
# stop_server: SIGTERM and wait until it has exited (our plugin writes
# back its tables on the way out).
stop_server () {
  kill "$SPID" 2>/dev/null || true
  for _ in $(seq 1 1200); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.02; done
  if kill -0 "$SPID" 2>/dev/null; then
    echo "server $SPID did not exit" >&2; exit 1
  fi
  local a=() p
  for p in "${started[@]}"; do [ "$p" = "$SPID" ] || a+=("$p"); done
  started=("${a[@]+"${a[@]}"}")
  SPID=
}
cpu_ticks () { awk '{print $14 + $15}' "/proc/$1/stat"; }

# record WORKLOAD ROLE REP VALUE CPU_TICKS BYTES [EXTRA]: the records of
# a step are kept aside until the whole step has succeeded.
record () {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "${7:-}" \
    >> "$tmp/pending.tsv"
}

# step FUNCTION ARGS...: one server's part of a workload (prepare,
# start, measure, stop).  A step whose server dies is retried once:
# the machine is shared, and a crash of the peer (or a stray kill) must
# not throw away the whole run.  Steps return non-zero on failure.
step () {
  local try
  for try in 1 2; do
    : > "$tmp/pending.tsv"
    if "$@"; then
      cat "$tmp/pending.tsv" >> "$TSV"
      return 0
    fi
    echo "step failed (try $try): $*" >&2
    echo "--- server log:" >&2; tail -20 "$tmp/servers.log" >&2
    [ -n "$SPID" ] && stop_server
    echo "step failed (try $try): $*" >> "$tmp/failures.log"
  done
  echo "$0: giving up" >&2
  exit 1
}

# fio_run ARGS...: run fio against $URI; sets VALUE_BW (MiB/s), VALUE_IOPS
# and BYTES (read + written).
fio_run () {
  fio --name=bench --ioengine=nbd --uri="$URI" "$@" \
      --output-format=json --output="$tmp/fio.json" >"$tmp/fio.out" 2>&1 || {
    echo "fio failed: $*" >&2; tail -5 "$tmp/fio.out" >&2; return 1; }
  read -r VALUE_BW VALUE_IOPS BYTES < <($PY - "$tmp/fio.json" <<'EOF'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index('{'):])['jobs'][0]
bw = iops = nbytes = 0
for d in ('read', 'write'):
    bw += j[d]['bw_bytes']; iops += j[d]['iops']; nbytes += j[d]['io_bytes']
print('%.1f %.0f %d' % (bw / 2**20, iops, nbytes))
EOF
)
}

# measure WORKLOAD ROLE REP METRIC FIO-ARGS...: CPU-accounted fio run
# against the server that is running (METRIC: bw or iops).
measure () {
  local w=$1 role=$2 rep=$3 metric=$4; shift 4
  local c0 c1 v
  c0=$(cpu_ticks "$SPID") || return 1
  fio_run "$@" || return 1
  c1=$(cpu_ticks "$SPID") || return 1
  if [ "$metric" = bw ]; then v=$VALUE_BW; else v=$VALUE_IOPS; fi
  record "$w" "$role" "$rep" "$v" $((c1 - c0)) "$BYTES"
  printf '  %-10s %-7s rep %s: %10s %-5s cpu %.2fs\n' "$w" "$role" "$rep" "$v" \
    "$([ "$metric" = bw ] && echo MiB/s || echo IOPS)" \
    "$(echo "$c1 $c0 $TICK" | awk '{print ($1-$2)/$3}')" >&2
}

# The order of the servers rotates with each repetition.
order () {
  local rep=$1; shift
  local a=("$@") n=$# i
  for ((i = 0; i < n; i++)); do echo "${a[(i + rep) % n]}"; done
}

want () { [ -z "$only" ] || [[ $1 =~ $only ]]; }

# ----------------------------------------------------------------- data
section "preparing data in $tmp ($SIZE_MB MiB)"
# Incompressible, non-zero data: 1 MiB of random bytes, varied per MiB.
$PY - "$tmp/data.raw" "$SIZE_MB" <<'EOF'
import os, sys
blk = bytearray(os.urandom(1 << 20))
with open(sys.argv[1], 'wb') as f:
    for i in range(int(sys.argv[2])):
        blk[0:8] = i.to_bytes(8, 'little')
        f.write(blk)
EOF
qemu-img convert -f raw -O qed -o cluster_size=$CLUSTER "$tmp/data.raw" "$tmp/full-ours.qed"
cp "$tmp/full-ours.qed" "$tmp/full-qemu.qed"
for s in ours qemu; do
  qemu-img create -q -f qed -o cluster_size=$CLUSTER \
    -b "$tmp/data.raw" -F raw "$tmp/overlay-$s.qed" "$SIZE"
done
# Random 4K writes, each into a different cluster of an empty image, in
# random order (fio cannot make this pattern itself: blockalign= turns
# off its random map).
$PY - "$tmp/alloc.iolog" "$SIZE" "$CLUSTER" <<'EOF'
import random, sys
path, size, cs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(42)
idx = list(range(size // cs))
r.shuffle(idx)
with open(path, 'w') as f:
    f.write('fio version 2 iolog\nnbd add\nnbd open\n')
    for c in idx:
        f.write('nbd write %d 4096\n' % (c * cs + r.randrange(cs // 4096) * 4096))
    f.write('nbd close\n')
EOF

new_empty () {                  # new_empty KIND PATH SIZE
  rm -f "$2"
  if [ "$1" = raw ]; then truncate -s "$3" "$2"
  else qemu-img create -q -f qed -o cluster_size=$CLUSTER "$2" "$3"; fi
}

# Serve the fully allocated image of each kind.
start_full () {
  case $1 in
    ours) start_server ours "$tmp/full-ours.qed" ;;
    qemu) start_server qemu "$tmp/full-qemu.qed" -f qed ;;
    raw)  start_server raw "$tmp/data.raw" ;;
  esac
}

SEQ="--bs=1M --iodepth=4"
TB="--runtime=$runtime --time_based"
RAND="--bs=4k --norandommap --randrepeat=1"

# ------------------------------------------------------------ workloads
# Each step_* function is one server's turn in one repetition.

# 1, 2: reads of allocated data.
step_reads () {
  local s=$1 rep=$2
  start_full $s || return 1
  if want seqread; then
    measure seqread $s $rep bw --rw=read $SEQ $TB || return 1
  fi
  if want randread1; then
    measure randread1 $s $rep iops --rw=randread $RAND --iodepth=1 $TB || return 1
  fi
  if want randread16; then
    measure randread16 $s $rep iops --rw=randread $RAND --iodepth=16 $TB || return 1
  fi
  stop_server
}
if want seqread || want randread1 || want randread16; then
  section "1, 2: reads of a fully allocated image"
  for ((rep = 1; rep <= reps; rep++)); do
    for s in $(order $rep ours qemu raw); do step step_reads $s $rep; done
  done
fi

# Start a server on a new empty image ($tmp/w.qed or $tmp/w.raw).
start_empty () {                # start_empty KIND SIZE [EXTRA ARGS]
  local s=$1 size=$2; shift 2
  case $s in
    ours) new_empty ours "$tmp/w.qed" $size && start_server ours "$tmp/w.qed" "$@" ;;
    qemu) new_empty qemu "$tmp/w.qed" $size && start_server qemu "$tmp/w.qed" -f qed "$@" ;;
    raw)  new_empty raw "$tmp/w.raw" $size && start_server raw "$tmp/w.raw" "$@" ;;
  esac
}

# 3: sequential allocating write into an empty image.
step_seqwrite () {
  local s=$1 rep=$2
  start_empty $s $SIZE || return 1
  measure seqwrite $s $rep bw --rw=write $SEQ --size=$SIZE || return 1
  stop_server
  rm -f "$tmp/w.qed" "$tmp/w.raw"
}
if want seqwrite; then
  section "3: 1 MiB sequential allocating write, $SIZE_MB MiB into an empty image"
  for ((rep = 1; rep <= reps; rep++)); do
    for s in $(order $rep ours qemu raw); do step step_seqwrite $s $rep; done
  done
fi

# 4: random 4K writes, in place and allocating.
step_randwrite () {
  local s=$1 rep=$2
  start_full $s || return 1
  measure randwrite $s $rep iops --rw=randwrite $RAND --iodepth=16 $TB || return 1
  stop_server
}
step_allocwrite () {
  local s=$1 rep=$2
  start_empty $s $SIZE || return 1
  measure allocwrite $s $rep iops --read_iolog="$tmp/alloc.iolog" --iodepth=16 || return 1
  stop_server
  rm -f "$tmp/w.qed" "$tmp/w.raw"
}
if want randwrite; then
  section "4a: 4 KiB random write into allocated clusters (qd16)"
  for ((rep = 1; rep <= reps; rep++)); do
    for s in $(order $rep ours qemu raw); do step step_randwrite $s $rep; done
  done
fi
if want allocwrite; then
  section "4b: 4 KiB random allocating write, one per cluster, $((SIZE / CLUSTER)) clusters (qd16)"
  for ((rep = 1; rep <= reps; rep++)); do
    for s in $(order $rep ours qemu raw); do step step_allocwrite $s $rep; done
  done
fi

# 5: sequential read through a raw backing file (empty overlay).
step_backing () {
  local s=$1 rep=$2
  case $s in
    ours) start_server ours "$tmp/overlay-ours.qed" ;;
    qemu) start_server qemu "$tmp/overlay-qemu.qed" -f qed ;;
    raw)  start_server raw "$tmp/data.raw" ;;
  esac || return 1
  measure backing $s $rep bw --rw=read $SEQ $TB || return 1
  stop_server
}
if want backing; then
  section "5: sequential read through a backing file (empty overlay)"
  for ((rep = 1; rep <= reps; rep++)); do
    for s in $(order $rep ours qemu raw); do step step_backing $s $rep; done
  done
fi

# 6: the filter's populating and second full read, against nbdkit's cow
# and cache filters (and the bare file plugin).
copy_read () {                  # copy_read WORKLOAD ROLE REP [SIZE]
  local c0 c1 t0 t1 bw size=${4:-$SIZE}
  c0=$(cpu_ticks "$SPID") || return 1
  t0=$(date +%s%N)
  nbdcopy --no-extents "$URI" null: || return 1
  t1=$(date +%s%N)
  c1=$(cpu_ticks "$SPID") || return 1
  bw=$(echo "$size $t0 $t1" | awk '{printf "%.1f", $1 / 1048576 / (($3 - $2) / 1e9)}')
  record "$1" "$2" "$3" "$bw" $((c1 - c0)) "$size"
  printf '  %-10s %-7s rep %s: %10s MiB/s cpu %.2fs\n' "$1" "$2" "$3" "$bw" \
    "$(echo "$c1 $c0 $TICK" | awk '{print ($1-$2)/$3}')" >&2
}
step_filter () {
  local s=$1 rep=$2 fargs
  rm -f "$tmp/fov.qed"
  case $s in
    qed)
      fargs=${QED_FILTER_ARGS:-"qed-overlay=@OVERLAY@ qed-copy-on-read=true"}
      # shellcheck disable=SC2086
      start_server filter "$tmp/data.raw" --filter="$FILTER" \
        ${fargs//@OVERLAY@/$tmp/fov.qed} ;;
    cow)   start_server filter "$tmp/data.raw" --filter=cow cow-on-read=true ;;
    cache) start_server filter "$tmp/data.raw" --filter=cache cache-on-read=true ;;
    file)  start_server raw "$tmp/data.raw" ;;
  esac || return 1
  copy_read filter1 $s $rep || return 1
  copy_read filter2 $s $rep || return 1
  stop_server
  if [ $s = qed ] && [ -f "$tmp/fov.qed" ]; then
    record filterdu qed $rep 0 0 0 "$(du -k "$tmp/fov.qed" | cut -f1)"
  fi
  rm -f "$tmp/fov.qed"
}
if want filter && [ $have_filter = 1 ]; then
  section "6: filter first (populating) and second full read (nbdcopy)"
  for ((rep = 1; rep <= reps; rep++)); do
    for s in $(order $rep qed cow cache file); do step step_filter $s $rep; done
  done
fi

# 9: a remote disk: the file plugin under nbdkit's delay filter (every
# read waits rdelay, as a round trip), 1 and 5 ms.  The filter with
# read-ahead (qed), without (qedra0, qed-readahead=0), and nbdkit's
# cache + readahead filters; sequential 64K reads at queue depth 1
# (first and second pass), random 4K reads at queue depth 1 on a cold
# cache, and nbdcopy against the delayed plugin read with no filter.
RSIZE=$((RSIZE_MB << 20))
start_remote () {               # start_remote ROLE DELAY_MS
  local d=$2
  rm -f "$tmp/rov.qed"
  case $1 in
    qed)    start_server stack "$tmp/remote.raw" --filter="$FILTER" \
              --filter=delay -- rdelay=${d}ms qed-overlay="$tmp/rov.qed" ;;
    qedra0) start_server stack "$tmp/remote.raw" --filter="$FILTER" \
              --filter=delay -- rdelay=${d}ms qed-overlay="$tmp/rov.qed" \
              qed-readahead=0 ;;
    cache)  start_server stack "$tmp/remote.raw" --filter=cache \
              --filter=readahead --filter=delay -- rdelay=${d}ms \
              cache-on-read=true ;;
    direct) start_server stack "$tmp/remote.raw" --filter=delay -- \
              rdelay=${d}ms ;;
  esac
}
step_remote () {                # step_remote ROLE REP DELAY_MS
  local s=$1 rep=$2 d=$3
  if [ $s != direct ]; then
    start_remote $s $d || return 1
    measure remote-seq1-$d $s $rep bw --rw=read --bs=64k --iodepth=1 \
      --size=$RSIZE || return 1
    measure remote-seq2-$d $s $rep bw --rw=read --bs=64k --iodepth=1 \
      --size=$RSIZE || return 1
    stop_server
    start_remote $s $d || return 1
    measure remote-rand-$d $s $rep iops --rw=randread $RAND --iodepth=1 \
      --size=$RSIZE $TB || return 1
    stop_server
  fi
  if [ $s = qed ] || [ $s = direct ]; then
    start_remote $s $d || return 1
    copy_read remote-copy-$d $s $rep $RSIZE || return 1
    stop_server
  fi
  rm -f "$tmp/rov.qed"
}
if want remote && [ $have_filter = 1 ]; then
  section "9: remote disk ($RSIZE_MB MiB) under the delay filter, 1 and 5 ms"
  head -c $RSIZE "$tmp/data.raw" > "$tmp/remote.raw"
  for ((rep = 1; rep <= reps; rep++)); do
    for d in 1 5; do
      for s in $(order $rep qed qedra0 cache direct); do
        step step_remote $s $rep $d
      done
    done
  done
fi

# 7: zero-filled writes with and without zero detection (qemu-nbd
# only with --detect-zeroes=on, the comparison the issue asks for; the
# step for qemu-nbd without it is kept for manual runs: --zero-all).
ZSIZE=$((ZERO_MB << 20))
ZARGS="--rw=write $SEQ --size=$ZSIZE --zero_buffers --scramble_buffers=0"
step_zero () {
  local s=$1 rep=$2 f du0 du1
  case $s in
    ours-zd) start_empty ours $ZSIZE zero-detect=true ;;
    ours)    start_empty ours $ZSIZE zero-detect=false ;;
    qemu-dz) start_empty qemu $ZSIZE --detect-zeroes=on ;;
    qemu)    start_empty qemu $ZSIZE ;;
    raw)     start_empty raw $ZSIZE ;;
  esac || return 1
  if [ $s = raw ]; then f=$tmp/w.raw; else f=$tmp/w.qed; fi
  du0=$(du -k "$f" | cut -f1)
  case $s in
    ours-zd) measure zero-on ours $rep bw $ZARGS ;;
    ours)    measure zero-off ours $rep bw $ZARGS ;;
    qemu-dz) measure zero-on qemu $rep bw $ZARGS ;;
    qemu)    measure zero-off qemu $rep bw $ZARGS ;;
    raw)     measure zero-on raw $rep bw $ZARGS &&
             tail -1 "$tmp/pending.tsv" | sed 's/^zero-on/zero-off/' >> "$tmp/pending.tsv" ;;
  esac || return 1
  stop_server
  du1=$(du -k "$f" | cut -f1)
  record zerodu "$s" $rep 0 0 0 $((du1 - du0))
  rm -f "$f"
}
if want zero; then
  section "7: $ZERO_MB MiB of zero-filled 1 MiB writes into an empty image"
  for ((rep = 1; rep <= reps; rep++)); do
    zs=(ours-zd ours qemu-dz raw)
    [ $zero_all = 1 ] && zs+=(qemu)
    for s in $(order $rep "${zs[@]}"); do step step_zero $s $rep; done
  done
fi

# 8: a 1 TiB sparse image with one 4K block in each 2 GiB region (one
# per L2 table: 512 tables).  fio's blockalign=2g makes every random
# read hit one of those 512 blocks.
step_1t () {
  local s=$1 rep=$2 t0 t1 t2 t3 ms ms2 hwm rss
  t0=$(date +%s%N)
  case $s in
    ours) start_server ours "$tmp/tb-ours.qed" ;;
    qemu) start_server qemu "$tmp/tb-qemu.qed" -f qed ;;
    raw)  start_server raw "$tmp/tb.raw" ;;
  esac || return 1
  nbdinfo --size "$URI" >/dev/null || return 1
  t1=$(date +%s%N)
  t2=$(date +%s%N); nbdinfo --size "$URI" >/dev/null || return 1; t3=$(date +%s%N)
  ms=$(echo "$t0 $t1" | awk '{printf "%.1f", ($2 - $1) / 1e6}')
  ms2=$(echo "$t2 $t3" | awk '{printf "%.1f", ($2 - $1) / 1e6}')
  record 1t-open $s $rep "$ms" 0 0 "$ms2"
  echo "  1t-open    $s rep $rep: ${ms} ms to the first answer (a second nbdinfo: ${ms2} ms)" >&2
  measure 1t-randread $s $rep iops --rw=randread --bs=4k --ba=2g --size=1T \
    --norandommap --iodepth=1 $TB || return 1
  measure 1t-randread16 $s $rep iops --rw=randread --bs=4k --ba=2g --size=1T \
    --norandommap --iodepth=16 $TB || return 1
  hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$SPID/status") || return 1
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$SPID/status") || return 1
  record 1t-rss $s $rep "$(echo "$hwm" | awk '{printf "%.1f", $1/1024}')" 0 0 \
    "$(echo "$rss" | awk '{printf "%.1f", $1/1024}')"
  stop_server
}
if want 1t; then
  section "8: 1 TiB sparse image, 512 L2 tables"
  qemu-img create -q -f qed -o cluster_size=$CLUSTER,table_size=4 "$tmp/tb-ours.qed" 1T
  cmds=()
  for ((i = 0; i < 512; i++)); do cmds+=(-c "write -q -P 0x5a $((i << 31)) 4k"); done
  qemu-io -f qed "${cmds[@]}" "$tmp/tb-ours.qed" >/dev/null
  cp --sparse=always "$tmp/tb-ours.qed" "$tmp/tb-qemu.qed"
  truncate -s 1T "$tmp/tb.raw"
  $PY - "$tmp/tb.raw" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
for i in range(512):
    os.pwrite(fd, b'\x5a' * 4096, i << 31)
os.close(fd)
EOF
  for ((rep = 1; rep <= reps; rep++)); do
    for s in $(order $rep ours qemu raw); do step step_1t $s $rep; done
  done
fi

# --------------------------------------------------------------- report
cp "$TSV" "$BENCH/results-latest.tsv"
{
  echo "nbdkit-qed benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores," \
       "mode=$([ $quick = 1 ] && echo quick || echo full), reps=$reps," \
       "runtime=${runtime}s, image=${SIZE_MB} MiB, cluster=64K"
  echo "ours: nbdkit $(nbdkit --version | awk '{print $2}') + plugin" \
       "(commit $(git -C "$TOP" rev-parse --short HEAD 2>/dev/null || echo ?)$(
         git -C "$TOP" diff --quiet HEAD -- common plugin filter 2>/dev/null || echo '+dirty'))" \
       "${NBDKIT_OPTS:+, nbdkit options: $NBDKIT_OPTS}"
  echo "qemu-nbd $(qemu-nbd --version | head -1 | awk '{print $2}') $QEMU_NBD_OPTS -t;" \
       "raw: nbdkit file plugin on a raw copy"
  if [ -s "$tmp/failures.log" ]; then
    echo "retried steps (the server died or fio failed):"; cat "$tmp/failures.log"
  fi
  echo
  $PY "$BENCH/summarize.py" "$TSV" "$TICK"
} | tee "$BENCH/results-latest.txt"
section "done"
