#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Clean-stop bench: how long SIGTERM takes after 1 GiB was freed (trim)
# in the middle of a 4 GiB image full of data, and the file left behind,
# for the three ways of giving the space back:
#   default          compact-limit=64M: move at most 64M, list the rest
#   compact-limit=0  move nothing, list everything
#   freelist=false   move everything (full compaction, no list)
# and, as the baseline, a stop with nothing freed (nbdkit's own shutdown
# takes about a second here, whatever the plugin).
# Usage: bench/stop.sh [--reps N] [--size-gib G] [--free-gib F] [--keep]
# The modes take turns in each repetition (order rotated); the table
# shows the median stop time, the file size and the space allocated,
# and what qemu-img check says.  Output also in bench/stop-latest.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
top=$(pwd)
reps=3 size_gib=4 free_gib=1 keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --reps) reps=$2; shift 2 ;;
    --size-gib) size_gib=$2; shift 2 ;;
    --free-gib) free_gib=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "usage: $0 [--reps N] [--size-gib G] [--free-gib F] [--keep]"; exit 1 ;;
  esac
done
make -s plugin/nbdkit-qed-plugin.so >/dev/null
plugin=$top/plugin/nbdkit-qed-plugin.so
work=$(mktemp -d /var/tmp/nbdkit-qed-stop.XXXXXX)
[ $keep = 1 ] || trap 'rm -rf "$work"' EXIT
G=$((1024 * 1024 * 1024))
size=$((size_gib * G)) free=$((free_gib * G))
free_off=$(( (size - free) / 2 ))

serve () {  # serve IMG ARGS...: start the plugin on $work/s.sock
  local img=$1; shift
  rm -f "$work/s.sock" "$work/s.pid"
  nbdkit -U "$work/s.sock" -P "$work/s.pid" "$plugin" "$img" idle-clean=0 "$@"
  for _ in $(seq 1 100); do [ -s "$work/s.pid" ] && break; sleep 0.05; done
}
stop_wait () {  # SIGTERM the server, wait for it; prints the seconds
  local pid t0 t1
  pid=$(cat "$work/s.pid")
  t0=$(date +%s.%N)
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}
uri="nbd+unix:///?socket=$work/s.sock"

# The base image: size_gib of random data (written once).
echo "stop bench: ${size_gib} GiB image, ${free_gib} GiB freed in the middle, $reps reps"
qemu-img create -q -f qed "$work/base.qed" "$size"
serve "$work/base.qed"
nbdcopy --flush -- [ nbdkit random size="$size" ] "$uri"
stop_wait > /dev/null
sync "$work/base.qed"

modes=("default" "compact-limit=0" "freelist=false" "nothing-freed")
: > "$work/results"
for r in $(seq 1 "$reps"); do
  for i in 0 1 2 3; do
    mode=${modes[$(( (i + r - 1) % 4 ))]}
    args=() n=$free
    case $mode in
      default) ;;
      nothing-freed) n=0 ;;
      *) args=("$mode") ;;
    esac
    cp --sparse=always "$work/base.qed" "$work/w.qed"
    sync "$work/w.qed"
    serve "$work/w.qed" "${args[@]}"
    /usr/bin/python3 -c '
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
off, n = int(sys.argv[2]), int(sys.argv[3])
for o in range(off, off + n, 1 << 30):   # (nothing if n is 0)
    h.trim(min(1 << 30, off + n - o), o)
h.flush()' "$uri" "$free_off" "$n"
    sync "$work/w.qed"
    secs=$(stop_wait)
    fsize=$(stat -c %s "$work/w.qed")
    alloc=$(( $(stat -c %b "$work/w.qed") * $(stat -c %B "$work/w.qed") ))
    rc=0; qemu-img check "$work/w.qed" > "$work/check.out" 2>&1 || rc=$?
    leaks=$(sed -n 's/^\([0-9]*\) leaked clusters.*/\1/p' "$work/check.out")
    bit=$(( $(od -An -tu1 -j32 -N1 "$work/w.qed") & 1 ))
    echo "$mode $r $secs $fsize $alloc $rc ${leaks:-0} $bit" >> "$work/results"
    echo "  rep $r: $mode: stop ${secs}s, file $fsize, allocated $alloc, check rc $rc"
  done
done

/usr/bin/python3 - "$work/results" "$size_gib" "$free_gib" <<'EOF' | tee bench/stop-latest.txt
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
G = 1 << 30
modes = ("default", "compact-limit=0", "freelist=false", "nothing-freed")
print("Clean stop after freeing %s GiB in the middle of a %s GiB image "
      "(median of %d)" % (sys.argv[3], sys.argv[2],
                          len(rows) // len(modes)))
print()
print("| mode | stop (s) | vs compact-limit=0 | file size (GiB) | allocated (GiB) "
      "| qemu-img check | list bit |")
print("|---|---|---|---|---|---|---|")
med = {}
for mode in modes:
    rs = [r for r in rows if r[0] == mode]
    med[mode] = statistics.median(float(r[2]) for r in rs)
base = med["compact-limit=0"]
for mode in modes:
    rs = [r for r in rows if r[0] == mode]
    r = rs[-1]
    check = "exit %s" % r[5] + (" (%s leaks)" % r[6] if r[5] == "3" else "")
    name = {"default": "default (compact-limit=64M)",
            "freelist=false": "freelist=false (full compaction)",
            "nothing-freed": "baseline: nothing freed"}.get(mode, mode)
    print("| %s | %.3f | %.1fx | %.3f | %.3f | %s | %s |" % (
        name, med[mode], med[mode] / base if base else 0,
        int(r[3]) / G, int(r[4]) / G, check, r[7]))
EOF
