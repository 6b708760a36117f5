/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: cluster allocation and the free lists.
 *
 * New clusters are handed out at file_end, the end of the clusters in
 * use; the file itself is grown in chunks ahead of it (alloc_end), and
 * cut back before the image is marked clean.  Clusters freed by zero
 * and trim travel three lists: pending_free (unlinked in memory),
 * flushed_free (the unlinking is durable) and free_list (no request
 * that might still hold the old address runs: reusable).  A reused
 * cluster is punched again, so that every new cluster is a hole.
 *
 * Locking: every function runs with img->lock held (asserted where it
 * allocates), except qed_free_durable, qed_op_begin and qed_op_end,
 * which take it, offset_list_append (on a list the caller owns) and
 * qed_cut_tail (lock held, or no request running).
 */

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <unistd.h>
#include <linux/falloc.h>

#include "qed-internal.h"
#include "geometry.h"
#include "seam.h"
#include "util.h"

/* The file grows by at least this much at a time. */
#define ALLOC_CHUNK (8u << 20)

int
offset_list_append (struct offset_list *l, uint64_t v)
{
  if (l->len == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 64;
    uint64_t *p = realloc (l->ptr, cap * sizeof *p);
    if (p == NULL) {
      qed_error ("realloc: %m");
      return -1;
    }
    l->ptr = p;
    l->cap = cap;
  }
  l->ptr[l->len++] = v;
  return 0;
}

/* Freed clusters whose unlinking is durable become reusable (no
 * request that saw them runs).  Lock held. */
static void
recycle_free (struct qed_image *img)
{
  assert (qed_lock_is_held (&img->lock));
  for (size_t i = 0; i < img->flushed_free.len; ++i)
    offset_list_append (&img->free_list, img->flushed_free.ptr[i]);
  img->flushed_free.len = 0;
}

void
qed_free_durable (struct qed_image *img, size_t n)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  struct offset_list *pending = &img->pending_free;

  assert (n <= pending->len);
  for (size_t i = 0; i < n; ++i)
    offset_list_append (&img->flushed_free, pending->ptr[i]);
  if (n > 0)                    /* ptr may still be NULL */
    memmove (pending->ptr, pending->ptr + n,
             (pending->len - n) * sizeof *pending->ptr);
  pending->len -= n;
  if (img->active_ops == 0)
    recycle_free (img);
}

void
qed_note_leak (struct qed_image *img, const char *why)
{
  if (!img->leaking)
    qed_debug ("%s: clusters leaked (%s): NEED_CHECK stays set until a "
               "check reclaims them", img->filename, why);
  img->leaking = true;
}

/* Take up to n contiguous free clusters (exactly n if exact), punched
 * again: an in-place write that looked a cluster up before a zero or
 * trim freed it may have landed after that punch (no such request is
 * left now), and a new cluster must be a hole.  Returns how many. */
static uint64_t
take_free_run (struct qed_image *img, uint64_t n, bool exact, uint64_t *off)
{
  size_t len = img->free_list.len;
  uint64_t got = 1;

  if (len == 0)
    return 0;
  /* The list is a stack; a listed run is pushed top down (freelist.c). */
  *off = img->free_list.ptr[len - 1];
  while (got < n && got < len &&
         img->free_list.ptr[len - 1 - got] ==
         *off + qed_clusters_to_bytes (img, got))
    got++;
  if (got == 1) {
    /* Clusters freed in ascending order come off it top down. */
    while (got < n && got < len &&
           img->free_list.ptr[len - 1 - got] ==
           *off - qed_clusters_to_bytes (img, got))
      got++;
    *off -= qed_clusters_to_bytes (img, got - 1);
  }
  if (exact && got != n)
    return 0;
  if (qed_io_fallocate (img->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 *off, qed_clusters_to_bytes (img, got)) == -1) {
    /* Only this run leaks (the next check reclaims it). */
    img->free_list.len -= got;
    qed_note_leak (img, "free clusters could not be punched again");
    return 0;
  }
  img->free_list.len -= got;
  qed_verbose ("alloc: %" PRIu64 " clusters at 0x%" PRIx64 " (reused)",
               got, *off);
  return got;
}

static int alloc_at_end (struct qed_image *img, uint64_t n, uint64_t *offset);

int
qed_alloc_run (struct qed_image *img, uint64_t n, uint64_t *offset,
               uint64_t *got)
{
  assert (n > 0);
  assert (qed_lock_is_held (&img->lock));
  if (qed_mark_need_check (img) == -1)
    return -1;
  *got = take_free_run (img, n, false, offset);
  if (*got > 0)
    return 0;
  *got = n;
  return alloc_at_end (img, n, offset);
}

int
qed_alloc_clusters (struct qed_image *img, uint64_t n, uint64_t *offset)
{
  assert (n > 0);
  assert (qed_lock_is_held (&img->lock));
  if (qed_mark_need_check (img) == -1)
    return -1;
  if (take_free_run (img, n, true, offset) == n)
    return 0;
  return alloc_at_end (img, n, offset);
}

/* New clusters at the end of the file. */
static int
alloc_at_end (struct qed_image *img, uint64_t n, uint64_t *offset)
{
  uint64_t bytes = qed_clusters_to_bytes (img, n), new_end;

  /* Bytes after the last whole cluster are garbage that must not show
   * through in a new cluster (QEMU overwrites them; we cut them). */
  if (img->tail_garbage) {
    if (qed_io_truncate (img->fd, img->file_end) == -1) {
      qed_error ("%s: ftruncate: %m", img->filename);
      return -1;
    }
    img->tail_garbage = false;
  }
  if (img->file_end > INT64_MAX - bytes) {
    qed_error ("%s: the file would be too large", img->filename);
    errno = EFBIG;
    return -1;
  }
  new_end = img->file_end + bytes;
  /* Growing the file first keeps every cluster we hand out below EOF,
   * even while its data is still being written.  Grow by a chunk at a
   * time: an ftruncate per allocating write (under the lock) was the
   * largest cost of small allocating writes. */
  if (new_end > img->alloc_end) {
    uint64_t chunk = MAX ((uint64_t) ALLOC_CHUNK, (uint64_t) img->cs);
    uint64_t grow_to = new_end <= INT64_MAX - chunk
      ? ROUND_UP (new_end, chunk) : new_end;
    if (qed_io_truncate (img->fd, grow_to) == -1 &&
        (grow_to == new_end ||
         qed_io_truncate (img->fd, grow_to = new_end) == -1)) {
      qed_error ("%s: cannot grow the file to %" PRIu64 ": %m",
                 img->filename, new_end);
      return -1;
    }
    img->alloc_end = grow_to;
  }
  *offset = img->file_end;
  img->file_end = new_end;
  qed_verbose ("alloc: %" PRIu64 " cluster%s at 0x%" PRIx64 " (end of file)",
               n, n == 1 ? "" : "s", *offset);
  return 0;
}

int
qed_cut_tail (struct qed_image *img)
{
  if (img->alloc_end > img->file_end) {
    /* Durable before the caller clears NEED_CHECK: otherwise a power
     * loss can keep the cleared flag but not the cut, and the tail's
     * clusters stay leaked for good. */
    if (qed_io_truncate (img->fd, img->file_end) == -1 ||
        qed_sync (img) == -1) {
      qed_error ("%s: ftruncate: %m", img->filename);
      return -1;
    }
    img->alloc_end = img->file_end;
  }
  return 0;
}

void
qed_op_begin (struct qed_image *img)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  img->active_ops++;
}

bool
qed_op_end (struct qed_image *img)
{
  int err = errno;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);

  assert (img->active_ops > 0);
  if (--img->active_ops == 0)
    recycle_free (img);
  errno = err;
  return img->ndirty > img->max_pages / 2;
}
