#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: the origin guard.  An overlay records its origin (size,
# qed-origin-id, the plugin export, a sample of copied clusters); a
# changed origin is refused with one line naming what differs, unless
# qed-origin-changed=keep (serve, record the new origin) or =discard
# (the overlay becomes OVERLAY.stale, 0600, symlinks never followed,
# and a new one starts).  Changes only in clusters never copied are
# served, and read back as the new data.  One overlay serves one
# export.  The record is read here by its specification (the manual's
# ORIGIN RECORD section), not through the filter.
. "$(dirname "$0")/functions.sh"
requires nbdsh --version
requires qemu-img --version
cd "$tmp"

CS=65536
M=$((1024*1024))
head -c $((8*M)) /dev/urandom > base.raw       # 128 clusters

# serve NAME ARGS...: the filter over base.raw with overlay ov.qed.
serve () {
  local n=$1; shift
  start_nbdkit "$n" --log=stderr --filter="$FILTER" file base.raw qed-overlay=ov.qed \
    qed-backing-name=base.raw "$@"
}
# refused NAME PATTERN: a client cannot connect, and the log has one
# error line matching PATTERN (which names the overlay).
refused () {
  if nbdinfo --size "$(uri "$1")" >/dev/null 2>&1; then
    fail "$1: a changed origin was served"
  fi
  grep -E "error: qed-overlay: $tmp/ov.qed.*$2" "$1.log" ||
    { cat "$1.log"; fail "$1: no error line matching '$2'"; }
}
# samples FILE: the sampled guest offsets of the current record slot.
samples () {
  /usr/bin/python3 - "$1" <<'EOF'
import struct, sys, zlib
raw = open(sys.argv[1], "rb").read(65536)
hdr = struct.unpack("<IIIIQQQQQII", raw[:64])
assert hdr[5] & 2, "compat bit 0x2 (origin record) not set"
end = hdr[3] * hdr[1] - 64
best = None
for at in (end - 3072, end - 1536):
    s = raw[at:at + 1536]
    if s[:8] != b"QEDORIGN" or zlib.crc32(s[:1532]) != struct.unpack("<I", s[1532:])[0]:
        continue
    gen = struct.unpack("<Q", s[8:16])[0]
    if best is None or gen > best[0]:
        best = (gen, s)
gen, s = best
size, cs, n, il, el, flags = struct.unpack("<QIHHHH", s[16:36])
offs = sorted(struct.unpack("<Q", s[64 + 16*i:72 + 16*i])[0] for i in range(n))
print(" ".join(str(o) for o in offs))
EOF
}
# change OFFSET: change one byte of the origin at OFFSET (same size).
change () {
  /usr/bin/python3 -c '
import sys
f = open("base.raw", "r+b"); f.seek(int(sys.argv[1])); b = f.read(1)
f.seek(int(sys.argv[1])); f.write(bytes([b[0] ^ 0xff]))' "$1"
}

# 1. Read everything: every cluster is copied, 64 are sampled.
serve a
nbdcopy "$(uri a)" null:
stop_nbdkit a
read -r -a S <<< "$(samples ov.qed)"
[ ${#S[@]} = 64 ] || fail "expected 64 samples, got ${#S[@]}"
[ "${S[0]}" = 0 ] || fail "the first cluster is not in the sample"
# Spread across the disk: some in each quarter.
for q in 0 1 2 3; do
  n=0
  for o in "${S[@]}"; do [ $((o / (2*M))) = $q ] && n=$((n+1)); done
  [ $n -ge 4 ] || fail "only $n samples in quarter $q: ${S[*]}"
done

# 2. An unchanged origin is served.
serve b
nbdinfo --size "$(uri b)" >/dev/null
stop_nbdkit b

# 3. A changed first cluster is refused, naming guest offset 0.
cp base.raw orig.raw
change 100
serve c
refused c "guest offset 0 changed.*qed-origin-changed=keep.*qed-origin-changed=discard"
stop_nbdkit c
cp orig.raw base.raw

# 4. Changed sampled clusters: the first one by guest offset is named.
hi=${S[63]} mid=${S[40]}
change $((hi + 7)); change $((mid + 9))
serve d
refused d "guest offset $mid changed \(2 of the 64"
stop_nbdkit d

# 5. keep: served as it is (the old cached data), the new fingerprint
# recorded, so the next default open serves it too.
serve e qed-origin-changed=keep
nbdsh -u "$(uri e)" -c "assert h.pread(4096, $mid) == open('orig.raw','rb').read()[$mid:$mid+4096]"
stop_nbdkit e
serve f
nbdinfo --size "$(uri f)" >/dev/null
stop_nbdkit f
cp orig.raw base.raw            # back: now the keep'd record differs
serve g
refused g "guest offset $mid changed"
stop_nbdkit g
serve g2 qed-origin-changed=keep      # (the overlay opens at a connection)
nbdinfo --size "$(uri g2)" >/dev/null
stop_nbdkit g2

# 6. qed-origin-id: recorded at the first open that names it; another
# id is refused; no id given is not compared.
serve h qed-origin-id=v1
nbdinfo --size "$(uri h)" >/dev/null
stop_nbdkit h
serve i qed-origin-id=v2
refused i 'qed-origin-id is "v2" but the overlay was made for "v1"'
stop_nbdkit i
serve j
nbdinfo --size "$(uri j)" >/dev/null
stop_nbdkit j
# keep with a new id over a changed cluster records both: the next open
# with that id is served.
change $((mid + 99))
serve j2 qed-origin-id=v2 qed-origin-changed=keep
nbdinfo --size "$(uri j2)" >/dev/null
stop_nbdkit j2
serve j3 qed-origin-id=v2
nbdinfo --size "$(uri j3)" >/dev/null || { cat j3.log; fail "keep did not record the new origin"; }
stop_nbdkit j3
cp orig.raw base.raw
serve j4 qed-origin-changed=keep
nbdinfo --size "$(uri j4)" >/dev/null
stop_nbdkit j4

# 7. A different size: refused; keep cannot serve it.
truncate -s $((9*M)) base.raw
serve k qed-origin-changed=keep
refused k "an overlay of a $((8*M))-byte disk, but the plugin.s disk is $((9*M)) bytes.*discard"
stop_nbdkit k
cp orig.raw base.raw

# 8. discard: the overlay (with a guest write) becomes ov.qed.stale,
# 0600, replacing an older one (a symlink there is replaced, not
# followed); a new empty overlay serves the new origin.
serve l
nbdsh -u "$(uri l)" -c "h.pwrite(b'G' * 4096, $M); h.flush()"
stop_nbdkit l
chmod 0644 ov.qed
echo victim > victim
ln -s victim ov.qed.stale
change 200
serve m qed-origin-changed=discard
nbdsh -u "$(uri m)" -c "
assert h.pread(4096, 0) == open('base.raw','rb').read(4096)
assert h.pread(4096, $M) == open('base.raw','rb').read()[$M:$M+4096]"
stop_nbdkit m
[ "$(cat victim)" = victim ] || fail "the symlink ov.qed.stale was followed"
[ -f ov.qed.stale ] && [ ! -L ov.qed.stale ] || fail "ov.qed.stale is not a file"
[ "$(stat -c %a ov.qed.stale)" = 600 ] || fail "ov.qed.stale is not 0600"
qemu_check ov.qed.stale
qemu_check ov.qed
qemu-img convert -f qed -O raw ov.qed.stale stale.raw
cmp -n 4096 -i $M:0 stale.raw <(printf 'G%.0s' $(seq 4096)) ||
  fail "the stale overlay lost the guest's write"
# A symlinked overlay is never renamed (the link's target stays put).
mv ov.qed real.qed; ln -s real.qed ov.qed
change 300
serve n qed-origin-changed=discard
refused n "not discarded: the name is a symbolic link"
stop_nbdkit n
rm ov.qed; mv real.qed ov.qed

# 9. A change only in clusters never copied is served, and reads as
# the new data there (not a mix).
rm -f ov.qed ov.qed.stale
cp orig.raw base.raw
serve o
nbdsh -u "$(uri o)" -c "h.pread(4*$M, 0)"          # the first half only
stop_nbdkit o
change $((6*M + 1234))
serve p
nbdsh -u "$(uri p)" -c "
assert h.pread(8*$M, 0) == open('base.raw','rb').read()"
stop_nbdkit p

# 9b. A damaged record (both slots) is refused; keep makes a new one.
/usr/bin/python3 - ov.qed <<'EOF'
import struct, sys
f = open(sys.argv[1], "r+b")
raw = f.read(64)
cs, hs = struct.unpack("<I", raw[4:8])[0], struct.unpack("<I", raw[12:16])[0]
end = hs * cs - 64
for at in (end - 3072 + 100, end - 1536 + 100):
    f.seek(at); f.write(b"\xff" * 8)
EOF
serve p2
refused p2 "its origin record is damaged.*qed-origin-changed=keep.*discard"
stop_nbdkit p2
serve p3 qed-origin-changed=keep
nbdinfo --size "$(uri p3)" >/dev/null
stop_nbdkit p3
serve p4
nbdinfo --size "$(uri p4)" >/dev/null || fail "no new record after keep"
stop_nbdkit p4

# 10. One overlay, one export: a plugin with two same-size exports.
mkdir EX
head -c $M /dev/urandom > EX/a.raw
head -c $M /dev/urandom > EX/b.raw
start_nbdkit q --log=stderr --filter="$FILTER" file dir=EX qed-overlay=ex.qed
ua="nbd+unix:///a.raw?socket=$tmp/q.sock"
ub="nbd+unix:///b.raw?socket=$tmp/q.sock"
nbdsh -u "$ua" -c "assert h.pread($M, 0) == open('EX/a.raw','rb').read()"
if nbdinfo --size "$ub" >/dev/null 2>&1; then
  fail "export b.raw served from a.raw's overlay"
fi
grep 'ex.qed was made for the plugin.s export "a.raw", not "b.raw"' q.log
stop_nbdkit q
# After a restart, too, even as the first connection.
start_nbdkit r --log=stderr --filter="$FILTER" file dir=EX qed-overlay=ex.qed
if nbdinfo --size "nbd+unix:///b.raw?socket=$tmp/r.sock" >/dev/null 2>&1; then
  fail "export b.raw served from a.raw's overlay after a restart"
fi
nbdsh -u "nbd+unix:///a.raw?socket=$tmp/r.sock" \
  -c "assert h.pread($M, 0) == open('EX/a.raw','rb').read()"
stop_nbdkit r
echo OK
