/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: what the plugin and the filter have in common: parameter
 * parsing, the open-once image with its start-up locks and idle timer,
 * and block status.  See glue-nbdkit.h.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <inttypes.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "glue-nbdkit.h"
#include "seam.h"
#include "util.h"

int
glue_parse_bool (const char *key, const char *value, bool *b)
{
  int r = parse_bool_word (value);

  if (r == -1) {
    nbdkit_error ("%s: expected true or false (or yes/no, on/off, 1/0), "
                  "not '%s'", key, value);
    return -1;
  }
  *b = r;
  return 0;
}

/* nbdkit_parse_size's message does not say which parameter was bad. */
int64_t
glue_parse_size (const char *key, const char *value)
{
  int64_t v = nbdkit_parse_size (value);

  if (v == -1)
    nbdkit_error ("%s: invalid size '%s'", key, value);
  return v;
}

/* 4096 as "4K", 67108864 as "64M". */
static void
format_size (char *buf, size_t len, uint64_t v)
{
  if (v >= (1u << 20) && v % (1u << 20) == 0)
    snprintf (buf, len, "%" PRIu64 "M", v >> 20);
  else if (v >= 1024 && v % 1024 == 0)
    snprintf (buf, len, "%" PRIu64 "K", v >> 10);
  else
    snprintf (buf, len, "%" PRIu64, v);
}

int
glue_parse_power_of_2 (const char *key, const char *value, uint32_t lo,
                       uint32_t hi, uint32_t *out)
{
  int64_t v = glue_parse_size (key, value);
  char los[32], his[32];

  if (v == -1)
    return -1;
  if (v < lo || v > hi || !is_power_of_2 (v)) {
    format_size (los, sizeof los, lo);
    format_size (his, sizeof his, hi);
    nbdkit_error ("%s: must be a power of 2 from %s to %s", key, los, his);
    return -1;
  }
  *out = v;
  return 0;
}

int
glue_parse_locking (const char *key, const char *value,
                    enum qed_locking *locking)
{
  if (qed_parse_locking (value, locking) == -1) {
    nbdkit_error ("%s: expected on, off or auto, not '%s'", key, value);
    return -1;
  }
  return 0;
}

pthread_mutex_t glue_open_lock = PTHREAD_MUTEX_INITIALIZER;
static struct qed_image *image;         /* atomic: read without the lock */
static int lock_fd = -1;                /* the start-up locks */
static struct qed_idle_timer *idle_timer;

struct qed_image *
glue_image (void)
{
  return __atomic_load_n (&image, __ATOMIC_ACQUIRE);
}

int
glue_after_fork (int fd, unsigned idle_seconds)
{
  lock_fd = fd;
  if (idle_seconds == 0)
    return 0;
  idle_timer = qed_idle_timer_start (idle_seconds, glue_image);
  return idle_timer ? 0 : -1;
}

void
glue_release_startup_locks (void)
{
  if (lock_fd >= 0)
    close (lock_fd);
  lock_fd = -1;
}

void
glue_set_image (struct qed_image *img)
{
  __atomic_store_n (&image, img, __ATOMIC_RELEASE);
}

void
glue_note_write (void)
{
  qed_idle_timer_note_write (idle_timer);
}

struct qed_image *
glue_cleanup (void)
{
  struct qed_image *img;

  qed_idle_timer_stop (idle_timer);
  idle_timer = NULL;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&glue_open_lock);
  glue_release_startup_locks ();
  img = image;
  glue_set_image (NULL);
  return img;
}

int
glue_extents (struct qed_image *img, uint64_t count, uint64_t offset,
              bool req_one, struct nbdkit_extents *extents,
              glue_unallocated_fn *unallocated, void *opaque)
{
  uint64_t end = offset + count;

  while (offset < end) {
    struct qed_map m;
    int64_t len = -1;

    errno = 0;
    if (qed_map (img, offset, end - offset, &m) == -1)
      return -1;
    if (m.type == QED_MAP_UNALLOCATED && unallocated)
      len = unallocated (opaque, m.length, offset, req_one, extents);
    else if (nbdkit_add_extent (extents, offset, m.length,
                                m.type == QED_MAP_DATA ? 0 :
                                NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO)
             == 0)
      len = m.length;
    if (len == -1)
      return -1;
    offset += len;
    if (req_one)
      break;
  }
  return 0;
}

/* Copy-on-read stores what was read; when it cannot (a full disk), the
 * request still succeeds with the data read, so this is no error: one
 * warning the first time, every failure under -D qed.verbose=1. */
int
glue_fill (struct qed_image *img, const void *buf, uint64_t count,
           uint64_t offset, bool detect_zero, bool known_zero)
{
  static bool warned;
  int r;

  qed_clear_last_error ();
  qed_soft_errors (1);
  r = qed_fill (img, buf, count, offset, detect_zero, known_zero);
  qed_soft_errors (0);
  if (r == -1 && !__atomic_test_and_set (&warned, __ATOMIC_RELAXED))
    qed_warning ("copy-on-read: %s: what was read is not stored in the "
                 "image, and reads still come from beneath it (said "
                 "once: every failure under -D qed.verbose=1)",
                 *qed_last_error () ? qed_last_error () : "failed");
  return r;
}
