#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# dir= memory: l2-cache is the budget of the whole process.  64
# exports, each a 1 GiB image with 4K clusters whose 128 L2 tables all
# exist (2 MiB of L2 pages per image, 128 MiB in all), are opened
# together and every L2 page of each is read; with all 64 open and
# idle, the server's peak RSS stays under 128 MiB (with the default
# 32M budget).  With a budget large enough for every page
# (l2-cache=256M) the same reads cost more than 128 MiB: the budget is
# what bounds it.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'
M=$((1024 * 1024))
N=64

D=$tmp/disks
mkdir -p "$D"
qemu-img create -q -f qed -o cluster_size=4096,table_size=4 "$tmp/t.qed" 1G
# One cluster in every 8 MiB: every L2 table (16K, 8 MiB of guest
# space) is allocated.
cmds=()
for ((i = 0; i < 128; i++)); do cmds+=(-c "write -P $((i % 255 + 1)) $((i * 8 * M)) 4k"); done
qemu-io -f qed "${cmds[@]}" "$tmp/t.qed" >/dev/null
for ((i = 0; i < N; i++)); do
  cp --sparse=always "$tmp/t.qed" "$D/$(printf 'e%03d' $i).qed"
done

# run_rss NAME ARGS...: serve D, open all N exports, read every L2
# page of each, and print the peak RSS in KiB.
run_rss () {
  local name=$1 out; shift
  start_nbdkit "$name" "$PLUGIN" dir="$D" "$@"
  out=$(/usr/bin/python3 "$TOP/tests/dir-rss.py" "$tmp/$name.sock" \
        "$(cat "$tmp/$name.pid")" $N stride 0) || fail "reads ($name)"
  echo "$name: $out" >&2
  stop_nbdkit "$name"
  out=${out#*hwm_kib=}
  echo "${out%% *}"
}

hwm=$(run_rss budget)
[ "$hwm" -lt $((128 * 1024)) ] || fail "64 open exports: peak RSS ${hwm} KiB >= 128 MiB"
echo "ok: 64 exports open, every L2 page read: peak RSS $((hwm / 1024)) MiB (< 128)"

big=$(run_rss big l2-cache=256M)
[ "$big" -gt $((128 * 1024)) ] \
  || fail "l2-cache=256M: peak RSS ${big} KiB: the test does not load enough pages"
echo "ok: with a budget for every page (l2-cache=256M): $((big / 1024)) MiB"
for f in "$D"/e00{0,1}.qed; do qemu_check "$f"; done
