/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the seam (seam.h) for the two nbdkit objects.
 *
 * Compiled into the plugin and into the filter (each keeps its own
 * copy: -fvisibility=hidden), not into the unit tests, which define
 * their own.  This is the core's only route to nbdkit.
 */

#include <stdarg.h>
#include <errno.h>

/* nbdkit_verror and nbdkit_vdebug come from nbdkit-common.h, which
 * may only be reached through the plugin or filter header. */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "seam.h"

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
  nbdkit_verror (fs, args);
  va_end (args);
  errno = e;
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
