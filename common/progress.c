/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: progress lines for long pieces of work (progress.h). */

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <time.h>

#include "progress.h"
#include "seam.h"

static uint64_t
now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void
qed_progress_start (struct qed_progress *p, const char *name,
                    const char *what)
{
  if (p == NULL)
    return;
  *p = (struct qed_progress) { .name = name, .what = what };
  p->start_ns = p->phase_ns = p->last_ns = now_ns ();
}

void
qed_progress_step (struct qed_progress *p, const char *phase,
                   uint64_t done, uint64_t total)
{
  uint64_t now;
  double elapsed;
  int e;

  if (p == NULL)
    return;
  now = now_ns ();
  if (phase != p->phase) {
    p->phase = phase;
    p->phase_ns = now;
  }
  if (now - p->last_ns < QED_PROGRESS_INTERVAL_NS || total == 0)
    return;
  e = errno;
  p->last_ns = now;
  p->lines++;
  if (done > total)
    done = total;
  elapsed = (now - p->phase_ns) / 1e9;
  if (done > 0)
    qed_debug ("%s: %s: %s: %u%% (%" PRIu64 " of %" PRIu64 "), %.0f s, "
               "about %.0f s left", p->name, p->what, phase,
               (unsigned) (done * 100 / total), done, total, elapsed,
               elapsed * (total - done) / done);
  else
    qed_debug ("%s: %s: %s: 0%% (0 of %" PRIu64 "), %.0f s, time left "
               "not known yet", p->name, p->what, phase, total, elapsed);
  errno = e;
}

void
qed_progress_end (struct qed_progress *p, const char *fs, ...)
{
  char msg[256];
  va_list args;
  int e = errno;

  if (p == NULL)
    return;
  va_start (args, fs);
  vsnprintf (msg, sizeof msg, fs, args);
  va_end (args);
  qed_debug ("%s: %s: done in %.1f s: %s, %" PRIu64 " bytes moved",
             p->name, p->what, (now_ns () - p->start_ns) / 1e9, msg,
             p->bytes);
  errno = e;
}
