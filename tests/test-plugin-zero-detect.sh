#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# zero-detect=true: all-zero clusters in a write are stored as
# zero/unallocated clusters instead of data, so writing zeros does not
# grow the file, and in a 3-cluster write whose middle cluster is all
# zero only that cluster stays out of `qemu-img map`'s data.  Over a
# backing file the zero cluster hides the backing data.  Without the
# option the same writes allocate (so the test can tell).
source "$(dirname "$0")/functions.sh"
# run_nbdkit ARGS... --run CMD: a captive nbdkit on a socket in $tmp
# (nbdkit leaves the socket file behind, so remove it first).
requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'

K=1024 M=$((1024 * 1024))

cat > "$tmp/writes.py" <<'EOF'
import nbd, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
K, M = 1024, 1 << 20
rng = random.Random(6)
a, c = rng.randbytes(64 * K), rng.randbytes(64 * K)
h.pwrite(bytes(M), 0)                          # 16 zero clusters
h.pwrite(a + bytes(64 * K) + c, M)             # data, zero, data
h.pwrite(bytes(200 * K), 2 * M + 10 * K)       # unaligned: 2 whole zero clusters
buf = bytearray(64 * K); buf[-1] = 1
h.pwrite(bytes(buf), 3 * M)                    # nearly zero: data
h.flush()
assert h.pread(M, 0) == bytes(M)
assert h.pread(192 * K, M) == a + bytes(64 * K) + c
assert h.pread(200 * K, 2 * M + 10 * K) == bytes(200 * K)
assert h.pread(64 * K, 3 * M) == bytes(buf)
EOF

# kinds IMAGE OFFSET...: "data" or "zero" for each offset in qemu-img map.
kinds () {
  local img=$1; shift
  qemu-img map --output=json "$img" > "$tmp/map.json"
  /usr/bin/python3 - "$tmp/map.json" "$@" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
out = []
for off in map(int, sys.argv[2:]):
    e = next(e for e in m if e["start"] <= off < e["start"] + e["length"])
    out.append("data" if e["data"] and e["depth"] == 0 else
               "zero" if e["zero"] and not e["data"] else "other:%s" % e)
print(" ".join(out))
EOF
}

# ---- 1. No backing file.
for zd in true false; do
  img=$tmp/zd-$zd.qed
  qemu-img create -q -f qed "$img" 4M
  # Space is what counts: the file's length grows in chunks (holes)
  # while served and is cut back at exit, so measure allocated bytes.
  size0=$(allocated "$img")
  start_nbdkit zd "$PLUGIN" "$img" zero-detect=$zd
  /usr/bin/python3 "$tmp/writes.py" "$(uri zd)" || fail "zero-detect=$zd: content"
  size1=$(allocated "$img")
  stop_nbdkit zd
  qemu_check "$img"
  got=$(kinds "$img" 0 $((512*K)) $M $((M+64*K)) $((M+128*K)) $((2*M+64*K)) \
          $((2*M)) $((3*M)))
  echo "zero-detect=$zd: allocated $size0 -> $size1 bytes while served; map: $got"
  if [ $zd = true ]; then
    # The zero clusters, the middle cluster and the whole zero cluster
    # inside the unaligned write are not data; the rest is.
    [ "$got" = "zero zero data zero data zero data data" ] ||
      fail "zero-detect=true: wrong map: $got"
    # Only 5 data clusters (+ one L2 table) were allocated in all.
    [ $size1 -le $((size0 + (5 + 4) * 64*K)) ] ||
      fail "zero-detect=true: the file grew to $size1"
  else
    [ "$got" = "data data data data data data data data" ] ||
      fail "zero-detect=false: wrong map: $got"
    [ $size1 -ge $((size0 + 16 * 64*K)) ] || fail "zero-detect=false: no growth?"
  fi
done

# ---- 2. Zero-filled writes alone never grow the file.
qemu-img create -q -f qed "$tmp/z.qed" 64M
size0=$(stat -c %s "$tmp/z.qed")
run_nbdkit "$PLUGIN" "$tmp/z.qed" zero-detect=true --run '
  /usr/bin/python3 -c "
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i in range(0, 64 << 20, 8 << 20):
    h.pwrite(bytes(8 << 20), i)
h.flush()
" "$uri"' || fail "writing zeros"
[ "$(stat -c %s "$tmp/z.qed")" = "$size0" ] ||
  fail "64M of zeros grew the file: $size0 -> $(stat -c %s "$tmp/z.qed")"
qemu_check "$tmp/z.qed"

# ---- 3. Over a backing file of 0x07 the zero clusters hide it.
qemu-img create -q -f raw "$tmp/b.raw" 4M
qemu-io -f raw -c "write -P 7 0 4M" "$tmp/b.raw" >/dev/null
qemu-img create -q -f qed -b b.raw -F raw "$tmp/o.qed" 4M
start_nbdkit o "$PLUGIN" "$tmp/o.qed" zero-detect=true
/usr/bin/python3 "$tmp/writes.py" "$(uri o)" || fail "backing: content"
stop_nbdkit o
qemu_check "$tmp/o.qed"
got=$(kinds "$tmp/o.qed" 0 $M $((M+64*K)) $((M+128*K)) $((2*M+64*K)))
[ "$got" = "zero data zero data zero" ] || fail "backing: wrong map: $got"
out=$(qemu-io -r -f qed -c "read -P 0 0 1M" -c "read -P 0 $((M+64*K)) 64k" \
  -c "read -P 0 $((2*M+10*K)) 200k" "$tmp/o.qed") || fail "QEMU reads: $out"
echo PASS
