/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the seam between the format core and its host.
 *
 * The core never calls nbdkit directly.  Each host (the plugin, the
 * filter, the unit tests) defines these two functions: the plugin and
 * filter forward them to nbdkit_error and nbdkit_debug.  Both objects
 * are built with -fvisibility=hidden, so each binds to its own copy.
 */

#ifndef NBDKIT_QED_SEAM_H
#define NBDKIT_QED_SEAM_H

/* An error the user should see.  Must preserve errno. */
extern void qed_error (const char *fs, ...)
  __attribute__ ((__format__ (__printf__, 1, 2)));

/* A message shown only when debugging (nbdkit -v).  Must preserve errno. */
extern void qed_debug (const char *fs, ...)
  __attribute__ ((__format__ (__printf__, 1, 2)));

/* One line per decision the core makes (allocation, copy from the
 * backing file, copy-on-read fill or skip, L2 cache miss, writeback),
 * logged only when the host asks for it (-D qed.verbose=1). */
extern int qed_verbose_enabled (void);
#define qed_verbose(fs, ...) \
  do { if (qed_verbose_enabled ()) qed_debug (fs, ##__VA_ARGS__); } while (0)

/* Only in the nbdkit seam (seam-nbdkit.c), for the plugin and the
 * filter: the calling thread's last qed_error message ("" after
 * qed_clear_last_error), and one log line when the first connection
 * cannot open the image: "WHAT: FILE: cannot open the image: CAUSE"
 * (nbdkit 1.32 sends the client no message). */
extern const char *qed_last_error (void);
extern void qed_clear_last_error (void);
extern void qed_open_failed (const char *what, const char *filename);

#endif /* NBDKIT_QED_SEAM_H */
