#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The free-cluster list (autoclear bit 0x1), with QEMU as the oracle:
# 1. compact-limit=0: a clean stop moves no data, lists the freed
#    clusters (bit set, NEED_CHECK clear, still punched); qemu-img check
#    finds leaks only, QEMU reads the same data, read-only QEMU opens
#    keep the bit.
# 2. Reuse: writing as much as was freed does not grow the file.
# 3. A stale list after an older writer (bit cleared, a listed cluster
#    linked into an L2 table by hand) is not trusted: that cluster is
#    never handed out again.
# 4. QEMU opening the image writable clears the bit; the image stays
#    consistent and the next open lists or compacts again.
# 5. compact-limit bounds the data moved; freelist=false compacts
#    completely (also an image that has a list).
# 6. The idle timer lists too; after kill -9 the list is still trusted.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'
TOOL="/usr/bin/python3 $TOP/tests/freelist-tool.py"
M=$((1024 * 1024))

# check_rc FILE [foreign]: qemu-img check's exit code (2 = corruption:
# fail).  Unless an older writer was the last (foreign), every leak must
# be explained by NEED_CHECK or the list.
check_rc () {
  local rc=0
  qemu-img check "$1" >"$tmp/check.out" 2>&1 || rc=$?
  [ $rc = 0 ] || [ $rc = 3 ] || { cat "$tmp/check.out"; fail "qemu-img check $1: rc $rc"; }
  # Every leak is explained by NEED_CHECK or the list.
  if [ $rc = 3 ] && [ "${2-}" != foreign ] &&
     [ "$(need_check "$1")" = 0 ] && [ "$(autoclear "$1")" = 0 ]; then
    cat "$tmp/check.out"; fail "$1: leaks with neither NEED_CHECK nor the list bit"
  fi
  echo $rc
}
leaks () {
  qemu-img check --output=json "$1" > "$tmp/check.json" 2>/dev/null || true
  /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin).get("leaks", 0))' \
    < "$tmp/check.json"; }
data_map () {
  qemu-img map -U --output=json "$1" | /usr/bin/python3 -c '
import json, sys
for e in json.load(sys.stdin):
    if e["data"]: print(e["start"], e["length"], e["offset"])'; }

# model.py URI REF STEP: do STEP over NBD and mirror it into REF (raw).
cat > "$tmp/model.py" <<'EOF'
import nbd, random, sys
uri, ref, step = sys.argv[1:4]
M = 1 << 20
h = nbd.NBD(); h.connect_uri(uri)
r = open(ref, "r+b")
def write(off, data):
    for i in range(0, len(data), M):
        h.pwrite(data[i:i+M], off + i)
    r.seek(off); r.write(data)
if step == "fill":                       # 48M of data, then free 16..32M
    write(0, random.Random(1).randbytes(48 * M))
    h.flush()
    h.trim(16 * M, 16 * M)
    r.seek(16 * M); r.write(bytes(16 * M))
elif step == "refill":                   # 16M of new data where it was freed
    write(16 * M, random.Random(2).randbytes(16 * M))
elif step == "free-more":
    h.trim(8 * M, 0)
    r.seek(0); r.write(bytes(8 * M))
h.flush()
r.seek(0)
want = r.read()
got = b"".join(h.pread(min(8 * M, len(want) - i), i)
               for i in range(0, len(want), 8 * M))
assert got == want, "content after " + step
EOF
model () { /usr/bin/python3 "$tmp/model.py" "$(uri "$1")" "$2" "$3" || fail "step $3 on $1"; }
new_image () {
  qemu-img create -q -f qed "$tmp/$1.qed" 64M
  rm -f "$tmp/$1.raw"; truncate -s 64M "$tmp/$1.raw"
}

# ---- 1. compact-limit=0: fast close.
new_image a
start_nbdkit a "$PLUGIN" "$tmp/a.qed" compact-limit=0 idle-clean=0
model a "$tmp/a.raw" fill
data_map "$tmp/a.qed" > "$tmp/map.before"
stop_nbdkit a
[ "$(autoclear "$tmp/a.qed")" = 1 ] || fail "list bit not set"
[ "$(need_check "$tmp/a.qed")" = 0 ] || fail "NEED_CHECK set after a clean stop"
[ "$(check_rc "$tmp/a.qed")" = 3 ] || fail "no leaks: were clusters moved?"
n=$(leaks "$tmp/a.qed")
[ "$n" -ge 255 ] && [ "$n" -le 257 ] || fail "$n leaks, expected the 256 freed"
data_map "$tmp/a.qed" > "$tmp/map.after"
cmp -s "$tmp/map.before" "$tmp/map.after" || {
  diff "$tmp/map.before" "$tmp/map.after"; fail "data moved with compact-limit=0"; }
b=$(allocated "$tmp/a.qed")
[ $b -le $((33 * M)) ] || fail "listed clusters not punched: $b bytes allocated"
total=0
while read -r _ k; do total=$((total + k)); done < <($TOOL runs "$tmp/a.qed")
[ $total -ge 255 ] || fail "only $total clusters listed"
same_data "$tmp/a.qed" "$tmp/a.raw"
qemu-io -r -f qed -c "read 0 64k" "$tmp/a.qed" >/dev/null
qemu-img info "$tmp/a.qed" >/dev/null
[ "$(autoclear "$tmp/a.qed")" = 1 ] || fail "a read-only QEMU open cleared the bit"
echo "ok: fast close, $n clusters listed"

# ---- 2. Reuse.
size=$(stat -c %s "$tmp/a.qed")
start_nbdkit a "$PLUGIN" "$tmp/a.qed" idle-clean=0
model a "$tmp/a.raw" refill
stop_nbdkit a
[ $(stat -c %s "$tmp/a.qed") -le $size ] ||
  fail "file grew from $size to $(stat -c %s "$tmp/a.qed") reusing freed space"
[ "$(check_rc "$tmp/a.qed")" = 0 ] || fail "leaks after reusing all free space"
[ "$(autoclear "$tmp/a.qed")" = 0 ] || fail "bit set with nothing free"
same_data "$tmp/a.qed" "$tmp/a.raw"
echo "ok: reuse"

# ---- 3. A stale list: an older writer cleared the bit and linked a
# listed cluster (and wrote data into it).
new_image s
start_nbdkit s "$PLUGIN" "$tmp/s.qed" compact-limit=0 idle-clean=0
model s "$tmp/s.raw" fill
stop_nbdkit s
read -r first _ < <($TOOL runs "$tmp/s.qed")
/usr/bin/python3 - "$tmp/s.qed" "$first" "$tmp/s.raw" <<'EOF'
import struct, sys
img, off, ref = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(img, "r+b") as f:
    f.seek(32); f.write(struct.pack("<Q", 0))     # the bit, cleared
    f.seek(off); f.write(b"\x5a" * 65536)          # the old writer's data
with open(ref, "r+b") as r:
    r.seek(56 << 20); r.write(b"\x5a" * 65536)
EOF
$TOOL link "$tmp/s.qed" $((56 * M)) "$first"
[ "$(check_rc "$tmp/s.qed" foreign)" = 3 ] || fail "hand edit: expected leaks only"
same_data "$tmp/s.qed" "$tmp/s.raw"
start_nbdkit s "$PLUGIN" "$tmp/s.qed" idle-clean=0
model s "$tmp/s.raw" refill
model s "$tmp/s.raw" free-more
stop_nbdkit s
check_rc "$tmp/s.qed" >/dev/null
same_data "$tmp/s.qed" "$tmp/s.raw"
out=$(qemu-io -r -f qed -c "read -P 0x5a $((56 * M)) 64k" "$tmp/s.qed") ||
  fail "the old writer's cluster was handed out again: $out"
echo "ok: stale list not trusted"

# ---- 4. QEMU opens an image with a list writable.
new_image q
start_nbdkit q "$PLUGIN" "$tmp/q.qed" compact-limit=0 idle-clean=0
model q "$tmp/q.raw" fill
stop_nbdkit q
qemu-io -f qed -c "read 0 4k" "$tmp/q.qed" >/dev/null
[ "$(autoclear "$tmp/q.qed")" = 0 ] || fail "QEMU did not clear the bit"
check_rc "$tmp/q.qed" foreign >/dev/null
qemu-io -f qed -c "write -P 0x33 $((40 * M)) 1M" "$tmp/q.qed" >/dev/null
/usr/bin/python3 -c "
import sys; r = open(sys.argv[1], 'r+b'); r.seek(40 << 20); r.write(b'\x33' * (1 << 20))
" "$tmp/q.raw"
[ "$(check_rc "$tmp/q.qed" foreign)" = 3 ] || fail "after QEMU's write: expected leaks only"
same_data "$tmp/q.qed" "$tmp/q.raw"
# The next open rebuilds the free space and lists it again.
start_nbdkit q "$PLUGIN" "$tmp/q.qed" compact-limit=0 idle-clean=0
nbdinfo --size "$(uri q)" >/dev/null      # the image opens at the first connection
stop_nbdkit q
[ "$(autoclear "$tmp/q.qed")" = 1 ] || fail "no list after a rebuild"
check_rc "$tmp/q.qed" >/dev/null
same_data "$tmp/q.qed" "$tmp/q.raw"
# And the default limit (64M) compacts these 16M completely.
size=$(stat -c %s "$tmp/q.qed")
start_nbdkit q "$PLUGIN" "$tmp/q.qed" idle-clean=0
model q "$tmp/q.raw" free-more
stop_nbdkit q
[ "$(check_rc "$tmp/q.qed")" = 0 ] || fail "default limit: not compacted"
[ "$(autoclear "$tmp/q.qed")" = 0 ] || fail "default limit: bit still set"
[ $(stat -c %s "$tmp/q.qed") -le $((size - 16 * M)) ] || fail "not compacted"
same_data "$tmp/q.qed" "$tmp/q.raw"
echo "ok: QEMU writable open, rebuild, compaction"

# ---- 5. compact-limit bounds the moves; freelist=false compacts all.
new_image l
start_nbdkit l "$PLUGIN" "$tmp/l.qed" compact-limit=1M idle-clean=0
model l "$tmp/l.raw" fill
stop_nbdkit l
[ "$(autoclear "$tmp/l.qed")" = 1 ] || fail "compact-limit=1M: no list"
n=$(leaks "$tmp/l.qed")
[ $n -ge 239 ] && [ $n -le 241 ] || fail "compact-limit=1M: $n leaks (expected 256 - 16)"
same_data "$tmp/l.qed" "$tmp/l.raw"
size=$(stat -c %s "$tmp/l.qed")
start_nbdkit l "$PLUGIN" "$tmp/l.qed" freelist=false idle-clean=0
nbdinfo --size "$(uri l)" >/dev/null
stop_nbdkit l
[ "$(check_rc "$tmp/l.qed")" = 0 ] || fail "freelist=false: not compacted"
[ "$(autoclear "$tmp/l.qed")" = 0 ] || fail "freelist=false: bit still set"
[ $(stat -c %s "$tmp/l.qed") -le $((size - 15 * M)) ] || fail "freelist=false: file not shorter"
same_data "$tmp/l.qed" "$tmp/l.raw"
echo "ok: compact-limit=1M, freelist=false"

# ---- 6. The idle timer lists; kill -9 afterwards keeps a trusted list.
new_image i
start_nbdkit i "$PLUGIN" "$tmp/i.qed" compact-limit=0 idle-clean=1
model i "$tmp/i.raw" fill
# The timer gives up while a request runs (the model's reads may still
# have been running when it fired): re-arm it with a zero request of an
# unallocated range, then stay quiet.
/usr/bin/python3 -c '
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.zero(65536, 60 << 20)' "$(uri i)"
clean () { [ "$(need_check "$tmp/i.qed")" = 0 ]; }
wait_until 120 clean || fail "idle: NEED_CHECK still set"
[ "$(autoclear "$tmp/i.qed")" = 1 ] || fail "idle: no list"
kill9_nbdkit i
[ "$(check_rc "$tmp/i.qed")" = 3 ] || fail "idle list: expected leaks"
size=$(stat -c %s "$tmp/i.qed")
start_nbdkit i "$PLUGIN" "$tmp/i.qed" idle-clean=0
model i "$tmp/i.raw" refill
stop_nbdkit i
[ $(stat -c %s "$tmp/i.qed") -le $size ] || fail "after kill -9: freed space not reused"
check_rc "$tmp/i.qed" >/dev/null
same_data "$tmp/i.qed" "$tmp/i.raw"
echo "ok: idle list, kill -9"
