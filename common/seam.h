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

#endif /* NBDKIT_QED_SEAM_H */
