#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Zero (with MAY_TRIM) and trim of whole allocated clusters give the
# space back to the host while the server runs (st_blocks drops), and
# after a clean stop the freed clusters are compacted away: qemu-img
# check exits 0 (no leaks) and the file is shorter.  Over a backing
# file, zeroed and trimmed clusters read as zeros (not backing data) and
# are zero clusters in `qemu-img map` (zero true, data false).
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'

K=1024 M=$((1024 * 1024))

# ---- 1. No backing file: punching and compaction.
qemu-img create -q -f qed "$tmp/p.qed" 8M
start_nbdkit p "$PLUGIN" "$tmp/p.qed"
cat > "$tmp/step.py" <<'EOF'
import nbd, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
M = 1 << 20
step = sys.argv[2]
rng = random.Random(5)
data = bytearray(rng.randbytes(6 * M))
if step == "write":
    h.pwrite(bytes(data), 0)
    h.flush()
elif step == "zero":
    h.zero(2 * M, 1 * M)                        # MAY_TRIM: punched
    data[1*M:3*M] = bytes(2 * M)
elif step == "trim":
    h.zero(2 * M, 1 * M)                        # (replay the model)
    data[1*M:3*M] = bytes(2 * M)
    h.trim(1 * M, 4 * M)                        # whole clusters
    data[4*M:5*M] = bytes(M)
    h.trim(1000, 5 * M + 100)                   # partial: punched
    data[5*M+100:5*M+1100] = bytes(1000)
    h.flush()
got = h.pread(6 * M, 0)
assert got == data, "content after %s" % step
EOF
run_step () { /usr/bin/python3 "$tmp/step.py" "$(uri p)" "$1" || fail "step $1"; }
run_step write
b0=$(allocated "$tmp/p.qed")
[ $b0 -ge $((6*M)) ] || fail "6M written but only $b0 bytes allocated"
run_step zero
b1=$(allocated "$tmp/p.qed")
[ $b1 -le $((b0 - 2*M + 64*K)) ] || fail "zero MAY_TRIM freed too little: $b0 -> $b1"
run_step trim
b2=$(allocated "$tmp/p.qed")
[ $b2 -le $((b1 - 1*M + 64*K)) ] || fail "trim freed too little: $b1 -> $b2"
size_before=$(stat -c %s "$tmp/p.qed")
stop_nbdkit p
qemu_check "$tmp/p.qed"
[ "$(need_check "$tmp/p.qed")" = 0 ] || fail "NEED_CHECK set after stop"
size_after=$(stat -c %s "$tmp/p.qed")
[ $size_after -le $((size_before - 3*M)) ] ||
  fail "no compaction: $size_before -> $size_after"
# After compaction the data is still right (served again, read-only).
start_nbdkit p -r "$PLUGIN" "$tmp/p.qed"
/usr/bin/python3 - "$(uri p)" <<'EOF' || fail "content after compaction"
import nbd, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
M = 1 << 20
data = bytearray(random.Random(5).randbytes(6 * M))
data[1*M:3*M] = bytes(2 * M); data[4*M:5*M] = bytes(M)
data[5*M+100:5*M+1100] = bytes(1000)
assert h.pread(6 * M, 0) == data
assert h.pread(2 * M, 6 * M) == bytes(2 * M)
EOF
stop_nbdkit p
echo "ok: punched $(( (b0 - b2) / K ))K, file $size_before -> $size_after"

# ---- 2. Over a backing file of 0x07: zero and trim hide the backing data.
qemu-img create -q -f raw "$tmp/b.raw" 2M
qemu-io -f raw -c "write -P 7 0 2M" "$tmp/b.raw" >/dev/null
bsum=$(md5sum < "$tmp/b.raw")
qemu-img create -q -f qed -b b.raw -F raw "$tmp/o.qed" 2M
start_nbdkit o "$PLUGIN" "$tmp/o.qed"
/usr/bin/python3 - "$(uri o)" <<'EOF' || fail "backing: zero/trim content"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
K = 1024
h.pwrite(b"\x01" * (256 * K), 0)       # allocated clusters 0..3
h.flush()
h.zero(128 * K, 0)                      # allocated -> zero (MAY_TRIM)
h.zero(64 * K, 128 * K, nbd.CMD_FLAG_NO_HOLE)  # stays allocated
h.trim(64 * K, 192 * K)                 # allocated -> trimmed
h.zero(128 * K, 512 * K)                # unallocated -> zero
h.zero(64 * K, 768 * K, nbd.CMD_FLAG_NO_HOLE)  # unallocated
h.trim(128 * K, 1024 * K)               # unallocated -> trimmed
for off in (0, 512, 768, 1024):
    n = {0: 256, 512: 128, 768: 64, 1024: 128}[off]
    assert h.pread(n * K, off * K) == bytes(n * K), "at %dK" % off
assert h.pread(64 * K, 256 * K) == b"\x07" * 65536   # untouched
h.flush()
EOF
stop_nbdkit o
qemu_check "$tmp/o.qed"
# Perfectly compacted: header, L1 (4), one data cluster, one L2 table (4).
[ $(stat -c %s "$tmp/o.qed") = $((10 * 64*K)) ] ||
  fail "overlay not compacted: $(stat -c %s "$tmp/o.qed") bytes"
qemu-img map --output=json "$tmp/o.qed" > "$tmp/map.json"
/usr/bin/python3 - "$tmp/map.json" <<'EOF' || { cat "$tmp/map.json"; fail "qemu-img map"; }
import json, sys
K = 1024
m = json.load(open(sys.argv[1]))
def at(off):
    for e in m:
        if e["start"] <= off < e["start"] + e["length"]:
            return e
for off in [0, 64, 192, 512, 576, 768, 1024, 1088]:
    e = at(off * K)
    assert e["zero"] and not e["data"] and e["depth"] == 0, (off, e)
# Zeroed with NO_HOLE: still allocated in the image (not a hole).
e = at(128 * K)
assert e["data"] and e["depth"] == 0, e
e = at(256 * K)
assert e["data"] and e["depth"] == 1, e          # backing data shows
EOF
for r in "0 256k" "512k 128k" "768k 64k" "1M 128k"; do
  out=$(qemu-io -r -f qed -c "read -P 0 $r" "$tmp/o.qed") || fail "QEMU reads backing data at $r: $out"
done
[ "$(md5sum < "$tmp/b.raw")" = "$bsum" ] || fail "backing file modified"
echo "ok: zero and trim over a backing file"
echo PASS
