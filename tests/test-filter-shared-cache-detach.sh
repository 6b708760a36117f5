#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: qed-detach=true with qed-overlay-dir and qed-shared-cache.
# Once the shared cache holds every cluster it drops its origin (one log
# line naming it, no backing file left in its header); the per-export
# overlays keep it as their backing file, so each NAME.qed -> FILE
# chain stands without the plugin: qemu-img check is clean on FILE and
# each NAME.qed, qemu-img compare finds NAME.qed equal to the disk
# served, and after a restart the same data is served while the plugin
# returns another disk.
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
cd "$tmp"

M=$((1024*1024))
make_gapped_base
mkdir ov

features () { od -An -tu8 -j16 -N8 "$1" | tr -d ' '; }
serve () {
  start_nbdkit s --log=stderr --filter="$FILTER" file base.raw \
    qed-overlay-dir=ov qed-shared-cache="$tmp/ov/cache.qed" \
    qed-backing-name="$tmp/base.raw" qed-detach=true "$@"
}
u () { echo "nbd+unix:///$1?socket=$tmp/s.sock"; }

serve
# b writes a little and reads a little: the cache is not complete yet.
nbdsh -u "$(u b)" -c "h.pwrite(b'B' * 4096, 2*$M); h.pread($M, 0)"
grep -q "qed-detach:" s.log && fail "an incomplete cache was detached"
[ $(( $(features ov/cache.qed) & 1 )) = 1 ] || fail "cache.qed lost its backing file early"
# a reads everything (its overlay stays empty): the cache is complete.
nbdsh -u "$(u a)" -c "for o in range(0, 8*$M, $M): h.pread($M, o)"
grep -q "qed-detach: $tmp/ov/cache.qed holds every cluster" s.log ||
  { cat s.log; fail "no detach line for ov/cache.qed"; }
[ $(( $(features ov/cache.qed) & 5 )) = 0 ] || fail "cache.qed still names its backing file"
for n in a b; do
  qemu-img info ov/$n.qed | grep -q "^backing file: cache.qed" ||
    fail "$n.qed does not name cache.qed as its backing file"
done

# From now on nothing reads the plugin.
head -c $M /dev/urandom | dd of=base.raw bs=$M seek=6 conv=notrunc status=none
nbdsh -u "$(u a)" -c "
assert h.pread($M, 6*$M) == open('orig.raw','rb').read()[6*$M:7*$M]
h.pwrite(b'A' * 4096, $M)"
nbdsh -u "$(u b)" -c "
assert h.pread($M, 6*$M) == open('orig.raw','rb').read()[6*$M:7*$M]"
stop_nbdkit s
/usr/bin/python3 - <<EOF2
o = open('orig.raw', 'rb').read()
a = bytearray(o); a[$M:$M+4096] = b'A' * 4096
b = bytearray(o); b[2*$M:2*$M+4096] = b'B' * 4096
open('expect-a.raw', 'wb').write(a)
open('expect-b.raw', 'wb').write(b)
EOF2
# The plugin now serves another disk altogether.
head -c $((8*M)) /dev/urandom > base.raw

qemu_check ov/cache.qed
qemu-img info ov/cache.qed | grep -q "backing file" && fail "qemu-img still sees a backing file in cache.qed"
for n in a b; do
  qemu_check ov/$n.qed
  qemu-img compare -f qed -F raw ov/$n.qed expect-$n.raw ||
    fail "qemu-img compare: $n.qed differs"
done

# Served again after a restart, as it stands.
serve
for n in a b; do
  nbdcopy "$(u $n)" served-$n.raw
  cmp served-$n.raw expect-$n.raw || fail "export $n serves another disk"
done
stop_nbdkit s
echo PASS
