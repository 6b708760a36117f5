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

static void
reserve (struct qed_image *img, struct reservation *r,
         uint64_t first, uint64_t last)
{
  r->first = first;
  r->last = last;
  r->next = img->reservations;
  img->reservations = r;
}

static void
unreserve (struct qed_image *img, struct reservation *r)
{
  struct reservation **rp = &img->reservations;

  while (*rp != r)
    rp = &(*rp)->next;
  *rp = r->next;
  pthread_cond_broadcast (&img->cond);
}

/* Unreserved clusters from c on, stopping at the end of c's table, at
 * limit clusters, or at the first cluster that stop() rejects.  c itself
 * must be unreserved.
 */
static uint64_t
run_length (struct qed_image *img, uint64_t c, uint64_t limit)
{
  uint64_t k = 1;

  limit = MIN (limit, clusters_left_in_table (img, c));
  while (k < limit && !is_reserved (img, c + k))
    k++;
  return k;
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

static int punch (struct qed_image *img, uint64_t fo, uint64_t len);

/* Write data with no zero detection.  Lock not held. */
static int
write_data (struct qed_image *img, const struct qed_below *below,
            const char *buf, uint64_t count, uint64_t offset)
{
  while (count > 0) {
    uint64_t c = qed_cluster_index (img, offset);
    uint64_t in = qed_offset_into_cluster (img, offset);
    uint64_t e, last_e, k, len, head, tail, last_c, newoff, start;
    struct reservation res;
    CLEANUP_FREE char *hb = NULL, *tb = NULL;
    struct iovec iov[3];
    int n = 0;

    pthread_mutex_lock (&img->lock);
    if (qed_get_entry (img, c, &e) == -1)
      goto err_unlock;

    if (e > QED_ENTRY_ZERO) {
      /* In place, over as many contiguous clusters as possible. */
      uint64_t fo = e + in, done = MIN (count, img->cs - in);
      while (done < count) {
        uint64_t e2;
        if (qed_get_entry (img, qed_cluster_index (img, offset + done),
                           &e2) == -1)
          goto err_unlock;
        if (e2 != fo + done)
          break;
        done += MIN (count - done, (uint64_t) img->cs);
      }
      pthread_mutex_unlock (&img->lock);
      if (pwrite_full (img->fd, buf, done, fo) == -1) {
        qed_error ("%s: write at 0x%" PRIx64 ": %m", img->filename, fo);
        return -1;
      }
      buf += done;
      offset += done;
      count -= done;
      continue;
    }

    if (is_reserved (img, c)) {
      pthread_cond_wait (&img->cond, &img->lock);
      pthread_mutex_unlock (&img->lock);
      continue;
    }

    /* An allocating run: clusters that are unallocated or zero. */
    last_c = qed_cluster_index (img, offset + count - 1);
    k = run_length (img, c, last_c - c + 1);
    last_e = e;
    for (uint64_t i = 1; i < k; ++i) {
      uint64_t e2;
      if (qed_get_entry (img, c + i, &e2) == -1)
        goto err_unlock;
      if (e2 > QED_ENTRY_ZERO) {
        k = i;
        break;
      }
      last_e = e2;
    }
    len = MIN (count, qed_clusters_to_bytes (img, k) - in);
    head = in;
    tail = qed_clusters_to_bytes (img, k) - in - len;
    reserve (img, &res, c, c + k - 1);
    if (qed_alloc_clusters (img, k, &newoff) == -1) {
      unreserve (img, &res);
      goto err_unlock;
    }
    pthread_mutex_unlock (&img->lock);

    /* The new clusters read as zeros: only backing data needs copying. */
    start = newoff + head;
    if (head > 0 && e == QED_ENTRY_UNALLOCATED && below) {
      hb = malloc (head);
      if (hb == NULL ||
          read_below (img, below, hb, head, qed_cluster_start (img, c)))
        goto err_unreserve;
      iov[n++] = (struct iovec) { hb, head };
      start = newoff;
    }
    iov[n++] = (struct iovec) { (void *) buf, len };
    if (tail > 0 && last_e == QED_ENTRY_UNALLOCATED && below) {
      uint64_t tail_len = MIN (tail, img->h.image_size - (offset + len));
      if (tail_len > 0) {
        tb = malloc (tail_len);
        if (tb == NULL ||
            read_below (img, below, tb, tail_len, offset + len) == -1)
          goto err_unreserve;
        iov[n++] = (struct iovec) { tb, tail_len };
      }
    }
    if (pwritev_full (img->fd, iov, n, start) == -1) {
      qed_error ("%s: write at 0x%" PRIx64 ": %m", img->filename, start);
      goto err_unreserve;
    }

    pthread_mutex_lock (&img->lock);
    for (uint64_t i = 0; i < k; ++i) {
      if (qed_set_entry (img, c + i,
                         newoff + qed_clusters_to_bytes (img, i)) == -1) {
        unreserve (img, &res);
        goto err_unlock;
      }
    }
    unreserve (img, &res);
    pthread_mutex_unlock (&img->lock);
    buf += len;
    offset += len;
    count -= len;
    continue;

  err_unreserve:
    {
      int err = errno ? errno : EIO;
      /* Give the unused clusters back (they are reclaimed at close). */
      if (punch (img, newoff, qed_clusters_to_bytes (img, k)) == 1) {
        pthread_mutex_lock (&img->lock);
        for (uint64_t i = 0; i < k; ++i)
          offset_list_append (&img->pending_free,
                              newoff + qed_clusters_to_bytes (img, i));
        pthread_mutex_unlock (&img->lock);
      }
      pthread_mutex_lock (&img->lock);
      unreserve (img, &res);
      pthread_mutex_unlock (&img->lock);
      errno = err;
      return -1;
    }
  err_unlock:
    pthread_mutex_unlock (&img->lock);
    return -1;
  }
  return 0;
}

/* Zero bytes inside one allocated cluster, in place. */
static int
zero_in_place (struct qed_image *img, uint64_t fo, uint64_t len, bool fast)
{
  if (fallocate (img->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
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
      fallocate (img->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 fo, len) == 0)
    return 1;
  if (img->can_punch && errno != EOPNOTSUPP && errno != ENOSYS) {
    qed_error ("%s: fallocate: %m", img->filename);
    return -1;
  }
  img->can_punch = false;
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
  bool unmap = trim || (flags & QED_ZERO_MAY_UNMAP);
  bool fast = flags & QED_ZERO_FAST;
  int64_t r = -1;

  pthread_mutex_lock (&img->lock);
  if (is_reserved (img, c)) {
    pthread_cond_wait (&img->cond, &img->lock);
    pthread_mutex_unlock (&img->lock);
    return 0;
  }
  k = run_length (img, c, MIN (k, (uint64_t) MAX_RUN));
  for (uint64_t i = 0; i < k; ++i) {
    if (qed_get_entry (img, c + i, &entries[i]) == -1) {
      pthread_mutex_unlock (&img->lock);
      return -1;
    }
  }
  reserve (img, &res, c, c + k - 1);
  pthread_mutex_unlock (&img->lock);

  /* Data clusters: punch (unmap) or zero in place, outside the lock. */
  for (uint64_t i = 0; i < k; ++i) {
    uint64_t len = qed_cluster_end (img, c + i)
      - qed_cluster_start (img, c + i);
    freed[i] = false;
    if (entries[i] <= QED_ENTRY_ZERO)
      continue;
    if (unmap) {
      int p = punch (img, entries[i], img->cs);
      if (p == -1)
        goto out;
      if (p == 1) {
        freed[i] = true;
        continue;
      }
    }
    if (trim)
      continue;                 /* advisory: keep the data */
    if (zero_in_place (img, entries[i], len, fast) == -1)
      goto out;
  }

  pthread_mutex_lock (&img->lock);
  for (uint64_t i = 0; i < k; ++i) {
    uint64_t e = entries[i], ne = e;
    if (e > QED_ENTRY_ZERO && freed[i]) {
      ne = below ? QED_ENTRY_ZERO : QED_ENTRY_UNALLOCATED;
      if (offset_list_append (&img->pending_free, e) == -1) {
        pthread_mutex_unlock (&img->lock);
        goto out;
      }
    }
    else if (e == QED_ENTRY_UNALLOCATED && below)
      ne = QED_ENTRY_ZERO;
    if (ne != e && qed_set_entry (img, c + i, ne) == -1) {
      pthread_mutex_unlock (&img->lock);
      goto out;
    }
  }
  pthread_mutex_unlock (&img->lock);
  r = k;

 out:
  {
    int err = errno;
    pthread_mutex_lock (&img->lock);
    unreserve (img, &res);
    pthread_mutex_unlock (&img->lock);
    errno = err;
  }
  return r;
}

/* Zero or trim part of one cluster. */
static int
zero_partial (struct qed_image *img, const struct qed_below *below,
              uint64_t count, uint64_t offset, unsigned flags, bool trim)
{
  uint64_t c = qed_cluster_index (img, offset), e;

  pthread_mutex_lock (&img->lock);
  if (qed_get_entry (img, c, &e) == -1) {
    pthread_mutex_unlock (&img->lock);
    return -1;
  }
  pthread_mutex_unlock (&img->lock);

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

static void
op_begin (struct qed_image *img)
{
  pthread_mutex_lock (&img->lock);
  qed_op_begin (img);
  pthread_mutex_unlock (&img->lock);
}

/* End a request.  Dirty table pages cannot be evicted, so when they
 * fill half the cache, write them back now: memory stays bounded by
 * l2-cache however much is written between flushes. */
static int
op_end (struct qed_image *img, int r)
{
  int err = errno;
  bool too_dirty;

  pthread_mutex_lock (&img->lock);
  qed_op_end (img);
  too_dirty = img->ndirty > img->max_pages / 2;
  pthread_mutex_unlock (&img->lock);
  if (r == 0 && too_dirty)
    return qed_flush (img);
  errno = err;
  return r;
}

int
qed_write (struct qed_image *img, const struct qed_below *below,
           const void *buf, uint64_t count, uint64_t offset, unsigned flags)
{
  int r;

  assert (offset <= img->h.image_size && count <= img->h.image_size - offset);
  if (img->readonly) {
    errno = EROFS;
    return -1;
  }
  op_begin (img);
  if (flags & QED_WRITE_DETECT_ZERO)
    r = write_detect_zero (img, below, buf, count, offset);
  else
    r = write_data (img, below, buf, count, offset);
  r = op_end (img, r);
  if (r == 0 && (flags & QED_WRITE_FUA))
    r = qed_flush (img);
  return r;
}

static int
zero_request (struct qed_image *img, const struct qed_below *below,
              uint64_t count, uint64_t offset, unsigned flags, bool trim)
{
  int r;

  assert (offset <= img->h.image_size && count <= img->h.image_size - offset);
  if (img->readonly) {
    errno = EROFS;
    return -1;
  }
  op_begin (img);
  r = zero_range (img, below, count, offset, flags, trim);
  r = op_end (img, r);
  if (r == 0 && (flags & QED_WRITE_FUA))
    r = qed_flush (img);
  return r;
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

int
qed_fill (struct qed_image *img, const void *buf, uint64_t count,
          uint64_t offset, bool detect_zero, bool known_zero)
{
  uint64_t c = qed_cluster_index (img, offset);
  uint64_t end_c = qed_bytes_to_clusters (img, offset + count);
  const char *base = buf;
  int r = 0;

  assert (qed_offset_is_cluster_aligned (img, offset));
  assert (count <= img->h.image_size - offset);
  assert (buf != NULL || known_zero);
  if (img->readonly)
    return 0;
  op_begin (img);
  while (c < end_c && r == 0) {
    uint64_t e, k, i;
    bool zero[MAX_RUN];
    struct reservation res;

    pthread_mutex_lock (&img->lock);
    /* A cluster being changed, or already changed, keeps its new
     * contents: the fill's data would be stale. */
    if (is_reserved (img, c) || qed_get_entry (img, c, &e) == -1 ||
        e != QED_ENTRY_UNALLOCATED) {
      pthread_mutex_unlock (&img->lock);
      c++;
      continue;
    }
    k = run_length (img, c, MIN (end_c - c, (uint64_t) MAX_RUN));
    for (i = 1; i < k; ++i) {
      if (qed_get_entry (img, c + i, &e) == -1 || e != QED_ENTRY_UNALLOCATED)
        break;
    }
    k = i;
    reserve (img, &res, c, c + k - 1);
    pthread_mutex_unlock (&img->lock);

    for (i = 0; i < k; ++i) {
      uint64_t s = qed_cluster_start (img, c + i);
      uint64_t send = MIN (qed_cluster_end (img, c + i), offset + count);
      zero[i] = known_zero ||
        (detect_zero && is_zero (base + (s - offset), send - s));
    }

    /* Allocate and write each run of data clusters, then commit. */
    for (i = 0; i < k && r == 0; ) {
      uint64_t j = i, newoff, s, len;
      if (zero[i]) {
        i++;
        continue;
      }
      while (j < k && !zero[j])
        j++;
      pthread_mutex_lock (&img->lock);
      r = qed_alloc_clusters (img, j - i, &newoff);
      pthread_mutex_unlock (&img->lock);
      if (r == -1)
        break;
      s = qed_cluster_start (img, c + i);
      len = MIN (qed_cluster_start (img, c + j), offset + count) - s;
      if (pwrite_full (img->fd, base + (s - offset), len, newoff) == -1) {
        qed_error ("%s: write at 0x%" PRIx64 ": %m", img->filename, newoff);
        r = -1;
        break;
      }
      pthread_mutex_lock (&img->lock);
      for (uint64_t m = i; m < j && r == 0; ++m)
        r = qed_set_entry (img, c + m,
                          newoff + qed_clusters_to_bytes (img, m - i));
      pthread_mutex_unlock (&img->lock);
      i = j;
    }
    pthread_mutex_lock (&img->lock);
    for (i = 0; i < k && r == 0; ++i)
      if (zero[i])
        r = qed_set_entry (img, c + i, QED_ENTRY_ZERO);
    unreserve (img, &res);
    pthread_mutex_unlock (&img->lock);
    c += k;
  }
  return op_end (img, r);
}
