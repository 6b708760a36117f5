/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: default qed_notice and qed_warning (seam.h).
 *
 * The nbdkit seam (seam-nbdkit.c) defines both; hosts that define only
 * qed_error and qed_debug (the fuzz target) get these
 * weak ones, which log through qed_debug with the level in front.
 */

#include <stdarg.h>
#include <stdio.h>
#include <errno.h>

#include "seam.h"

static void
vlog (const char *level, const char *fs, va_list args)
{
  char msg[512];
  int e = errno;

  vsnprintf (msg, sizeof msg, fs, args);
  qed_debug ("%s: %s", level, msg);
  errno = e;
}

__attribute__ ((__weak__)) void
qed_notice (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  vlog ("notice", fs, args);
  va_end (args);
}

__attribute__ ((__weak__)) void
qed_warning (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  vlog ("warning", fs, args);
  va_end (args);
}
