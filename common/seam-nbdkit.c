/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the seam (seam.h) for the two nbdkit objects.
 *
 * Compiled into the plugin and into the filter (each keeps its own
 * copy: -fvisibility=hidden), not into the unit tests, which define
 * their own.  This is the core's only route to nbdkit.
 */

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <syslog.h>
#include <unistd.h>
#include <sys/stat.h>

/* nbdkit_verror and nbdkit_vdebug come from nbdkit-common.h, which
 * may only be reached through the plugin or filter header. */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "seam.h"

/* The thread's last error, for the one-line summary of a failed open
 * (qed_open_failed). */
static _Thread_local char last_error[512];

/* qed_soft_errors: this thread's depth. */
static _Thread_local int soft_errors;

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
  if (soft_errors == 0)
    nbdkit_error ("%s", last_error);
  else if (qed_debug_verbose)
    nbdkit_debug ("%s", last_error);
  errno = e;
}

void
qed_soft_errors (int on)
{
  soft_errors += on ? 1 : -1;
}

/* Where nbdkit logs its errors, so that notices and warnings go to the
 * same place.  nbdkit 1.32 does not tell a plugin, so this follows its
 * rules: --log=stderr|syslog|null if given; otherwise syslog when it
 * runs in the background, and stderr when not.  In the background
 * (without -v) nbdkit points stderr at /dev/null: that is the sign. */
enum log_to { LOG_TO_STDERR, LOG_TO_SYSLOG, LOG_TO_NULL };

static enum log_to
from_cmdline (enum log_to dflt)
{
  char buf[8192];
  ssize_t n;
  size_t i;
  enum log_to r = dflt;
  int fd = open ("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);

  if (fd == -1)
    return dflt;
  n = read (fd, buf, sizeof buf - 1);
  close (fd);
  if (n <= 0)
    return dflt;
  buf[n] = '\0';
  /* NUL-separated arguments: "--log=VALUE", or "--log" "VALUE". */
  for (i = 0; i < (size_t) n; i += strlen (buf + i) + 1) {
    const char *a = buf + i, *v = NULL;

    if (strncmp (a, "--log=", 6) == 0)
      v = a + 6;
    else if (strcmp (a, "--log") == 0 && i + 6 < (size_t) n)
      v = a + 6;
    if (v == NULL)
      continue;
    if (strcmp (v, "stderr") == 0)
      r = LOG_TO_STDERR;
    else if (strcmp (v, "syslog") == 0)
      r = LOG_TO_SYSLOG;
    else if (strcmp (v, "null") == 0)
      r = LOG_TO_NULL;
  }
  return r;
}

static enum log_to
log_to (void)
{
  struct stat err, null;
  enum log_to dflt = LOG_TO_STDERR;

  if (fstat (STDERR_FILENO, &err) == -1 ||
      (stat ("/dev/null", &null) == 0 && S_ISCHR (err.st_mode) &&
       err.st_rdev == null.st_rdev))
    dflt = LOG_TO_SYSLOG;
  return from_cmdline (dflt);
}

static void
vlog (int priority, const char *level, const char *fs, va_list args)
{
  char msg[1024];
  int e = errno;

  vsnprintf (msg, sizeof msg, fs, args);
  switch (log_to ()) {
  case LOG_TO_STDERR:
    /* nbdkit's own format ("nbdkit: NAME: error: ..."), one write. */
    fprintf (stderr, "nbdkit: qed: %s: %s\n", level, msg);
    break;
  case LOG_TO_SYSLOG:
    syslog (priority, "qed: %s", msg);
    break;
  case LOG_TO_NULL:
    break;
  }
  errno = e;
}

void
qed_notice (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  vlog (LOG_NOTICE, "notice", fs, args);
  va_end (args);
}

void
qed_warning (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  vlog (LOG_WARNING, "warning", fs, args);
  va_end (args);
}

const char *
qed_last_error (void)
{
  return last_error;
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
