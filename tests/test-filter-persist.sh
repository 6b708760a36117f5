#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: a persistent overlay.  Data survives restarts (clean and after
# kill -9 once flushed), the backend never changes, the overlay passes
# qemu-img check after a clean stop, and with qed-backing-name the QED
# plugin and qemu-img see the disk the filter served.  Wrong overlays
# and bad parameters are refused with clear errors.
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
cd "$tmp"

M=$((1024*1024))
# 16M base: random data with a hole at 4M-8M.
head -c $((4*M)) /dev/urandom > base.raw
truncate -s $((8*M)) base.raw
head -c $((8*M)) /dev/urandom >> base.raw
cp base.raw model.raw
sum=$(md5sum < base.raw)

# write_model SEED: random writes, zeroes and trims through the filter
# (plus reads, which fill), mirrored into model.raw; then a flush.
write_model () {
  nbdsh -u "$(uri "$1")" -c "
import random
r = random.Random($2)
model = bytearray(open('model.raw', 'rb').read())
size = len(model)
for i in range(60):
    off = r.randrange(size)
    n = min(r.choice([1, 100, 4096, 65536, 200000]), size - off)
    op = r.randrange(5)
    if op == 0:
        buf = bytes(r.getrandbits(8) for _ in range(min(n, 64))) * (n // 64 + 1)
        buf = buf[:n]
        h.pwrite(buf, off)
        model[off:off+n] = buf
    elif op == 1:
        h.zero(n, off)
        model[off:off+n] = bytes(n)
    elif op == 2:
        h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)
        model[off:off+n] = bytes(n)
    elif op == 3:
        # Trim is advisory: what it reads as is unspecified, so only
        # whole-cluster trims are mirrored (they become zero clusters).
        a = (off + 65535) // 65536 * 65536
        b = (off + n) // 65536 * 65536
        if b > a:
            h.trim(b - a, a)
            model[a:b] = bytes(b - a)
    else:
        assert h.pread(n, off) == model[off:off+n], ('read', off, n)
assert h.pread(size, 0) == model
h.flush()
open('model.raw', 'wb').write(model)
"
}

start_nbdkit p1 --filter="$FILTER" file base.raw qed-overlay=ov.qed \
  qed-backing-name=base.raw
write_model p1 1
stop_nbdkit p1
[ "$(need_check ov.qed)" = 0 ] || fail "NEED_CHECK still set after a clean stop"
qemu_check ov.qed
[ "$(md5sum < base.raw)" = "$sum" ] || fail "base.raw was modified"

# Restart: the data is intact; more writes.
start_nbdkit p2 --filter="$FILTER" file base.raw qed-overlay=ov.qed \
  qed-backing-name=base.raw
nbdcopy "$(uri p2)" out.raw
cmp out.raw model.raw || fail "data lost across a clean restart"
write_model p2 2
# A crash after the flush: the flushed data must survive.
kill9_nbdkit p2
[ "$(need_check ov.qed)" = 1 ] || fail "NEED_CHECK not set while in use"
start_nbdkit p3 --filter="$FILTER" file base.raw qed-overlay=ov.qed \
  qed-backing-name=base.raw
rm -f out.raw
nbdcopy "$(uri p3)" out.raw
cmp out.raw model.raw || fail "flushed data lost after kill -9"
stop_nbdkit p3
[ "$(need_check ov.qed)" = 0 ] || fail "NEED_CHECK still set after restart"
qemu_check ov.qed
[ "$(md5sum < base.raw)" = "$sum" ] || fail "base.raw was modified"

# While idle, a persistent overlay is written back and marked clean
# (after 5s without writes; space freed by zero and trim keeps it
# dirty until exit, so only writes and reads here).
start_nbdkit idle --filter="$FILTER" file base.raw qed-overlay=idle.qed
nbdsh -u "$(uri idle)" -c "h.pwrite(b'x' * 100000, 12345); h.pread(1000000, 5000000)"
[ "$(need_check idle.qed)" = 1 ] || fail "NEED_CHECK not set after writes"
clean () { [ "$(need_check idle.qed)" = 0 ]; }
wait_until 120 clean || fail "NEED_CHECK not cleared while idle"
qemu_check_live idle.qed
stop_nbdkit idle

# Other readers see the same disk: qemu-img, and the QED plugin (which
# follows the recorded backing file name).
qemu-img compare ov.qed model.raw || fail "qemu-img compare: overlay != model"
start_nbdkit plug "$PLUGIN" ov.qed
rm -f out.raw
nbdcopy "$(uri plug)" out.raw
cmp out.raw model.raw || fail "nbdkit qed ov.qed differs from the model"
stop_nbdkit plug
qemu_check ov.qed

# Expected failures, with clear messages.
# A different size (at the first connection).
expect_fail "size mismatch" "overlay of a 16777216-byte disk, but the plugin's disk is 8388608" \
  --filter="$FILTER" memory 8M qed-overlay="$tmp/ov.qed"
# Not a QED file (at start-up).
expect_fail "not QED" "cannot be used as a QED overlay" \
  --filter="$FILTER" memory 16M qed-overlay="$tmp/base.raw"
# A different recorded backing file.
expect_fail "backing name" 'records "base.raw" as its backing file, not qed-backing-name=other.raw' \
  --filter="$FILTER" file base.raw qed-overlay="$tmp/ov.qed" qed-backing-name=other.raw
# Bad parameters.
expect_fail "cluster size" "qed-cluster-size: must be a power of 2" \
  --filter="$FILTER" memory 1M qed-cluster-size=1000
expect_fail "bool" "qed-copy-on-read: expected true or false" \
  --filter="$FILTER" memory 1M qed-copy-on-read=maybe
expect_fail "unknown" "unknown parameter 'qed-bogus'" \
  --filter="$FILTER" memory 1M qed-bogus=1
expect_fail "directory" "cannot create" \
  --filter="$FILTER" memory 1M qed-overlay="$tmp/no/such/dir/ov.qed"
[ "$(md5sum < base.raw)" = "$sum" ] || fail "base.raw was modified"
qemu_check ov.qed
echo OK
