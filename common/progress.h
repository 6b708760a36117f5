/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: progress lines for long pieces of work (a check or
 * repair, compaction, demote, prefetch).
 *
 *   struct qed_progress p;
 *   qed_progress_start (&p, img->filename, "repair");
 *   for (i = 0; i < n; ++i) {
 *     qed_progress_step (&p, "reading the tables", i, n);
 *     ...
 *   }
 *   qed_progress_end (&p, "%" PRIu64 " clusters freed", freed);
 *
 * qed_progress_step costs a clock read; at most every 2 s (the first
 * time 2 s after the start) it logs a line through qed_debug (nbdkit
 * -v) with the phase's percentage and an estimate of its time left:
 *   "disk.qed: repair: reading the tables: 42% (2150 of 5120), 4 s,
 *    about 6 s left"
 * qed_progress_end logs one line with what was done and the time:
 *   "disk.qed: repair: done in 9.8 s: 12 clusters freed, 786432 bytes
 *    moved"
 * Every function accepts p == NULL and then does nothing.  Not thread
 * safe: one piece of work, one thread.
 */

#ifndef NBDKIT_QED_PROGRESS_H
#define NBDKIT_QED_PROGRESS_H

#include <stdint.h>

/* Progress lines at most this often (and the first after this long). */
#define QED_PROGRESS_INTERVAL_NS (2 * UINT64_C (1000000000))

struct qed_progress {
  const char *name;             /* the image, first on every line */
  const char *what;             /* the work: "repair", "compaction" */
  const char *phase;            /* its current phase */
  uint64_t start_ns;            /* the work's start */
  uint64_t phase_ns;            /* the phase's start */
  uint64_t last_ns;             /* the last line (start_ns: none yet) */
  uint64_t bytes;               /* bytes moved, for the end line */
  unsigned lines;               /* progress lines logged */
};

extern void qed_progress_start (struct qed_progress *p, const char *name,
                                const char *what);
/* DONE of TOTAL units of PHASE (a string constant) are done. */
extern void qed_progress_step (struct qed_progress *p, const char *phase,
                               uint64_t done, uint64_t total);
extern void qed_progress_end (struct qed_progress *p, const char *fs, ...)
  __attribute__ ((__format__ (__printf__, 2, 3)));

#endif /* NBDKIT_QED_PROGRESS_H */
