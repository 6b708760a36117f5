/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the write path (write, zero, trim and copy-on-read
 * fills).
 *
 * An allocating write reserves its run of clusters, allocates new
 * clusters (always holes: freshly extended file space or punched free
 * clusters), writes head fill + data + tail fill with one pwritev, and
 * then commits the new L2 entries in memory.  Fill comes from the layer
 * beneath only when the cluster was unallocated; a zero cluster or an
 * image without a backing file needs no fill at all, because the new
 * cluster already reads as zeros.  (QEMU writes explicit zeros, and
 * copies backing data into zero clusters: docs/qemu-differences.md.)
 *
 * Whole-cluster zero and trim are metadata changes: the entry becomes a
 * zero cluster (if there is a layer beneath whose data must stay
 * hidden) or unallocated (if not), and a data cluster's space is given
 * back to the host with FALLOC_FL_PUNCH_HOLE.
 *
 * Locking: the entry points are called without img->lock.  Each step
 * takes it around lookups, reservations and commits and drops it for
 * data I/O, so each function says which it is ("Lock held" or "Lock
 * not held"); the table and allocator functions it calls assert it.
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
#include <sys/uio.h>
#include <linux/falloc.h>

#include "qed-internal.h"
#include "geometry.h"
#include "seam.h"
#include "util.h"

/* At most this many clusters are reserved and looked up at once by a
 * zero, trim or fill (bounded stack use and lock hold time). */
#define MAX_RUN 512

static bool
is_reserved (const struct qed_image *img, uint64_t c)
{
  for (const struct reservation *r = img->reservations; r; r = r->next)
    if (c >= r->first && c <= r->last)
      return true;
  return false;
}

/* Lock held (as for unreserve). */
static void
reserve (struct qed_image *img, struct reservation *r,
         uint64_t first, uint64_t last)
{
  assert (first <= last);
  r->first = first;
  r->last = last;
  r->next = img->reservations;
  img->reservations = r;
}

static void
unreserve (struct qed_image *img, struct reservation *r)
{
  struct reservation **rp = &img->reservations;

  while (*rp != r) {
    assert (*rp != NULL);
    rp = &(*rp)->next;
  }
  *rp = r->next;
  pthread_cond_broadcast (&img->cond);
}

/* unreserve, taking the lock.  Preserves errno. */
static void
release (struct qed_image *img, struct reservation *r)
{
  int err = errno;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);

  unreserve (img, r);
  errno = err;
}

/* Unreserved clusters from c on, stopping at the end of c's table, at
 * limit clusters, or at the first reserved cluster.  c itself must be
 * unreserved.  Lock held.
 */
static uint64_t
run_length (struct qed_image *img, uint64_t c, uint64_t limit)
{
  uint64_t k = 1;

  assert (!is_reserved (img, c));
  limit = MIN (limit, clusters_left_in_table (img, c));
  while (k < limit && !is_reserved (img, c + k))
    k++;
  return k;
}

static int
lookup_entry (struct qed_image *img, uint64_t c, uint64_t *e)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  return qed_get_entry (img, c, e);
}

static int
alloc_run (struct qed_image *img, uint64_t n, uint64_t *offset,
           uint64_t *got)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  return qed_alloc_run (img, n, offset, got);
}

static int punch (struct qed_image *img, uint64_t fo, uint64_t len);

/* New clusters that will not be linked (their write failed): punched,
 * they are free again (reused after the next writeback, reclaimed at
 * close); if they cannot be punched, they leak (qed_note_leak).  Lock
 * held. */
static void
give_back (struct qed_image *img, uint64_t offset, uint64_t n)
{
  int err = errno;

  if (punch (img, offset, qed_clusters_to_bytes (img, n)) != 1)
    qed_note_leak (img, "a failed write's clusters could not be punched");
  else
    for (uint64_t i = 0; i < n; ++i)
      if (offset_list_append (&img->pending_free,
                              offset + qed_clusters_to_bytes (img, i)) == -1) {
        qed_note_leak (img, "out of memory");
        break;
      }
  errno = err;
}

/* Point guest clusters [c, c+n) at the n file clusters from offset;
 * those not linked when a table update fails are given back.  Lock
 * held. */
static int
link_clusters (struct qed_image *img, uint64_t c, uint64_t n,
               uint64_t offset)
{
  for (uint64_t i = 0; i < n; ++i)
    if (qed_set_entry (img, c + i,
                       offset + qed_clusters_to_bytes (img, i)) == -1) {
      give_back (img, offset + qed_clusters_to_bytes (img, i), n - i);
      return -1;
    }
  return 0;
}

static int
read_below (struct qed_image *img, const struct qed_below *below,
            void *buf, uint64_t count, uint64_t offset)
{
  if (below->read (below->opaque, buf, count, offset) == -1) {
    if (errno == 0)
      errno = EIO;
    return -1;
  }
  return 0;
}

/* Zero bytes inside one allocated cluster, in place. */
static int
zero_in_place (struct qed_image *img, uint64_t fo, uint64_t len, bool fast)
{
  if (qed_io_fallocate (img->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                 fo, len) == 0)
    return 0;
  if (errno != EOPNOTSUPP && errno != ENOSYS) {
    qed_error ("%s: fallocate: %m", img->filename);
    return -1;
  }
  if (fast) {
    errno = ENOTSUP;
    return -1;
  }
  for (uint64_t done = 0; done < len; ) {
    uint64_t n = MIN (len - done, (uint64_t) img->cs);
    if (pwrite_full (img->fd, img->zero_buf, n, fo + done) == -1) {
      qed_error ("%s: write at 0x%" PRIx64 ": %m", img->filename, fo + done);
      return -1;
    }
    done += n;
  }
  return 0;
}

/* Give a data cluster's space back to the host.  Returns 1 if freed, 0
 * if the filesystem cannot punch holes (the caller zeroes instead). */
static int
punch (struct qed_image *img, uint64_t fo, uint64_t len)
{
  if (img->can_punch &&
      qed_io_fallocate (img->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 fo, len) == 0)
    return 1;
  if (img->can_punch && errno != EOPNOTSUPP && errno != ENOSYS) {
    qed_error ("%s: fallocate: %m", img->filename);
    return -1;
  }
  img->can_punch = false;
  return 0;
}

/* Writes go run by run.  A run is either clusters that are allocated
 * and contiguous in the file (written in place), or clusters that are
 * unallocated or zero, reserved and given new clusters in one
 * allocation (written with the backing data around them, then linked).
 */
struct write_run {
  uint64_t c, k;                /* first guest cluster, clusters */
  uint64_t len;                 /* bytes of the request in the run */
  uint64_t file_offset;         /* in place: where the bytes go;
                                   else: the new clusters */
  uint64_t first_e, last_e;     /* new clusters: the entries they
                                   replace at both ends (0 or 1) */
  struct reservation res;       /* new clusters */
};
enum { RUN_WAITED = 0, RUN_IN_PLACE, RUN_NEW_CLUSTERS };

/* The bytes from offset (in a data cluster at file offset e) that are
 * contiguous in the file.  Lock held. */
static int
find_in_place_run (struct qed_image *img, uint64_t e, uint64_t count,
                   uint64_t offset, struct write_run *w)
{
  uint64_t in = qed_offset_into_cluster (img, offset);
  uint64_t fo = e + in, done = MIN (count, img->cs - in);

  while (done < count) {
    uint64_t e2;
    if (qed_get_entry (img, qed_cluster_index (img, offset + done),
                       &e2) == -1)
      return -1;
    if (e2 != fo + done)
      break;
    done += MIN (count - done, (uint64_t) img->cs);
  }
  w->file_offset = fo;
  w->len = done;
  return 0;
}

/* The run of unallocated or zero clusters from offset (whose entry is
 * e): reserve it and allocate its new clusters.  Lock held. */
static int
find_new_cluster_run (struct qed_image *img, uint64_t e, uint64_t count,
                      uint64_t offset, struct write_run *w)
{
  uint64_t c = qed_cluster_index (img, offset);
  uint64_t last_c = qed_cluster_index (img, offset + count - 1);
  uint64_t k = run_length (img, c, last_c - c + 1), last_e = e, got;

  for (uint64_t i = 1; i < k; ++i) {
    uint64_t e2;
    if (qed_get_entry (img, c + i, &e2) == -1)
      return -1;
    if (e2 > QED_ENTRY_ZERO) {
      k = i;
      break;
    }
    last_e = e2;
  }
  reserve (img, &w->res, c, c + k - 1);
  if (qed_alloc_run (img, k, &w->file_offset, &got) == -1) {
    unreserve (img, &w->res);
    return -1;
  }
  if (got < k) {
    /* Free clusters are reused a contiguous run at a time. */
    k = got;
    w->res.last = c + k - 1;
    if (qed_get_entry (img, c + k - 1, &last_e) == -1) {
      unreserve (img, &w->res);
      return -1;
    }
  }
  w->c = c;
  w->k = k;
  w->first_e = e;
  w->last_e = last_e;
  w->len = MIN (count, qed_clusters_to_bytes (img, k)
                - qed_offset_into_cluster (img, offset));
  return 0;
}

/* Look up what lies at offset and prepare the run that starts there.
 * Returns RUN_IN_PLACE, RUN_NEW_CLUSTERS (reserved), RUN_WAITED (a
 * reservation was in the way: look again) or -1.
 */
static int
plan_run (struct qed_image *img, uint64_t count, uint64_t offset,
          struct write_run *w)
{
  uint64_t c = qed_cluster_index (img, offset), e;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);

  if (qed_get_entry (img, c, &e) == -1)
    return -1;
  if (e > QED_ENTRY_ZERO)
    return find_in_place_run (img, e, count, offset, w) == -1
      ? -1 : RUN_IN_PLACE;
  if (is_reserved (img, c)) {
    pthread_cond_wait (&img->cond, &img->lock);
    return RUN_WAITED;
  }
  return find_new_cluster_run (img, e, count, offset, w) == -1
    ? -1 : RUN_NEW_CLUSTERS;
}

/* Write the run's bytes into its new clusters with one pwritev.  The
 * new clusters read as zeros: only the backing data around the bytes,
 * in clusters that were unallocated, needs copying (head and tail
 * fill).  Lock not held.
 */
static int
write_new_clusters (struct qed_image *img, const struct qed_below *below,
                    const char *buf, uint64_t offset,
                    const struct write_run *w)
{
  uint64_t head = qed_offset_into_cluster (img, offset);
  uint64_t tail = qed_clusters_to_bytes (img, w->k) - head - w->len;
  uint64_t start = w->file_offset + head;
  CLEANUP_FREE char *hb = NULL, *tb = NULL;
  struct iovec iov[3];
  int n = 0;

  if (head > 0 && w->first_e == QED_ENTRY_UNALLOCATED && below) {
    hb = malloc (head);
    if (hb == NULL ||
        read_below (img, below, hb, head, qed_cluster_start (img, w->c)))
      return -1;
    qed_verbose ("copy from backing: %" PRIu64 " bytes at %" PRIu64
                 " (head of a partial write)", head,
                 qed_cluster_start (img, w->c));
    iov[n++] = (struct iovec) { hb, head };
    start = w->file_offset;
  }
  iov[n++] = (struct iovec) { (void *) buf, w->len };
  if (tail > 0 && w->last_e == QED_ENTRY_UNALLOCATED && below) {
    uint64_t tail_len = MIN (tail, img->h.image_size - (offset + w->len));
    if (tail_len > 0) {
      tb = malloc (tail_len);
      if (tb == NULL ||
          read_below (img, below, tb, tail_len, offset + w->len) == -1)
        return -1;
      qed_verbose ("copy from backing: %" PRIu64 " bytes at %" PRIu64
                   " (tail of a partial write)", tail_len, offset + w->len);
      iov[n++] = (struct iovec) { tb, tail_len };
    }
  }
  if (pwritev_full (img->fd, iov, n, start) == -1) {
    qed_error ("%s: write at 0x%" PRIx64 ": %m", img->filename, start);
    return -1;
  }
  return 0;
}

/* Link the run's new clusters and release it.  Lock not held. */
static int
commit_run (struct qed_image *img, struct write_run *w)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  int r = link_clusters (img, w->c, w->k, w->file_offset);

  unreserve (img, &w->res);
  return r;
}

/* The run's data could not be written: give its new clusters back
 * and release it.  Lock not held. */
static void
abandon_run (struct qed_image *img, struct write_run *w)
{
  int err = errno ? errno : EIO;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);

  give_back (img, w->file_offset, w->k);
  unreserve (img, &w->res);
  errno = err;
}

/* Write the run at offset.  Returns the bytes written, 0 if it must
 * look again, or -1.  Lock not held. */
static int64_t
write_run (struct qed_image *img, const struct qed_below *below,
           const char *buf, uint64_t count, uint64_t offset)
{
  struct write_run w;

  switch (plan_run (img, count, offset, &w)) {
  case RUN_WAITED:
    return 0;
  case RUN_IN_PLACE:
    if (pwrite_full (img->fd, buf, w.len, w.file_offset) == -1) {
      qed_error ("%s: write at 0x%" PRIx64 ": %m", img->filename,
                 w.file_offset);
      return -1;
    }
    return w.len;
  case RUN_NEW_CLUSTERS:
    if (write_new_clusters (img, below, buf, offset, &w) == -1) {
      abandon_run (img, &w);
      return -1;
    }
    if (commit_run (img, &w) == -1)
      return -1;
    return w.len;
  default:
    return -1;
  }
}

/* Write data with no zero detection.  Lock not held. */
static int
write_data (struct qed_image *img, const struct qed_below *below,
            const char *buf, uint64_t count, uint64_t offset)
{
  while (count > 0) {
    int64_t n = write_run (img, below, buf, count, offset);
    if (n == -1)
      return -1;
    buf += n;
    offset += n;
    count -= n;
  }
  return 0;
}

/* Look up whole clusters [c, c+k) for a zero or trim and reserve a
 * prefix of them (at most MAX_RUN).  Returns the clusters reserved, 0
 * after waiting for a reservation, or -1.  Lock not held.
 */
static int64_t
reserve_for_zero (struct qed_image *img, uint64_t c, uint64_t k,
                  uint64_t *entries, struct reservation *res)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);

  if (is_reserved (img, c)) {
    pthread_cond_wait (&img->cond, &img->lock);
    return 0;
  }
  k = run_length (img, c, MIN (k, (uint64_t) MAX_RUN));
  for (uint64_t i = 0; i < k; ++i)
    if (qed_get_entry (img, c + i, &entries[i]) == -1)
      return -1;
  reserve (img, res, c, c + k - 1);
  return k;
}

/* The data clusters among entries: punch them (unmap; freed[i] says
 * which were) or zero them in place.  Lock not held. */
static int
clear_data_clusters (struct qed_image *img, uint64_t c, uint64_t k,
                     const uint64_t *entries, bool *freed,
                     unsigned flags, bool trim)
{
  bool unmap = trim || (flags & QED_ZERO_MAY_UNMAP);

  for (uint64_t i = 0; i < k; ++i) {
    uint64_t len = qed_cluster_end (img, c + i)
      - qed_cluster_start (img, c + i);
    freed[i] = false;
    if (entries[i] <= QED_ENTRY_ZERO)
      continue;
    if (unmap) {
      int p = punch (img, entries[i], img->cs);
      if (p == -1)
        return -1;
      if (p == 1) {
        freed[i] = true;
        continue;
      }
    }
    if (trim)
      continue;                 /* advisory: keep the data */
    if (zero_in_place (img, entries[i], len, flags & QED_ZERO_FAST) == -1)
      return -1;
  }
  return 0;
}

/* The new entries: a freed data cluster goes to pending_free, and it
 * or an unallocated cluster becomes a zero cluster if a layer beneath
 * must stay hidden.  Lock not held. */
static int
commit_zeroed (struct qed_image *img, const struct qed_below *below,
               uint64_t c, uint64_t k, const uint64_t *entries,
               const bool *freed)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);

  for (uint64_t i = 0; i < k; ++i) {
    uint64_t e = entries[i], ne = e;
    if (e > QED_ENTRY_ZERO && freed[i])
      ne = below ? QED_ENTRY_ZERO : QED_ENTRY_UNALLOCATED;
    else if (e == QED_ENTRY_UNALLOCATED && below)
      ne = QED_ENTRY_ZERO;
    if (ne != e && qed_set_entry (img, c + i, ne) == -1)
      return -1;
    /* Unlinked (not before: a cluster still linked must never be
     * reused): free once the unlinking is durable. */
    if (e > QED_ENTRY_ZERO && freed[i] &&
        offset_list_append (&img->pending_free, e) == -1)
      qed_note_leak (img, "out of memory");
  }
  return 0;
}

/* Zero (or trim) whole clusters [c, c+k).  Processes a prefix and
 * returns the number of clusters done (0 after waiting for a
 * reservation), or -1.  Lock not held.
 */
static int64_t
zero_whole (struct qed_image *img, const struct qed_below *below,
            uint64_t c, uint64_t k, unsigned flags, bool trim)
{
  uint64_t entries[MAX_RUN];
  bool freed[MAX_RUN];
  struct reservation res;
  int64_t n = reserve_for_zero (img, c, k, entries, &res);

  if (n <= 0)
    return n;
  if (clear_data_clusters (img, c, n, entries, freed, flags, trim) == -1 ||
      commit_zeroed (img, below, c, n, entries, freed) == -1)
    n = -1;
  release (img, &res);
  return n;
}

/* Zero or trim part of one cluster. */
static int
zero_partial (struct qed_image *img, const struct qed_below *below,
              uint64_t count, uint64_t offset, unsigned flags, bool trim)
{
  uint64_t e;

  if (lookup_entry (img, qed_cluster_index (img, offset), &e) == -1)
    return -1;
  if (e > QED_ENTRY_ZERO) {
    uint64_t fo = e + qed_offset_into_cluster (img, offset);
    if (trim)                   /* reads as zeros afterwards: allowed */
      return punch (img, fo, count) == -1 ? -1 : 0;
    return zero_in_place (img, fo, count, flags & QED_ZERO_FAST);
  }
  /* Already reads as zeros, or a trim (advisory) over backing data. */
  if (e == QED_ENTRY_ZERO || !below || trim)
    return 0;
  if (flags & QED_ZERO_FAST) {
    errno = ENOTSUP;
    return -1;
  }
  /* Hide the backing data: allocate, copying the rest of the cluster. */
  return write_data (img, below, img->zero_buf, count, offset);
}

static int
zero_range (struct qed_image *img, const struct qed_below *below,
            uint64_t count, uint64_t offset, unsigned flags, bool trim)
{
  while (count > 0) {
    uint64_t c = qed_cluster_index (img, offset);
    uint64_t cend = qed_cluster_end (img, c);
    uint64_t n = MIN (count, cend - offset);

    if (qed_offset_is_cluster_aligned (img, offset) && n == cend - offset) {
      /* Whole clusters. */
      uint64_t k = 1;
      int64_t done;
      while (qed_cluster_start (img, c + k) < offset + count &&
             qed_cluster_end (img, c + k) <= offset + count)
        k++;
      done = zero_whole (img, below, c, k, flags, trim);
      if (done == -1)
        return -1;
      n = done > 0 ? qed_cluster_end (img, c + done - 1) - offset : 0;
    }
    else if (zero_partial (img, below, n, offset, flags, trim) == -1)
      return -1;
    offset += n;
    count -= n;
  }
  return 0;
}

/* Write with zero detection: whole zero clusters become zero (or
 * unallocated) clusters, the rest is written as data. */
static int
write_detect_zero (struct qed_image *img, const struct qed_below *below,
                   const char *buf, uint64_t count, uint64_t offset)
{
  uint64_t end = offset + count, seg = offset;
  uint64_t c = qed_bytes_to_clusters (img, offset);

  for (;; c++) {
    uint64_t cs_start = qed_cluster_start (img, c), cend;
    if (cs_start >= end)
      break;
    cend = qed_cluster_end (img, c);
    if (cend > end)
      break;
    if (!is_zero (buf + (cs_start - offset), cend - cs_start))
      continue;
    if (cs_start > seg &&
        write_data (img, below, buf + (seg - offset), cs_start - seg, seg))
      return -1;
    if (zero_range (img, below, cend - cs_start, cs_start,
                    QED_ZERO_MAY_UNMAP, false) == -1)
      return -1;
    seg = cend;
  }
  if (seg < end)
    return write_data (img, below, buf + (seg - offset), end - seg, seg);
  return 0;
}

/* End a request that changed the image (r: its result).  Dirty
 * table pages cannot be evicted, so when they fill half the cache,
 * write them back now: memory stays bounded by l2-cache however much
 * is written between flushes. */
static int
end_change (struct qed_image *img, int r)
{
  int err = errno;
  bool too_dirty = qed_op_end (img);

  /* After a failed fdatasync every flush fails (qed_sync), but the
   * writeback still cleaned the pages: not this request's error. */
  if (r == 0 && too_dirty && qed_flush (img) == -1 && !img->sync_error)
    return -1;
  errno = err;
  return r;
}

/* end_change, then the flush that FUA asks for. */
static int
finish_request (struct qed_image *img, int r, unsigned flags)
{
  r = end_change (img, r);
  if (r == 0 && (flags & QED_WRITE_FUA))
    r = qed_flush (img);
  return r;
}

/* Start a request that changes the image: refused on a read-only one. */
static int
begin_change (struct qed_image *img, uint64_t count, uint64_t offset)
{
  assert (offset <= img->h.image_size && count <= img->h.image_size - offset);
  if (img->readonly) {
    errno = EROFS;
    return -1;
  }
  qed_op_begin (img);
  return 0;
}

int
qed_write (struct qed_image *img, const struct qed_below *below,
           const void *buf, uint64_t count, uint64_t offset, unsigned flags)
{
  int r;

  if (begin_change (img, count, offset) == -1)
    return -1;
  if (flags & QED_WRITE_DETECT_ZERO)
    r = write_detect_zero (img, below, buf, count, offset);
  else
    r = write_data (img, below, buf, count, offset);
  return finish_request (img, r, flags);
}

static int
zero_request (struct qed_image *img, const struct qed_below *below,
              uint64_t count, uint64_t offset, unsigned flags, bool trim)
{
  int r;

  if (begin_change (img, count, offset) == -1)
    return -1;
  r = zero_range (img, below, count, offset, flags, trim);
  return finish_request (img, r, flags);
}

int
qed_zero (struct qed_image *img, const struct qed_below *below,
          uint64_t count, uint64_t offset, unsigned flags)
{
  return zero_request (img, below, count, offset, flags, false);
}

int
qed_trim (struct qed_image *img, const struct qed_below *below,
          uint64_t count, uint64_t offset, unsigned flags)
{
  return zero_request (img, below, count, offset, flags, true);
}

/* Reserve the run of still unallocated clusters from c (at most limit)
 * for a fill.  Returns its length, or 0 if c is reserved, no longer
 * unallocated, or cannot be looked up: a cluster being changed, or
 * already changed, keeps its new contents (the fill's data would be
 * stale).  Lock not held.
 */
static uint64_t
reserve_for_fill (struct qed_image *img, uint64_t c, uint64_t limit,
                  struct reservation *res)
{
  uint64_t e, k, i;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);

  if (is_reserved (img, c) || qed_get_entry (img, c, &e) == -1 ||
      e != QED_ENTRY_UNALLOCATED)
    return 0;
  k = run_length (img, c, MIN (limit, (uint64_t) MAX_RUN));
  for (i = 1; i < k; ++i)
    if (qed_get_entry (img, c + i, &e) == -1 || e != QED_ENTRY_UNALLOCATED)
      break;
  reserve (img, res, c, c + i - 1);
  return i;
}

/* Allocate, write and link n data clusters from guest cluster c of a
 * fill whose buffer base holds [offset, offset+count).  Lock not held. */
static int
fill_data (struct qed_image *img, const char *base, uint64_t count,
           uint64_t offset, uint64_t c, uint64_t n)
{
  while (n > 0) {
    uint64_t s = qed_cluster_start (img, c), newoff, got, len;
    int r;

    /* Free clusters are reused a contiguous run at a time. */
    if (alloc_run (img, n, &newoff, &got) == -1)
      return -1;
    len = MIN (qed_cluster_start (img, c + got), offset + count) - s;
    if (pwrite_full (img->fd, base + (s - offset), len, newoff) == -1) {
      qed_error ("%s: write at 0x%" PRIx64 ": %m", img->filename, newoff);
      pthread_mutex_lock (&img->lock);
      give_back (img, newoff, got);
      pthread_mutex_unlock (&img->lock);
      return -1;
    }
    pthread_mutex_lock (&img->lock);
    r = link_clusters (img, c, got, newoff);
    pthread_mutex_unlock (&img->lock);
    if (r == -1)
      return -1;
    c += got;
    n -= got;
  }
  return 0;
}

/* Fill the reserved run [c, c+k): each run of data clusters gets new
 * clusters, zero clusters become zero entries; then release it. */
static int
fill_run (struct qed_image *img, struct reservation *res,
          const char *base, uint64_t count, uint64_t offset,
          uint64_t c, uint64_t k, bool detect_zero, bool known_zero)
{
  bool zero[MAX_RUN];
  uint64_t i, j;
  int r = 0;

  for (i = 0; i < k; ++i) {
    uint64_t s = qed_cluster_start (img, c + i);
    uint64_t send = MIN (qed_cluster_end (img, c + i), offset + count);
    zero[i] = known_zero ||
      (detect_zero && is_zero (base + (s - offset), send - s));
  }
  for (i = 0; i < k && r == 0; i = j) {
    for (j = i + 1; j < k && zero[j] == zero[i]; ++j)
      ;
    if (!zero[i])
      r = fill_data (img, base, count, offset, c + i, j - i);
  }
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  for (i = 0; i < k && r == 0; ++i)
    if (zero[i])
      r = qed_set_entry (img, c + i, QED_ENTRY_ZERO);
  unreserve (img, res);
  return r;
}

int
qed_fill (struct qed_image *img, const void *buf, uint64_t count,
          uint64_t offset, bool detect_zero, bool known_zero)
{
  uint64_t c = qed_cluster_index (img, offset);
  uint64_t end_c = qed_bytes_to_clusters (img, offset + count);
  int r = 0;

  assert (qed_offset_is_cluster_aligned (img, offset));
  assert (count <= img->h.image_size - offset);
  assert (buf != NULL || known_zero);
  if (img->readonly)
    return 0;
  qed_op_begin (img);
  while (c < end_c && r == 0) {
    struct reservation res;
    uint64_t k = reserve_for_fill (img, c, end_c - c, &res);

    if (k == 0) {
      qed_verbose ("copy-on-read: skip cluster %" PRIu64
                   " (being written or already in the image)", c);
      c++;
      continue;
    }
    qed_verbose ("copy-on-read: fill clusters %" PRIu64 "-%" PRIu64 "%s",
                 c, c + k - 1, known_zero ? " (zero)" : "");
    r = fill_run (img, &res, buf, count, offset, c, k, detect_zero,
                  known_zero);
    c += k;
  }
  return end_change (img, r);
}
