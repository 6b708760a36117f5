/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed test shim (LD_PRELOAD): a file system without OFD locks.
 * fcntl's OFD lock commands fail with ENOLCK
 * (tests/test-security-overlay.sh).
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>

static int
shim (const char *name, int fd, int cmd, void *arg)
{
  int (*real) (int, int, ...) = dlsym (RTLD_NEXT, name);
  if (cmd == F_OFD_SETLK || cmd == F_OFD_GETLK || cmd == F_OFD_SETLKW) {
    errno = ENOLCK;
    return -1;
  }
  return real (fd, cmd, arg);
}
int fcntl (int fd, int cmd, ...)
{ va_list a; va_start (a, cmd); void *p = va_arg (a, void *); va_end (a);
  return shim ("fcntl", fd, cmd, p); }
int fcntl64 (int fd, int cmd, ...)
{ va_list a; va_start (a, cmd); void *p = va_arg (a, void *); va_end (a);
  return shim ("fcntl64", fd, cmd, p); }
