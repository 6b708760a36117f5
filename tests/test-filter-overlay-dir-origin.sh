#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: the origin guard per overlay with qed-overlay-dir (no shared
# cache).  Each export's overlay records its origin (size, id, the
# plugin's default export, a sample of copied clusters) and is checked
# when it is opened: a changed origin is refused for every export, with
# an error naming that export's overlay; qed-origin-changed=keep and
# =discard act on the export that is opened (discard sets DIR/NAME.qed
# aside as NAME.qed.stale); an unchanged origin is served.
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
cd "$tmp"

M=$((1024*1024))
head -c $((8*M)) /dev/urandom > base.raw
cp base.raw orig.raw
mkdir ov

serve () {
  start_nbdkit s --log=stderr --filter="$FILTER" file base.raw qed-overlay-dir=ov \
    qed-backing-name="$tmp/base.raw" "$@"
}
u () { echo "nbd+unix:///$1?socket=$tmp/s.sock"; }
# refused EXPORT PATTERN: the export cannot be opened, and the log has
# an error naming its overlay.
refused () {
  if nbdinfo --size "$(u "$1")" >/dev/null 2>&1; then
    fail "export $1: a changed origin was served"
  fi
  grep -E "error: qed-overlay: $tmp/ov/$1\.qed: .*$2" s.log ||
    { cat s.log; fail "export $1: no error naming ov/$1.qed ('$2')"; }
}
# check EXPORT BYTE WHAT: the export's first byte and its own write.
check () {
  nbdsh -u "$(u "$1")" -c "
assert h.pread(1, 0) == bytes([$2]), 'export $1: first byte is %r' % h.pread(1, 0)
assert h.pread(4096, 3 * 1048576) == b'$3' * 4096, 'export $1: its write'
"
}

# Two exports read all of the origin (every cluster copied, the first
# always sampled) and write their own data at 3M.
serve
for e in a b; do
  nbdsh -u "$(u $e)" -c "
h.pread(h.get_size(), 0)
h.pwrite(b'$e' * 4096, 3 * 1048576)
h.flush()
"
done
stop_nbdkit s
b0=$(od -An -tu1 -N1 base.raw | tr -d ' ')
for e in a b; do qemu_check ov/$e.qed; done

# An unchanged origin is served.
serve
check a "$b0" a
check b "$b0" b
stop_nbdkit s

# Change the first cluster of the origin: both exports refused.
printf "\\x$(printf %02x $(( b0 ^ 0xff )))" | dd of=base.raw bs=1 count=1 conv=notrunc status=none
nb0=$(( b0 ^ 0xff ))
serve
refused a "origin's cluster at guest offset 0 changed"
refused b "origin's cluster at guest offset 0 changed"
grep -q "qed-origin-changed=keep" s.log || fail "no hint of qed-origin-changed"
stop_nbdkit s
[ ! -e ov/a.qed.stale ] && [ ! -e ov/b.qed.stale ] ||
  fail "a refused overlay was set aside"

# keep, for export a only: served as it is (its old first cluster and
# its write), and its record now names the new origin.
serve qed-origin-changed=keep
check a "$b0" a
grep -q "warning: qed-overlay: $tmp/ov/a.qed: the origin changed" s.log ||
  { cat s.log; fail "no warning for keep"; }
stop_nbdkit s

# Default mode again: a (recorded afresh) is served, b still refused.
serve
check a "$b0" a
refused b "origin's cluster at guest offset 0 changed"
stop_nbdkit s

# discard, for export b: set aside as b.qed.stale, a new overlay serves
# the new origin; a is untouched.
serve qed-origin-changed=discard
nbdsh -u "$(u b)" -c "
assert h.pread(1, 0) == bytes([$nb0])
assert h.pread(4096, 3 * 1048576) == open('$tmp/base.raw', 'rb').read()[3*1048576:3*1048576+4096]
"
check a "$b0" a
stop_nbdkit s
[ -f ov/b.qed.stale ] || fail "b.qed was not set aside as b.qed.stale"
[ ! -e ov/a.qed.stale ] || fail "a.qed was set aside"
[ "$(stat -c %a ov/b.qed.stale)" = 600 ] || fail "b.qed.stale is not 0600"
qemu_check ov/b.qed.stale
qemu_check ov/b.qed

# Both serve in the default mode now.
serve
check a "$b0" a
nbdsh -u "$(u b)" -c "assert h.pread(1, 0) == bytes([$nb0])"
stop_nbdkit s
for e in a b; do qemu_check ov/$e.qed; done
echo PASS
