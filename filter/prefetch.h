/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the filter's background warming, qed-prefetch
 * (prefetch.c).
 */

#ifndef NBDKIT_QED_PREFETCH_H
#define NBDKIT_QED_PREFETCH_H

#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "qed.h"

/* Copy the clusters [start, end) from next into img (buf holds
 * end - start bytes; opaque is prefetch_new's), adding to *read and
 * *holes the bytes read from the plugin and those its extents call
 * holes.  -1 if the plugin failed: nothing was stored. */
typedef int prefetch_fetch_fn (nbdkit_next *next, struct qed_image *img,
                               void *opaque, char *buf,
                               uint64_t start, uint64_t end,
                               uint64_t *read, uint64_t *holes);

/* Parameters. */
extern int prefetch_set_rate (const char *key, const char *value);

/* In .open: the backend and export name the prefetch's own context is
 * opened with (the first call counts). */
extern int prefetch_note_backend (nbdkit_backend *backend,
                                  const char *exportname);

/* After the overlay is open (the first connection): start the
 * background thread, once.  flush: the overlay persists (flush it now
 * and then, to bound what a crash loses). */
extern void prefetch_start (struct qed_image *img, prefetch_fetch_fn *fetch,
                            bool flush);

/* At cleanup: stop that thread and close its context. */
extern void prefetch_stop (void);

/* One more warming thread, for img (qed-overlay-dir without the
 * shared cache: one per open overlay): NULL if it could not start
 * (logged) or no context can be opened. */
struct prefetch;
extern struct prefetch *prefetch_new (struct qed_image *img,
                                      prefetch_fetch_fn *fetch,
                                      void *opaque, bool flush);

/* Stop it (before img is closed) and free it.  NULL is fine. */
extern void prefetch_free (struct prefetch *p);

/* At unload, after every thread stopped. */
extern void prefetch_unload (void);

/* Guest requests (they go first): around every data request. */
extern void prefetch_guest_begin (void);
extern void prefetch_guest_end (void);

#endif /* NBDKIT_QED_PREFETCH_H */
