/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the seam (seam.h) for the two nbdkit objects.
 *
 * Compiled into the plugin and into the filter (each keeps its own
 * copy: -fvisibility=hidden), not into the unit tests, which define
 * their own.  This is the core's only route to nbdkit.
 */

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>

/* nbdkit_verror and nbdkit_vdebug come from nbdkit-common.h, which
 * may only be reached through the plugin or filter header. */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "seam.h"

/* The thread's last error, for the one-line summary of a failed open
 * (qed_open_failed). */
static _Thread_local char last_error[512];

/* -D qed.verbose=1 (both objects are named "qed"): see qed_verbose. */
NBDKIT_DLL_PUBLIC int qed_debug_verbose = 0;

int
qed_verbose_enabled (void)
{
  return qed_debug_verbose;
}

void
qed_error (const char *fs, ...)
{
  va_list args;
  int e = errno;

  va_start (args, fs);
  vsnprintf (last_error, sizeof last_error, fs, args);
  va_end (args);
  nbdkit_error ("%s", last_error);
  errno = e;
}

void
qed_clear_last_error (void)
{
  last_error[0] = '\0';
}

void
qed_debug (const char *fs, ...)
{
  va_list args;
  int e = errno;

  va_start (args, fs);
  nbdkit_vdebug (fs, args);
  va_end (args);
  errno = e;
}

void
qed_open_failed (const char *what, const char *filename)
{
  const char *cause = last_error;
  size_t n = strlen (filename);
  int e = errno;

  /* "FILE: cause" from the core: keep just the cause. */
  if (strncmp (cause, filename, n) == 0 && strncmp (cause + n, ": ", 2) == 0)
    cause += n + 2;
  if (*cause == '\0')
    cause = strerror (e ? e : EIO);
  nbdkit_error ("%s: %s: cannot open the image: %s", what, filename, cause);
  errno = e;
}
