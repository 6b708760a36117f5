#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# demote=true: at the stop, every feature an older reader would not know
# is removed: the free-cluster list (compacted completely, record gone,
# autoclear bit 0x1 clear), the copy-on-read hint (compat bit 0x1), and,
# without a backing file, zero clusters (they become unallocated).
# qemu-img check exits 0 and the data is unchanged.  With a backing
# file, zero clusters stay: they hide backing data.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'
TOOL="/usr/bin/python3 $TOP/tests/freelist-tool.py"
M=$((1024 * 1024))

# zero_map IMG: guest ranges QEMU maps as zero clusters (present, no data).
zero_map () {
  qemu-img map --output=json "$1" | /usr/bin/python3 -c '
import json, sys
for e in json.load(sys.stdin):
    if e["present"] and e["zero"] and not e["data"]: print(e["start"], e["length"])'; }

# ---- 1. No backing file: list + compat hint + zero clusters.
rm -f "$tmp/d.qed"
start_nbdkit d "$PLUGIN" "$tmp/d.qed" create=true size=64M copy-on-read=true \
  compact-limit=0 idle-clean=0
/usr/bin/python3 - "$(uri d)" "$tmp/d.raw" <<'EOF' || fail "write"
import nbd, random, sys
M = 1 << 20
h = nbd.NBD(); h.connect_uri(sys.argv[1])
data = bytearray(random.Random(3).randbytes(48 * M))
for i in range(0, 48 * M, M):
    h.pwrite(bytes(data[i:i+M]), i)
h.flush()
h.trim(16 * M, 16 * M)
data[16*M:32*M] = bytes(16 * M)
h.flush()
open(sys.argv[2], "wb").write(bytes(data) + bytes(16 * M))
EOF
stop_nbdkit d
# QEMU adds zero clusters (it writes L2 entries of 1 even without a
# backing file).
qemu-io -f qed -c "write -z $((50 * M)) 2M" "$tmp/d.qed" >/dev/null
/usr/bin/python3 -c "
import sys; r = open(sys.argv[1], 'r+b'); r.seek(50 << 20); r.write(bytes(2 << 20))
" "$tmp/d.raw"
[ "$($TOOL zero-clusters "$tmp/d.qed")" = 32 ] || fail "QEMU made no zero clusters"
# An image with a list again (QEMU cleared the bit: a writable open
# rebuilds it).
start_nbdkit d "$PLUGIN" "$tmp/d.qed" compact-limit=0 idle-clean=0
nbdinfo --size "$(uri d)" >/dev/null
stop_nbdkit d
read -r feat compat autoclear < <(flags "$tmp/d.qed")
[ $compat = 1 ] && [ $autoclear = 1 ] || fail "before demote: compat $compat autoclear $autoclear"
size=$(stat -c %s "$tmp/d.qed")

start_nbdkit d "$PLUGIN" "$tmp/d.qed" demote=true idle-clean=0
nbdinfo --size "$(uri d)" >/dev/null
stop_nbdkit d
read -r feat compat autoclear < <(flags "$tmp/d.qed")
[ $compat = 0 ] || fail "demote: compat bits $compat"
[ $autoclear = 0 ] || fail "demote: autoclear bits $autoclear"
[ $(( feat & 2 )) = 0 ] || fail "demote: NEED_CHECK set"
qemu_check "$tmp/d.qed"
[ "$($TOOL zero-clusters "$tmp/d.qed")" = 0 ] || fail "demote: zero clusters left"
[ -z "$(zero_map "$tmp/d.qed")" ] || fail "demote: QEMU still maps zero clusters"
$TOOL runs "$tmp/d.qed" 2>/dev/null && fail "demote: the list record is still there"
[ $(stat -c %s "$tmp/d.qed") -le $((size - 15 * M)) ] ||
  fail "demote: not compacted ($size -> $(stat -c %s "$tmp/d.qed"))"
same_data "$tmp/d.qed" "$tmp/d.raw"
echo "ok: demote without a backing file"

# ---- 2. Demote of an image with a list and no other change (the
# plugin opens it, writes nothing).
rm -f "$tmp/e.qed"
start_nbdkit e "$PLUGIN" "$tmp/e.qed" create=true size=64M compact-limit=0 idle-clean=0
/usr/bin/python3 - "$(uri e)" <<'EOF' || fail "write e"
import nbd, sys
M = 1 << 20
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i in range(0, 32 * M, M):
    h.pwrite(bytes([i // M + 1]) * M, i)
h.flush()
h.trim(8 * M, 8 * M)
EOF
stop_nbdkit e
read -r _ _ autoclear < <(flags "$tmp/e.qed")
[ $autoclear = 1 ] || fail "no list to demote"
qemu-img convert -O raw "$tmp/e.qed" "$tmp/e.raw"
start_nbdkit e "$PLUGIN" "$tmp/e.qed" demote=true idle-clean=0
nbdinfo --size "$(uri e)" >/dev/null
stop_nbdkit e
read -r _ _ autoclear < <(flags "$tmp/e.qed")
[ $autoclear = 0 ] || fail "demote of an unchanged image: bit still set"
qemu_check "$tmp/e.qed"
same_data "$tmp/e.qed" "$tmp/e.raw"
echo "ok: demote of an unchanged image with a list"

# ---- 3. With a backing file, zero clusters stay (they hide data).
qemu-img create -q -f raw "$tmp/b.raw" 8M
qemu-io -f raw -c "write -P 7 0 8M" "$tmp/b.raw" >/dev/null
rm -f "$tmp/o.qed"
start_nbdkit o "$PLUGIN" "$tmp/o.qed" create=true size=8M backing=b.raw \
  backing-format=raw copy-on-read=true idle-clean=0
/usr/bin/python3 - "$(uri o)" <<'EOF' || fail "write o"
import nbd, sys
M = 1 << 20
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.zero(M, 2 * M)                         # zero clusters over backing data
h.pwrite(b"\x09" * M, 4 * M)
h.flush()
EOF
stop_nbdkit o
qemu-img convert -O raw "$tmp/o.qed" "$tmp/o.raw"
start_nbdkit o "$PLUGIN" "$tmp/o.qed" demote=true idle-clean=0
nbdinfo --size "$(uri o)" >/dev/null
stop_nbdkit o
read -r _ compat autoclear < <(flags "$tmp/o.qed")
[ $compat = 0 ] && [ $autoclear = 0 ] || fail "backing: compat $compat autoclear $autoclear"
qemu_check "$tmp/o.qed"
[ "$(zero_map "$tmp/o.qed")" = "$((2 * M)) $M" ] ||
  fail "backing: zero clusters changed: $(zero_map "$tmp/o.qed")"
same_data "$tmp/o.qed" "$tmp/o.raw"
echo "ok: demote over a backing file"
