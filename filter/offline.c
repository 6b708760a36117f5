/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: serving the overlay while the origin is away.
 *
 * A persistent overlay is often complete or nearly so: a golden image
 * on an HTTP server that is down should not stop the VMs that have
 * what they need.  When the plugin cannot be opened for a connection,
 * the filter serves the overlay alone (held clusters read, missing
 * ones fail with EIO and are never stored, writes go to the overlay),
 * and this thread opens the plugin again in the background, with a
 * doubling backoff.  When it can, the filter runs the origin guard
 * with that context (before any missing cluster is fetched: a changed
 * origin must not leak into the overlay) and, if it passes, the
 * context becomes the origin of the connections that had none.
 *
 * The context is shared by those connections: with a plugin that is
 * not fully parallel (curl is serialize_requests), their requests to
 * it are serialised here, as nbdkit would for one connection.
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

#include "util.h"
#include "offline.h"

#define BACKOFF_MAX 60

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static bool started, stopping;
static pthread_t thread;
static nbdkit_backend *backend;
static char *export;
static offline_back_fn *back_fn;
static nbdkit_next *origin;     /* published: atomic */
static bool parallel;
static pthread_mutex_t origin_lock = PTHREAD_MUTEX_INITIALIZER;

void
offline_set_parallel (bool p)
{
  parallel = p;
}

nbdkit_next *
offline_origin (void)
{
  return __atomic_load_n (&origin, __ATOMIC_ACQUIRE);
}

void
offline_lock_origin (void)
{
  if (!parallel)
    pthread_mutex_lock (&origin_lock);
}

void
offline_unlock_origin (void)
{
  if (!parallel)
    pthread_mutex_unlock (&origin_lock);
}

/* Sleep up to seconds, or until stopping.  true if stopping. */
static bool
pause_for (unsigned seconds)
{
  struct timespec ts;

  clock_gettime (CLOCK_REALTIME, &ts);
  ts.tv_sec += seconds;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  while (!stopping)
    if (pthread_cond_timedwait (&cond, &lock, &ts) == ETIMEDOUT)
      break;
  return stopping;
}

static void *
reconnect_thread (void *arg)
{
  unsigned backoff = 1;

  while (!pause_for (backoff)) {
    nbdkit_next *ctx = nbdkit_next_context_open (backend, 1, export, 1);
    bool prepared = ctx && ctx->prepare (ctx) != -1;
    int64_t size = prepared ? ctx->get_size (ctx) : -1;

    if (size >= 0) {
      if (back_fn (ctx, size) == 0) {
        __atomic_store_n (&origin, ctx, __ATOMIC_RELEASE);
        return NULL;
      }
      /* The guard refused the origin: no point trying again. */
      ctx->finalize (ctx);
      nbdkit_next_context_close (ctx);
      return NULL;
    }
    if (ctx) {
      if (prepared)
        ctx->finalize (ctx);
      nbdkit_next_context_close (ctx);
    }
    nbdkit_debug ("the plugin still cannot be opened: trying again in "
                  "%u s", MIN (backoff * 2, (unsigned) BACKOFF_MAX));
    backoff = MIN (backoff * 2, (unsigned) BACKOFF_MAX);
  }
  return NULL;
}

void
offline_start (nbdkit_backend *b, const char *exportname,
               offline_back_fn *back)
{
  int e;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  if (started || stopping || offline_origin ())
    return;
  export = strdup (exportname);
  if (export == NULL) {
    nbdkit_error ("strdup: %m");
    return;
  }
  backend = b;
  back_fn = back;
  e = pthread_create (&thread, NULL, reconnect_thread, NULL);
  if (e != 0) {
    errno = e;
    nbdkit_error ("cannot start a thread to reopen the plugin: %m");
    return;
  }
  started = true;
}

void
offline_stop (void)
{
  nbdkit_next *ctx;
  bool join;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
    stopping = true;
    pthread_cond_broadcast (&cond);
    join = started;
  }
  if (join)
    pthread_join (thread, NULL);
  ctx = __atomic_exchange_n (&origin, NULL, __ATOMIC_ACQ_REL);
  if (ctx) {
    ctx->finalize (ctx);
    nbdkit_next_context_close (ctx);
  }
  free (export);
  export = NULL;
}
