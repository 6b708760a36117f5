#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The memory of one dir= server: peak and current RSS with 1, 16 and 64
# exports open after random reads.  See bench/README.md.
#
#   bench/dir-rss.sh [--reads N] [--size SIZE] [--l2-cache SIZE]
#
# Each export is a SIZE (default 4G) QED image with 4K clusters whose
# every L2 table exists (so that a random read loads an L2 page; 4G
# holds 8 MiB of L2 pages), copied sparsely; N (default 4000) random 4K
# reads per export, with all of them open, then the server's VmHWM and
# VmRSS.  The same with l2-cache=1G (no budget in effect) for contrast.
set -euo pipefail
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
export LANG=C LC_ALL=C
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP=$(dirname "$BENCH")
PLUGIN=$TOP/plugin/nbdkit-qed-plugin.so
reads=4000 size=4G l2=

while [ $# -gt 0 ]; do
  case $1 in
    --reads) reads=$2; shift ;;
    --size) size=$2; shift ;;
    --l2-cache) l2=$2; shift ;;
    *) echo "usage: $0 [--reads N] [--size SIZE] [--l2-cache SIZE]" >&2; exit 1 ;;
  esac
  shift
done
make -C "$TOP" -s plugin/nbdkit-qed-plugin.so
tmp=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/nbdkit-qed-dirrss.XXXXXX")
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$tmp"' EXIT

qemu-img create -q -f qed -o cluster_size=4096,table_size=4 "$tmp/t.qed" "$size"
bytes=$(qemu-img info --output=json "$tmp/t.qed" | /usr/bin/python3 -c \
  'import json, sys; print(json.load(sys.stdin)["virtual-size"])')
cmds=()
for ((o = 0; o < bytes; o += 8 << 20)); do cmds+=(-c "write -P 1 $o 4k"); done
qemu-io -f qed "${cmds[@]}" "$tmp/t.qed" >/dev/null

mkdir "$tmp/d"
printf '%-8s %-10s %10s %10s\n' exports l2-cache peak_MiB now_MiB
for cache in "${l2:-32M}" 1G; do
  for n in 1 16 64; do
    rm -f "$tmp"/d/*
    for ((i = 0; i < n; i++)); do
      cp --sparse=always "$tmp/t.qed" "$tmp/d/$(printf 'e%03d' $i).qed"
    done
    rm -f "$tmp/s.sock" "$tmp/s.pid"
    nbdkit -U "$tmp/s.sock" -P "$tmp/s.pid" "$PLUGIN" dir="$tmp/d" \
      l2-cache="$cache"
    for _ in $(seq 1 100); do [ -s "$tmp/s.pid" ] && break; sleep 0.1; done
    pid=$(cat "$tmp/s.pid")
    out=$(/usr/bin/python3 "$TOP/tests/dir-rss.py" "$tmp/s.sock" "$pid" \
          "$n" random "$reads")
    hwm=${out#*hwm_kib=}; hwm=${hwm%% *}
    rss=${out#*rss_kib=}
    printf '%-8s %-10s %10.1f %10.1f\n' "$n" "$cache" \
      "$(echo "$hwm / 1024" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    pid=
  done
done
