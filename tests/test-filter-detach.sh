#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: qed-detach=true.  Once the overlay holds every cluster of the
# disk, the origin is removed from its header (one synced write, one
# log line) and the plugin is never read again; the overlay is then a
# standalone image: the QED plugin and qemu-img see the same disk as
# the origin, and qemu-img check exits 0.  An incomplete overlay keeps
# its origin.
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
cd "$tmp"

M=$((1024*1024))
make_gapped_base

features () { od -An -tu8 -j16 -N8 "$1" | tr -d ' '; }

# An incomplete overlay is not detached.
start_nbdkit a --log=stderr --filter="$FILTER" file base.raw \
  qed-overlay=part.qed qed-backing-name=base.raw qed-detach=true
nbdsh -u "$(uri a)" -c "h.pread($M, 0)"
stop_nbdkit a
[ $(( $(features part.qed) & 1 )) = 1 ] || fail "an incomplete overlay lost its backing file"
grep -q "qed-detach:" a.log && fail "an incomplete overlay was detached"

# Read everything: detached once the last cluster is in.
start_nbdkit b --log=stderr --filter="$FILTER" file base.raw \
  qed-overlay=ov.qed qed-backing-name=base.raw qed-detach=true
nbdsh -u "$(uri b)" -c "for o in range(0, 8*$M, $M): h.pread($M, o)"
grep -q "qed-detach: .*ov.qed holds every cluster" b.log ||
  { cat b.log; fail "no detach line"; }
[ $(( $(features ov.qed) & 5 )) = 0 ] || fail "the backing file is still in the header"
# From now on the plugin is never read: change it, trim and read.
head -c $M /dev/urandom | dd of=base.raw bs=$M seek=6 conv=notrunc status=none
nbdsh -u "$(uri b)" -c "
h.trim(65536, 7*$M)
assert h.pread(65536, 7*$M) == bytes(65536), 'a trimmed cluster read the plugin'
assert h.pread($M, 6*$M) == open('orig.raw','rb').read()[6*$M:7*$M]
h.pwrite(b'W' * 4096, $M)"
stop_nbdkit b
/usr/bin/python3 - <<EOF
b = bytearray(open('orig.raw', 'rb').read())
b[7*$M:7*$M+65536] = bytes(65536)
b[$M:$M+4096] = b'W' * 4096
open('expect.raw', 'wb').write(b)
EOF
cp orig.raw base.raw

qemu_check ov.qed
qemu-img info ov.qed | grep -q "backing file" && fail "qemu-img still sees a backing file"
qemu-img compare -f qed -F raw ov.qed expect.raw || fail "qemu-img compare: different"
# The plugin opens it without any origin.
mv base.raw away.raw
nbdkit -U - "$PLUGIN" ov.qed --run 'nbdcopy "$uri" plugin.raw'
cmp plugin.raw expect.raw || fail "the plugin sees another disk"
mv away.raw base.raw

# Restarting the filter with the same command line serves it as it is.
start_nbdkit c --log=stderr --filter="$FILTER" file base.raw \
  qed-overlay=ov.qed qed-backing-name=base.raw qed-detach=true
nbdcopy "$(uri c)" c.raw
cmp c.raw expect.raw || fail "the detached overlay served another disk"
stop_nbdkit c
qemu_check ov.qed
echo OK
