#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# ThreadSanitizer over dir=: eight clients connect, write, read and
# disconnect in a loop over four exports (two of them one file, through
# a symlink) with idle-clean=0, so that exports are opened, shared,
# waited for and closed concurrently (dir.c's OPENING and CLOSING
# states), while the L2 budget is shared.  Any TSan report fails; the
# data each client wrote is read back; every image checks clean.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires /usr/bin/python3 -c 'import nbd'
libtsan=$(ls /usr/lib/x86_64-linux-gnu/libtsan.so.2 2>/dev/null) ||
  skip "libtsan not installed"

build_helper tsan-plugin.so
so=$TOP/tests/tsan-plugin.so

D=$tmp/disks
mkdir -p "$D"
for n in a b c; do
  qemu-img create -q -f qed -o cluster_size=4096 "$D/$n.qed" 16M
done
ln -s a.qed "$D/a2.qed"
sock=$tmp/t.sock
LD_PRELOAD=$libtsan TSAN_OPTIONS="log_path=$tmp/tsan.log halt_on_error=0" \
  nbdkit -f -U "$sock" "$so" dir="$D" idle-clean=0 l2-cache=64K &
pid=$!
cleanup_fn "kill $pid 2>/dev/null"
wait_until 120 test -S "$sock" || fail "the TSan server did not start"

/usr/bin/python3 - "$sock" <<'EOF2' || fail "clients"
import nbd, random, sys, threading
sock = sys.argv[1]
errors = []
def client(k):
    rng = random.Random(k)
    try:
        for i in range(25):
            name = rng.choice(["a", "a2", "b", "c"])
            h = nbd.NBD(); h.set_export_name(name); h.connect_unix(sock)
            # Each client owns its own 64K slot of every image.
            off = k * 65536 + rng.randrange(0, 1 << 20, 1 << 20) * 8
            data = bytes([k + 1]) * 4096
            h.pwrite(data, off)
            if rng.random() < 0.3: h.flush()
            assert h.pread(4096, off) == data
            h.shutdown()
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=client, args=(k,)) for k in range(8)]
for t in ts: t.start()
for t in ts: t.join()
if errors:
    sys.exit("\n".join(errors))
EOF2
kill $pid; rc=0; wait $pid || rc=$?
[ $rc = 0 ] || fail "nbdkit exited with status $rc"
if ls "$tmp"/tsan.log* >/dev/null 2>&1; then
  cat "$tmp"/tsan.log*
  fail "ThreadSanitizer reported problems"
fi
for n in a b c; do
  qemu_check "$D/$n.qed"
  [ "$(need_check "$D/$n.qed")" = 0 ] || fail "$n.qed: NEED_CHECK still set"
done
echo "TSan over dir=: no reports"
