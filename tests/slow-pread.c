/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed test shim (LD_PRELOAD): a slow disk.  pread and pread64
 * of a file whose name ends in "slow.qed" sleep 40 ms first
 * (tests/test-progress.sh: a repair long enough for progress lines,
 * whatever the machine).
 */

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
