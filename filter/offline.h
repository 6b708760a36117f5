/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: serving the overlay while the origin is away
 * (offline.c).
 */

#ifndef NBDKIT_QED_OFFLINE_H
#define NBDKIT_QED_OFFLINE_H

#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

/* The origin can be opened again: ctx is a prepared shared context
 * (its size asked for).  Return 0 to keep it (it becomes the origin of
 * the connections that could not open the plugin), -1 to give up (ctx
 * is closed and the thread ends). */
typedef int offline_back_fn (nbdkit_next *ctx, int64_t size);

/* Start, once, a thread that opens the plugin (backend, export) again
 * with a doubling backoff (1 s to 60 s) until it can, then calls
 * back. */
extern void offline_start (nbdkit_backend *backend, const char *exportname,
                           offline_back_fn *back);

/* The origin's shared context once it is back, or NULL.  Use it under
 * offline_lock_origin/offline_unlock_origin (which serialise its
 * requests when the plugin's thread model is not parallel). */
extern nbdkit_next *offline_origin (void);
extern void offline_set_parallel (bool parallel);
extern void offline_lock_origin (void);
extern void offline_unlock_origin (void);

/* At cleanup: stop the thread, close the context. */
extern void offline_stop (void);

#endif /* NBDKIT_QED_OFFLINE_H */
