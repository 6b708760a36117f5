#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# nbdkit-qed: the filter as a kept cache (manual, "Keeping a cache"),
# over a remote disk simulated by nbdkit's delay filter (rdelay=1ms
# under the file plugin, as workload 9 of run.sh):
#
#  1. time to a complete overlay: qed-prefetch=true (the "done" line)
#     against nbdcopy URI null: through the filter, and through nbdkit's
#     cache + readahead filters (cache-on-read=true);
#  2. a guest's random 4K reads at queue depth 1 (fio, IOPS and mean
#     latency), with and without the prefetch running, on a cold cache:
#     a 16 GiB sparse disk read as data (nbdkit's noextents filter, so
#     that every cluster is fetched), of which the guest reads the last
#     quarter, nearly always missing, while the prefetch (unlimited),
#     which goes in disk order, is still in the first three.
#
# Usage: bench/keep-cache.sh [--reps N] [--size MiB] [--runtime S]
# (defaults 3, 256, 5).  Medians are printed; the machine is shared.
set -euo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH LC_ALL=C
TOP=$(cd "$(dirname "$0")/.." && pwd)
FILTER=$TOP/filter/nbdkit-qed-filter.so
reps=3 size_mb=256 runtime=5
while [ $# -gt 0 ]; do
  case $1 in
    --reps) reps=$2; shift 2 ;;
    --size) size_mb=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    *) echo "usage: $0 [--reps N] [--size MiB] [--runtime S]" >&2; exit 2 ;;
  esac
done
make -C "$TOP" -s all >/dev/null
command -v fio >/dev/null || { echo "$0: needs fio" >&2; exit 1; }
tmp=$(mktemp -d /var/tmp/nbdkit-qed-keep.XXXXXX)
pid=
cleanup () {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && sleep 1
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
size=$((size_mb << 20))
head -c "$size" /dev/urandom > "$tmp/remote.raw"
sparse=$((16 << 30))
truncate -s $sparse "$tmp/sparse.raw"
sock=$tmp/s.sock
uri="nbd+unix:///?socket=$sock"

# serve ARGS...: nbdkit over the delayed file plugin, log in $tmp/log.
serve () {
  rm -f "$sock" "$tmp/pid" "$tmp/ov.qed"
  nbdkit -v --log=stderr -U "$sock" -P "$tmp/pid" "$@" 2>"$tmp/log"
  for _ in $(seq 1 200); do [ -s "$tmp/pid" ] && break; sleep 0.05; done
  pid=$(cat "$tmp/pid")
}
stop () {
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  pid=
}
now () { date +%s.%N; }
median () { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

qed=(--filter="$FILTER" --filter=delay file "$tmp/remote.raw" rdelay=1ms
     qed-overlay="$tmp/ov.qed")
for ((r = 1; r <= reps; r++)); do
  # 1a. qed-prefetch: from the first connection to the "done" line.
  serve "${qed[@]}" qed-prefetch=true
  t0=$(now)
  nbdinfo --size "$uri" >/dev/null
  until grep -q "qed-prefetch: done" "$tmp/log"; do sleep 0.01; done
  t1=$(now)
  stop
  echo "prefetch $(echo "$t0 $t1" | awk '{print $2 - $1}')" >> "$tmp/res"
  # 1b. nbdcopy through the filter.
  serve "${qed[@]}"
  t0=$(now); nbdcopy "$uri" null:; t1=$(now)
  stop
  echo "nbdcopy-qed $(echo "$t0 $t1" | awk '{print $2 - $1}')" >> "$tmp/res"
  # 1c. nbdcopy through cache + readahead.
  serve --filter=cache --filter=readahead --filter=delay file \
    "$tmp/remote.raw" rdelay=1ms cache-on-read=true
  t0=$(now); nbdcopy "$uri" null:; t1=$(now)
  stop
  echo "nbdcopy-cache $(echo "$t0 $t1" | awk '{print $2 - $1}')" >> "$tmp/res"

  # 2. random 4K reads of the last quarter, with and without prefetch.
  for mode in without with; do
    extra=()
    [ $mode = with ] && extra=(qed-prefetch=true)
    serve --filter="$FILTER" --filter=noextents --filter=delay \
      file "$tmp/sparse.raw" rdelay=1ms qed-overlay="$tmp/ov.qed" \
      "${extra[@]}"
    nbdinfo --size "$uri" >/dev/null
    fio --name=rand --ioengine=nbd --uri="$uri" --rw=randread --bs=4k \
        --iodepth=1 --offset=$((sparse * 3 / 4)) --size=$((sparse / 4)) \
        --time_based --runtime="$runtime" --output-format=json \
        --output="$tmp/fio.json" >/dev/null 2>&1
    read -r iops lat < <(python3 - "$tmp/fio.json" <<'EOF'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index('{'):])['jobs'][0]['read']
print('%.0f %.3f' % (j['iops'], j['clat_ns']['mean'] / 1e6))
EOF
)
    if [ $mode = with ] && grep -q "qed-prefetch: done" "$tmp/log"; then
      echo "note: the prefetch finished during the run" >&2
    fi
    stop
    echo "rand-$mode-iops $iops" >> "$tmp/res"
    echo "rand-$mode-ms $lat" >> "$tmp/res"
  done
done

echo "keep-cache benchmark: $size_mb MiB, rdelay=1ms, $reps reps, medians"
for k in prefetch nbdcopy-qed nbdcopy-cache rand-without-iops \
         rand-with-iops rand-without-ms rand-with-ms; do
  printf '  %-18s %s\n' "$k" "$(awk -v k=$k '$1 == k { print $2 }' "$tmp/res" | median)"
done
w=$(awk '$1 == "rand-without-ms" { print $2 }' "$tmp/res" | median)
p=$(awk '$1 == "rand-with-ms" { print $2 }' "$tmp/res" | median)
echo "  random-read latency with prefetch / without: $(echo "$p $w" | awk '{printf "%.2f", $1 / $2}')x"
