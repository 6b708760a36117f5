/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed test shim (LD_PRELOAD): a kernel without openat2.  The
 * syscall makes SYS_openat2 fail with ENOSYS and creates the file
 * named by $NO_OPENAT2_MARK to show that it did
 * (tests/test-security-backing.sh).
 */

#define _GNU_SOURCE
#include <stdlib.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <unistd.h>
#include <sys/syscall.h>

long
syscall (long n, ...)
{
  va_list a;
  long x[6];
  long (*real) (long, ...) = dlsym (RTLD_NEXT, "syscall");
  va_start (a, n);
  for (int i = 0; i < 6; ++i) x[i] = va_arg (a, long);
  va_end (a);
  if (n == SYS_openat2) {
    close (open (getenv ("NO_OPENAT2_MARK"), O_CREAT | O_WRONLY, 0600));
    errno = ENOSYS;
    return -1;
  }
  return real (n, x[0], x[1], x[2], x[3], x[4], x[5]);
}
