/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: what the plugin and the filter have in common
 * (glue-nbdkit.c).
 *
 * Built into both objects, like the seam: each has its own copy
 * (-fvisibility=hidden), so "the image" below is the plugin's image in
 * the plugin and the overlay in the filter.
 */

#ifndef NBDKIT_QED_GLUE_NBDKIT_H
#define NBDKIT_QED_GLUE_NBDKIT_H

#include <stdbool.h>
#include <stdint.h>
#include <errno.h>
#include <pthread.h>

#include "qed.h"

struct nbdkit_extents;

/* Parameters.  Each message names the parameter (key). */
extern int glue_parse_bool (const char *key, const char *value, bool *b);
/* A size; -1 on error. */
extern int64_t glue_parse_size (const char *key, const char *value);
/* A power of 2 from lo to hi, given as a size (4K, 64M...). */
extern int glue_parse_power_of_2 (const char *key, const char *value,
                                  uint32_t lo, uint32_t hi, uint32_t *out);
/* on, off or auto. */
extern int glue_parse_locking (const char *key, const char *value,
                               enum qed_locking *locking);

/* The image, opened once by the first connection (under
 * glue_open_lock) and shared by all until cleanup.
 *
 * From after the fork until that open, a reader's locks are held on
 * the file, so that QEMU cannot open it for writing in between.  (Not
 * from get_ready: the parent's copy of the descriptor would keep its
 * locks until that process is gone, racing the first connection.)
 * An idle timer writes the image back and clears NEED_CHECK once
 * writes stop.
 */
extern pthread_mutex_t glue_open_lock;
/* The image, or NULL before the first open (safe without the lock). */
extern struct qed_image *glue_image (void);
/* After the fork: keep lock_fd (a descriptor holding a reader's locks
 * on the file, or -1) until the image is opened, and start the idle
 * timer (0 seconds: none). */
extern int glue_after_fork (int lock_fd, unsigned idle_seconds);
/* Before opening the image: release the start-up locks, which would
 * conflict with the image's own.  glue_open_lock held. */
extern void glue_release_startup_locks (void);
/* Publish the opened image.  glue_open_lock held. */
extern void glue_set_image (struct qed_image *img);
/* A write happened (for the idle timer). */
extern void glue_note_write (void);
/* At cleanup: stop the idle timer, release the start-up locks, and
 * hand back the image for the caller to close (NULL if never opened). */
extern struct qed_image *glue_cleanup (void);

/* Block status of [offset, offset+count) from the image's mapping.
 * Allocated and zero clusters are added here; for each unallocated run
 * (len bytes at offset), unallocated adds the extents of a prefix of it
 * and returns that prefix's length (-1 with errno on error), or, with
 * no function, the run is a hole that reads as zeros.  Returns -1 with
 * errno set on error.
 */
typedef int64_t glue_unallocated_fn (void *opaque, uint64_t len,
                                     uint64_t offset, bool req_one,
                                     struct nbdkit_extents *extents);
extern int glue_extents (struct qed_image *img, uint64_t count,
                         uint64_t offset, bool req_one,
                         struct nbdkit_extents *extents,
                         glue_unallocated_fn *unallocated, void *opaque);

/* qed_fill for copy-on-read: a failure (a full disk) is said once as a
 * warning, not as an error: the read itself succeeds. */
extern int glue_fill (struct qed_image *img, const void *buf,
                      uint64_t count, uint64_t offset, bool detect_zero,
                      bool known_zero);

/* For filter callbacks (which report errors in *err): the errno of a
 * failed call, EIO if it set none.  Always returns -1.  Clear errno
 * before the call. */
static inline int
glue_fail (int *err)
{
  *err = errno ? errno : EIO;
  return -1;
}

#endif /* NBDKIT_QED_GLUE_NBDKIT_H */
