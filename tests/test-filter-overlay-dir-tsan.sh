#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# ThreadSanitizer over qed-overlay-dir with qed-shared-cache: four
# exports' random reads, writes, zeroes and flushes over the same
# clusters (concurrent fills of the shared cache from several
# exports, over a 1 ms origin), while other connections open and
# close three more exports again and again (the overlay set's
# OPENING/OPEN/CLOSING, at qed-max-exports=6: some are refused).
# Any TSan report fails; then every file passes qemu-img check.
. "$(dirname "$0")/functions.sh"
requires fio --version
requires nbdsh --version
requires qemu-img --version
libtsan=$(ls /usr/lib/x86_64-linux-gnu/libtsan.so.2 2>/dev/null) ||
  skip "libtsan not installed"
cd "$tmp"

build_helper tsan-filter.so
so=$TOP/tests/tsan-filter.so

M=$((1024*1024))
head -c $((6*M)) /dev/urandom > base.raw
truncate -s $((8*M)) base.raw
mkdir ov

sock=$tmp/t.sock
LD_PRELOAD=$libtsan TSAN_OPTIONS="log_path=$tmp/tsan.log halt_on_error=0" \
  nbdkit -f -U "$sock" --filter="$so" --filter=delay file base.raw \
  rdelay=1ms qed-overlay-dir="$tmp/ov" qed-shared-cache="$tmp/ov/shared.qed" \
  qed-cluster-size=16K qed-max-exports=6 &
pid=$!
cleanup_fn "kill $pid 2>/dev/null"
wait_until 120 test -S "$sock" || fail "nbdkit (TSan) did not listen"

fpids=()
for e in e0 e1 e2 e3; do
  fio --name=$e --ioengine=nbd --uri="nbd+unix:///$e?socket=$sock" \
      --rw=randrw --bs=6k --size=8M --iodepth=8 --numjobs=1 \
      --randrepeat=0 --time_based --runtime=5 --fsync=50 >fio-$e.log 2>&1 &
  fpids+=($!)
done
/usr/bin/python3 - "$sock" <<'PY'
import nbd, random, sys
r = random.Random(7)
served = refused = 0
for i in range(60):
    e = r.choice(["o1", "o2", "o3"])
    h = nbd.NBD()
    try:
        h.connect_uri("nbd+unix:///%s?socket=%s" % (e, sys.argv[1]))
    except nbd.Error:
        refused += 1        # qed-max-exports (the fio jobs hold four)
        continue
    o = r.randrange(0, 8 << 20, 512)
    h.pwrite(b"x" * 512, o)
    h.pread(65536, r.randrange(0, (8 << 20) - 65536))
    h.shutdown()
    served += 1
print("churn: %d connections served, %d refused" % (served, refused))
assert served > 0
PY
for p in "${fpids[@]}"; do wait "$p" || { cat fio-*.log; fail "fio failed"; }; done
kill "$pid"
wait "$pid" || true
if ls tsan.log.* >/dev/null 2>&1; then
  cat tsan.log.*
  fail "ThreadSanitizer reported races"
fi
for f in ov/*.qed; do qemu_check "$f"; done
echo PASS
