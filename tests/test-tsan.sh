#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# ThreadSanitizer over the plugin: several connections doing parallel
# allocating writes to the same and to neighbouring clusters and L2
# tables, reads, zeroes, trims and flushes.  Any TSan report fails.
source "$(dirname "$0")/functions.sh"
requires fio --version
libtsan=$(ls /usr/lib/x86_64-linux-gnu/libtsan.so.2 2>/dev/null) ||
  skip "libtsan not installed"

build_helper tsan-plugin.so
so=$TOP/tests/tsan-plugin.so

# 4K clusters, table size 2: each L2 table maps 4 MiB.  12 MiB stays
# below QEMU's phantom-leak threshold (cluster_size-1 clusters).
nbdkit "$PLUGIN" "$tmp/t.qed" create=true size=12M cluster-size=4K \
       table-size=2 --run true
sock=$tmp/t.sock
LD_PRELOAD=$libtsan TSAN_OPTIONS="log_path=$tmp/tsan.log halt_on_error=0" \
  nbdkit -f -U "$sock" "$so" "$tmp/t.qed" idle-clean=1 &
pid=$!
cleanup_fn "kill $pid 2>/dev/null"
wait_until 120 test -S "$sock" || fail "nbdkit (TSan) did not listen"

# Two fio jobs with odd block sizes so requests straddle clusters and
# tables, racing over the same 12 MiB; a third connection zeroes and
# trims and flushes meanwhile.
fio --name=a --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
    --rw=randrw --bs=6k --size=12M --iodepth=16 --numjobs=2 \
    --randrepeat=1 --time_based --runtime=6 --fsync=50 >"$tmp/fio.log" 2>&1 &
fiopid=$!
nbdsh -u "nbd+unix:///?socket=$sock" -c '
import random
random.seed(1)
for i in range(300):
    off = random.randrange(0, 12 << 20, 512)
    n = min(random.choice([512, 4096, 65536, 1 << 20]), (12 << 20) - off)
    op = random.choice(["zero", "trim", "nohole", "flush"])
    if op == "zero": h.zero(n, off)
    elif op == "nohole": h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)
    elif op == "trim": h.trim(n, off)
    else: h.flush()
'
wait $fiopid || { cat "$tmp/fio.log"; fail "fio failed"; }
sleep 2                                 # let the idle timer run
# nbdkit must exit 0 after SIGTERM (a crash, or an error at close,
# gives another status).
kill $pid; rc=0; wait $pid || rc=$?
[ $rc = 0 ] || fail "nbdkit exited with status $rc"

if ls "$tmp"/tsan.log* >/dev/null 2>&1; then
  cat "$tmp"/tsan.log*
  fail "ThreadSanitizer reported problems"
fi
qemu_check "$tmp/t.qed"
[ "$(need_check "$tmp/t.qed")" = 0 ] || fail "NEED_CHECK still set"
echo "TSan: no reports"
