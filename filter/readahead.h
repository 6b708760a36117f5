/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the filter's read-ahead on copy-on-read misses, and its
 * cache of the plugin's extents (readahead.c).
 */

#ifndef NBDKIT_QED_READAHEAD_H
#define NBDKIT_QED_READAHEAD_H

#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

/* The default and largest qed-readahead (the bound of the window). */
#define RA_DEFAULT_WINDOW (8u * 1024 * 1024)
#define RA_MAX_WINDOW (32u * 1024 * 1024)

/* Set the window's bound in bytes (0 disables read-ahead). */
extern void ra_set_max_window (uint64_t bytes);

/* A copy-on-read miss needs the clusters [start, end); the clusters
 * from end up to limit are unallocated too.  Returns where the fetch
 * should end (end if this miss does not continue a sequential run,
 * further on if it does), and records [start, returned end) as in
 * flight until ra_done.  cs is the cluster size.  Returns 0 (nothing
 * recorded) if [start, end) overlaps a fetch in flight: the caller
 * waits for it (ra_wait_in_flight) and looks at the overlay again.
 */
extern uint64_t ra_plan (uint64_t start, uint64_t end, uint64_t limit,
                         uint64_t cs);

/* Record [start, end) as in flight with no read-ahead and no run
 * (the background prefetch), until ra_done (ok = true).  false, with
 * nothing recorded, if it overlaps a fetch in flight. */
extern bool ra_claim (uint64_t start, uint64_t end);

/* The fetch planned by ra_plan finished (ok: its clusters were read
 * and offered to the overlay).  A failed read-ahead ends its run. */
extern void ra_done (uint64_t start, uint64_t fetch_end, bool ok);

/* Whether the overlay stored what the last fetch read (false: a fill
 * failed, e.g. on a full file system).  No read-ahead while it cannot.
 */
extern void ra_note_stored (bool ok);

/* If [start, end) overlaps a fetch in flight, wait until no fetch in
 * flight overlaps it and return true (the caller then looks at the
 * overlay again); otherwise return false at once. */
extern bool ra_wait_in_flight (uint64_t start, uint64_t end);

/* Counters for debug messages at unload. */
extern void ra_log_stats (void);

/* Which of the n clusters of cs bytes from start (cluster aligned,
 * reads ending at dend, the plugin's end or earlier) the plugin's
 * extents call zero: zero[i] is set for those.  Extents are asked for
 * in large aligned windows and kept (the plugin is never written, so
 * they cannot change under us).  A plugin without extents, or one
 * whose extents fail, has no zero clusters. */
extern void extcache_zero_clusters (nbdkit_next *next, uint64_t start,
                                    uint64_t dend, uint64_t cs, uint64_t n,
                                    bool *zero);

/* Forget the cached extents (at unload). */
extern void extcache_free (void);

#endif /* NBDKIT_QED_READAHEAD_H */
