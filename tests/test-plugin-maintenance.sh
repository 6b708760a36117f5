#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Maintenance with no client: the work an image or a key asks for is
# done when nbdkit exits even if no client ever connected (the
# manual's one-liners):
#   nbdkit qed IMG --run true            repairs an image with NEED_CHECK
#   nbdkit qed IMG demote=true --run true    demotes it
#   nbdkit qed IMG freelist=false --run true compacts its free list away
# Under -r (in all the spellings nbdkit's getopt accepts, before or
# after the plugin name) nothing is written (cmp) and one line says
# why; "-r" inside another option's argument is not -r.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires /usr/bin/python3 -c 'import nbd'
TOOL="/usr/bin/python3 $TOP/tests/freelist-tool.py"
M=$((1024 * 1024))

flags () { $TOOL flags "$1"; }

# An image with NEED_CHECK set and leaked clusters: a crash after writes.
crashed_image () {
  rm -f "$1"
  start_nbdkit c "$PLUGIN" "$1" create=true size=64M idle-clean=0
  /usr/bin/python3 - "$(uri c)" <<'EOF' || fail "write"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i in range(0, 32 << 20, 1 << 20):
    h.pwrite(bytes([i >> 20 | 1]) * (1 << 20), i)
h.flush()
h.trim(8 << 20, 8 << 20)
h.flush()
EOF
  kill9_nbdkit c
  [ "$(need_check "$1")" = 1 ] || fail "the crash left NEED_CHECK clear"
}

# expect_readonly LOG IMG COPY: nothing written, one line says why.
expect_readonly () {
  cmp "$2" "$3" || fail "-r: the image changed"
  grep -q "not done: nbdkit -r (read-only), nothing written" "$1" \
    || { cat "$1"; fail "-r: no line says why nothing was done"; }
}

# ---- 1. NEED_CHECK: -r leaves the file byte for byte, then the repair.
crashed_image "$tmp/a.qed"
cp "$tmp/a.qed" "$tmp/a.copy"
for ro in "-r" "--readonly" "--read-only" "--read" "-fr" "-vr"; do
  run_nbdkit $ro "$PLUGIN" "$tmp/a.qed" --run true 2>"$tmp/ro.log" \
    || fail "nbdkit $ro failed"
  expect_readonly "$tmp/ro.log" "$tmp/a.qed" "$tmp/a.copy"
done
# After the plugin and its parameters (getopt permutes), and with
# debug flags that take arguments.
run_nbdkit "$PLUGIN" "$tmp/a.qed" -r --run true 2>"$tmp/ro.log"
expect_readonly "$tmp/ro.log" "$tmp/a.qed" "$tmp/a.copy"
run_nbdkit -D qed.verbose=1 -Dqed.verbose=1 --filter=log -r "$PLUGIN" \
  "$tmp/a.qed" logfile=/dev/null --run true 2>"$tmp/ro.log"
expect_readonly "$tmp/ro.log" "$tmp/a.qed" "$tmp/a.copy"
echo "ok: -r in seven spellings: unchanged, and said why"

# "-r" as another option's argument is not -r: the repair is done.
run_nbdkit -e -r "$PLUGIN" "$tmp/a.qed" --run 'true -r' 2>"$tmp/rw.log" \
  || { cat "$tmp/rw.log"; fail "nbdkit (repair) failed"; }
[ "$(need_check "$tmp/a.qed")" = 0 ] || fail "NEED_CHECK still set after the exit"
qemu_check "$tmp/a.qed"
echo "ok: nbdkit qed IMG --run true: repaired, NEED_CHECK clear, qemu-img check 0"

# The same data as after qemu-img check -r all (which clears
# NEED_CHECK but keeps the leaks: QEMU's QED repair cannot free them).
crashed_image "$tmp/b.qed"
cp "$tmp/b.qed" "$tmp/b.qemu"
qemu-img check -q -r all "$tmp/b.qemu" || true
[ "$(need_check "$tmp/b.qemu")" = 0 ] || fail "qemu-img check -r all left NEED_CHECK"
run_nbdkit "$PLUGIN" "$tmp/b.qed" --run true
qemu_check "$tmp/b.qed"
qemu-img compare -q "$tmp/b.qed" "$tmp/b.qemu" || fail "repairs differ in data"
echo "ok: the same data as qemu-img check -r all, and no leak left"

# ---- 2. demote=true, no client.
rm -f "$tmp/d.qed"
start_nbdkit d "$PLUGIN" "$tmp/d.qed" create=true size=64M copy-on-read=true \
  compact-limit=0 idle-clean=0
nbdsh -u "$(uri d)" -c '
h.pwrite(b"\x55" * (16 << 20), 0)
h.flush()
h.trim(4 << 20, 0)
'
stop_nbdkit d
read -r feat compat autoclear < <(flags "$tmp/d.qed")
[ $compat = 1 ] && [ $autoclear = 1 ] || fail "before: compat $compat autoclear $autoclear"
cp "$tmp/d.qed" "$tmp/d.copy"
run_nbdkit -r "$PLUGIN" "$tmp/d.qed" demote=true --run true 2>"$tmp/ro.log"
expect_readonly "$tmp/ro.log" "$tmp/d.qed" "$tmp/d.copy"
run_nbdkit "$PLUGIN" "$tmp/d.qed" demote=true --run true
read -r feat compat autoclear < <(flags "$tmp/d.qed")
[ $compat = 0 ] && [ $autoclear = 0 ] || fail "after demote: compat $compat autoclear $autoclear"
qemu_check "$tmp/d.qed"
qemu-img compare -q "$tmp/d.qed" "$tmp/d.copy" || fail "demote changed the data"
echo "ok: nbdkit qed IMG demote=true --run true: demoted, qemu-img check 0"

# ---- 3. Compaction of a free list with no client (freelist=false).
rm -f "$tmp/f.qed"
start_nbdkit f "$PLUGIN" "$tmp/f.qed" create=true size=64M compact-limit=0 \
  idle-clean=0
nbdsh -u "$(uri f)" -c '
h.pwrite(b"\x33" * (32 << 20), 0)
h.flush()
h.trim(8 << 20, 0)
'
stop_nbdkit f
read -r feat compat autoclear < <(flags "$tmp/f.qed")
[ $autoclear = 1 ] || fail "no free list to compact"
size=$(stat -c %s "$tmp/f.qed")
cp "$tmp/f.qed" "$tmp/f.copy"
run_nbdkit "$PLUGIN" "$tmp/f.qed" freelist=false --run true
read -r feat compat autoclear < <(flags "$tmp/f.qed")
[ $autoclear = 0 ] || fail "the list is still there"
[ $(stat -c %s "$tmp/f.qed") -lt $size ] || fail "nothing was given back"
qemu_check "$tmp/f.qed"
qemu-img compare -q "$tmp/f.qed" "$tmp/f.copy" || fail "compaction changed the data"
echo "ok: freelist=false --run true: compacted ($size -> $(stat -c %s "$tmp/f.qed") bytes)"

# ---- 4. A clean image with nothing to do is not touched.
cp "$tmp/f.qed" "$tmp/f.copy"
touch -d @1000000000 "$tmp/f.qed"
run_nbdkit "$PLUGIN" "$tmp/f.qed" --run true
cmp "$tmp/f.qed" "$tmp/f.copy" || fail "a clean image was rewritten"
[ "$(stat -c %Y "$tmp/f.qed")" = 1000000000 ] || fail "a clean image was written"
echo "ok: nothing to do: nothing written"
