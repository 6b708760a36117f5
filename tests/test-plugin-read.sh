#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Plugin reads, with QEMU as the oracle: images written by qemu-io with
# several cluster and table sizes (data, zero clusters, unaligned zero
# writes, unallocated areas, L2-table boundaries, a partial last
# cluster) must read back byte for byte like `qemu-img convert -O raw`,
# and `nbdinfo --map` must agree with `qemu-img map --output=json`.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdcopy --version
requires nbdinfo --version

M=$((1024 * 1024))


# random_reads URI RAW SEED: unaligned reads at random offsets (and
# around cluster/table boundaries) equal the raw conversion.
random_reads () {
  /usr/bin/python3 - "$1" "$2" "$3" "$4" <<'EOF'
import nbd, random, sys
uri, raw, seed, cs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
f = open(raw, "rb")
import os
h = nbd.NBD(); h.connect_uri(uri)
size = h.get_size()
assert size == os.path.getsize(raw), size
rng = random.Random(seed)
for i in range(150):
    if i % 3 == 0:
        # straddle a cluster boundary
        b = rng.randrange(1, size // cs + 1) * cs
        off = max(0, b - rng.randrange(1, 3000)); n = rng.randrange(1, 6000)
    else:
        off = rng.randrange(0, size); n = rng.randrange(1, 3 * cs)
    n = min(n, size - off)
    if n == 0:
        continue
    got = h.pread(n, off)
    f.seek(off)
    assert got == f.read(n), "mismatch at %d+%d" % (off, n)
h.shutdown()
EOF
}

n=0
# cluster_size table_size image_size (non-cluster-multiple sizes on purpose)
while read -r cs ts size; do
  n=$((n+1))
  img=$tmp/g$n.qed
  cov=$((ts * cs / 8 * cs))     # guest bytes covered by one L2 table
  qemu-img create -q -f qed -o cluster_size=$cs,table_size=$ts "$img" $size
  ops=(
    -c "write -P 0x11 0 $((3*cs+100))"            # data, partial last cluster
    -c "write -z $((5*cs)) $((2*cs))"             # two zero clusters
    -c "write -P 0x44 $((6*cs+512)) 1024"         # write into a zero cluster
    -c "write -z $((10*cs+7)) 1000"               # unaligned zero: data cluster
    -c "write -P 0x55 $((12*cs)) $cs"             # data then zeroed in place
    -c "write -z $((12*cs)) $cs"
    -c "write -P 0x66 $((20*cs-300)) 600"         # straddles two clusters
    -c "write -P 0x33 $((size-1000)) 1000"        # the image's last bytes
  )
  if [ $size -gt $((cov + 8*cs)) ]; then
    ops+=(-c "write -P 0x22 $((cov-1000)) 5000"   # crosses an L2 table
          -c "write -z $((cov+3*cs)) $cs")        # zero cluster in table 2
  fi
  if [ $size -gt $((2*cov + 8*cs)) ]; then
    ops+=(-c "write -P 0x77 $((2*cov+5*cs)) 3000")  # third table
  fi
  out=$(qemu-io -f qed "${ops[@]}" "$img") || fail "qemu-io: $out"
  case "$out" in *failed*) fail "qemu-io: $out";; esac
  qemu-img check -q "$img" || fail "qemu made a bad image?"
  qemu-img convert -O raw "$img" "$tmp/want.raw"
  sum=$(md5sum < "$img")

  # Odd geometries are served read-only, even ones writable: either way
  # reading must not change the file.
  ro=(); [ $((n % 2)) = 1 ] && ro=(-r)
  start_nbdkit g$n "${ro[@]}" "$PLUGIN" "$img"
  rm -f "$tmp/got.raw"
  nbdcopy "$(uri g$n)" "$tmp/got.raw"
  # Byte for byte (qemu-img compare skips the holes of big sparse files).
  if [ $size -le $((64*M)) ]; then
    cmp "$tmp/want.raw" "$tmp/got.raw"
  else
    qemu-img compare -q -f raw -F raw "$tmp/want.raw" "$tmp/got.raw"
  fi || fail "cs=$cs ts=$ts: plugin read differs from qemu-img convert"
  random_reads "$(uri g$n)" "$tmp/want.raw" $n $cs ||
    fail "cs=$cs ts=$ts: unaligned reads differ"
  maps_match "$(uri g$n)" "$img" ||
    fail "cs=$cs ts=$ts: nbdinfo --map differs from qemu-img map"
  # The map shows the zero clusters qemu-io made as hole,zero.
  nbdinfo --map "$(uri g$n)" | grep -q 'hole,zero' || fail "no hole,zero"
  stop_nbdkit g$n
  [ "$(md5sum < "$img")" = "$sum" ] || fail "cs=$cs ts=$ts: reading changed the file"
  rm -f "$tmp/want.raw" "$tmp/got.raw"
  echo "ok: cs=$cs ts=$ts size=$size"
done <<EOF
4096 2 $((13*M+1536))
4096 16 $((40*M))
65536 4 $((8*M+512))
65536 2 $((16*M))
1048576 2 $((260*M+512))
1048576 16 $((24*M))
EOF
echo PASS
