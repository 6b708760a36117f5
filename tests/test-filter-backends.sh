#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: works over different plugins (file, an odd-sized file, memory,
# pattern 1G, data, nbd) and stacked with other filters (blocksize above
# and below, delay below: copy-on-read hides the delay).  Each run does
# random reads, writes and zeroes through the filter and compares with
# the plugin served alone (read-only) plus the writes.
. "$(dirname "$0")/functions.sh"
requires nbdsh --version
requires qemu-img --version
cd "$tmp"
check="/usr/bin/python3 $TOP/tests/filter-check.py"

M=$((1024*1024))
head -c $((8*M)) /dev/urandom > base.raw
truncate -s $((12*M)) base.raw
head -c 1000001 /dev/urandom > odd.raw
sums=$(md5sum base.raw odd.raw)

# run NAME SEED PLUGIN ARGS...: the plain server and the filter (with a
# persistent overlay, checked afterwards) over the same plugin.
n=0
run () {
  local name=$1 seed=$2; shift 2
  n=$((n+1))
  start_nbdkit plain$n -r "$@"
  start_nbdkit filt$n --filter="$FILTER" "$@" qed-overlay="$tmp/$name.qed"
  $check "$(uri plain$n)" "$(uri filt$n)" "$seed" ||
    fail "$name: data mismatch"
  stop_nbdkit filt$n
  stop_nbdkit plain$n
  qemu_check "$name.qed"
  echo "PASS: $name"
}

run file 1 file base.raw
run odd-size 2 file odd.raw
run memory 3 memory 16M
run pattern 4 pattern 1G
run data 5 data '1 2 3 @65536 ( "hello" )*100 @1000000 4 5 6' size=3000001
start_nbdkit server file base.raw
run nbd 6 nbd socket="$tmp/server.sock"
stop_nbdkit server
# blocksize below the filter: the backend only sees 4K-aligned reads,
# while the filter's partial-cluster fills ask for arbitrary ranges.
run blocksize-below 7 --filter=blocksize file base.raw minblock=4096
# blocksize above the filter: requests arrive split into small pieces.
n=$((n+1))
start_nbdkit plain$n -r file base.raw
start_nbdkit filt$n --filter=blocksize --filter="$FILTER" file base.raw \
  maxdata=16384 qed-overlay="$tmp/above.qed"
$check "$(uri plain$n)" "$(uri filt$n)" 8 || fail "blocksize-above: mismatch"
stop_nbdkit filt$n
stop_nbdkit plain$n
qemu_check above.qed

# The odd-sized disk keeps its exact size; the overlay is rounded up.
qemu-img info --output=json odd-size.qed | grep -q '"virtual-size": 1000448' ||
  fail "odd-size.qed is not 1000448 bytes"
start_nbdkit odd --filter="$FILTER" file odd.raw qed-overlay="$tmp/odd-size.qed"
[ "$(nbdinfo --size "$(uri odd)")" = 1000001 ] || fail "odd size not kept"
stop_nbdkit odd

# delay below the filter: the first read waits, the second is served
# from the overlay.
start_nbdkit slow --filter="$FILTER" --filter=delay file base.raw rdelay=1
nbdsh -u "$(uri slow)" -c "
import time
t = time.monotonic(); h.pread(65536, $M); t1 = time.monotonic() - t
t = time.monotonic(); h.pread(65536, $M); t2 = time.monotonic() - t
print('first read %.3fs, second %.3fs' % (t1, t2))
assert t1 >= 1.0 and t2 < 0.5, (t1, t2)
"
stop_nbdkit slow

[ "$(md5sum base.raw odd.raw)" = "$sums" ] || fail "a backend file was modified"
echo OK
