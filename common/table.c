/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: L1 and L2 tables.
 *
 * The L1 is read at open and stays resident.  L2 tables are cached in
 * 4K pages: a hash keyed by the page's file offset finds a page, and an
 * LRU list picks the victim when the cache is full.  Dirty pages are
 * never evicted; they leave the dirty list only through writeback,
 * which follows the ordering described in qed-internal.h.  qed_flush
 * is writeback plus the free lists' step that it makes safe.
 *
 * Locking: the cache and entry functions run with img->lock held
 * (asserted in qed_get_entry, qed_set_entry and qed_table_absent);
 * writeback runs with flush_lock held and img->lock not held, taking
 * it for each step that touches the cache; qed_flush takes flush_lock.
 * Init, free, qed_cache_drop and qed_scan_unreachable run with no
 * request running.  Every acquisition asserts that the thread does not
 * hold the lock already (error-checking mutexes, util.h).
 */

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <endian.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mman.h>

#include "qed-internal.h"
#include "geometry.h"
#include "seam.h"
#include "util.h"

static void
le_to_host (uint64_t *e, size_t n)
{
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
  for (size_t i = 0; i < n; ++i)
    e[i] = le64toh (e[i]);
#endif
}

/* Count (and, if clear, zero on disk) the nonzero 8-byte entries in
 * [from, to) of the file: table entries that the image size cannot
 * reach; *in_file counts those that name a cluster inside the file.
 * Holes are skipped (SEEK_DATA) and the file is read 1 MiB at a time,
 * so a 1 GiB sparse table costs neither memory nor time, and clearing
 * writes only the entries that are set (no file growth). */
int
qed_scan_unreachable (struct qed_image *img, uint64_t from, uint64_t to,
                      bool clear, uint64_t *count, uint64_t *in_file)
{
  const uint64_t chunk = 1u << 20;
  CLEANUP_FREE uint64_t *buf = malloc (MIN (chunk, to - from + 8));
  static const uint64_t zero = 0;

  *count = *in_file = 0;
  if (buf == NULL) {
    qed_error ("malloc: %m");
    return -1;
  }
  while (from < to) {
    off_t d = qed_io_seek (img->fd, from, SEEK_DATA);
    uint64_t len;
    if (d == -1 && errno == ENXIO)
      break;                    /* only holes up to EOF */
    if (d != -1 && (uint64_t) d > from)
      from = ROUND_DOWN ((uint64_t) d, 8);
    if (from >= to)
      break;
    len = MIN (chunk, to - from);
    if (pread_zeros_past_eof (img->fd, buf, len, from) == -1) {
      qed_error ("%s: cannot read table entries at 0x%" PRIx64 ": %m",
                 img->filename, from);
      return -1;
    }
    for (uint64_t i = 0; i < len / 8; ++i) {
      if (buf[i] == 0)
        continue;
      (*count)++;
      if (valid_cluster_offset (img, le64toh (buf[i]), img->cs))
        (*in_file)++;
      if (clear && pwrite_full (img->fd, &zero, 8, from + i * 8) == -1) {
        qed_error ("%s: cannot clear a table entry at 0x%" PRIx64 ": %m",
                   img->filename, from + i * 8);
        return -1;
      }
    }
    from += len;
  }
  return 0;
}

/* Keep in memory only the L1 entries that guest offsets reach.  The
 * others must be zero (as QEMU and we always leave them); a hostile
 * image's are ignored, never loaded, checked or followed (a writable
 * open clears them: image.c). */
static int
load_l1 (struct qed_image *img)
{
  uint64_t need = img->nr_clusters
    ? qed_l1_index (img, img->nr_clusters - 1) + 1 : 1;
  uint64_t n = MIN (ROUND_UP (need, (uint64_t) L2_PAGE_ENTRIES),
                    img->table_entries);

  img->l1_reach = need;
  img->l1_entries = n;
  img->l1 = malloc (n * 8);
  img->l1_dirty = calloc (qed_l1_pages (img), sizeof (bool));
  if (img->l1 == NULL || img->l1_dirty == NULL) {
    qed_error ("%s: cannot allocate the L1 table: %m", img->filename);
    return -1;
  }
  if (pread_full (img->fd, img->l1, n * 8, img->l1_start) == -1) {
    qed_error ("%s: cannot read the L1 table: %m", img->filename);
    return -1;
  }
  le_to_host (img->l1, n);
  img->l1_unreachable = img->l1_unreachable_in_file = 0;
  for (uint64_t i = need; i < n; ++i) {
    if (img->l1[i] != 0)
      img->l1_unreachable++;
    if (valid_cluster_offset (img, img->l1[i], img->cs))
      img->l1_unreachable_in_file++;
    img->l1[i] = 0;
  }
  if (n < img->table_entries) {
    uint64_t far, far_in_file;
    if (qed_scan_unreachable (img, img->l1_start + n * 8, img->l1_end, false,
                              &far, &far_in_file) == -1)
      return -1;
    img->l1_unreachable += far;
    img->l1_unreachable_in_file += far_in_file;
  }
  return 0;
}

int
qed_tables_init (struct qed_image *img, uint64_t cache_bytes)
{
  size_t hash_size;

  if (load_l1 (img) == -1)
    return -1;

  if (img->cache_budget)
    cache_bytes = img->cache_budget->max_bytes;
  if (cache_bytes == 0)
    cache_bytes = DEFAULT_L2_CACHE;
  if (cache_bytes < MIN_L2_CACHE)
    cache_bytes = MIN_L2_CACHE;
  img->max_pages = cache_bytes / L2_PAGE_BYTES;
  for (hash_size = 64; hash_size < img->max_pages * 2; hash_size *= 2)
    ;
  img->hash = calloc (hash_size, sizeof *img->hash);
  if (img->hash == NULL) {
    qed_error ("calloc: %m");
    return -1;
  }
  img->hash_mask = hash_size - 1;
  img->lru.next = img->lru.prev = &img->lru;
  return 0;
}

static size_t
hash_of (const struct qed_image *img, uint64_t offset)
{
  return ((offset >> 12) * UINT64_C (0x9E3779B97F4A7C15)) >> 20
    & img->hash_mask;
}

static void
lru_unlink (struct l2_page *p)
{
  p->prev->next = p->next;
  p->next->prev = p->prev;
}

static void
lru_push_front (struct qed_image *img, struct l2_page *p)
{
  p->next = img->lru.next;
  p->prev = &img->lru;
  img->lru.next->prev = p;
  img->lru.next = p;
}

static void
page_free (struct qed_image *img, struct l2_page *p)
{
  struct l2_page **pp = &img->hash[hash_of (img, p->offset)];

  while (*pp != p)
    pp = &(*pp)->hnext;
  *pp = p->hnext;
  lru_unlink (p);
  free (p->entries);
  free (p);
  img->npages--;
  if (img->cache_budget)
    __atomic_sub_fetch (&img->cache_budget->pages, 1, __ATOMIC_RELAXED);
}

/* Must this image give back a page before it loads one?  Its own
 * bound, or the budget it shares with other images (then it keeps at
 * least MIN_L2_CACHE of its own, so that it can always make progress:
 * the pages of images that are idle are not reachable from here). */
static bool
cache_full (const struct qed_image *img)
{
  const struct qed_cache_budget *b = img->cache_budget;

  if (img->npages >= img->max_pages)
    return true;
  return b && img->npages >= MIN_L2_CACHE / L2_PAGE_BYTES &&
    __atomic_load_n (&b->pages, __ATOMIC_RELAXED) >=
    b->max_bytes / L2_PAGE_BYTES;
}

/* Drop every clean page (after check or compaction wrote tables
 * behind the cache's back).  Lock held or single-threaded.
 */
void
qed_cache_drop (struct qed_image *img)
{
  struct l2_page *p, *prev;

  for (p = img->lru.prev; p != &img->lru; p = prev) {
    prev = p->prev;
    if (!p->dirty)
      page_free (img, p);
  }
}

void
qed_tables_free (struct qed_image *img)
{
  struct l2_page *p, *next;

  if (img->hash) {
    for (p = img->lru.next; p != &img->lru; p = next) {
      next = p->next;
      free (p->entries);
      free (p);
    }
    if (img->cache_budget)
      __atomic_sub_fetch (&img->cache_budget->pages, img->npages,
                          __ATOMIC_RELAXED);
  }
  free (img->hash);
  free (img->l1);
  free (img->l1_dirty);
}

/* Find or load the cache page at file offset `offset`.  With `fresh`
 * the page belongs to a table just allocated (a hole): don't read it.
 * Lock held.
 */
static struct l2_page *
get_page (struct qed_image *img, uint64_t offset, bool fresh)
{
  size_t h = hash_of (img, offset);
  struct l2_page *p;

  for (p = img->hash[h]; p; p = p->hnext) {
    if (p->offset == offset) {
      /* CLOCK-style: a hit only sets a bit (no list surgery on the hot
       * path); the eviction scan gives referenced pages a second chance. */
      img->hits++;
      p->referenced = true;
      return p;
    }
  }
  img->misses++;
  qed_verbose ("L2 cache miss: page at 0x%" PRIx64 "%s", offset,
               fresh ? " (new table)" : "");

  /* Evict clean pages from the cold end while the cache is full. */
  while (cache_full (img)) {
    struct l2_page *victim = img->lru.prev, *prev;
    size_t scanned = 0;
    while (victim != &img->lru && scanned++ < 2 * img->npages) {
      prev = victim->prev;
      if (victim->referenced) {
        victim->referenced = false;
        lru_unlink (victim);
        lru_push_front (img, victim);
      }
      else if (!victim->dirty && !victim->pinned)
        break;
      victim = prev;
    }
    if (victim == &img->lru || victim->dirty || victim->pinned ||
        victim->referenced)
      break;                    /* all dirty: grow until writeback */
    page_free (img, victim);
  }

  p = calloc (1, sizeof *p);
  if (p == NULL || (p->entries = malloc (L2_PAGE_BYTES)) == NULL) {
    free (p);
    qed_error ("malloc: %m");
    return NULL;
  }
  p->offset = offset;
  if (fresh)
    memset (p->entries, 0, L2_PAGE_BYTES);
  else {
    if (pread_full (img->fd, p->entries, L2_PAGE_BYTES, offset) == -1) {
      int e = errno;
      qed_error ("%s: cannot read L2 table at 0x%" PRIx64 ": %m",
                 img->filename, offset);
      free (p->entries);
      free (p);
      errno = e;
      return NULL;
    }
    le_to_host (p->entries, L2_PAGE_ENTRIES);
  }
  p->hnext = img->hash[h];
  img->hash[h] = p;
  lru_push_front (img, p);
  img->npages++;
  if (img->cache_budget)
    __atomic_add_fetch (&img->cache_budget->pages, 1, __ATOMIC_RELAXED);
  return p;
}

bool
qed_table_absent (struct qed_image *img, uint64_t cluster)
{
  assert (qed_lock_is_held (&img->lock));
  return img->l1[qed_l1_index (img, cluster)] == 0;
}

/* The validated L2 table offset for a cluster, or 0 if absent. */
static int
get_table (struct qed_image *img, uint64_t cluster, uint64_t *table)
{
  uint64_t l1i = qed_l1_index (img, cluster);
  uint64_t t = img->l1[l1i];

  if (t != 0 && !valid_cluster_offset (img, t, img->table_bytes)) {
    qed_error ("%s: invalid L1 entry %" PRIu64 " (0x%" PRIx64 ") for guest "
               "offset 0x%" PRIx64 ": not an aligned table inside the file",
               img->filename, l1i, t, qed_cluster_start (img, cluster));
    errno = EIO;
    return -1;
  }
  *table = t;
  return 0;
}

int
qed_get_entry (struct qed_image *img, uint64_t cluster, uint64_t *entry)
{
  uint64_t t, idx, e;
  struct l2_page *p;

  assert (qed_lock_is_held (&img->lock));
  assert (qed_l1_index (img, cluster) < img->l1_entries);
  if (get_table (img, cluster, &t) == -1)
    return -1;
  if (t == 0) {
    *entry = QED_ENTRY_UNALLOCATED;
    return 0;
  }
  idx = qed_l2_index (img, cluster);
  p = get_page (img, t + (idx / L2_PAGE_ENTRIES) * L2_PAGE_BYTES, false);
  if (p == NULL) {
    errno = EIO;
    return -1;
  }
  e = p->entries[idx % L2_PAGE_ENTRIES];
  if (e > QED_ENTRY_ZERO && !valid_cluster_offset (img, e, img->cs)) {
    qed_error ("%s: invalid L2 entry 0x%" PRIx64 " for guest offset 0x%"
               PRIx64 ": %s", img->filename, e,
               qed_cluster_start (img, cluster),
               !qed_offset_is_cluster_aligned (img, e)
               ? "reserved low bits are set"
               : e < img->header_end ? "points into the header"
               : (e < img->l1_end && e + img->cs > img->l1_start)
               ? "points into the L1 table" : "beyond the end of the file");
    errno = EIO;
    return -1;
  }
  *entry = e;
  return 0;
}

/* Lock held. */
static void
mark_dirty (struct qed_image *img, struct l2_page *p)
{
  if (!p->dirty) {
    p->dirty = true;
    p->dnext = img->dirty_list;
    img->dirty_list = p;
    img->ndirty++;
  }
}

/* A table page that is still a hole (all its entries zero: a new
 * table, or a page never written) needs a block of its own when it is
 * written back.  Take it now, so that on a full file system the write
 * that needs it fails with ENOSPC, and not the writeback after the
 * write was acknowledged.  Lock held. */
static int
reserve_page (struct qed_image *img, struct l2_page *p, bool fresh)
{
  bool hole = fresh;

  if (p->backed)
    return 0;
  if (!hole) {
    hole = true;
    for (size_t i = 0; i < L2_PAGE_ENTRIES && hole; ++i)
      hole = p->entries[i] == 0;
  }
  if (hole && qed_io_fallocate (img->fd, FALLOC_FL_KEEP_SIZE, p->offset,
                         L2_PAGE_BYTES) == -1 &&
      errno != EOPNOTSUPP && errno != ENOSYS) {
    qed_error ("%s: cannot reserve space for a table at 0x%" PRIx64 ": %m",
               img->filename, p->offset);
    return -1;
  }
  p->backed = true;
  return 0;
}

int
qed_set_entry (struct qed_image *img, uint64_t cluster, uint64_t entry)
{
  uint64_t l1i = qed_l1_index (img, cluster), t, idx;
  struct l2_page *p;
  bool fresh = false;

  assert (qed_lock_is_held (&img->lock));
  assert (l1i < img->l1_entries);
  if (qed_mark_need_check (img) == -1 || get_table (img, cluster, &t) == -1)
    return -1;
  if (t == 0) {
    /* A clearing entry in an absent table changes nothing. */
    if (entry == QED_ENTRY_UNALLOCATED)
      return 0;
    if (qed_alloc_clusters (img, img->h.table_size, &t) == -1)
      return -1;
    img->l1[l1i] = t;
    img->l1_dirty[(l1i * 8) / L2_PAGE_BYTES] = true;
    fresh = true;
  }
  idx = qed_l2_index (img, cluster);
  p = get_page (img, t + (idx / L2_PAGE_ENTRIES) * L2_PAGE_BYTES, fresh);
  if (p == NULL) {
    errno = EIO;
    return -1;
  }
  if (reserve_page (img, p, fresh) == -1)
    return -1;
  p->entries[idx % L2_PAGE_ENTRIES] = entry;
  mark_dirty (img, p);
  return 0;
}

/* A copy of one dirty page taken under the lock. */
struct page_copy {
  uint64_t offset;
  struct l2_page *page;         /* pinned until written; NULL for L1 */
  uint64_t data[L2_PAGE_ENTRIES];
};

/* Writeback.  flush_lock held, lock not held.
 *
 * 1. Under the lock, copy every dirty page (L2 and L1) and mark them
 *    clean.  Only committed entries are in the copies, and a commit
 *    happens after its data write completed.
 * 2. fdatasync: all data those entries point to is now durable (and so
 *    is the file length covering new clusters).
 * 3. Write the copies, then fdatasync again.
 * The copied pages are pinned until then: evicting one and reading it
 * back before our write lands would lose entries.  If a step fails,
 * the copied pages are marked dirty again.
 */
struct writeback {
  struct page_copy *copies;     /* mmap'd */
  size_t n, bytes;
};

/* Step 1.  Lock not held. */
static int
copy_dirty_pages (struct qed_image *img, struct writeback *wb)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  size_t cap = img->ndirty;

  for (uint64_t i = 0; i < qed_l1_pages (img); ++i)
    cap += img->l1_dirty[i];
  /* mmap, not malloc: a large freed malloc block would raise glibc's
   * mmap threshold and stay in some thread's arena for good. */
  if (cap > 0) {
    wb->bytes = cap * sizeof *wb->copies;
    wb->copies = mmap (NULL, wb->bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (wb->copies == MAP_FAILED) {
      wb->copies = NULL;
      qed_error ("mmap: %m");
      return -1;
    }
  }
  /* L2 pages first: a new table's entries go out with or before the
   * L1 entry that links it (both only point at durable clusters).
   */
  for (struct l2_page *p = img->dirty_list; p; p = p->dnext) {
    struct page_copy *c = &wb->copies[wb->n++];
    c->offset = p->offset;
    c->page = p;
    p->pinned = true;
    memcpy (c->data, p->entries, L2_PAGE_BYTES);
    p->dirty = false;
  }
  img->dirty_list = NULL;
  img->ndirty = 0;
  for (uint64_t i = 0; i < qed_l1_pages (img); ++i) {
    if (img->l1_dirty[i]) {
      struct page_copy *c = &wb->copies[wb->n++];
      c->offset = img->l1_start + i * L2_PAGE_BYTES;
      c->page = NULL;
      memcpy (c->data, &img->l1[i * L2_PAGE_ENTRIES], L2_PAGE_BYTES);
      img->l1_dirty[i] = false;
    }
  }
  assert (wb->n == cap);
  return 0;
}

/* Steps 2 and 3.  Lock not held.  *written: the copies reached the
 * file (even if a sync failed).
 *
 * After a failed fdatasync (it sticks: qed_sync) the tables are still
 * written, so that the page cache has them: a clean close keeps the
 * writes, and NEED_CHECK, which then stays set, covers a crash.  The
 * flush fails all the same. */
static int
write_copies (struct qed_image *img, struct writeback *wb, bool *written)
{
  *written = false;
  if (qed_sync (img) == -1 && !img->sync_error)
    return -1;
  if (wb->n == 0)
    return img->sync_error ? (errno = img->sync_error, -1) : 0;
  qed_verbose ("writeback: %zu table page%s", wb->n, wb->n == 1 ? "" : "s");
  for (size_t i = 0; i < wb->n; ++i) {
    struct page_copy *c = &wb->copies[i];
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    for (size_t j = 0; j < L2_PAGE_ENTRIES; ++j)
      c->data[j] = htole64 (c->data[j]);
#endif
    if (pwrite_full (img->fd, c->data, L2_PAGE_BYTES, c->offset) == -1) {
      qed_error ("%s: cannot write table at 0x%" PRIx64 ": %m",
                 img->filename, c->offset);
      return -1;
    }
  }
  *written = true;
  return qed_sync (img);
}

/* Unpin the copied pages; if the writeback failed, mark them dirty
 * again so that a later flush retries.  Lock not held. */
static void
finish_copies (struct qed_image *img, struct writeback *wb, bool written)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);

  for (size_t i = 0; i < wb->n; ++i) {
    struct l2_page *p = wb->copies[i].page;
    if (p)
      p->pinned = false;
    if (written)
      continue;
    if (p == NULL)
      img->l1_dirty[(wb->copies[i].offset - img->l1_start)
                    / L2_PAGE_BYTES] = true;
    else
      mark_dirty (img, p);
  }
}

int
qed_writeback (struct qed_image *img)
{
  struct writeback wb = { .copies = NULL };
  bool written;
  int r, err;

  if (copy_dirty_pages (img, &wb) == -1)
    return -1;
  r = write_copies (img, &wb, &written);
  err = errno;
  finish_copies (img, &wb, written);
  if (wb.copies)
    munmap (wb.copies, wb.bytes);
  errno = err;
  return r;
}

/* How many freed clusters are waiting for writeback. */
static size_t
pending_free_count (struct qed_image *img)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  return img->pending_free.len;
}

int
qed_flush (struct qed_image *img)
{
  size_t n;

  if (img->readonly)
    return 0;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->flush_lock);
  /* Only clusters unlinked before the writeback copies the dirty pages
   * become durably free: a zero or trim committing during the writeback
   * is in no copied page, and reusing its cluster now would let a crash
   * show new data through the old, still durable, entry. */
  n = pending_free_count (img);
  if (qed_writeback (img) == -1)
    return -1;
  qed_free_durable (img, n);
  return 0;
}
