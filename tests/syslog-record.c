/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed test shim (LD_PRELOAD): syslog recorded, not sent.  Each
 * syslog call appends "<LEVEL> MESSAGE" to the file named by
 * $SYSLOG_FILE (tests/test-log-levels.sh: where notices and warnings
 * go).
 */

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

void
syslog (int pri, const char *fs, ...)
{
  va_list a;

  va_start (a, fs);
  record (pri, fs, a);
  va_end (a);
}

void
__syslog_chk (int pri, int flag, const char *fs, ...)
{
  va_list a;

  va_start (a, fs);
  record (pri, fs, a);
  va_end (a);
}

void
vsyslog (int pri, const char *fs, va_list a)
{
  record (pri, fs, a);
}

void
__vsyslog_chk (int pri, int flag, const char *fs, va_list a)
{
  record (pri, fs, a);
}
