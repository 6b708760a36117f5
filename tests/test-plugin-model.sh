#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Model test: a few hundred seeded random writes, zeroes (with and
# without MAY_TRIM, some FAST_ZERO), trims, flushes and FUA requests,
# aligned and not, some across cluster and L2-table boundaries, are
# checked against a bytearray model, over images with and without a raw
# backing file.  After a clean stop QEMU must agree: `qemu-img check`
# exits 0, `qemu-img compare` with the model says identical, and
# NEED_CHECK is clear.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires /usr/bin/python3 -c 'import nbd'

K=1024 M=$((1024 * 1024))

cat > "$tmp/model.py" <<'EOF'
import errno, nbd, random, sys

uri, size, cs, ts, seed, backing, out = sys.argv[1:8]
size, cs, ts, seed = int(size), int(cs), int(ts), int(seed)
table = ts * cs // 8 * cs          # guest bytes per L2 table
rng = random.Random(seed)
model = bytearray(size)
if backing:
    b = open(backing, "rb").read()[:size]
    model[:len(b)] = b
h = nbd.NBD(); h.connect_uri(uri)
assert h.get_size() == size
assert h.can_trim() and h.can_zero() and h.can_fast_zero() and h.can_fua()

def pick():
    """An (offset, length) pair: aligned, unaligned, or across a
    cluster or table boundary."""
    r = rng.random()
    if r < 0.25:                                   # aligned clusters
        n = rng.randrange(1, 9) * cs
        off = rng.randrange(0, size // cs) * cs
    elif r < 0.45:                                 # small, unaligned
        n = rng.randrange(1, 700)
        off = rng.randrange(0, size)
    elif r < 0.65:                                 # across a table boundary
        b = rng.randrange(1, max(2, size // table + 1)) * table
        b = min(b, size - 1)
        off = max(0, b - rng.randrange(1, 3 * cs))
        n = rng.randrange(1, 6 * cs)
    else:                                          # across cluster boundaries
        b = rng.randrange(1, size // cs) * cs
        off = max(0, b - rng.randrange(1, cs))
        n = rng.randrange(1, 3 * cs)
    n = max(1, min(n, size - off))
    return off, n

def check(off, n, what):
    got = h.pread(n, off)
    if got != model[off:off+n]:
        i = next(i for i in range(n) if got[i] != model[off+i])
        sys.exit("%s: mismatch at %d (read %d+%d): got %#x want %#x"
                 % (what, off + i, off, n, got[i], model[off + i]))

counts = {}
for step in range(350):
    r = rng.random()
    off, n = pick()
    fua = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
    if r < 0.45:
        kind = "write"
        # Some all-zero buffers, mostly random data.
        data = bytes(n) if rng.random() < 0.1 else rng.randbytes(n)
        h.pwrite(data, off, fua)
        model[off:off+n] = data
    elif r < 0.65:
        kind = "zero"
        # Without NO_HOLE, nbdkit passes MAY_TRIM to the plugin.
        flags = fua | (nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
        h.zero(n, off, flags)
        model[off:off+n] = bytes(n)
    elif r < 0.70:
        kind = "fast-zero"
        try:
            h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO)
            model[off:off+n] = bytes(n)
        except nbd.Error as e:
            assert e.errnum == errno.ENOTSUP, e
            kind = "fast-zero-refused"
            # The client falls back to writing zeros, so whole clusters
            # zeroed before the refusal are allowed: zeros or old data.
            got = h.pread(n, off)
            for i in range(n):
                if got[i] != 0 and got[i] != model[off + i]:
                    sys.exit("refused fast zero wrote garbage at %d" % (off + i))
            model[off:off+n] = got
    elif r < 0.85:
        kind = "trim"
        h.trim(n, off, fua)
        # Trimmed content: whole clusters read as zeros; a partial piece
        # of a cluster reads as zeros or keeps its old data.
        got = h.pread(n, off)
        p = off
        while p < off + n:
            cend = min((p // cs + 1) * cs, size)
            e = min(cend, off + n)
            piece = got[p-off:e-off]
            whole = p % cs == 0 and e == cend
            if piece != bytes(e - p):
                if whole or piece != model[p:e]:
                    sys.exit("step %d: trim %d+%d: piece %d..%d is neither "
                             "zeros%s" % (step, off, n, p, e,
                                          "" if whole else " nor the old data"))
            model[p:e] = piece
            p = e
    elif r < 0.92:
        kind = "flush"
        h.flush()
    else:
        kind = "read"
    counts[kind] = counts.get(kind, 0) + 1
    check(off, n, "step %d after %s %d+%d" % (step, kind, off, n))

h.flush()
for p in range(0, size, 1 << 20):
    check(p, min(1 << 20, size - p), "final")
h.shutdown()
open(out, "wb").write(model)
print("ops:", sorted(counts.items()))
EOF

# variant NAME CLUSTER TABLE SIZE SEED [BACKING-SIZE]
variant () {
  local name=$1 cs=$2 ts=$3 size=$4 seed=$5 bsize=${6:-} b=()
  local img=$tmp/$name.qed backing=""
  if [ -n "$bsize" ]; then
    backing=$tmp/$name-base.raw
    /usr/bin/python3 -c '
import random, sys
r = random.Random(int(sys.argv[2]))
open(sys.argv[1], "wb").write(r.randbytes(int(sys.argv[3])))' \
      "$backing" $seed $bsize
    b=(-b "$name-base.raw" -F raw)
  fi
  qemu-img create -q -f qed "${b[@]}" -o cluster_size=$cs,table_size=$ts \
    "$img" $size
  local bsum=""; [ -n "$backing" ] && bsum=$(md5sum < "$backing")
  start_nbdkit $name "$PLUGIN" "$img"
  /usr/bin/python3 "$tmp/model.py" "$(uri $name)" $size $cs $ts $seed \
    "$backing" "$tmp/$name.model" || fail "$name: model mismatch"
  stop_nbdkit $name
  qemu_check "$img"
  qemu-img compare -f qed -F raw "$img" "$tmp/$name.model" ||
    fail "$name: qemu-img compare with the model"
  [ "$(need_check "$img")" = 0 ] || fail "$name: NEED_CHECK still set"
  [ -z "$backing" ] || [ "$(md5sum < "$backing")" = "$bsum" ] ||
    fail "$name: backing file modified"
  echo "ok: $name"
}

variant plain64k 65536 4 $((8*M)) 1
variant small4k 4096 2 $((12*M+1536)) 2              # 4 L2 tables
variant back4k 4096 2 $((10*M)) 3 $((7*M+1000))      # short backing
variant back64k 65536 4 $((6*M+512)) 4 $((6*M+512))
echo PASS
