/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: read-ahead on the filter's copy-on-read misses, and a
 * cache of the plugin's extents.
 *
 * Over a remote plugin every request costs a round trip, so a reader
 * going through the disk in order would wait once per cluster.  When
 * a miss starts exactly where an earlier fetch ended, the reader is
 * sequential: the fetch is extended past what it needs by a window
 * that doubles on each such miss, up to qed-readahead.  Any other miss
 * starts a new run with no window, so random reads fetch only the
 * clusters they need.  A few runs are tracked at once (interleaved
 * readers, several connections).  A client that keeps several reads
 * in flight gets no read-ahead (the filter passes limit = end for its
 * misses, and a miss while an earlier fetch of its run is in flight
 * gets none either): its reads hide the latency already, and measured
 * with nbdcopy one large fetch only made them wait for it in turn.
 *
 * The extension is part of the client's own backend read (one larger
 * request, not a second one in the background): measured over a
 * delayed plugin, one request per window already makes the first pass
 * bandwidth bound, and it needs no second backend context, no thread,
 * and nothing left running at close.  The filter installs what was
 * fetched with qed_fill, which never stores over a cluster a write
 * reached first.
 *
 * While the overlay cannot store what is fetched (its file system is
 * full), nothing is read ahead: it would be read only to be thrown
 * away, and read again by the next miss.
 *
 * Fetches in flight are recorded, so that a miss on clusters another
 * request is already fetching waits for it instead of reading them
 * again (several requests in flight on a sequential stream, such as
 * nbdcopy's, would otherwise fetch most clusters twice).
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "readahead.h"
#include "util.h"

/* Sequential runs tracked at once. */
#define RA_STREAMS 8
/* Fetches recorded in flight (more run unrecorded, without a window). */
#define RA_IN_FLIGHT 64

struct ra_stream {
  uint64_t next;                /* where the run's last fetch ended */
  uint64_t window;              /* its current read-ahead, bytes */
  uint64_t last_used;           /* for replacing the oldest run */
  uint64_t id;                  /* unique, for its fetches in flight */
  bool valid;
};

struct ra_fetch {
  uint64_t start, end;
  uint64_t stream_id;           /* the run it belongs to (0: none) */
  bool used;
  /* Signalled when this fetch ends: only its waiters wake (nbdcopy
   * keeps dozens of requests waiting on different fetches). */
  pthread_cond_t done;
};

static pthread_mutex_t ra_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t max_window = RA_DEFAULT_WINDOW;
static struct ra_stream streams[RA_STREAMS];
static struct ra_fetch in_flight[RA_IN_FLIGHT] = {
  [0 ... RA_IN_FLIGHT - 1] = { .done = PTHREAD_COND_INITIALIZER },
};
static uint64_t tick, last_stream_id;
/* Set while the overlay cannot store what is fetched (a full file
 * system): what is read ahead would only be discarded, and read again
 * by the next miss, so nothing is read ahead until a fill succeeds. */
static bool store_failing;
/* Counters for the debug log. */
static uint64_t n_misses, n_sequential, n_waits, n_failed, bytes_ahead;

void
ra_set_max_window (uint64_t bytes)
{
  max_window = bytes;
}

/* A fetch in flight overlapping [start, end), or NULL. */
static struct ra_fetch *
overlapping_fetch (uint64_t start, uint64_t end)
{
  for (size_t i = 0; i < RA_IN_FLIGHT; ++i)
    if (in_flight[i].used && in_flight[i].start < end &&
        start < in_flight[i].end)
      return &in_flight[i];
  return NULL;
}

/* Whether a fetch of the run s is in flight. */
static bool
run_in_flight (const struct ra_stream *s)
{
  for (size_t i = 0; i < RA_IN_FLIGHT; ++i)
    if (in_flight[i].used && in_flight[i].stream_id == s->id)
      return true;
  return false;
}

/* The start of the nearest fetch in flight beyond end, or limit. */
static uint64_t
next_in_flight (uint64_t end, uint64_t limit)
{
  for (size_t i = 0; i < RA_IN_FLIGHT; ++i)
    if (in_flight[i].used && in_flight[i].start >= end &&
        in_flight[i].start < limit)
      limit = in_flight[i].start;
  return limit;
}

/* The run a miss at start continues (*continued set), or a new one. */
static struct ra_stream *
find_stream (uint64_t start, bool *continued)
{
  struct ra_stream *oldest = &streams[0];

  *continued = true;
  for (size_t i = 0; i < RA_STREAMS; ++i) {
    if (streams[i].valid && streams[i].next == start)
      return &streams[i];
    if (!streams[i].valid ||
        (oldest->valid && streams[i].last_used < oldest->last_used))
      oldest = &streams[i];
  }
  /* Not a continuation: a new run, with no read-ahead yet. */
  *continued = false;
  *oldest = (struct ra_stream) { .valid = true, .window = 0,
                                 .id = ++last_stream_id };
  return oldest;
}

/* The read-ahead for a miss [start, end) continuing the run s. */
static uint64_t
grow_window (struct ra_stream *s, uint64_t start, uint64_t end, uint64_t cs)
{
  s->window = s->window ? s->window * 2 : 2 * (end - start);
  s->window = MIN (s->window, max_window);
  return ROUND_DOWN (s->window, cs);
}

uint64_t
ra_plan (uint64_t start, uint64_t end, uint64_t limit, uint64_t cs)
{
  struct ra_stream *s;
  uint64_t ahead = 0, fetch_end = end, stream_id = 0;
  bool continued;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ra_lock);
  if (overlapping_fetch (start, end))
    return 0;
  n_misses++;
  if (max_window >= cs) {
    s = find_stream (start, &continued);
    /* If an earlier fetch of the run is still in flight, the client
     * keeps several reads in flight itself (nbdcopy, a VM at a high
     * queue depth): they already hide the latency, and one large
     * fetch would only make them wait for it in turn. */
    if (continued && limit > end && !run_in_flight (s) && !store_failing)
      ahead = grow_window (s, start, end, cs);
    stream_id = s->id;
    if (ahead) {
      n_sequential++;
      fetch_end = MIN (end + ahead, next_in_flight (end, limit));
      fetch_end = MAX (fetch_end, end);
      bytes_ahead += fetch_end - end;
    }
    s->next = fetch_end;
    s->last_used = ++tick;
  }
  for (size_t i = 0; i < RA_IN_FLIGHT; ++i)
    if (!in_flight[i].used) {
      in_flight[i].start = start;
      in_flight[i].end = fetch_end;
      in_flight[i].stream_id = stream_id;
      in_flight[i].used = true;
      break;
    }
  return fetch_end;
}

bool
ra_claim (uint64_t start, uint64_t end)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ra_lock);
  if (overlapping_fetch (start, end))
    return false;
  for (size_t i = 0; i < RA_IN_FLIGHT; ++i)
    if (!in_flight[i].used) {
      in_flight[i].start = start;
      in_flight[i].end = end;
      in_flight[i].stream_id = 0;
      in_flight[i].used = true;
      break;
    }
  return true;
}

void
ra_done (uint64_t start, uint64_t fetch_end, bool ok)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ra_lock);
  for (size_t i = 0; i < RA_IN_FLIGHT; ++i)
    if (in_flight[i].used && in_flight[i].start == start &&
        in_flight[i].end == fetch_end) {
      in_flight[i].used = false;
      pthread_cond_broadcast (&in_flight[i].done);
      break;
    }
  if (!ok) {
    n_failed++;
    /* Start the run again from nothing. */
    for (size_t i = 0; i < RA_STREAMS; ++i)
      if (streams[i].valid && streams[i].next == fetch_end)
        streams[i].window = 0;
  }
}

void
ra_note_stored (bool ok)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ra_lock);
  if (store_failing == !ok)
    return;
  store_failing = !ok;
  nbdkit_debug ("read-ahead %s: the overlay %s", ok ? "resumed" : "stopped",
                ok ? "stores fetched clusters again"
                : "cannot store fetched clusters");
  if (!ok)
    for (size_t i = 0; i < RA_STREAMS; ++i)
      streams[i].window = 0;
}

bool
ra_wait_in_flight (uint64_t start, uint64_t end)
{
  struct ra_fetch *f;
  bool waited = false;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ra_lock);
  while ((f = overlapping_fetch (start, end)) != NULL) {
    if (!waited)
      n_waits++;
    waited = true;
    pthread_cond_wait (&f->done, &ra_lock);
  }
  return waited;
}

void
ra_log_stats (void)
{
  nbdkit_debug ("read-ahead: %" PRIu64 " misses, %" PRIu64 " sequential, %"
                PRIu64 " waited for a fetch in flight, %" PRIu64 " failed, %"
                PRIu64 " bytes read ahead", n_misses, n_sequential, n_waits,
                n_failed, bytes_ahead);
}

/* The extents cache.  Extents are asked for in aligned windows of
 * EXT_WINDOW bytes (no cluster crosses one, clusters being at most
 * 64M) and kept as the sorted, merged zero ranges of each window.
 */
#define EXT_WINDOW (64ull * 1024 * 1024)
#define EXT_SLOTS 64

struct zero_range {
  uint64_t start, end;
};

struct ext_window {
  bool valid;
  uint64_t index;               /* offset / EXT_WINDOW */
  uint64_t last_used;
  size_t n;
  struct zero_range *zeros;
};

static pthread_mutex_t ext_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ext_window ext_windows[EXT_SLOTS];
static uint64_t ext_tick, ext_queries;

/* Ask the plugin for the extents of [offset, offset+len) and make
 * the window's zero ranges.  Returns -1 if the plugin failed. */
static int
query_window (nbdkit_next *next, uint64_t offset, uint64_t len,
              struct ext_window *w)
{
  struct nbdkit_extents *exts;
  int err = 0;
  size_t count;

  exts = nbdkit_extents_full (next, len, offset, 0, &err);
  if (exts == NULL) {
    nbdkit_debug ("copy-on-read: plugin extents failed (ignored): %s",
                  strerror (err));
    return -1;
  }
  count = nbdkit_extents_count (exts);
  w->zeros = malloc (MAX (count, (size_t) 1) * sizeof *w->zeros);
  if (w->zeros == NULL) {
    nbdkit_extents_free (exts);
    return -1;
  }
  w->n = 0;
  for (size_t k = 0; k < count; ++k) {
    struct nbdkit_extent e = nbdkit_get_extent (exts, k);
    uint64_t s = MAX (e.offset, offset);
    uint64_t t = MIN (e.offset + e.length, offset + len);
    if (t <= s || !(e.type & NBDKIT_EXTENT_ZERO))
      continue;
    if (w->n > 0 && w->zeros[w->n - 1].end == s)
      w->zeros[w->n - 1].end = t;
    else
      w->zeros[w->n++] = (struct zero_range) { s, t };
  }
  nbdkit_extents_free (exts);
  return 0;
}

/* The cached window holding offset, or NULL.  ext_lock held. */
static struct ext_window *
lookup_window (uint64_t index)
{
  for (size_t i = 0; i < EXT_SLOTS; ++i)
    if (ext_windows[i].valid && ext_windows[i].index == index) {
      ext_windows[i].last_used = ++ext_tick;
      return &ext_windows[i];
    }
  return NULL;
}

/* Keep w (its zeros now owned by the cache), replacing the oldest. */
static void
store_window (struct ext_window *w)
{
  struct ext_window *slot = &ext_windows[0];

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ext_lock);
  if (lookup_window (w->index)) {       /* another request was faster */
    free (w->zeros);
    return;
  }
  for (size_t i = 0; i < EXT_SLOTS; ++i)
    if (!ext_windows[i].valid ||
        (slot->valid && ext_windows[i].last_used < slot->last_used))
      slot = &ext_windows[i];
  free (slot->zeros);
  *slot = *w;
  slot->valid = true;
  slot->last_used = ++ext_tick;
  ext_queries++;
}

/* Whether [s, t) (inside one window) is zero by the window's ranges. */
static bool
window_is_zero (const struct ext_window *w, uint64_t s, uint64_t t)
{
  size_t lo = 0, hi = w->n;

  while (lo < hi) {             /* the first range ending after s */
    size_t mid = (lo + hi) / 2;
    if (w->zeros[mid].end <= s)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < w->n && w->zeros[lo].start <= s && w->zeros[lo].end >= t;
}

/* Make sure the window index is cached.  Returns false if it cannot be. */
static bool
ensure_window (nbdkit_next *next, uint64_t index, uint64_t size)
{
  struct ext_window w = { .index = index };
  uint64_t offset = index * EXT_WINDOW;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ext_lock);
    if (lookup_window (index))
      return true;
  }
  /* Asked outside the lock: a round trip must not hold up others. */
  if (query_window (next, offset, MIN (EXT_WINDOW, size - offset), &w) == -1)
    return false;
  store_window (&w);
  return true;
}

void
extcache_zero_clusters (nbdkit_next *next, uint64_t start, uint64_t dend,
                        uint64_t cs, uint64_t n, bool *zero)
{
  int64_t size = next->get_size (next);
  uint64_t have = UINT64_MAX;   /* the window known to be cached */
  bool usable = false;

  memset (zero, 0, n * sizeof *zero);
  if (size <= 0 || next->can_extents (next) != 1)
    return;
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t s = start + i * cs, t = MIN (s + cs, dend);
    uint64_t index = s / EXT_WINDOW;

    if (s >= dend) {            /* past the plugin's end: zeros */
      zero[i] = true;
      continue;
    }
    if (index != have) {
      usable = ensure_window (next, index, size);
      have = index;
    }
    if (usable) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&ext_lock);
      struct ext_window *w = lookup_window (index);
      zero[i] = w && window_is_zero (w, s, t);
    }
  }
}

void
extcache_free (void)
{
  nbdkit_debug ("extents cache: %" PRIu64 " windows of %llu bytes asked for",
                ext_queries, EXT_WINDOW);
  for (size_t i = 0; i < EXT_SLOTS; ++i) {
    free (ext_windows[i].zeros);
    ext_windows[i] = (struct ext_window) { 0 };
  }
}
