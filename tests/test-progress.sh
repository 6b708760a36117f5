#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Progress lines of long work (common/progress.c): a repair at open made
# slow by a shim that delays every read of the image's tables (40 ms
# each, 256 tables: at least 10 s, whatever the machine) logs, with -v,
# progress lines with increasing percentages, at most one per 2 s, and
# one line at the end with what it did; without -v only the notice of
# the repair is shown, once, and nothing says "error".  The compaction
# at a clean stop ends with its line too, with the bytes it moved.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires cc --version
requires nbdinfo --version
[ -f "$PLUGIN" ] || skip "the plugin is not built"
cd "$tmp"

# The shim: pread of a file named *slow.qed sleeps 40 ms first.
cat > slow.c <<'SHIM'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/types.h>
static int
is_slow (int fd)
{
  char link[64], path[4096];
  ssize_t n;
  snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
  n = readlink (link, path, sizeof path - 1);
  if (n < 8)
    return 0;
  path[n] = '\0';
  return strcmp (path + n - 8, "slow.qed") == 0;
}
#define SHIM_PREAD(name)                                                \
  ssize_t name (int fd, void *buf, size_t count, off_t off)             \
  {                                                                     \
    static ssize_t (*real) (int, void *, size_t, off_t);                \
    if (!real)                                                          \
      real = dlsym (RTLD_NEXT, #name);                                  \
    if (is_slow (fd))                                                   \
      usleep (40000);                                                   \
    return real (fd, buf, count, off);                                  \
  }
SHIM_PREAD (pread)
SHIM_PREAD (pread64)
SHIM
cc -shared -fPIC -o slow.so slow.c -ldl || fail "shim build"

# 256 L2 tables: 4K clusters, 16K tables, each table 8M of the disk.
qemu-img create -q -f qed -o cluster_size=4096,table_size=4 slow.qed 2G
cmds=()
for i in $(seq 0 255); do cmds+=(-c "write -P 0x5a $((i * 8))M 4k"); done
qemu-io -f qed "${cmds[@]}" slow.qed > /dev/null || fail "qemu-io write"
# A crash: NEED_CHECK set, and 64 leaked clusters at the end.
printf '\x02' | dd of=slow.qed bs=1 seek=16 conv=notrunc status=none
truncate -s +256K slow.qed
[ "$(need_check slow.qed)" = 1 ] || fail "NEED_CHECK not set"
cp slow.qed slow2.qed.orig

t0=$(date +%s)
# (freelist=false: the free-cluster list would walk the tables again.)
LD_PRELOAD=$tmp/slow.so nbdkit -f -v -U - "$PLUGIN" slow.qed freelist=false \
  --run 'nbdinfo --size "$uri"' > out.log 2> err.log ||
  { tail -n 20 err.log; fail "nbdkit failed"; }
secs=$(( $(date +%s) - t0 ))
grep -E 'repair: ' err.log || true
mapfile -t pct < <(sed -n 's/.*slow\.qed: repair: reading the tables: \([0-9]*\)% .*left$/\1/p' err.log)
echo "progress percentages: ${pct[*]} in $secs s"
[ ${#pct[@]} -ge 2 ] || fail "fewer than 2 progress lines"
for ((i = 1; i < ${#pct[@]}; i++)); do
  [ "${pct[i]}" -gt "${pct[i-1]}" ] || fail "percentages do not increase: ${pct[*]}"
done
# At most one line per 2 s (the first after 2 s).
[ ${#pct[@]} -le $(( secs / 2 )) ] || fail "${#pct[@]} lines in $secs s"
[ "$(grep -c 'slow\.qed: repair: done in [0-9.]* s: 0 corruptions repaired, 64 clusters freed, 0 bytes moved' err.log)" = 1 ] ||
  fail "no end line"
[ "$(need_check slow.qed)" = 0 ] || fail "NEED_CHECK still set"
qemu_check slow.qed

# Without -v: the repair is said once, as a notice; nothing is an error.
mv slow2.qed.orig slow.qed
nbdkit -f -U - "$PLUGIN" slow.qed \
  --run 'nbdinfo --size "$uri"' > out.log 2> err.log ||
  { cat err.log; fail "nbdkit failed"; }
cat err.log
[ "$(grep -c '^nbdkit: qed: notice: .*slow\.qed: repaired 0 corruptions and reclaimed 64 leaked clusters$' err.log)" = 1 ] ||
  fail "the repair is not one notice"
! grep -qi 'error\|progress\|reading the tables' err.log || fail "more than the notice"

# The compaction at a clean stop: a trimmed first cluster, the last one
# moved into it (64K).
qemu-img create -q -f qed c.qed 64M
nbdkit -f -v -U - "$PLUGIN" c.qed freelist=false --run 'nbdsh -u "$uri" -c "
for i in range(4):
    h.pwrite(bytes([65 + i]) * 65536, i * 1048576)
h.flush()
h.trim(65536, 0)
h.flush()
"' > out.log 2> err.log || { tail -n 20 err.log; fail "nbdkit (compaction)"; }
grep 'compaction: ' err.log
[ "$(grep -c 'c\.qed: compaction: done in [0-9.]* s: 0 corruptions repaired, 1 clusters freed, 65536 bytes moved$' err.log)" = 1 ] ||
  fail "no end line of the compaction"
qemu_check c.qed
qemu-io -f qed -c 'read -P 0x44 3M 64k' -c 'read -P 0 0 64k' c.qed |
  grep -c '^read 65536/65536' | grep -qx 2 || fail "data after the compaction"
echo OK
