#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# When the first connection cannot open the image, nbdkit's log has one
# line naming the file and the cause.  Here: a read-only open of an
# image with NEED_CHECK set and a corrupt L2 entry (a read-only check
# cannot repair it).
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdinfo --version
[ -f "$PLUGIN" ] || fail "the plugin is not built"
cd "$tmp"

qemu-img create -q -f qed disk.qed 4M
qemu-io -f qed -c "write -P 0x11 0 64k" disk.qed >/dev/null
# L1[0] -> the L2 table; make its first entry point past the end of
# the file, and set NEED_CHECK.
/usr/bin/python3 - disk.qed <<'PY'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    hdr = f.read(64)
    l1 = struct.unpack_from("<Q", hdr, 40)[0]
    f.seek(l1); t = struct.unpack("<Q", f.read(8))[0]
    f.seek(t); f.write(struct.pack("<Q", 1 << 40))
    f.seek(16); f.write(struct.pack("<Q", 2))
PY
rm -f s.sock
nbdkit -f -r -U "$tmp/s.sock" "$PLUGIN" "$tmp/disk.qed" 2> nbdkit.log &
pid=$!
cleanup_fn "kill $pid 2>/dev/null"
wait_until 120 test -S s.sock || fail "nbdkit did not listen"
nbdinfo --size "nbd+unix:///?socket=$tmp/s.sock" > /dev/null 2>&1 &&
  fail "a corrupt image with NEED_CHECK was served read-only"
kill $pid; wait $pid || true
cat nbdkit.log
n=$(grep -c "qed: $tmp/disk.qed: cannot open the image: .*corruption" nbdkit.log || true)
[ "$n" = 1 ] ||
  fail "expected one line naming the file and the cause, found $n"
echo OK
