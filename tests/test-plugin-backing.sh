#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Backing files through the plugin, with QEMU as the oracle: raw and QED
# backing files, a chain of depth 3 with relative names (nbdkit run from
# another directory), a backing file shorter than the image, loops,
# missing files, follow-backing=false and backing-override.  Writes go
# to a QED twin through qemu-io as well, and `qemu-img compare` must
# find the two identical.  No backing file may ever change.
source "$(dirname "$0")/functions.sh"
# run_nbdkit ARGS... --run CMD: a captive nbdkit on a socket in $tmp
# (nbdkit leaves the socket file behind, so remove it first).
requires qemu-img --version
requires qemu-io --version
requires nbdcopy --version
requires nbdinfo --version
requires /usr/bin/python3 -c 'import nbd'

K=1024 M=$((1024 * 1024))

# expect_fail PATTERN NBDKIT-ARGS...: nbdkit must refuse to start (before
# serving anything) with a message matching PATTERN.
expect_fail () {
  local pat=$1; shift
  if run_nbdkit "$@" --run 'exit 0' >"$tmp/err" 2>&1; then
    fail "nbdkit $* started, expected: $pat"
  fi
  grep -Eq "$pat" "$tmp/err" || { cat "$tmp/err"; fail "no '$pat' in the error"; }
}

# apply_ops URI OPS...: each op is "OFFSET:LENGTH:BYTE" written through
# NBD; twin_ops IMAGE OPS...: the same writes through qemu-io.
apply_ops () {
  local u=$1; shift
  /usr/bin/python3 - "$u" "$@" <<'EOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for op in sys.argv[2:]:
    off, n, b = (int(x, 0) for x in op.split(":"))
    h.pwrite(bytes([b]) * n, off)
h.flush()
h.shutdown()
EOF
}
twin_ops () {
  local img=$1 cmds=() op; shift
  for op in "$@"; do
    IFS=: read -r off n b <<<"$op"
    cmds+=(-c "write -P $b $off $n")
  done
  qemu-io -f qed "${cmds[@]}" "$img" >/dev/null
}


# checksums of backing files, compared at the end.
sums () { (cd "$tmp" && md5sum "$@"); }

# ---- 1. Raw backing file; reads and COW writes equal QEMU's.
qemu-img create -q -f raw "$tmp/base.raw" 4M
qemu-io -f raw -c "write -P 0x5a 0 1M" -c "write -P 0x33 2M 100k" \
  -c "write -P 0x44 $((4*M-5000)) 5000" "$tmp/base.raw" >/dev/null
qemu-img create -q -f qed -b base.raw -F raw "$tmp/o1.qed" 4M
qemu-io -f qed -c "write -P 0x11 100k 10k" -c "write -P 0x12 3M 64k" \
  "$tmp/o1.qed" >/dev/null
cp "$tmp/o1.qed" "$tmp/o1-twin.qed"
before=$(sums base.raw)
start_nbdkit o1 "$PLUGIN" "$tmp/o1.qed"
nbdcopy "$(uri o1)" "$tmp/got.raw"
qemu-img convert -U -O raw "$tmp/o1.qed" "$tmp/want.raw"
cmp "$tmp/want.raw" "$tmp/got.raw" || fail "raw backing: read differs"
# Partial-cluster writes (COW of head and tail from the backing file),
# one spanning three clusters, one in an already allocated cluster.
ops=(100:1:0x71 $((64*K+1000)):$((130*K)):0x72 $((1*M-10)):20:0x73
     $((100*K+5)):7:0x74 $((4*M-3000)):3000:0x75)
apply_ops "$(uri o1)" "${ops[@]}"
stop_nbdkit o1
twin_ops "$tmp/o1-twin.qed" "${ops[@]}"
qemu-img compare -q "$tmp/o1.qed" "$tmp/o1-twin.qed" ||
  fail "raw backing: writes differ from qemu-io's"
qemu_check "$tmp/o1.qed"
[ "$(sums base.raw)" = "$before" ] || fail "base.raw was modified"
echo "ok: raw backing"

# ---- 2. QED backing file (probed, no NO_PROBE bit), which itself has
# an unknown autoclear bit that a writable open would clear: we must
# open it read-only and leave it byte-identical.
qemu-img create -q -f qed "$tmp/b2.qed" 4M
qemu-io -f qed -c "write -P 0x21 0 200k" -c "write -z 1M 128k" \
  -c "write -P 0x22 $((3*M+7)) 9" "$tmp/b2.qed" >/dev/null
printf '\x08' | dd of="$tmp/b2.qed" bs=1 seek=32 conv=notrunc status=none
qemu-img create -q -f qed -b b2.qed -F qed "$tmp/o2.qed" 4M
qemu-io -f qed -c "write -P 0x23 64k 64k" "$tmp/o2.qed" >/dev/null
cp "$tmp/o2.qed" "$tmp/o2-twin.qed"
before=$(sums b2.qed)
start_nbdkit o2 "$PLUGIN" "$tmp/o2.qed"
rm -f "$tmp/got.raw"; nbdcopy "$(uri o2)" "$tmp/got.raw"
qemu-img convert -U -O raw "$tmp/o2.qed" "$tmp/want.raw"
cmp "$tmp/want.raw" "$tmp/got.raw" || fail "qed backing: read differs"
ops=(10:100:0x61 $((1*M+5)):10:0x62 $((200*K-4)):8:0x63)
apply_ops "$(uri o2)" "${ops[@]}"
stop_nbdkit o2
twin_ops "$tmp/o2-twin.qed" "${ops[@]}"
qemu-img compare -q "$tmp/o2.qed" "$tmp/o2-twin.qed" ||
  fail "qed backing: writes differ from qemu-io's"
[ "$(sums b2.qed)" = "$before" ] || fail "b2.qed (backing) was modified"
echo "ok: qed backing"

# ---- 3. A chain of depth 3 with relative names, resolved against each
# image's directory: d/top.qed -> sub/mid.qed -> ../base3.raw (= d/base3.raw).
mkdir -p "$tmp/d/sub" "$tmp/elsewhere"
# The raw base is sparse (holes read as zeros), the image is longer
# than the chain below it, and each layer has zero clusters.
qemu-img create -q -f raw "$tmp/d/base3.raw" 8M
qemu-io -f raw -c "write -P 0x31 0 3M" -c "write -P 0x39 6M 100k" \
  "$tmp/d/base3.raw" >/dev/null
qemu-img create -q -f qed -b ../base3.raw -F raw "$tmp/d/sub/mid.qed" 8M
qemu-io -f qed -c "write -P 0x32 1M 1M" -c "write -z 5M 256k" \
  -c "write -z 2560k 128k" -c "write -P 0x35 $((5*M+64*K+100)) 100" \
  "$tmp/d/sub/mid.qed" >/dev/null
qemu-img create -q -f qed -b sub/mid.qed -F qed "$tmp/d/top.qed" 10M
qemu-io -f qed -c "write -P 0x33 $((1*M+512*K)) 1M" -c "write -P 0x34 7M 10" \
  -c "write -z 4M 64k" "$tmp/d/top.qed" >/dev/null
cp "$tmp/d/top.qed" "$tmp/d/top-twin.qed"
before=$(sums d/base3.raw d/sub/mid.qed)
# Started from another directory, with a relative image path.
(cd "$tmp/elsewhere" && start_nbdkit o3 "$PLUGIN" ../d/top.qed)
grep -q 'backing chain: .*mid.qed (qed.*base3.raw (raw' "$tmp/o3.log" ||
  fail "chain not described in the log"
rm -f "$tmp/got.raw"; nbdcopy "$(uri o3)" "$tmp/got.raw"
qemu-img convert -U -O raw "$tmp/d/top.qed" "$tmp/want.raw"
cmp "$tmp/want.raw" "$tmp/got.raw" || fail "chain: read differs"
maps_match "$(uri o3)" "$tmp/d/top.qed" || fail "chain: map differs from qemu-img map"
ops=($((5*M+100)):50:0x41 $((2*M-100)):200:0x42 $((8*M-1)):2:0x43
     $((2560*K+10)):10:0x44 $((10*M-5)):5:0x45)
apply_ops "$(uri o3)" "${ops[@]}"
stop_nbdkit o3
twin_ops "$tmp/d/top-twin.qed" "${ops[@]}"
qemu-img compare -q "$tmp/d/top.qed" "$tmp/d/top-twin.qed" ||
  fail "chain: writes differ from qemu-io's"
qemu_check "$tmp/d/top.qed"
[ "$(sums d/base3.raw d/sub/mid.qed)" = "$before" ] || fail "chain modified"
echo "ok: chain of depth 3, relative names"

# ---- 4. A backing file shorter than the image (100000 bytes, not even
# 512-aligned): zeros past its end, a read straddling its EOF, and a
# partial-cluster write in the cluster that straddles it.
/usr/bin/python3 -c '
import random, sys
r = random.Random(4)
open(sys.argv[1], "wb").write(bytes(r.randrange(1, 256) for _ in range(100000)))
' "$tmp/short.raw"
qemu-img create -q -f qed -b short.raw -F raw "$tmp/o4.qed" 1M
cp "$tmp/o4.qed" "$tmp/o4-twin.qed"
before=$(sums short.raw)
start_nbdkit o4 "$PLUGIN" "$tmp/o4.qed"
/usr/bin/python3 - "$(uri o4)" "$tmp/short.raw" <<'EOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
base = open(sys.argv[2], "rb").read()
assert h.get_size() == 1 << 20
# Straddling EOF: backing bytes, then zeros.
assert h.pread(2000, 99000) == base[99000:] + bytes(1000)
assert h.pread(1, 99999) == base[99999:]
assert h.pread(4096, 100000) == bytes(4096)
assert h.pread(1 << 19, 1 << 19) == bytes(1 << 19)
# A partial write in the cluster [64K, 128K) that holds the EOF.
h.pwrite(b"\xee" * 100, 100100)
h.flush()
want = base[65536:] + bytes(100100 - 100000) + b"\xee" * 100
want += bytes(131072 - len(want) - 65536)
assert h.pread(65536, 65536) == want, "COW across the backing EOF"
EOF
maps_match "$(uri o4)" "$tmp/o4.qed" || fail "short backing: map differs"
stop_nbdkit o4
twin_ops "$tmp/o4-twin.qed" 100100:100:0xee
qemu-img compare -q "$tmp/o4.qed" "$tmp/o4-twin.qed" ||
  fail "short backing: differs from qemu-io"
qemu-img convert -O raw "$tmp/o4.qed" "$tmp/want.raw"
[ "$(sums short.raw)" = "$before" ] || fail "short.raw was modified"
echo "ok: short backing file"

# ---- 5. Errors at start-up.
# A loop A -> B -> A (made with rebase -u), and an image naming itself.
qemu-img create -q -f qed "$tmp/B.qed" 1M
qemu-img create -q -f qed -b B.qed -F qed "$tmp/A.qed" 1M
qemu-img rebase -u -b A.qed -F qed "$tmp/B.qed"
sa=$(sums A.qed B.qed)
expect_fail 'loop' "$PLUGIN" "$tmp/A.qed"
expect_fail 'loop' -r "$PLUGIN" "$tmp/A.qed"
qemu-img create -q -f qed "$tmp/self.qed" 1M
qemu-img rebase -u -b self.qed -F qed "$tmp/self.qed"
expect_fail 'loop' "$PLUGIN" "$tmp/self.qed"
[ "$(sums A.qed B.qed)" = "$sa" ] || fail "loop images were modified"
# A missing backing file: the message names it.
qemu-img create -q -u -f qed -b gone.raw -F raw "$tmp/o5.qed" 1M
expect_fail 'gone\.raw.*(No such file|not found)|(No such file|not found).*gone\.raw' \
  "$PLUGIN" "$tmp/o5.qed"
# follow-backing=false: refused, naming the option.
expect_fail 'follow-backing=false' "$PLUGIN" "$tmp/o1.qed" follow-backing=false
echo "ok: loop, missing backing file, follow-backing=false"

# ---- 6. backing-override: another file replaces the stored name (even
# a missing one, and with follow-backing=false).
qemu-img create -q -f raw "$tmp/alt.raw" 1M
qemu-io -f raw -c "write -P 0x99 0 1M" "$tmp/alt.raw" >/dev/null
before=$(sums alt.raw)
# Without a format it is refused (a probed raw disk could name any file).
expect_fail 'needs backing-override-format' "$PLUGIN" "$tmp/o5.qed" \
  backing-override="$tmp/alt.raw"
for extra in "" "follow-backing=false"; do
  cp "$tmp/o5.qed" "$tmp/o6.qed"
  run_nbdkit "$PLUGIN" "$tmp/o6.qed" backing-override="$tmp/alt.raw" \
    backing-override-format=raw $extra \
    --run '/usr/bin/python3 -c "
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.pread(1 << 20, 0) == b\"\x99\" * (1 << 20)
h.pwrite(b\"\x01\" * 10, 5000)
assert h.pread(65536, 0) == b\"\x99\" * 5000 + b\"\x01\" * 10 + b\"\x99\" * 60526
" "$uri"' || fail "backing-override $extra"
done
# The override of a raw-looking QED file as raw: the QED bytes show.
run_nbdkit "$PLUGIN" "$tmp/o5.qed" backing-override="$tmp/b2.qed" \
  backing-override-format=raw --run '/usr/bin/python3 -c "
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.pread(4, 0) == b\"QED\0\"
" "$uri"' || fail "backing-override-format=raw did not force raw"
[ "$(sums alt.raw)" = "$before" ] || fail "alt.raw was modified"
echo "ok: backing-override"
echo PASS
