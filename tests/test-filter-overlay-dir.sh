#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: qed-overlay-dir=DIR, an overlay DIR/NAME.qed per export name
# over the plugin's default export.  Each export's writes are visible
# only to it and survive a restart; the empty name is default.qed;
# nbdinfo --list lists the overlays; refused names create nothing; an
# overlay is closed cleanly (unlocked, NEED_CHECK clear) after its last
# connection; qed-max-exports refuses one more; bad combinations are
# refused.  Every file passes qemu-img check and reads as served.
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
cd "$tmp"

M=$((1024*1024))
head -c $((4*M)) /dev/urandom > base.raw
truncate -s $((6*M)) base.raw
head -c $((2*M)) /dev/urandom >> base.raw
mkdir ov
sum=$(md5sum < base.raw)

serve () {
  start_nbdkit s --log=stderr --filter="$FILTER" file base.raw qed-overlay-dir=ov \
    qed-backing-name="$tmp/base.raw" qed-max-exports=3 "$@"
}
u () { echo "nbd+unix:///$1?socket=$tmp/s.sock"; }

serve
# Each export writes its own name at 1M (and reads everything).
for e in a b c; do
  nbdsh -u "$(u $e)" -c "
h.pwrite(b'$e' * 70000, 1048576 + 1000)
h.flush()
d = h.pread(h.get_size(), 0)
open('$e.served', 'wb').write(d)
"
done
nbdsh -u "$(u '')" -c "open('default.served', 'wb').write(h.pread(h.get_size(), 0))"
for e in a b c; do
  nbdsh -u "$(u $e)" -c "
assert h.pread(70000, 1048576 + 1000) == b'$e' * 70000
"
done
cmp default.served base.raw || fail "the default export differs from the origin"
[ -f ov/default.qed ] || fail "the empty name did not map to default.qed"
for e in a b c default; do
  [ "$(stat -c %a ov/$e.qed)" = 600 ] || fail "ov/$e.qed is not 0600"
done
nbdinfo --list "$(u '')" > list.txt
for e in a b c default; do
  grep -q "^export=\"$e\":" list.txt || { cat list.txt; fail "export $e not listed"; }
done

# Closed after its last connection: QEMU may open it (no -U) at once,
# NEED_CHECK clear.
wait_log s "ov/a.qed closed (no connection left)"
[ "$(need_check ov/a.qed)" = 0 ] || fail "a.qed still has NEED_CHECK"
qemu_check ov/a.qed
same_data ov/a.qed a.served

# Refused names create nothing and do not disturb the others.
long=$(printf 'x%.0s' $(seq 1 201))
for bad in .hidden a%2Fb .. "$long" 'a%20b'; do
  if nbdsh -u "$(u "$bad")" -c 'h.pread(1, 0)' 2>/dev/null; then
    fail "export name '$bad' was accepted"
  fi
done
grep -q "export name \".hidden\" refused" "$tmp/s.log" ||
  fail "no clear error for a refused name"
[ "$(ls ov | sort | tr '\n' ' ')" = "a.qed b.qed c.qed default.qed " ] ||
  { ls -la ov; fail "refused names created files"; }
# A name of 200 bytes is fine.
name200=$(printf 'y%.0s' $(seq 1 200))
nbdsh -u "$(u $name200)" -c 'h.pread(1, 0)'
rm ov/$name200.qed

# qed-max-exports=3: three held open, the fourth refused, then
# accepted once one is closed.
nbdsh -c "
import time
hs = []
for e in ['a', 'b', 'c']:
    x = nbd.NBD(); x.connect_uri('$(u '')'.replace(':///', ':///' + e)); hs.append(x)
try:
    x = nbd.NBD(); x.connect_uri('$(u d)')
    raise SystemExit('a fourth export was opened')
except nbd.Error:
    pass
hs[0].shutdown()
" || fail "qed-max-exports"
grep -q 'export "d" refused: 3 exports are open already (qed-max-exports=3)' \
  "$tmp/s.log" || fail "no clear qed-max-exports error"
wait_log s "ov/a.qed closed (no connection left)"
nbdsh -u "$(u d)" -c 'h.pread(1, 0)'
stop_nbdkit s

# Everything passes QEMU's check and reads as served; the origin never
# changed.
for e in a b c default; do
  qemu_check ov/$e.qed
  same_data ov/$e.qed $e.served
done
[ "$(md5sum < base.raw)" = "$sum" ] || fail "the origin was written"

# Persistent across a restart, each export its own.
serve
for e in a b c; do
  nbdsh -u "$(u $e)" -c "
assert h.pread(70000, 1048576 + 1000) == b'$e' * 70000
"
done
stop_nbdkit s

# Bad combinations and directories.
expect_fail "both" "cannot be combined with qed-overlay" \
  --filter="$FILTER" file base.raw qed-overlay-dir=ov qed-overlay=x.qed
# (qed-detach with qed-shared-cache is served: test-filter-shared-cache-detach.sh.)
expect_fail "missing dir" "qed-overlay-dir: .*nodir" \
  --filter="$FILTER" file base.raw qed-overlay-dir=nodir
expect_fail "not a dir" "is not a directory" \
  --filter="$FILTER" file base.raw qed-overlay-dir=base.raw
expect_fail "max" "qed-max-exports" \
  --filter="$FILTER" file base.raw qed-overlay-dir=ov qed-max-exports=0
# A planted symlink as an export's overlay is refused, not followed.
ln -s /etc/passwd ov/evil.qed
chown -h nobody ov/evil.qed
start_nbdkit s --filter="$FILTER" file base.raw qed-overlay-dir=ov
if nbdsh -u "$(u evil)" -c 'h.pread(1, 0)' 2>/dev/null; then
  fail "a symlinked overlay was served"
fi
nbdsh -u "$(u a)" -c "assert h.pread(1, 1048576 + 1000) == b'a'"
stop_nbdkit s
echo PASS
