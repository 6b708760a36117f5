/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: background warming (qed-prefetch=true).
 *
 * From the first connection on, one thread copies into the overlay
 * every cluster it lacks, in disk order, through a backend context of
 * its own (nbdkit_next_context_open, shared: it outlives connections),
 * so that the overlay becomes complete without a client reading every
 * byte.  With qed-overlay-dir and no shared cache, each open per-export
 * overlay has such a thread (prefetch_new, stopped by prefetch_free
 * before the overlay closes); the guest activity below is counted over
 * all of them, and the fetches in flight are the filter's (by offset:
 * a thread may wait for another export's fetch of the same range, then
 * looks again).  The design rules:
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

/* The backend and export every warming thread opens its context
 * with (set once, in .open). */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static nbdkit_backend *backend;
static char *export;

/* One warming thread and the image it warms. */
struct prefetch {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool stopping;
  pthread_t thread;
  struct qed_image *image;
  prefetch_fetch_fn *fetch_fn;
  void *opaque;
  bool persistent;              /* flush now and then (else temporary) */
};

/* prefetch_start's (the one overlay, or the shared cache). */
static struct prefetch *one;
static bool one_started;
static unsigned running;        /* atomic: threads that may run */

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
  if (__atomic_load_n (&running, __ATOMIC_RELAXED) == 0)
    return;
  __atomic_add_fetch (&guest_active, 1, __ATOMIC_RELAXED);
  __atomic_store_n (&guest_last_ns, now_ns (), __ATOMIC_RELAXED);
}

void
prefetch_guest_end (void)
{
  if (__atomic_load_n (&running, __ATOMIC_RELAXED) == 0)
    return;
  __atomic_sub_fetch (&guest_active, 1, __ATOMIC_RELAXED);
  __atomic_store_n (&guest_last_ns, now_ns (), __ATOMIC_RELAXED);
}

/* Sleep up to seconds, or until stopping.  true if stopping. */
static bool
pause_for (struct prefetch *p, double seconds)
{
  struct timespec ts;
  double t;

  clock_gettime (CLOCK_REALTIME, &ts);
  t = ts.tv_sec + ts.tv_nsec / 1e9 + seconds;
  ts.tv_sec = (time_t) t;
  ts.tv_nsec = (long) ((t - ts.tv_sec) * 1e9);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
  while (!p->stopping)
    if (pthread_cond_timedwait (&p->cond, &p->lock, &ts) == ETIMEDOUT)
      break;
  return p->stopping;
}

static bool
is_stopping (struct prefetch *p)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
  return p->stopping;
}

/* Guests first: wait until no guest request is in progress and none
 * began or ended for GUEST_QUIET_MS, at most GUEST_WAIT_MS.  A guest
 * that keeps the disk busy then sees at most one chunk in every
 * GUEST_WAIT_MS beside its requests. */
static void
yield_to_guests (struct prefetch *p)
{
  uint64_t t0 = now_ns ();

  for (;;) {
    uint64_t t = now_ns ();
    struct timespec ts = { .tv_nsec = 500000 };

    if (t - t0 >= GUEST_WAIT_MS * UINT64_C(1000000) || is_stopping (p))
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

/* The state of one warming pass (prefetch_thread). */
struct warm {
  struct prefetch *p;
  struct qed_image *img;
  uint64_t cs, isize;
  uint64_t offset;              /* where to look next, in disk order */
  uint64_t fetched, holes, unflushed;
  double t0;
  struct qed_progress progress;
  unsigned backoff;             /* seconds, while the origin fails */
  bool failing;
  nbdkit_next *next;            /* our own plugin context */
  bool prepared;
  char *buf;
};

/* Pause after a failure of the origin, saying so once per outage. */
static void
origin_failed (struct warm *w, const char *what, uint64_t at)
{
  if (!w->failing) {
    if (what)
      qed_warning ("qed-prefetch: the origin failed at %" PRIu64
                   ": paused, retrying in %u s", at, w->backoff);
    else
      qed_warning ("qed-prefetch: cannot open the plugin: paused, "
                   "retrying in %u s", w->backoff);
  }
  w->failing = true;
  /* The context may be dead (a lost connection): a new one. */
  close_context (&w->next, w->prepared);
  pause_for (w->p, w->backoff);
  w->backoff = MIN (w->backoff * 2, (unsigned) BACKOFF_MAX);
}

/* Our plugin context, opened (again) if needed: false after a pause. */
static bool
have_context (struct warm *w)
{
  if (w->next)
    return true;
  w->next = nbdkit_next_context_open (backend, 1, export, 1);
  w->prepared = w->next && w->next->prepare (w->next) != -1;
  if (w->prepared && w->next->get_size (w->next) != -1)
    return true;
  origin_failed (w, NULL, 0);
  return false;
}

/* The next run [*start, *end) the overlay lacks, at most a chunk:
 * 1, or 0 after moving w->offset past what it holds (or a pause). */
static int
next_missing_run (struct warm *w, uint64_t *start, uint64_t *end)
{
  struct qed_map m;
  uint64_t e;

  if (qed_map (w->img, w->offset, w->isize - w->offset, &m) == -1) {
    pause_for (w->p, w->backoff);
    return 0;
  }
  if (m.type != QED_MAP_UNALLOCATED) {
    w->offset += m.length;
    return 0;
  }
  *start = w->offset;
  e = MIN (m.length, MAX ((uint64_t) CHUNK, w->cs));
  e = MIN (*start + e, w->isize);
  if (e < w->isize)
    e = MAX (ROUND_DOWN (e, w->cs), *start + w->cs);
  *end = e;
  return 1;
}

/* Count a fetched run, flush now and then, show progress, keep the
 * rate. */
static void
fetched_run (struct warm *w, uint64_t end, uint64_t r, uint64_t h)
{
  if (w->failing)
    qed_notice ("qed-prefetch: the origin is back: resuming at %"
                PRIu64, w->offset);
  w->failing = false;
  w->backoff = 1;
  w->fetched += r;
  w->holes += h;
  w->unflushed += r + h;
  w->offset = end;
  /* Bound what a crash makes us fetch again. */
  if (w->p->persistent && w->unflushed >= FLUSH_EVERY && qed_flush (w->img) == 0)
    w->unflushed = 0;
  /* The common progress line (at most every 2 s), under
   * -D qed.verbose=1: bytes of the disk gone through. */
  if (qed_verbose_enabled ())
    qed_progress_step (&w->progress, "copying missing clusters", w->offset,
                       w->isize);
  if (rate) {
    /* Hold the average at the rate. */
    double ahead = (double) w->fetched / rate - (now () - w->t0);
    if (ahead > 0)
      pause_for (w->p, ahead);
  }
}

static void *
prefetch_thread (void *arg)
{
  struct prefetch *p = arg;
  struct warm w = { .p = p, .img = p->image, .t0 = now (), .backoff = 1 };
  CLEANUP_FREE char *buf = NULL;

  w.cs = qed_get_cluster_size (w.img);
  w.isize = qed_get_size (w.img);
  w.buf = buf = malloc (MAX ((uint64_t) CHUNK, w.cs));
  if (buf == NULL) {
    nbdkit_error ("qed-prefetch: malloc: %m");
    return NULL;
  }
  nbdkit_debug ("qed-prefetch: started: warming %s (%" PRIu64 " bytes)",
                qed_get_filename (w.img), w.isize);
  qed_progress_start (&w.progress, qed_get_filename (w.img), "prefetch");
  while (w.offset < w.isize && !is_stopping (p)) {
    uint64_t start, end, r = 0, h = 0;
    int err;

    if (!have_context (&w) || !next_missing_run (&w, &start, &end))
      continue;
    yield_to_guests (p);
    if (!ra_claim (start, end)) {
      /* A guest is fetching some of it: let it, then look again. */
      ra_wait_in_flight (start, end);
      continue;
    }
    err = p->fetch_fn (w.next, w.img, p->opaque, w.buf, start, end, &r, &h);
    ra_done (start, end, true);
    if (err == -1)
      origin_failed (&w, "fetch", start);
    else
      fetched_run (&w, end, r, h);
  }
  if (w.offset >= w.isize) {
    if (p->persistent)
      qed_flush (w.img);
    qed_notice ("qed-prefetch: done: %" PRIu64 " bytes fetched, %" PRIu64
                " bytes found as holes, in %.1f s", w.fetched, w.holes,
                now () - w.t0);
  }
  close_context (&w.next, w.prepared);
  return NULL;
}

struct prefetch *
prefetch_new (struct qed_image *img, prefetch_fetch_fn *fetch, void *opaque,
              bool flush)
{
  struct prefetch *p;
  int e;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
    if (backend == NULL)
      return NULL;
  }
  p = calloc (1, sizeof *p);
  if (p == NULL) {
    nbdkit_error ("qed-prefetch: calloc: %m");
    return NULL;
  }
  pthread_mutex_init (&p->lock, NULL);
  pthread_cond_init (&p->cond, NULL);
  p->image = img;
  p->fetch_fn = fetch;
  p->opaque = opaque;
  p->persistent = flush;
  __atomic_add_fetch (&running, 1, __ATOMIC_RELAXED);
  e = pthread_create (&p->thread, NULL, prefetch_thread, p);
  if (e != 0) {
    __atomic_sub_fetch (&running, 1, __ATOMIC_RELAXED);
    pthread_cond_destroy (&p->cond);
    pthread_mutex_destroy (&p->lock);
    free (p);
    errno = e;
    nbdkit_error ("qed-prefetch: cannot start its thread: %m");
    return NULL;
  }
  return p;
}

void
prefetch_free (struct prefetch *p)
{
  if (p == NULL)
    return;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&p->lock);
    p->stopping = true;
    pthread_cond_broadcast (&p->cond);
  }
  pthread_join (p->thread, NULL);
  __atomic_sub_fetch (&running, 1, __ATOMIC_RELAXED);
  pthread_cond_destroy (&p->cond);
  pthread_mutex_destroy (&p->lock);
  free (p);
}

void
prefetch_start (struct qed_image *img, prefetch_fetch_fn *fetch,
                bool flush)
{
  struct prefetch *p;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
    if (one_started || backend == NULL)
      return;
    one_started = true;
  }
  p = prefetch_new (img, fetch, NULL, flush);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  one = p;
}

void
prefetch_stop (void)
{
  struct prefetch *p;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
    p = one;
    one = NULL;
  }
  prefetch_free (p);
}

void
prefetch_unload (void)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  free (export);
  export = NULL;
  backend = NULL;
  one_started = false;
}
