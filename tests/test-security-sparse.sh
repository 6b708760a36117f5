#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Hostile metadata costs what the disk size allows: a 1 MiB disk in a
# 4 TiB sparse file, with a CRC-valid free-cluster list of everything
# past its data, opened on every path (a trusted list, the rebuild of
# an older writer's list, NEED_CHECK, each also with -r, and a data
# cluster planted near the end of the file) must open and stop in under
# 1 s of CPU time and 64 MiB peak RSS, serve the same bytes, and leave
# an image that qemu-img check accepts (exit 0) or that has NEED_CHECK
# set.  (CPU time, not wall time: the bound is on the work done, which
# a loaded machine does not change.)
source "$(dirname "$0")/functions.sh"
requires test -x /usr/bin/time
SIZE=$((4 << 40))
dd if=/dev/zero of="$tmp/probe" bs=1 count=0 seek=$SIZE status=none 2>/dev/null \
  || skip "the file system of $tmp cannot hold a 4 TiB sparse file"
rm -f "$tmp/probe"

# make IMG MODE [high]: the hostile image (high: guest cluster 0 lives
# at 3 TiB; CS: the cluster size, 64K by default).
make () {
  qemu-img create -q -f qed -o cluster_size=${CS:-65536} "$1" 1M
  qemu-io -f qed -c "write -P 0x61 0 512k" "$1" >/dev/null
  /usr/bin/python3 "$TOP/tests/make-sparse-list.py" "$1" $SIZE "$2"
  if [ "${3:-}" = high ]; then
    printf 'HIGHDATA' | dd of="$1" bs=1 seek=$((3 << 40)) conv=notrunc \
      status=none
    /usr/bin/python3 "$TOP/tests/freelist-tool.py" link "$1" 0 $((3 << 40))
  fi
}

# measure NAME IMG [-r] PARAMS...: serve IMG (a copy) with PARAMS, copy the disk
# out, stop; check the bounds and the data.
measure () {
  local name=$1 img=$2 ro=; shift 2
  [ "${1:-}" != -r ] || { ro=-r; shift; }
  cp --sparse=always "$img" "$tmp/w.qed"
  qemu-img convert -U -O raw "$img" "$tmp/expect.raw" \
    || fail "$name: qemu-img convert"
  rm -f "$tmp/run.sock"
  /usr/bin/time -o "$tmp/$name.time" -f "%U %S %M" \
    nbdkit -U "$tmp/run.sock" $ro "$PLUGIN" "$tmp/w.qed" "$@" \
    --run "nbdcopy \"\$uri\" $tmp/$name.out" >"$tmp/$name.err" 2>&1 \
    || { cat "$tmp/$name.err"; fail "$name: nbdkit failed"; }
  read -r user sys rss < "$tmp/$name.time"
  cpu=$(echo "$user + $sys" | bc)
  echo "$name: cpu ${cpu}s (user $user, sys $sys), peak RSS $((rss / 1024)) MiB," \
    "file $(stat -c %s "$tmp/w.qed") bytes"
  [ "$rss" -lt $((64 * 1024)) ] || fail "$name: peak RSS $rss KiB >= 64 MiB"
  [ "$(echo "$cpu < 1" | bc)" = 1 ] || fail "$name: $cpu s of CPU time >= 1 s"
  cmp "$tmp/$name.out" "$tmp/expect.raw" || fail "$name: wrong data"
  # (-r writes nothing: the hostile image stays as it was.)
  if [ -z "$ro" ] && [ "$(need_check "$tmp/w.qed")" = 0 ]; then
    qemu-img check "$tmp/w.qed" >"$tmp/$name.check" 2>&1 \
      || { cat "$tmp/$name.check"; fail "$name: leaks or errors with NEED_CHECK clear"; }
  fi
}
requires bc --version

for mode in trusted rebuild needcheck; do
  make "$tmp/$mode.qed" $mode
  measure "$mode" "$tmp/$mode.qed"
  measure "$mode-r" "$tmp/$mode.qed" -r
  measure "$mode-nolist" "$tmp/$mode.qed" freelist=false
  make "$tmp/$mode-high.qed" $mode high
  measure "$mode-high" "$tmp/$mode-high.qed"
  head -c 8 "$tmp/$mode-high.out" | grep -q HIGHDATA \
    || fail "$mode-high: the planted cluster was not served"
  # What the first open left is opened again, just as bounded.
  cp --sparse=always "$tmp/w.qed" "$tmp/$mode-again.qed"
  measure "$mode-again" "$tmp/$mode-again.qed"
  # 4K clusters: a billion of them in the file.
  CS=4096 make "$tmp/$mode-4k.qed" $mode high
  measure "$mode-4k" "$tmp/$mode-4k.qed"
  measure "$mode-4k-r" "$tmp/$mode-4k.qed" -r
done
echo PASS
