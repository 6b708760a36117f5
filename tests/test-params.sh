#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Parameters and names of both objects: boolean errors name their key,
# files that are not QED are described, the filter is called "qed",
# -D qed.verbose=1 logs the core's decisions (and only with the flag),
# a failed create leaves nothing behind, create=if-missing, and stacking
# the filter twice leaks no temporary directory.
source "$(dirname "$0")/functions.sh"
requires nbdkit --version
requires qemu-img --version
cd "$tmp"

# Boolean errors name the parameter.
qemu-img create -f qed img.qed 4M >/dev/null
expect_fail "plugin bool" "zero-detect: expected true or false" \
  "$PLUGIN" img.qed zero-detect=maybe
expect_fail "plugin create" "create: expected true or false" \
  "$PLUGIN" new.qed create=maybe size=1M
expect_fail "filter bool" "qed-zero-detect: expected true or false" \
  --filter="$FILTER" memory 1M qed-zero-detect=maybe
run_nbdkit "$PLUGIN" img.qed zero-detect=YES --run true ||
  fail "zero-detect=YES refused"

# Files that are not QED are described, not just "bad magic".
qemu-img create -f qcow2 disk.qcow2 1M >/dev/null
qemu-img create -f vmdk disk.vmdk 1M >/dev/null
truncate -s 1M disk.raw
expect_fail "qcow2" "not a QED image: this is a qcow2 image" -r "$PLUGIN" disk.qcow2
expect_fail "vmdk" "not a QED image: this is a VMDK image" -r "$PLUGIN" disk.vmdk
expect_fail "raw" "not a QED image: it starts with zeros: a raw disk image" \
  -r "$PLUGIN" disk.raw
expect_fail "filter qcow2" "this is a qcow2 image" \
  --filter="$FILTER" memory 1M qed-overlay="$tmp/disk.qcow2"

# The filter is named qed: in --version, --help and nbdkit's debug lines.
nbdkit --filter="$FILTER" memory 1M --version > version.txt
grep -q "^qed " version.txt || { cat version.txt; fail "--version: not qed"; }
grep -q "qedfilter" version.txt && fail "--version still says qedfilter"
nbdkit --filter="$FILTER" memory --help > help.txt
grep -q "^filter: qed " help.txt || { cat help.txt; fail "--help: not qed"; }
run_nbdkit -v --filter="$FILTER" memory 1M --run true 2> v.txt
grep -q "registered filter .* (name qed)" v.txt || fail "nbdkit: not named qed"
grep -q qedfilter v.txt && fail "debug lines say qedfilter"

# -D qed.verbose=1: one line per decision of the core, in both objects.
decisions='alloc: |copy from backing: |copy-on-read: |L2 cache miss: |writeback: '
printf 'base' > base.raw; truncate -s 4M base.raw
writes='h.pwrite(b"x" * 100, 70000); h.flush()'
rm -f top.qed
qemu-img create -f qed -b base.raw -F raw top.qed 4M >/dev/null
run_nbdkit -v -D qed.verbose=1 "$PLUGIN" top.qed \
  --run "nbdsh -u \"\$uri\" -c '$writes'" 2> plugin-v.txt
for d in "alloc: 1 cluster" "copy from backing: 4464 bytes at 65536" \
         "copy from backing: 60972 bytes at 70100" "L2 cache miss: " \
         "writeback: "; do
  grep -q "$d" plugin-v.txt || { grep -E "$decisions" plugin-v.txt; fail "plugin: no '$d'"; }
done
rm -f ov.qed
run_nbdkit -v -D qed.verbose=1 --filter="$FILTER" file base.raw \
  qed-overlay="$tmp/ov.qed" \
  --run "nbdsh -u \"\$uri\" -c 'h.pread(4096, 0); $writes'" 2> filter-v.txt
for d in "copy-on-read: fill clusters 0-0" "alloc: " "copy from backing: " \
         "L2 cache miss: " "writeback: "; do
  grep -q "$d" filter-v.txt || { grep -E "$decisions" filter-v.txt; fail "filter: no '$d'"; }
done
# Without the flag, none of it (nbdkit's -v trace is not repeated).
rm -f top.qed ov.qed
qemu-img create -f qed -b base.raw -F raw top.qed 4M >/dev/null
run_nbdkit -v "$PLUGIN" top.qed \
  --run "nbdsh -u \"\$uri\" -c '$writes'" 2> quiet.txt
run_nbdkit -v --filter="$FILTER" file base.raw qed-overlay="$tmp/ov.qed" \
  --run "nbdsh -u \"\$uri\" -c 'h.pread(4096, 0); $writes'" 2>> quiet.txt
if grep -E "debug: ($decisions)" quiet.txt; then
  fail "decision lines without -D qed.verbose=1"
fi
# The flag is accepted for the filter alone (over another plugin).
run_nbdkit -v -D qed.verbose=1 --filter="$FILTER" memory 1M \
  --run "nbdsh -u \"\$uri\" -c 'h.pwrite(b\"y\" * 512, 0)'" 2> mem-v.txt
grep -q "alloc: " mem-v.txt || fail "filter over memory: no decision lines"

# A failed create=true leaves nothing behind, and the retry works.
mkdir adir
for bad in missing.raw:raw disk.qcow2:qed adir:raw disk.qcow2:probe; do
  fmt=${bad#*:} bad=${bad%:*}
  expect_fail "create over $bad" "" "$PLUGIN" new.qed create=true size=1M \
    backing="$bad" $([ $fmt = probe ] || echo backing-format=$fmt)
  [ -e new.qed ] && fail "create=true backing=$bad ($fmt) left new.qed behind"
  ls -A | grep -q '^\.qed-create' && fail "create=true backing=$bad left a temporary file"
done
# (A qcow2 backing file is found only by validating the new image.)
expect_fail "qcow2 backing" "removed the image create=true made" \
  "$PLUGIN" new.qed create=true size=1M backing=disk.qcow2 backing-format=qed
expect_fail "missing backing" "nothing was created" \
  "$PLUGIN" new.qed create=true size=1M backing=missing.raw backing-format=raw
[ -e new.qed ] && fail "new.qed left behind"
run_nbdkit "$PLUGIN" new.qed create=true size=1M backing=base.raw \
  backing-format=raw --run true || fail "the retry failed"
qemu_check new.qed
expect_fail "exists" "already exists" "$PLUGIN" new.qed create=true size=1M

# create=if-missing: creates once, then serves what is there.
run_nbdkit "$PLUGIN" im.qed create=if-missing size=2M \
  --run "nbdsh -u \"\$uri\" -c 'h.pwrite(b\"kept\", 0)'" || fail "if-missing: create"
run_nbdkit "$PLUGIN" im.qed create=if-missing size=2M \
  --run "nbdsh -u \"\$uri\" -c 'assert h.pread(4, 0) == b\"kept\"'" ||
  fail "if-missing: the existing image was not served as it was"
qemu_check im.qed
expect_fail "if-missing without size" "create=if-missing needs size" \
  "$PLUGIN" im2.qed create=if-missing
[ -e im2.qed ] && fail "im2.qed created without a size"

# Stacking the filter twice leaks no temporary directory (or anything),
# and nbdkit exits cleanly (both layers share the object's globals).
mkdir tmpd
TMPDIR=$tmp/tmpd run_nbdkit --filter="$FILTER" --filter="$FILTER" memory 1M \
  --run "nbdsh -u \"\$uri\" -c 'h.pwrite(b\"z\" * 512, 0); assert h.pread(512, 0) == b\"z\" * 512'" \
  2> stack.txt || { cat stack.txt; fail "stacked twice: failed"; }
[ -z "$(ls -A tmpd)" ] || { ls -la tmpd; fail "stacked twice: left $(ls -A tmpd)"; }
rm -f st.qed
run_nbdkit --filter="$FILTER" --filter="$FILTER" memory 1M \
  qed-overlay="$tmp/st.qed" --run "nbdsh -u \"\$uri\" -c 'h.pwrite(b\"s\" * 512, 0)'" \
  2>> stack.txt || { cat stack.txt; fail "stacked twice, persistent overlay: failed"; }
[ -s stack.txt ] && { cat stack.txt; fail "stacked twice: messages (a crash at exit?)"; }
qemu_check st.qed
echo OK
