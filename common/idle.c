/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the idle timer.
 *
 * QEMU's tools never clear NEED_CHECK until exit (their timer runs on a
 * clock that does not advance), so any crash after the first write
 * means a full check.  This thread writes back and clears the flag
 * once writes have stopped for a while; a crash after an idle period
 * then needs no check.  Used by both the plugin and the filter.
 */

#include <stdlib.h>
#include <stdbool.h>
#include <errno.h>
#include <time.h>
#include <pthread.h>

#include "qed.h"
#include "seam.h"

struct qed_idle_timer {
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool stopping;
  time_t last_write;            /* 0: nothing written since the last clean */
  unsigned seconds;
  struct qed_image *(*get_image) (void);
};

static void *
idle_main (void *arg)
{
  struct qed_idle_timer *t = arg;

  pthread_mutex_lock (&t->lock);
  while (!t->stopping) {
    struct timespec ts;
    time_t lw;
    struct qed_image *img;

    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec += 1;
    pthread_cond_timedwait (&t->cond, &t->lock, &ts);
    lw = __atomic_load_n (&t->last_write, __ATOMIC_RELAXED);
    if (t->stopping || lw == 0 || time (NULL) - lw < (time_t) t->seconds)
      continue;
    __atomic_store_n (&t->last_write, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock (&t->lock);
    img = t->get_image ();
    if (img && qed_idle (img) == -1)
      qed_debug ("idle writeback failed: %m");
    pthread_mutex_lock (&t->lock);
  }
  pthread_mutex_unlock (&t->lock);
  return NULL;
}

struct qed_idle_timer *
qed_idle_timer_start (unsigned seconds, struct qed_image *(*get_image) (void))
{
  struct qed_idle_timer *t = calloc (1, sizeof *t);
  int err;

  if (t == NULL) {
    qed_error ("calloc: %m");
    return NULL;
  }
  pthread_mutex_init (&t->lock, NULL);
  pthread_cond_init (&t->cond, NULL);
  t->seconds = seconds;
  t->get_image = get_image;
  err = pthread_create (&t->thread, NULL, idle_main, t);
  if (err) {
    errno = err;
    qed_error ("pthread_create: %m");
    pthread_mutex_destroy (&t->lock);
    pthread_cond_destroy (&t->cond);
    free (t);
    return NULL;
  }
  return t;
}

void
qed_idle_timer_note_write (struct qed_idle_timer *t)
{
  if (t)
    __atomic_store_n (&t->last_write, time (NULL), __ATOMIC_RELAXED);
}

void
qed_idle_timer_stop (struct qed_idle_timer *t)
{
  if (t == NULL)
    return;
  pthread_mutex_lock (&t->lock);
  t->stopping = true;
  pthread_cond_signal (&t->cond);
  pthread_mutex_unlock (&t->lock);
  pthread_join (t->thread, NULL);
  pthread_mutex_destroy (&t->lock);
  pthread_cond_destroy (&t->cond);
  free (t);
}
