#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Log levels: nbdkit_error only for what fails a request or the start.
#   1. copy-on-read on a full disk (the filter over the pattern plugin,
#      the overlay on a 1M tmpfs): every read succeeds with the plugin's
#      data; one warning says that nothing more is stored, and no line
#      says "error"; with -D qed.verbose=1 each failed fill is shown
#      (debug lines);
#   2. locking=off: one "nbdkit: qed: warning: ..." line, no "error";
#   3. where the lines go, as nbdkit's own errors: --log=null hides
#      them, --log=syslog and the background (no -f, stderr at
#      /dev/null) send them to syslog at LOG_NOTICE / LOG_WARNING (a
#      shim records syslog calls), stderr otherwise.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires nbdsh --version
requires cc --version
requires nbdkit pattern --version
[ -f "$PLUGIN" ] || skip "the plugin is not built"
[ -f "$FILTER" ] || skip "the filter is not built"
cd "$tmp"

# ---- 1. Copy-on-read on a full disk.
small_fs "$tmp/small" 1M
reads='
for i in range(32):
    off = i * 1048576
    b = h.pread(1048576, off)
    assert b[0:8] == off.to_bytes(8, "big"), i
    assert b[-8:] == (off + 1048568).to_bytes(8, "big"), i
'
nbdkit -f -U - --filter="$FILTER" pattern 32M qed-overlay="$tmp/small/ov.qed" \
  qed-readahead=0 --run "nbdsh -u \"\$uri\" -c '$reads'" > out 2> err ||
  { cat err; fail "reads failed on a full disk"; }
cat err
[ "$(grep -c '^nbdkit: qed: warning: copy-on-read: .*No space left on device.*said once' err)" = 1 ] ||
  fail "not one warning for the full disk"
! grep -qi error err || fail "an error line for copy-on-read on a full disk"
qemu-img check "$tmp/small/ov.qed" || fail "qemu-img check of the overlay"
rm -f "$tmp/small/ov.qed"
nbdkit -f -v -U - --filter="$FILTER" pattern 32M qed-overlay="$tmp/small/ov.qed" \
  qed-readahead=0 -D qed.verbose=1 --run "nbdsh -u \"\$uri\" -c '$reads'" \
  > out 2> err || { tail err; fail "reads failed on a full disk (verbose)"; }
n=$(grep -c 'debug: .*No space left on device' err || true)
echo "verbose: $n failed fills logged"
[ "$n" -ge 2 ] || fail "-D qed.verbose=1 does not show each failed fill"
[ "$(grep -c 'warning: copy-on-read' err)" = 1 ] || fail "verbose: not one warning"
! grep -q ': error: ' err || fail "verbose: an error line"
rm -f "$tmp/small/ov.qed"

# ---- 2. locking=off.
qemu-img create -q -f qed a.qed 1M
nbdkit -f -U - "$PLUGIN" a.qed locking=off --run 'nbdinfo --size "$uri"' \
  > out 2> err || { cat err; fail "locking=off"; }
cat err
[ "$(grep -c '^nbdkit: qed: warning: .*a\.qed: locking is off' err)" = 1 ] ||
  fail "locking=off: not one warning line"
! grep -qi error err || fail "locking=off: an error line"

# ---- 3. Where the lines go.
cat > syslog.c <<'SHIM'
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
static void
record (int pri, const char *fs, va_list a)
{
  FILE *f = fopen (getenv ("SYSLOG_FILE"), "a");
  if (f) {
    fprintf (f, "<%d> ", pri & 7);
    vfprintf (f, fs, a);
    fputc ('\n', f);
    fclose (f);
  }
}
void syslog (int pri, const char *fs, ...)
{ va_list a; va_start (a, fs); record (pri, fs, a); va_end (a); }
void __syslog_chk (int pri, int flag, const char *fs, ...)
{ va_list a; va_start (a, fs); record (pri, fs, a); va_end (a); }
void vsyslog (int pri, const char *fs, va_list a) { record (pri, fs, a); }
void __vsyslog_chk (int pri, int flag, const char *fs, va_list a)
{ record (pri, fs, a); }
SHIM
cc -shared -fPIC -o syslog.so syslog.c || fail "shim build"
export SYSLOG_FILE=$tmp/syslog.txt
for log in null syslog; do
  rm -f syslog.txt
  LD_PRELOAD=$tmp/syslog.so nbdkit -f --log=$log -U - "$PLUGIN" a.qed \
    locking=off --run 'nbdinfo --size "$uri"' > out 2> err ||
    { cat err; fail "--log=$log"; }
  ! grep -q 'locking is off' err || fail "--log=$log: on stderr"
  if [ $log = syslog ]; then
    grep -q '^<4> qed: .*a\.qed: locking is off' syslog.txt ||
      { cat syslog.txt; fail "--log=syslog: not in syslog at LOG_WARNING"; }
  else
    ! grep -q 'locking is off' syslog.txt 2>/dev/null || fail "--log=null: in syslog"
  fi
done
# In the background (no -f): syslog, as nbdkit's own errors.
rm -f syslog.txt
printf '\x02' | dd of=a.qed bs=1 seek=16 conv=notrunc status=none
truncate -s +64K a.qed
LD_PRELOAD=$tmp/syslog.so nbdkit -U "$tmp/bg.sock" -P "$tmp/bg.pid" "$PLUGIN" \
  a.qed 2> err || { cat err; fail "background start"; }
for _ in $(seq 1 100); do [ -s bg.pid ] && break; sleep 0.1; done
cleanup_fn "kill \$(cat '$tmp/bg.pid') 2>/dev/null"
nbdinfo --size "nbd+unix:///?socket=$tmp/bg.sock" >/dev/null || fail "nbdinfo"
grep -q '^<5> qed: .*a\.qed: repaired 0 corruptions and reclaimed 1 leaked clusters' syslog.txt ||
  { cat syslog.txt; fail "background: the repair not in syslog at LOG_NOTICE"; }
[ ! -s err ] || { cat err; fail "background: stderr"; }
echo OK
