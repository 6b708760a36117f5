#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Header feature bits, as QEMU treats them (docs/qemu-differences.md):
# - an unknown `features` bit refuses the image, even read-only, with a
#   message naming the bit, and the file is left unchanged;
# - an unknown compat bit is ignored and preserved across a write session;
# - an unknown autoclear bit is cleared by a writable session and left
#   alone (file byte-identical) by a read-only one.
# Header updates never touch the bytes after the 64-byte header (the
# backing file name, and anything else in the header cluster).
source "$(dirname "$0")/functions.sh"
# run_nbdkit ARGS... --run CMD: a captive nbdkit on a socket in $tmp
# (nbdkit leaves the socket file behind, so remove it first).
requires qemu-img --version
requires /usr/bin/python3 -c 'import nbd'

# put64 FILE OFFSET VALUE / get64 FILE OFFSET: little-endian u64 fields.
put64 () {
  /usr/bin/python3 -c 'import struct, sys
f = open(sys.argv[1], "r+b"); f.seek(int(sys.argv[2]))
f.write(struct.pack("<Q", int(sys.argv[3], 0)))' "$@"
}
get64 () {
  /usr/bin/python3 -c 'import struct, sys
f = open(sys.argv[1], "rb"); f.seek(int(sys.argv[2]))
print(hex(struct.unpack("<Q", f.read(8))[0]))' "$@"
}
# tail_sum FILE: checksum of the header cluster after byte 64.
tail_sum () { dd if="$1" bs=1 skip=64 count=$((65536 - 64)) status=none | md5sum; }

# An image with a raw backing file (its name at offset 64) and some
# other bytes further into the header cluster that must survive.
qemu-img create -q -f raw "$tmp/base.raw" 1M
qemu-img create -q -f qed -b base.raw -F raw "$tmp/proto.qed" 1M
printf 'keep-these-bytes' | dd of="$tmp/proto.qed" bs=1 seek=1000 conv=notrunc status=none
[ "$(dd if="$tmp/proto.qed" bs=1 skip=64 count=8 status=none)" = base.raw ] ||
  fail "no backing name at offset 64?"
features0=$(get64 "$tmp/proto.qed" 16)     # BACKING_FILE | NO_PROBE = 0x5

# session URI WRITE?: connect, read, and write (and flush) if asked.
session () {
  /usr/bin/python3 - "$@" <<'EOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.pread(4096, 0) == bytes(4096) or sys.argv[2] == "0"
if sys.argv[2] == "1":
    h.pwrite(b"\xab" * 70000, 1000)
    h.flush()
    assert h.pread(70000, 1000) == b"\xab" * 70000
h.shutdown()
EOF
}

# ---- 1. Unknown features bit 0x10: refused, rw and ro, file unchanged.
cp "$tmp/proto.qed" "$tmp/f.qed"
put64 "$tmp/f.qed" 16 $((features0 | 0x10))
sum=$(md5sum < "$tmp/f.qed")
for ro in "" -r; do
  if run_nbdkit $ro "$PLUGIN" "$tmp/f.qed" --run 'exit 0' 2>"$tmp/err"; then
    fail "unknown feature 0x10 accepted ($ro)"
  fi
  cat "$tmp/err"
  grep -q '0x10' "$tmp/err" || fail "message does not name 0x10 ($ro)"
  grep -qi 'feature' "$tmp/err" || fail "message does not say feature ($ro)"
done
[ "$(md5sum < "$tmp/f.qed")" = "$sum" ] || fail "refused image was modified"
echo "ok: unknown features bit refused"

# ---- 2. Unknown compat bit: served, preserved by a write session (which
# sets and clears NEED_CHECK), and QEMU still reads the result.
cp "$tmp/proto.qed" "$tmp/c.qed"
put64 "$tmp/c.qed" 24 0x100
ts0=$(tail_sum "$tmp/c.qed")
start_nbdkit c "$PLUGIN" "$tmp/c.qed"
session "$(uri c)" 1 || fail "compat: session"
stop_nbdkit c
[ "$(get64 "$tmp/c.qed" 24)" = 0x100 ] || fail "compat bit lost: $(get64 "$tmp/c.qed" 24)"
[ "$(get64 "$tmp/c.qed" 16)" = "$(printf '%#x' $features0)" ] ||
  fail "features changed: $(get64 "$tmp/c.qed" 16)"
[ "$(tail_sum "$tmp/c.qed")" = "$ts0" ] || fail "compat: bytes after the header changed"
out=$(qemu-io -r -f qed -c "read -P 0xab 1000 70000" "$tmp/c.qed") || fail "qemu: $out"
qemu_check "$tmp/c.qed"
echo "ok: unknown compat bit preserved"

# ---- 3. Unknown autoclear bit: read-only sessions leave the file
# byte-identical; a writable one clears it (even with no write).
cp "$tmp/proto.qed" "$tmp/a.qed"
put64 "$tmp/a.qed" 32 0x4
sum=$(md5sum < "$tmp/a.qed")
start_nbdkit a -r "$PLUGIN" "$tmp/a.qed"
session "$(uri a)" 0 || fail "autoclear: -r session"
stop_nbdkit a
[ "$(md5sum < "$tmp/a.qed")" = "$sum" ] || fail "-r session changed the file"
ts0=$(tail_sum "$tmp/a.qed")
start_nbdkit a "$PLUGIN" "$tmp/a.qed"
session "$(uri a)" 0 || fail "autoclear: read-only use of a writable server"
stop_nbdkit a
[ "$(get64 "$tmp/a.qed" 32)" = 0x0 ] || fail "autoclear not cleared: $(get64 "$tmp/a.qed" 32)"
[ "$(tail_sum "$tmp/a.qed")" = "$ts0" ] || fail "autoclear: bytes after the header changed"
# And with a write too (a second unknown bit, two sessions).
put64 "$tmp/a.qed" 32 0x8000000000000000
start_nbdkit a "$PLUGIN" "$tmp/a.qed"
session "$(uri a)" 1 || fail "autoclear: write session"
stop_nbdkit a
[ "$(get64 "$tmp/a.qed" 32)" = 0x0 ] || fail "autoclear 1<<63 not cleared"
[ "$(get64 "$tmp/a.qed" 16)" = "$(printf '%#x' $features0)" ] || fail "features changed"
[ "$(tail_sum "$tmp/a.qed")" = "$ts0" ] || fail "bytes after the header changed"
qemu_check "$tmp/a.qed"
echo "ok: unknown autoclear bits"
echo PASS
