/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: background warming (qed-prefetch=true).
 *
 * From the first connection on, one thread copies into the overlay
 * every cluster it lacks, in disk order, through a backend context of
 * its own (nbdkit_next_context_open, shared: it outlives connections),
 * so that the overlay becomes complete without a client reading every
 * byte.  The design rules:
 *
 * - It is an ordinary copy-on-read fill (the filter's fetch: extents
 *   holes become zero clusters without a read, all-zero data zero
 *   clusters with qed-zero-detect, and qed_fill installs a cluster
 *   only if it is still unallocated, so a guest write that reached it
 *   first always wins).  Its chunks are recorded as fetches in flight
 *   (readahead.c), so a guest miss on them waits instead of reading
 *   the same clusters again, and it skips chunks a guest is fetching.
 *
 * - Guest requests go first: before each chunk the thread waits until
 *   no guest request is in progress and none began or ended for
 *   GUEST_QUIET_MS (but at most GUEST_WAIT_MS, so that a guest that
 *   never pauses slows it down rather than stops it), chunks are small
 *   (CHUNK), and it has one chunk in flight.
 *
 * - qed-prefetch-rate bounds the bytes read from the origin per second
 *   (holes cost nothing and do not count).
 *
 * - It resumes where it stopped after a restart or a crash, since it
 *   only fetches what the overlay lacks.  It flushes the overlay every
 *   FLUSH_EVERY bytes fetched, so that a crash loses at most that
 *   window of copied clusters (fetched again after the restart).
 *
 * - A failing origin (the chunk's fetch or the context's open fails)
 *   pauses it with a doubling backoff (1 s to 60 s); a failed fetch
 *   stores nothing, so no cluster is ever marked copied that was not.
 *
 * - Progress under -D qed.verbose=1 at most every 2 s, and one line
 *   when done: bytes fetched, bytes found as holes, elapsed time.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <time.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "qed.h"
#include "glue-nbdkit.h"
#include "seam.h"
#include "util.h"
#include "progress.h"
#include "readahead.h"
#include "prefetch.h"

#define CHUNK          (2u * 1024 * 1024)
#define FLUSH_EVERY    (32u * 1024 * 1024)
/* A chunk starts only after the guest was quiet this long, or after
 * waiting GUEST_WAIT_MS (so that a guest that never pauses slows it
 * down rather than stops it). */
#define GUEST_QUIET_MS 10
#define GUEST_WAIT_MS  100
#define BACKOFF_MAX    60

static uint64_t rate;           /* bytes/s, 0 = unlimited */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static nbdkit_backend *backend;
static char *export;
static bool started, stopping;
static pthread_t thread;
static struct qed_image *image;
static prefetch_fetch_fn *fetch_fn;
static bool persistent;         /* flush now and then (else temporary) */

static unsigned guest_active;   /* atomic */
static uint64_t guest_last_ns;  /* atomic: when a guest request began or ended */

int
prefetch_set_rate (const char *key, const char *value)
{
  int64_t v = glue_parse_size (key, value);

  if (v == -1)
    return -1;
  if (v > 0 && v < 4096) {
    nbdkit_error ("%s: at least 4K per second (or 0: unlimited)", key);
    return -1;
  }
  rate = v;
  return 0;
}

int
prefetch_note_backend (nbdkit_backend *b, const char *exportname)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  if (backend)
    return 0;
  export = strdup (exportname);
  if (export == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  backend = b;
  return 0;
}

static double
now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t
now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * UINT64_C(1000000000) + ts.tv_nsec;
}

void
prefetch_guest_begin (void)
{
  if (!__atomic_load_n (&started, __ATOMIC_RELAXED))
    return;
  __atomic_add_fetch (&guest_active, 1, __ATOMIC_RELAXED);
  __atomic_store_n (&guest_last_ns, now_ns (), __ATOMIC_RELAXED);
}

void
prefetch_guest_end (void)
{
  if (!__atomic_load_n (&started, __ATOMIC_RELAXED))
    return;
  __atomic_sub_fetch (&guest_active, 1, __ATOMIC_RELAXED);
  __atomic_store_n (&guest_last_ns, now_ns (), __ATOMIC_RELAXED);
}

/* Sleep up to seconds, or until stopping.  true if stopping. */
static bool
pause_for (double seconds)
{
  struct timespec ts;
  double t;

  clock_gettime (CLOCK_REALTIME, &ts);
  t = ts.tv_sec + ts.tv_nsec / 1e9 + seconds;
  ts.tv_sec = (time_t) t;
  ts.tv_nsec = (long) ((t - ts.tv_sec) * 1e9);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  while (!stopping)
    if (pthread_cond_timedwait (&cond, &lock, &ts) == ETIMEDOUT)
      break;
  return stopping;
}

static bool
is_stopping (void)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  return stopping;
}

/* Guests first: wait until no guest request is in progress and none
 * began or ended for GUEST_QUIET_MS, at most GUEST_WAIT_MS.  A guest
 * that keeps the disk busy then sees at most one chunk in every
 * GUEST_WAIT_MS beside its requests. */
static void
yield_to_guests (void)
{
  uint64_t t0 = now_ns ();

  for (;;) {
    uint64_t t = now_ns ();
    struct timespec ts = { .tv_nsec = 500000 };

    if (t - t0 >= GUEST_WAIT_MS * UINT64_C(1000000) || is_stopping ())
      return;
    if (__atomic_load_n (&guest_active, __ATOMIC_RELAXED) == 0 &&
        t - __atomic_load_n (&guest_last_ns, __ATOMIC_RELAXED) >=
        GUEST_QUIET_MS * UINT64_C(1000000))
      return;
    nanosleep (&ts, NULL);
  }
}

static void
close_context (nbdkit_next **next, bool prepared)
{
  if (*next) {
    if (prepared)
      (*next)->finalize (*next);
    nbdkit_next_context_close (*next);
    *next = NULL;
  }
}

static void *
prefetch_thread (void *arg)
{
  struct qed_image *img = image;
  uint64_t cs = qed_get_cluster_size (img), isize = qed_get_size (img);
  uint64_t offset = 0, fetched = 0, holes = 0, unflushed = 0;
  double t0 = now ();
  struct qed_progress progress;
  unsigned backoff = 1;
  nbdkit_next *next = NULL;
  bool prepared = false, failing = false;
  CLEANUP_FREE char *buf = malloc (MAX ((uint64_t) CHUNK, cs));

  if (buf == NULL) {
    nbdkit_error ("qed-prefetch: malloc: %m");
    return NULL;
  }
  nbdkit_debug ("qed-prefetch: started: warming %s (%" PRIu64 " bytes)",
                qed_get_filename (img), isize);
  qed_progress_start (&progress, qed_get_filename (img), "prefetch");
  while (offset < isize && !is_stopping ()) {
    struct qed_map m;
    uint64_t start, end, chunk, r = 0, h = 0;
    int err = 0;

    if (next == NULL) {
      next = nbdkit_next_context_open (backend, 1, export, 1);
      prepared = next && next->prepare (next) != -1;
      if (!prepared || next->get_size (next) == -1) {
        close_context (&next, prepared);
        if (!failing)
          qed_warning ("qed-prefetch: cannot open the plugin: paused, "
                        "retrying in %u s", backoff);
        failing = true;
        pause_for (backoff);
        backoff = MIN (backoff * 2, (unsigned) BACKOFF_MAX);
        continue;
      }
    }

    /* The next run the overlay lacks, in disk order. */
    if (qed_map (img, offset, isize - offset, &m) == -1) {
      pause_for (backoff);
      continue;
    }
    if (m.type != QED_MAP_UNALLOCATED) {
      offset += m.length;
      continue;
    }
    start = offset;
    chunk = MAX ((uint64_t) CHUNK, cs);
    end = MIN (m.length, chunk);
    end = MIN (start + end, isize);
    if (end < isize)
      end = MAX (ROUND_DOWN (end, cs), start + cs);

    yield_to_guests ();
    if (!ra_claim (start, end)) {
      /* A guest is fetching some of it: let it, then look again. */
      ra_wait_in_flight (start, end);
      continue;
    }
    err = fetch_fn (next, buf, start, end, &r, &h);
    ra_done (start, end, true);
    if (err == -1) {
      if (!failing)
        qed_warning ("qed-prefetch: the origin failed at %" PRIu64
                    ": paused, retrying in %u s", start, backoff);
      failing = true;
      /* The context may be dead (a lost connection): a new one. */
      close_context (&next, prepared);
      pause_for (backoff);
      backoff = MIN (backoff * 2, (unsigned) BACKOFF_MAX);
      continue;
    }
    if (failing)
      qed_notice ("qed-prefetch: the origin is back: resuming at %"
                    PRIu64, start);
    failing = false;
    backoff = 1;
    fetched += r;
    holes += h;
    unflushed += r + h;
    offset = end;
    if (persistent && unflushed >= FLUSH_EVERY) {
      /* Bound what a crash makes us fetch again. */
      if (qed_flush (img) == 0)
        unflushed = 0;
    }
    /* The common progress line (at most every 2 s), under
     * -D qed.verbose=1: bytes of the disk gone through. */
    if (qed_verbose_enabled ())
      qed_progress_step (&progress, "copying missing clusters", offset, isize);
    if (rate) {
      /* Hold the average at the rate. */
      double ahead = (double) fetched / rate - (now () - t0);
      if (ahead > 0)
        pause_for (ahead);
    }
  }
  if (offset >= isize) {
    if (persistent)
      qed_flush (img);
    qed_notice ("qed-prefetch: done: %" PRIu64 " bytes fetched, %" PRIu64
                  " bytes found as holes, in %.1f s", fetched, holes,
                  now () - t0);
  }
  close_context (&next, prepared);
  return NULL;
}

void
prefetch_start (struct qed_image *img, prefetch_fetch_fn *fetch,
                bool flush)
{
  int e;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  if (started || backend == NULL)
    return;
  image = img;
  fetch_fn = fetch;
  persistent = flush;
  e = pthread_create (&thread, NULL, prefetch_thread, NULL);
  if (e != 0) {
    errno = e;
    nbdkit_error ("qed-prefetch: cannot start its thread: %m");
    return;
  }
  __atomic_store_n (&started, true, __ATOMIC_RELAXED);
}

void
prefetch_stop (void)
{
  bool join;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
    stopping = true;
    pthread_cond_broadcast (&cond);
    join = started;
    __atomic_store_n (&started, false, __ATOMIC_RELAXED);
  }
  if (join)
    pthread_join (thread, NULL);
  free (export);
  export = NULL;
}
