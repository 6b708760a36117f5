/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the free-cluster list (autoclear feature bit 0x1) and
 * demote.
 *
 * Clusters freed by zero and trim used to be given back at a clean
 * stop by moving the last data clusters into them, which takes time in
 * proportion to what was freed.  Instead, what is still free after a
 * bounded compaction is recorded on disk, and the next writable open
 * reuses it at once.  The on-disk format (the manual's "FREE-CLUSTER
 * LIST" section is the reference):
 *
 * - A 64-byte record in the last 64 bytes of the header area (file
 *   offset header_size * cluster_size - 64), little-endian:
 *     0  magic "QEDFREEL"      8  list offset (cluster aligned)
 *     16 list length in bytes  24 number of free clusters listed
 *     32 CRC-32 of the list    36..59 zero
 *     60 CRC-32 of bytes 0..59
 * - The list: runs of 16 bytes (first cluster's file offset, number of
 *   clusters), sorted, disjoint, in contiguous clusters at the list
 *   offset.
 *
 * The list is trusted only if autoclear bit 0x1 is set, NEED_CHECK is
 * clear and every field checks out.  Writers follow the table rules:
 * list and record are written and synced, then the bit is set (with
 * NEED_CHECK still set), then NEED_CHECK is cleared; and the bit is
 * cleared durably, together with setting NEED_CHECK, before anything
 * changes (qed_mark_need_check).  QEMU clears the unknown bit on a
 * writable open, so a list it may have allocated over is never trusted
 * again: the next writable open rebuilds the free space from the tables.
 * Listed clusters stay punched.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <endian.h>
#include <unistd.h>
#include <linux/falloc.h>

#include "qed-internal.h"
#include "geometry.h"
#include "progress.h"
#include "seam.h"
#include "util.h"

#define RECORD_BYTES 64
#define RUN_BYTES    16
static const char record_magic[8] = "QEDFREEL";

/* CRC-32 (the IEEE 802.3 polynomial, as zlib's crc32). */
static uint32_t
crc32_update (uint32_t crc, const void *buf, size_t len)
{
  static uint32_t table[256];
  const unsigned char *p = buf;

  if (__atomic_load_n (&table[1], __ATOMIC_ACQUIRE) == 0) {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k)
        c = c & 1 ? 0xedb88320 ^ (c >> 1) : c >> 1;
      __atomic_store_n (&table[i], c, __ATOMIC_RELEASE);
    }
  }
  crc = ~crc;
  while (len--)
    crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t
qed_crc32 (const void *buf, size_t len)
{
  return crc32_update (0, buf, len);
}

uint64_t
qed_freelist_record_offset (const struct qed_image *img)
{
  uint64_t off = img->header_end - RECORD_BYTES;

  /* A backing file name reaching into those bytes leaves no room. */
  if (img->h.features & QED_F_BACKING_FILE &&
      (uint64_t) img->h.backing_filename_offset +
      img->h.backing_filename_size > off)
    return 0;
  return off;
}

struct record {
  uint64_t list_offset, list_bytes, free_clusters;
  uint32_t list_crc;
};

static void
encode_record (unsigned char raw[RECORD_BYTES], const struct record *r)
{
  memset (raw, 0, RECORD_BYTES);
  memcpy (raw, record_magic, 8);
  put_le64 (raw + 8, r->list_offset);
  put_le64 (raw + 16, r->list_bytes);
  put_le64 (raw + 24, r->free_clusters);
  put_le32 (raw + 32, r->list_crc);
  put_le32 (raw + 60, qed_crc32 (raw, 60));
}

/* 1 if a record with a good checksum is there, 0 if not, -1 on error. */
static int
read_record (struct qed_image *img, struct record *r)
{
  uint64_t off = qed_freelist_record_offset (img);
  unsigned char raw[RECORD_BYTES];

  if (off == 0)
    return 0;
  if (pread_full (img->fd, raw, sizeof raw, off) == -1) {
    qed_error ("%s: cannot read the free-cluster list record: %m",
               img->filename);
    return -1;
  }
  if (memcmp (raw, record_magic, 8) != 0)
    return 0;
  if (get_le32 (raw + 60) != qed_crc32 (raw, 60))
    return 0;
  r->list_offset = get_le64 (raw + 8);
  r->list_bytes = get_le64 (raw + 16);
  r->free_clusters = get_le64 (raw + 24);
  r->list_crc = get_le32 (raw + 32);
  return 1;
}

/* Is [off, off + n clusters) a place where free clusters can be? */
static bool
valid_free_range (const struct qed_image *img, uint64_t off, uint64_t n)
{
  return n > 0 && n <= (img->file_end >> img->cs_bits) &&
    valid_cluster_offset (img, off, n << img->cs_bits);
}

/* Check the list against the record and the file.  Returns the runs
 * (host order, 2 words each) or NULL with *why set. */
static uint64_t *
read_runs (struct qed_image *img, const struct record *r, const char **why)
{
  uint64_t nruns = r->list_bytes / RUN_BYTES, total = 0, prev_end = 0;
  uint64_t list_clusters = (r->list_bytes + img->cs - 1) >> img->cs_bits;
  uint64_t valid_end = qed_valid_end (img);
  uint64_t *runs;

  *why = NULL;
  if (r->list_bytes == 0 || r->list_bytes % RUN_BYTES ||
      nruns > (img->file_end >> img->cs_bits) ||
      !valid_free_range (img, r->list_offset, list_clusters)) {
    *why = "the list's place or length is invalid";
    return NULL;
  }
  /* Loaded, the list costs 8 bytes a cluster: only what a valid image
   * of this size can hold is trusted (the rest is rebuilt, bounded). */
  if (r->free_clusters > (valid_end >> img->cs_bits) ||
      nruns > (valid_end >> img->cs_bits) ||
      r->list_offset + (list_clusters << img->cs_bits) > valid_end) {
    *why = "it lists more than an image of this size can hold";
    return NULL;
  }
  runs = malloc (r->list_bytes);
  if (runs == NULL) {
    *why = "out of memory";
    return NULL;
  }
  if (pread_full (img->fd, runs, r->list_bytes, r->list_offset) == -1) {
    *why = "the list cannot be read";
    goto bad;
  }
  if (qed_crc32 (runs, r->list_bytes) != r->list_crc) {
    *why = "the list's checksum does not match";
    goto bad;
  }
  for (uint64_t i = 0; i < nruns; ++i) {
    uint64_t off = le64toh (runs[2*i]), n = le64toh (runs[2*i+1]);
    runs[2*i] = off;
    runs[2*i+1] = n;
    if (!valid_free_range (img, off, n) || off < prev_end ||
        off + (n << img->cs_bits) > valid_end ||
        (off < r->list_offset + (list_clusters << img->cs_bits) &&
         r->list_offset < off + (n << img->cs_bits))) {
      *why = "a run is out of place";
      goto bad;
    }
    prev_end = off + (n << img->cs_bits);
    total += n;
  }
  if (total != r->free_clusters) {
    *why = "the count of free clusters does not match";
    goto bad;
  }
  return runs;

 bad:
  free (runs);
  return NULL;
}

/* Queue the clusters [off, off + n clusters) for reuse.  The free list
 * is a stack: pushed from the top down, they come out in ascending
 * order, so that a run can be handed out whole. */
static int
push_run (struct qed_image *img, uint64_t off, uint64_t n)
{
  for (uint64_t i = n; i-- > 0; )
    if (offset_list_append (&img->free_list, off + (i << img->cs_bits)) == -1)
      return -1;
  return 0;
}

int
qed_freelist_open (struct qed_image *img, bool *rebuild)
{
  struct record r;
  const char *why;
  CLEANUP_FREE uint64_t *runs = NULL;
  uint64_t nruns;
  int found;

  *rebuild = false;
  found = read_record (img, &r);
  if (found == -1)
    return -1;
  img->list_record = found == 1;
  if (!(img->h.autoclear_features & QED_AF_FREELIST)) {
    /* A list we wrote, invalidated by a writer that did not know it. */
    *rebuild = found == 1;
    return 0;
  }
  if (img->need_check || found == 0) {
    *rebuild = true;
    return 0;
  }
  if (img->readonly)
    return 0;                   /* nothing is allocated */
  runs = read_runs (img, &r, &why);
  if (runs == NULL) {
    qed_warning ("%s: the free-cluster list is not used: %s", img->filename,
                 why);
    *rebuild = true;
    return 0;
  }
  nruns = r.list_bytes / RUN_BYTES;
  /* The list's own clusters are free too, once the bit is cleared:
   * queued first, they are reused last. */
  if (push_run (img, r.list_offset,
                (r.list_bytes + img->cs - 1) >> img->cs_bits) == -1)
    return -1;
  for (uint64_t i = nruns; i-- > 0; )
    if (push_run (img, runs[2*i], runs[2*i+1]) == -1)
      return -1;
  img->list_trusted = true;
  qed_debug ("%s: free-cluster list: %" PRIu64 " clusters in %" PRIu64
             " runs", img->filename, r.free_clusters, nruns);
  return 0;
}

static int
erase_record (struct qed_image *img)
{
  unsigned char zero[RECORD_BYTES] = { 0 };
  uint64_t off = qed_freelist_record_offset (img);

  if (!img->list_record || off == 0)
    return 0;
  if (pwrite_full (img->fd, zero, sizeof zero, off) == -1 ||
      qed_sync (img) == -1) {
    qed_error ("%s: cannot erase the free-cluster list record: %m",
               img->filename);
    return -1;
  }
  img->list_record = false;
  return 0;
}

static int
cmp_u64 (const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

/* The free clusters (free_list and flushed_free) as sorted runs, in
 * little-endian order ready to be written.  Returns the number of runs
 * or -1. */
static int64_t
build_runs (struct qed_image *img, uint64_t **runs_out, uint64_t *total)
{
  size_t n = img->free_list.len + img->flushed_free.len, nruns = 0;
  CLEANUP_FREE uint64_t *all = malloc ((n ? n : 1) * sizeof *all);
  uint64_t *runs = malloc ((n ? n : 1) * 2 * sizeof *runs);

  if (all == NULL || runs == NULL) {
    free (runs);
    qed_error ("malloc: %m");
    return -1;
  }
  if (img->free_list.len)       /* ptr may be NULL */
    memcpy (all, img->free_list.ptr, img->free_list.len * sizeof *all);
  if (img->flushed_free.len)
    memcpy (all + img->free_list.len, img->flushed_free.ptr,
            img->flushed_free.len * sizeof *all);
  qsort (all, n, sizeof *all, cmp_u64);
  *total = 0;
  for (size_t i = 0; i < n; ++i) {
    if (i > 0 && all[i] == all[i-1])
      continue;
    if (nruns > 0 &&
        runs[2*nruns-2] + (runs[2*nruns-1] << img->cs_bits) == all[i])
      runs[2*nruns-1]++;
    else {
      runs[2*nruns] = all[i];
      runs[2*nruns+1] = 1;
      nruns++;
    }
    ++*total;
  }
  *runs_out = runs;
  return nruns;
}

/* Where the list goes: at the start of the first free run long enough
 * (its clusters then hold the list instead of being listed), else at
 * the end of the file.  Lock held. */
static int
place_list (struct qed_image *img, uint64_t *runs, uint64_t nruns,
            uint64_t *total, uint64_t need, uint64_t *where)
{
  /* (A run is never used up: the list would be empty.) */
  for (uint64_t i = 0; i < nruns; ++i) {
    if (runs[2*i+1] <= need)
      continue;
    *where = runs[2*i];
    runs[2*i] += need << img->cs_bits;
    runs[2*i+1] -= need;
    *total -= need;
    return 0;
  }
  if (qed_cut_tail (img) == -1)
    return -1;
  *where = img->file_end;
  if (qed_io_truncate (img->fd,
                       img->file_end + (need << img->cs_bits)) == -1) {
    qed_error ("%s: cannot grow the file for the free-cluster list: %m",
               img->filename);
    return -1;
  }
  img->file_end = img->alloc_end = *where + (need << img->cs_bits);
  /* Free again as soon as the bit is cleared. */
  return push_run (img, *where, need);
}

int
qed_freelist_publish (struct qed_image *img)
{
  CLEANUP_FREE uint64_t *runs = NULL;
  unsigned char raw[RECORD_BYTES];
  struct record r = { 0 };
  uint64_t total, nruns, need, where;
  int64_t n;

  if (img->h.autoclear_features & QED_AF_FREELIST)
    return 0;                   /* the list on disk is still current */
  n = build_runs (img, &runs, &total);
  if (n == -1)
    return -1;
  nruns = n;
  if (nruns == 0)
    return erase_record (img);
  if (qed_freelist_record_offset (img) == 0) {
    /* A backing file name reaching into the record's bytes: the free
     * clusters cannot be listed, so they stay leaks that NEED_CHECK
     * must explain (a clean stop compacts them all away instead). */
    qed_note_leak (img, "the backing file name leaves no room for the "
                   "free-cluster list record");
    return erase_record (img);
  }
  /* Taking the list's room from a run never adds or removes one. */
  need = (nruns * RUN_BYTES + img->cs - 1) >> img->cs_bits;
  if (place_list (img, runs, nruns, &total, need, &where) == -1)
    return -1;
  r.list_offset = where;
  r.list_bytes = nruns * RUN_BYTES;
  r.free_clusters = total;
  for (uint64_t i = 0; i < 2 * nruns; ++i)
    runs[i] = htole64 (runs[i]);
  r.list_crc = qed_crc32 (runs, r.list_bytes);
  encode_record (raw, &r);
  /* List and record durable, then the bit (NEED_CHECK still set: the
   * caller clears it last). */
  if (pwrite_full (img->fd, runs, r.list_bytes, where) == -1 ||
      pwrite_full (img->fd, raw, sizeof raw,
                   qed_freelist_record_offset (img)) == -1 ||
      qed_sync (img) == -1) {
    qed_error ("%s: cannot write the free-cluster list: %m", img->filename);
    return -1;
  }
  img->list_record = true;
  if (qed_write_flags (img, img->h.features, img->h.compat_features,
                       img->h.autoclear_features | QED_AF_FREELIST) == -1)
    return -1;
  qed_debug ("%s: free-cluster list written: %" PRIu64 " clusters in %"
             PRIu64 " runs at 0x%" PRIx64, img->filename, total, nruns,
             where);
  return 0;
}

/* Rebuild the free clusters from the tables: every cluster no table
 * references becomes free (punched, one run at a time).  Bounded by
 * the disk size, not by the file's apparent size: free clusters at the
 * end of the file are cut off, and those past what a valid image of
 * this size can reach are left to the check at the stop (a leak, with
 * NEED_CHECK set) rather than listed.  No request runs (open, close). */
int
qed_freelist_rebuild (struct qed_image *img)
{
  struct qed_check_result res;
  struct offset_list leaks = { 0 };
  uint64_t valid_end = qed_valid_end (img), past = 0;
  int r;

  img->leak_sink = &leaks;
  r = qed_check (img, false, &res);
  img->leak_sink = NULL;
  if (r == 0 && res.check_errors > 0) {
    errno = EIO;
    r = -1;
  }
  pthread_mutex_lock (&img->lock);
  img->pending_free.len = img->flushed_free.len = img->free_list.len = 0;
  /* A last run that ends the file: cut. */
  if (r == 0 && leaks.len >= 2 &&
      leaks.ptr[leaks.len - 2] + (leaks.ptr[leaks.len - 1] << img->cs_bits)
      == img->file_end) {
    uint64_t start = leaks.ptr[leaks.len - 2];
    if (qed_io_truncate (img->fd, start) == 0) {
      qed_debug ("%s: %" PRIu64 " free clusters at the end of the file "
                 "cut off", img->filename, leaks.ptr[leaks.len - 1]);
      img->file_end = img->alloc_end = start;
      img->tail_garbage = false;
      leaks.len -= 2;
    }
  }
  /* Pushed from the top down: reused from the bottom up. */
  for (size_t i = leaks.len; r == 0 && i >= 2; i -= 2) {
    uint64_t off = leaks.ptr[i - 2], n = leaks.ptr[i - 1];
    if (off >= valid_end) {
      past += n;
      continue;
    }
    if (off + (n << img->cs_bits) > valid_end) {
      uint64_t keep = (valid_end - off) >> img->cs_bits;
      past += n - keep;
      n = keep;
    }
    if (n == 0)
      continue;
    if (qed_io_fallocate (img->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          off, n << img->cs_bits) == -1 &&
        errno != EOPNOTSUPP && errno != ENOSYS) {
      qed_error ("%s: fallocate: %m", img->filename);
      r = -1;
    }
    else if (push_run (img, off, n) == -1)
      r = -1;
  }
  if (r == 0 && past > 0)
    qed_note_leak (img, "free clusters past what an image of this size "
                   "can reach");
  pthread_mutex_unlock (&img->lock);
  if (r == 0)
    qed_debug ("%s: free space rebuilt from the tables: %zu free clusters",
               img->filename, img->free_list.len);
  free (leaks.ptr);
  return r;
}

/* Demote, before the final writeback: without a backing file a zero
 * cluster reads exactly like an unallocated one, so store it as one.
 * No request runs. */
int
qed_demote_zero_clusters (struct qed_image *img)
{
  uint64_t changed = 0;
  struct qed_progress pg;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);

  if (img->has_backing)
    return 0;
  qed_progress_start (&pg, img->filename, "demote");
  for (uint64_t t = 0; t < img->l1_entries; ++t) {
    uint64_t first = t << img->table_bits;
    qed_progress_step (&pg, "zero clusters to unallocated", t,
                       img->l1_entries);
    if (img->l1[t] == 0 || first >= img->nr_clusters)
      continue;
    for (uint64_t c = first; c < MIN (first + img->table_entries,
                                      img->nr_clusters); ++c) {
      uint64_t e;
      if (qed_get_entry (img, c, &e) == -1)
        return -1;
      if (e != QED_ENTRY_ZERO)
        continue;
      if (qed_set_entry (img, c, QED_ENTRY_UNALLOCATED) == -1)
        return -1;
      changed++;
    }
  }
  qed_progress_end (&pg, "%" PRIu64 " zero clusters now unallocated",
                    changed);
  return 0;
}

/* Demote, after the final compaction: no list, no copy-on-read hint,
 * no origin record (the filter's; QEMU refuses qemu-img rebase -u
 * while a compat bit it does not know is set).  Lock not held. */
int
qed_demote_flags (struct qed_image *img)
{
  const uint64_t compat = QED_CF_COPY_ON_READ | QED_CF_ORIGIN;

  if (erase_record (img) == -1)
    return -1;
  if (img->h.compat_features & compat ||
      img->h.autoclear_features & QED_AF_FREELIST)
    return qed_write_flags (img, img->h.features,
                            img->h.compat_features & ~compat,
                            img->h.autoclear_features &
                            ~(uint64_t) QED_AF_FREELIST);
  return 0;
}
