#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# ThreadSanitizer over the filter: parallel copy-on-read reads, writes,
# zeroes, trims, cache and flushes from several connections over the
# same clusters of a persistent overlay (with the idle timer running),
# and sequential readers (read-ahead) at the same time; then the same
# random requests with qed-prefetch and qed-detach.
# Any TSan report fails.
. "$(dirname "$0")/functions.sh"
requires fio --version
requires nbdsh --version
libtsan=$(ls /usr/lib/x86_64-linux-gnu/libtsan.so.2 2>/dev/null) ||
  skip "libtsan not installed"
cd "$tmp"

build_helper tsan-filter.so
so=$TOP/tests/tsan-filter.so

M=$((1024*1024))
head -c $((6*M)) /dev/urandom > base.raw
truncate -s $((8*M)) base.raw
sum=$(md5sum < base.raw)

sock=$tmp/t.sock
LD_PRELOAD=$libtsan TSAN_OPTIONS="log_path=$tmp/tsan.log halt_on_error=0" \
  nbdkit -f -U "$sock" --filter="$so" --filter=delay file base.raw \
  rdelay=1ms qed-overlay="$tmp/ov.qed" qed-cluster-size=16K &
pid=$!
cleanup_fn "kill $pid 2>/dev/null"
wait_until 120 test -S "$sock" || fail "nbdkit (TSan) did not listen"

fio --name=a --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
    --rw=randrw --bs=6k --size=8M --iodepth=16 --numjobs=2 \
    --randrepeat=1 --time_based --runtime=5 --fsync=50 >fio.log 2>&1 &
fiopid=$!
fio --name=s --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
    --rw=read --bs=64k --size=8M --iodepth=4 --numjobs=2 \
    --time_based --runtime=5 >fio-seq.log 2>&1 &
seqpid=$!
nbdsh -u "nbd+unix:///?socket=$sock" -c '
import random
random.seed(1)
size = h.get_size()
for i in range(400):
    off = random.randrange(0, size, 512)
    n = min(random.choice([512, 4096, 65536, 1 << 20]), size - off)
    op = random.choice(["read", "read", "zero", "trim", "cache", "flush"])
    if op == "read": h.pread(n, off)
    elif op == "zero": h.zero(n, off)
    elif op == "trim": h.trim(n, off)
    elif op == "cache": h.cache(n, off)
    else: h.flush()
'
wait $fiopid || { cat fio.log; fail "fio failed"; }
wait $seqpid || { cat fio-seq.log; fail "sequential fio failed"; }
sleep 6.5                               # let the idle timer run
# nbdkit must exit 0 after SIGTERM (a crash, or an error at close,
# gives another status).
kill $pid; rc=0; wait $pid || rc=$?
[ $rc = 0 ] || fail "nbdkit exited with status $rc"

if ls "$tmp"/tsan.log* >/dev/null 2>&1; then
  cat "$tmp"/tsan.log*
  fail "ThreadSanitizer reported problems"
fi
qemu_check ov.qed
[ "$(need_check ov.qed)" = 0 ] || fail "NEED_CHECK still set"
[ "$(md5sum < base.raw)" = "$sum" ] || fail "base.raw was modified"
echo "TSan: no reports"

# The same with qed-prefetch and qed-detach: the warming thread, guest
# writes racing it, and the detach when the overlay becomes complete
# (its header update once raced with requests reading the geometry).
rm -f "$sock"
LD_PRELOAD=$libtsan TSAN_OPTIONS="log_path=$tmp/tsan2.log halt_on_error=0" \
  nbdkit -f -v -U "$sock" --filter="$so" --filter=delay file base.raw \
  rdelay=1ms qed-overlay="$tmp/ov2.qed" qed-cluster-size=16K \
  qed-prefetch=true qed-detach=true 2> nbdkit2.log &
pid=$!
cleanup_fn "kill $pid 2>/dev/null"
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
fio --name=p --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
    --rw=randrw --bs=6k --size=8M --iodepth=16 --numjobs=2 \
    --randrepeat=1 --time_based --runtime=4 --fsync=50 >fio2.log 2>&1 ||
  { cat fio2.log; fail "fio with prefetch failed"; }
until grep -q "qed-detach: .* holds every cluster" nbdkit2.log; do
  kill -0 $pid 2>/dev/null || { tail nbdkit2.log; fail "nbdkit died"; }
  sleep 0.1
done
kill $pid; rc=0; wait $pid || rc=$?
[ $rc = 0 ] || fail "nbdkit (prefetch) exited with status $rc"
if ls "$tmp"/tsan2.log* >/dev/null 2>&1; then
  cat "$tmp"/tsan2.log*
  fail "ThreadSanitizer reported problems (prefetch, detach)"
fi
qemu_check ov2.qed
echo "TSan with prefetch and detach: no reports"
