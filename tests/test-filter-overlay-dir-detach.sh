#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: qed-detach=true with qed-overlay-dir (no shared cache).  A
# per-export overlay that holds every cluster drops its origin (one log
# line naming it, the backing file removed from its header) and its
# export never reads the plugin again; another export's incomplete
# overlay keeps its origin (and its guard).  The detached overlay is
# served again after a restart (it names no backing file, whatever
# qed-backing-name says), passes qemu-img check and equals what was
# served.
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
cd "$tmp"

M=$((1024*1024))
make_gapped_base
mkdir ov

features () { od -An -tu8 -j16 -N8 "$1" | tr -d ' '; }
serve () {
  start_nbdkit s --log=stderr --filter="$FILTER" file base.raw qed-overlay-dir=ov \
    qed-backing-name="$tmp/base.raw" qed-detach=true "$@"
}
u () { echo "nbd+unix:///$1?socket=$tmp/s.sock"; }

serve
# b reads a little: not detached.  a reads everything: detached.
nbdsh -u "$(u b)" -c "h.pread($M, 0)"
nbdsh -u "$(u a)" -c "for o in range(0, 8*$M, $M): h.pread($M, o)"
grep -q "qed-detach: $tmp/ov/a.qed holds every cluster" s.log ||
  { cat s.log; fail "no detach line for ov/a.qed"; }
grep -q "qed-detach: .*b.qed" s.log && fail "the incomplete b.qed was detached"
[ $(( $(features ov/a.qed) & 5 )) = 0 ] || fail "a.qed still names its backing file"
[ $(( $(features ov/b.qed) & 1 )) = 1 ] || fail "b.qed lost its backing file"

# From now on export a never reads the plugin: change it, trim, read.
head -c $M /dev/urandom | dd of=base.raw bs=$M seek=6 conv=notrunc status=none
nbdsh -u "$(u a)" -c "
h.trim(65536, 7*$M)
assert h.pread(65536, 7*$M) == bytes(65536), 'a trimmed cluster read the plugin'
assert h.pread($M, 6*$M) == open('orig.raw','rb').read()[6*$M:7*$M]
h.pwrite(b'W' * 4096, $M)"
# Export b still reads the plugin where its overlay has nothing.
nbdsh -u "$(u b)" -c "
assert h.pread($M, 6*$M) == open('base.raw','rb').read()[6*$M:7*$M]"
stop_nbdkit s
/usr/bin/python3 - <<EOF2
b = bytearray(open('orig.raw', 'rb').read())
b[7*$M:7*$M+65536] = bytes(65536)
b[$M:$M+4096] = b'W' * 4096
open('expect.raw', 'wb').write(b)
EOF2
cp orig.raw base.raw

qemu_check ov/a.qed
qemu-img info ov/a.qed | grep -q "backing file" && fail "qemu-img still sees a backing file"
qemu-img compare -f qed -F raw ov/a.qed expect.raw || fail "qemu-img compare: different"
qemu_check ov/b.qed

# Served again after a restart, as it stands.  b copied the changed
# cluster at 6M before the origin was put back: its guard refuses it
# (a has no origin left to check).
serve
nbdcopy "$(u a)" served.raw
cmp served.raw expect.raw || fail "the detached export serves another disk"
if nbdinfo --size "$(u b)" >/dev/null 2>&1; then
  fail "export b was served over a changed origin"
fi
grep -q "error: qed-overlay: $tmp/ov/b.qed: the origin is not" s.log ||
  { cat s.log; fail "no guard error for b.qed"; }
stop_nbdkit s
echo PASS
