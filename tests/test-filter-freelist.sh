#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The filter's overlay keeps a free-cluster list too (qed-compact-limit=,
# qed-freelist=): with qed-compact-limit=0 a clean stop lists the
# clusters freed by trim (bit set, NEED_CHECK clear, qemu-img check
# finds leaks only); the next run reuses them (the overlay does not
# grow); qed-freelist=false compacts completely.  The data served is
# checked against a model each time.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires /usr/bin/python3 -c 'import nbd'
[ -f "$FILTER" ] || skip "the filter is not built"
TOOL="/usr/bin/python3 $TOP/tests/freelist-tool.py"
M=$((1024 * 1024))

check_rc () {
  local rc=0
  qemu-img check "$1" >"$tmp/check.out" 2>&1 || rc=$?
  [ $rc = 0 ] || [ $rc = 3 ] || { cat "$tmp/check.out"; fail "qemu-img check $1: rc $rc"; }
  echo $rc
}

/usr/bin/python3 -c '
import random, sys
open(sys.argv[1], "wb").write(random.Random(7).randbytes(64 << 20))' "$tmp/base.raw"
cp "$tmp/base.raw" "$tmp/model.raw"
ov=$tmp/ov.qed

# model.py URI STEP: do STEP through the filter, mirror it into the model.
cat > "$tmp/model.py" <<'EOF'
import nbd, random, sys
uri, model, step = sys.argv[1:4]
M = 1 << 20
h = nbd.NBD(); h.connect_uri(uri)
r = open(model, "r+b")
def write(off, data):
    for i in range(0, len(data), M):
        h.pwrite(data[i:i+M], off + i)
    r.seek(off); r.write(data)
if step == "fill":                       # 48M written, then 16..32M trimmed
    write(0, random.Random(1).randbytes(48 * M))
    h.flush()
    h.trim(16 * M, 16 * M)
    r.seek(16 * M); r.write(bytes(16 * M))
elif step == "refill":
    write(16 * M, random.Random(2).randbytes(16 * M))
elif step == "free":
    h.trim(8 * M, 0)
    r.seek(0); r.write(bytes(8 * M))
h.flush()
r.seek(0)
want = r.read()
got = b"".join(h.pread(8 * M, i) for i in range(0, len(want), 8 * M))
assert got == want, "content after " + step
EOF
model () { /usr/bin/python3 "$tmp/model.py" "$(uri f)" "$tmp/model.raw" "$1" ||
             fail "filter step $1"; }
serve () { start_nbdkit f --filter="$FILTER" file "$tmp/base.raw" \
             qed-overlay="$ov" qed-copy-on-read=false "$@"; }

serve qed-compact-limit=0
model fill
stop_nbdkit f
[ "$(autoclear "$ov")" = 1 ] || fail "qed-compact-limit=0: no list"
[ "$(need_check "$ov")" = 0 ] || fail "NEED_CHECK set after a clean stop"
[ "$(check_rc "$ov")" = 3 ] || fail "qed-compact-limit=0: no leaks (moved?)"
size=$(stat -c %s "$ov")

serve
model refill
stop_nbdkit f
[ $(stat -c %s "$ov") -le $size ] || fail "overlay grew from $size reusing freed space"
[ "$(check_rc "$ov")" = 0 ] || fail "leaks after reusing all free space"

serve qed-compact-limit=0
model free
stop_nbdkit f
[ "$(autoclear "$ov")" = 1 ] || fail "second list not written"
serve qed-freelist=false
nbdinfo --size "$(uri f)" >/dev/null
stop_nbdkit f
[ "$(autoclear "$ov")" = 0 ] || fail "qed-freelist=false: bit still set"
[ "$(check_rc "$ov")" = 0 ] || fail "qed-freelist=false: not compacted"
serve qed-freelist=false
/usr/bin/python3 -c '
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
want = open(sys.argv[2], "rb").read()
got = b"".join(h.pread(8 << 20, i) for i in range(0, len(want), 8 << 20))
assert got == want' "$(uri f)" "$tmp/model.raw" || fail "data after compaction"
stop_nbdkit f
echo "ok: filter free-cluster list"
