/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: consistency check, repair and compaction.
 *
 * The check walks the L1 and every L2 table, marking the clusters in
 * use.  Compared with QEMU's qed-check.c (docs/qemu-differences.md):
 *
 * - A bad L2 entry is replaced by a zero cluster when the image has a
 *   backing file (QEMU unlinks it, silently exposing backing data), and
 *   a bad L1 entry by a table of zero clusters.
 * - A cluster referenced twice is repaired by giving the second user a
 *   copy (QEMU cannot repair duplicates).
 * - Leaked clusters are reclaimed: trailing ones by truncating the
 *   file, others by moving the last data clusters into them
 *   (compaction).  QEMU only counts leaks.
 * - Cluster counts are exact (QEMU divides by cluster_size - 1).
 *
 * Repairs follow the writeback order: copies are made durable before
 * any table points at them, and the file is truncated last.  The check
 * runs with no request in flight: at open, or at close (compaction).
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
#include <linux/falloc.h>

#include "qed-internal.h"
#include "geometry.h"
#include "progress.h"
#include "seam.h"
#include "util.h"

struct bitmap {
  uint64_t *bits;
  uint64_t n;
};

static bool
bm_get (const struct bitmap *b, uint64_t i)
{
  return i < b->n && (b->bits[i / 64] >> (i % 64)) & 1;
}

static void
bm_set (struct bitmap *b, uint64_t i)
{
  if (i < b->n)
    b->bits[i / 64] |= UINT64_C (1) << (i % 64);
}

/* The first index in [i, end) whose bit is `set`, or end.  A word at
 * a time: a file with a huge sparse tail costs a scan of zero words
 * (pages never written map the zero page), not a loop per cluster. */
static uint64_t
bm_find (const struct bitmap *b, uint64_t i, uint64_t end, bool set)
{
  end = MIN (end, b->n);
  while (i < end) {
    uint64_t w = b->bits[i / 64] ^ (set ? 0 : UINT64_MAX);
    w &= UINT64_MAX << (i % 64);
    if (w) {
      i = (i & ~UINT64_C (63)) + __builtin_ctzll (w);
      return MIN (i, end);
    }
    i = (i | 63) + 1;
  }
  return end;
}

/* The highest index in [floor, end) whose bit is set, plus one; or
 * floor if none. */
static uint64_t
bm_last_set (const struct bitmap *b, uint64_t floor, uint64_t end)
{
  end = MIN (end, b->n);
  while (end > floor) {
    uint64_t i = end - 1, w = b->bits[i / 64];
    if (i % 64 != 63)
      w &= (UINT64_C (2) << (i % 64)) - 1;
    if (w) {
      i = (i & ~UINT64_C (63)) + 63 - __builtin_clzll (w);
      return i >= floor ? i + 1 : floor;
    }
    end = i & ~UINT64_C (63);
  }
  return floor;
}

struct checker {
  struct qed_image *img;
  bool repair;
  struct qed_check_result *res;
  struct bitmap used;           /* clusters referenced */
  struct bitmap table;          /* clusters holding L1/L2 tables */
  uint64_t *buf;                /* one L2 table */
  bool wrote;                   /* repairs were written */
  bool again;                   /* reclaim made room for another pass */
  bool diverged;                /* the L1 in memory is not the file's */
  struct qed_progress *pg;      /* progress lines (progress.h) */
};

static uint64_t
hide_entry (const struct qed_image *img)
{
  return img->has_backing ? QED_ENTRY_ZERO : QED_ENTRY_UNALLOCATED;
}

/* Write the first n entries of a table (the L1 in memory may be only
 * its head: the rest is zero on disk). */
static int
write_entries (struct checker *ck, const uint64_t *t, uint64_t n,
               uint64_t offset)
{
  struct qed_image *img = ck->img;
  CLEANUP_FREE uint64_t *le = malloc (n * 8);

  if (le == NULL) {
    qed_error ("malloc: %m");
    return -1;
  }
  for (uint64_t i = 0; i < n; ++i)
    le[i] = htole64 (t[i]);
  if (pwrite_full (img->fd, le, n * 8, offset) == -1) {
    qed_error ("%s: cannot write table at 0x%" PRIx64 ": %m",
               img->filename, offset);
    return -1;
  }
  ck->wrote = true;
  return 0;
}

static int
write_table (struct checker *ck, const uint64_t *t, uint64_t l1i,
             uint64_t offset)
{
  return write_entries (ck, t, qed_table_reach (ck->img, l1i), offset);
}

/* Tables are read and written only as far as the image size reaches
 * (a 64M/16 table is 1 GiB; a 1 GiB disk reaches 128 bytes of it). */
static int
read_table (struct checker *ck, uint64_t l1i, uint64_t offset)
{
  struct qed_image *img = ck->img;
  uint64_t n = qed_table_reach (img, l1i);

  if (pread_full (img->fd, ck->buf, n * 8, offset) == -1)
    return -1;
  for (uint64_t j = 0; j < n; ++j)
    ck->buf[j] = le64toh (ck->buf[j]);
  return 0;
}

static int
write_l1 (struct checker *ck)
{
  return write_entries (ck, ck->img->l1, ck->img->l1_entries,
                        ck->img->l1_start);
}

static bool
range_used (const struct checker *ck, uint64_t off, uint64_t n)
{
  for (uint64_t i = 0; i < n; ++i)
    if (bm_get (&ck->used, qed_cluster_index (ck->img, off) + i))
      return true;
  return false;
}

static void
mark (struct checker *ck, uint64_t off, uint64_t n, bool is_table)
{
  for (uint64_t i = 0; i < n; ++i) {
    bm_set (&ck->used, qed_cluster_index (ck->img, off) + i);
    if (is_table)
      bm_set (&ck->table, qed_cluster_index (ck->img, off) + i);
  }
}

static int
bm_resize (struct bitmap *b, uint64_t n)
{
  size_t old_words = (b->n + 63) / 64 + 1, words = (n + 63) / 64 + 1;
  uint64_t *p = realloc (b->bits, words * 8);

  if (p == NULL) {
    qed_error ("realloc: %m");
    return -1;
  }
  if (words > old_words)
    memset (p + old_words, 0, (words - old_words) * 8);
  b->bits = p;
  b->n = n;
  return 0;
}

/* Allocate n clusters at the end of the file for a repair.  The
 * bitmaps grow with the file (the caller marks the new clusters). */
static int
grow (struct checker *ck, uint64_t n, uint64_t *off)
{
  struct qed_image *img = ck->img;
  uint64_t new_end = img->file_end + qed_clusters_to_bytes (img, n);

  if (bm_resize (&ck->used, qed_cluster_index (img, new_end)) == -1 ||
      bm_resize (&ck->table, qed_cluster_index (img, new_end)) == -1)
    return -1;
  if (qed_io_truncate (img->fd, new_end) == -1) {
    qed_error ("%s: ftruncate: %m", img->filename);
    return -1;
  }
  *off = img->file_end;
  img->file_end = img->alloc_end = new_end;
  img->tail_garbage = false;
  return 0;
}

/* Clusters are copied COPY_CHUNK at a time (a 64M cluster must not
 * cost 64M of memory); the destination is punched first, so that zero
 * chunks need no write and take no space.  The last chunk is always
 * written: a copy past the end of the file must extend it. */
#define COPY_CHUNK (1u << 20)

static int
copy_cluster (struct qed_image *img, uint64_t from, uint64_t to, void *tmp)
{
  uint64_t n = MIN ((uint64_t) COPY_CHUNK, (uint64_t) img->cs);
  bool holes = qed_io_fallocate (img->fd,
                                 FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                 to, img->cs) == 0;

  for (uint64_t done = 0; done < img->cs; done += n) {
    if (pread_full (img->fd, tmp, n, from + done) == -1 ||
        (!(holes && done + n < img->cs && is_zero (tmp, n)) &&
         pwrite_full (img->fd, tmp, n, to + done) == -1)) {
      qed_error ("%s: cannot copy cluster 0x%" PRIx64 " to 0x%" PRIx64
                 ": %m", img->filename, from, to);
      return -1;
    }
  }
  return 0;
}

/* Check (and repair) one L2 table, already marked and read into
 * ck->buf.  Returns -1 only on a repair write error. */
static int
check_table (struct checker *ck, uint64_t l1i, uint64_t t)
{
  struct qed_image *img = ck->img;
  uint64_t fixed = 0;
  CLEANUP_FREE void *tmp = NULL;

  for (uint64_t j = 0; j < qed_table_reach (img, l1i); ++j) {
    uint64_t e = ck->buf[j];
    uint64_t guest =
      qed_cluster_start (img, qed_l1_first_cluster (img, l1i) + j);

    if (e <= QED_ENTRY_ZERO)
      continue;
    if (!valid_cluster_offset (img, e, img->cs)) {
      ck->res->corruptions++;
      qed_error ("%s: guest offset 0x%" PRIx64 ": invalid L2 entry 0x%"
                 PRIx64 "%s", img->filename, guest, e,
                 ck->repair ? (img->has_backing
                               ? ": repaired (now a zero cluster)"
                               : ": repaired (now unallocated)") : "");
      if (ck->repair) {
        ck->buf[j] = hide_entry (img);
        fixed++;
      }
      continue;
    }
    if (range_used (ck, e, 1)) {
      uint64_t copy;
      ck->res->corruptions++;
      qed_error ("%s: guest offset 0x%" PRIx64 ": cluster 0x%" PRIx64
                 " is referenced twice%s", img->filename, guest, e,
                 ck->repair ? ": repaired (given its own copy)" : "");
      if (!ck->repair)
        continue;
      if (tmp == NULL && (tmp = malloc (COPY_CHUNK)) == NULL) {
        qed_error ("malloc: %m");
        return -1;
      }
      if (grow (ck, 1, &copy) == -1 || copy_cluster (img, e, copy, tmp) == -1)
        return -1;
      ck->buf[j] = e = copy;
      fixed++;
    }
    mark (ck, e, 1, false);
    ck->res->allocated_clusters++;
  }
  if (fixed > 0) {
    /* Copies must be durable before the table points at them. */
    if (qed_sync (img) == -1) {
      qed_error ("%s: fdatasync: %m", img->filename);
      return -1;
    }
    if (write_table (ck, ck->buf, l1i, t) == -1)
      return -1;
    ck->res->corruptions_fixed += fixed;
  }
  return 0;
}

/* Entries of the last table beyond the image size are never followed;
 * a repair clears them, so that no cluster they name (a leak to us) is
 * both reclaimed and, for QEMU, still in use. */
static int
clear_table_tail (struct checker *ck, uint64_t l1i, uint64_t t)
{
  struct qed_image *img = ck->img;
  uint64_t reach = qed_table_reach (img, l1i), n, in_file;

  if (!ck->repair || reach == img->table_entries)
    return 0;
  if (qed_scan_unreachable (img, t + reach * 8, t + img->table_bytes, true,
                            &n, &in_file) == -1)
    return -1;
  if (n > 0) {
    qed_debug ("%s: cleared %" PRIu64 " L2 entries beyond the image size",
               img->filename, n);
    ck->wrote = true;
  }
  return 0;
}

static int
walk (struct checker *ck)
{
  struct qed_image *img = ck->img;
  bool l1_changed = false;
  uint64_t tables = 0, seen = 0;

  for (uint64_t i = 0; i < img->l1_entries; ++i)
    tables += img->l1[i] != 0;
  for (uint64_t i = 0; i < img->l1_entries; ++i) {
    uint64_t t = img->l1[i];
    uint64_t guest = qed_cluster_start (img, qed_l1_first_cluster (img, i));

    if (t == 0)
      continue;
    qed_progress_step (ck->pg, "reading the tables", seen++, tables);
    if (!valid_cluster_offset (img, t, img->table_bytes) ||
        range_used (ck, t, img->h.table_size)) {
      bool valid = valid_cluster_offset (img, t, img->table_bytes);
      ck->res->corruptions++;
      qed_error ("%s: guest offset 0x%" PRIx64 ": L1 entry %" PRIu64
                 " (0x%" PRIx64 ") %s%s", img->filename, guest, i, t,
                 valid ? "overlaps other metadata or data"
                 : "is not an aligned table inside the file",
                 !ck->repair ? ""
                 : valid ? ": repaired (table copied)"
                 : img->has_backing ? ": repaired (a table of zero clusters)"
                 : ": repaired (unallocated)");
      if (!ck->repair)
        continue;
      if (valid) {
        /* Keep what the table says, in a copy of its own. */
        if (read_table (ck, i, t) == -1) {
          ck->res->check_errors++;
          continue;
        }
      }
      else {
        for (uint64_t j = 0; j < qed_table_reach (img, i); ++j)
          ck->buf[j] = hide_entry (img);
      }
      if (!valid && !img->has_backing)
        t = 0;
      else if (grow (ck, img->h.table_size, &t) == -1 ||
               write_table (ck, ck->buf, i, t) == -1 ||
               qed_sync (img) == -1)
        return -1;
      img->l1[i] = t;
      l1_changed = true;
      ck->res->corruptions_fixed++;
      if (t == 0)
        continue;
    }
    else if (read_table (ck, i, t) == -1) {
      qed_error ("%s: cannot read L2 table at 0x%" PRIx64 ": %m",
                 img->filename, t);
      ck->res->check_errors++;
      continue;
    }
    mark (ck, t, img->h.table_size, true);
    if (check_table (ck, i, t) == -1 || clear_table_tail (ck, i, t) == -1)
      return -1;
  }

  if (l1_changed && write_l1 (ck) == -1)
    return -1;
  return 0;
}

/* Move the last data clusters into the leaked holes below them, then
 * truncate the file.  An L2 table is moved whole into the lowest run of
 * table_size holes below it.  If there is no such run, the pass prepares
 * another (ck->again): it sinks the data just below the table into
 * lower holes, or, with holes just below it, parks the table after the
 * end of the file so that the next pass can move it down over its old
 * place.  Copies only ever go to clusters no table on disk points at.
 * Returns the number of clusters truncated.
 */
struct move {
  uint64_t src, dst;            /* file offsets */
};
struct table_move {
  uint64_t l1i, dst;            /* L1 index, new table offset */
};
struct reclaim_plan {
  struct move *moves;
  uint64_t nmoves;
  size_t cap;
  struct table_move *tmoves;
  size_t ntmoves;
  uint64_t park_end;            /* cluster after the parked tables, or 0 */
};

/* Passes of reclaim that prepare the next one (see plan_sink_and_park). */
#define MAX_RECLAIM_PASSES 16

static int
add_move (struct reclaim_plan *pl, uint64_t src, uint64_t dst)
{
  if (pl->nmoves == pl->cap) {
    size_t c = pl->cap ? pl->cap * 2 : 64;
    struct move *m = realloc (pl->moves, c * sizeof *m);
    if (m == NULL) {
      qed_error ("realloc: %m");
      return -1;
    }
    pl->moves = m;
    pl->cap = c;
  }
  pl->moves[pl->nmoves].src = src;
  pl->moves[pl->nmoves].dst = dst;
  pl->nmoves++;
  return 0;
}

/* Move the table of L1 entry l1i from cluster src to cluster dst. */
static int
add_table_move (struct checker *ck, struct reclaim_plan *pl, uint64_t l1i,
                uint64_t src, uint64_t dst)
{
  struct qed_image *img = ck->img;
  struct table_move *tm = realloc (pl->tmoves,
                                   (pl->ntmoves + 1) * sizeof *tm);

  if (tm == NULL) {
    qed_error ("realloc: %m");
    return -1;
  }
  pl->tmoves = tm;
  tm[pl->ntmoves].l1i = l1i;
  tm[pl->ntmoves].dst = qed_cluster_start (img, dst);
  pl->ntmoves++;
  for (uint64_t k = 0; k < img->h.table_size; ++k)
    if (add_move (pl, qed_cluster_start (img, src + k),
                  qed_cluster_start (img, dst + k)) == -1)
      return -1;
  return 0;
}

static int
move_cmp (const void *a, const void *b)
{
  const struct move *x = a, *y = b;
  return x->src < y->src ? -1 : x->src > y->src;
}

/* The L1 index of the table at cluster t (moved there in this pass, or
 * linked there), or l1_entries if none (the L1 or the header). */
static uint64_t
table_owner (const struct checker *ck, const struct reclaim_plan *pl,
             uint64_t t)
{
  const struct qed_image *img = ck->img;
  uint64_t i;

  for (i = 0; i < img->l1_entries; ++i)
    if (img->l1[i] == qed_cluster_start (img, t))
      break;
  for (size_t k = 0; k < pl->ntmoves; ++k)
    if (pl->tmoves[k].dst == qed_cluster_start (img, t))
      i = pl->tmoves[k].l1i;
  return i;
}

/* No room below the table at cluster t.  Prepare the next pass (after
 * this one's table updates are durable, vacated clusters are holes):
 * sink every data cluster above the lowest hole into the lowest holes
 * (data fits anywhere), so that only tables and holes are left above
 * it, and park those tables after the end of the file.  The next pass
 * then finds one run of holes from the lowest hole up, and packs the
 * parked tables into it.  (Only parking the top table, or sinking only
 * the data right below it, can cycle: with stacked tables above a
 * single hole, or with data between the hole and the tables.)
 */
static int
plan_sink_and_park (struct checker *ck, struct reclaim_plan *pl,
                    uint64_t lo, uint64_t t, uint64_t top, unsigned pass)
{
  struct qed_image *img = ck->img;
  uint64_t hi = t, pe = qed_cluster_index (img, img->file_end);
  uint64_t nmoves0 = pl->nmoves;
  size_t ntmoves0 = pl->ntmoves;

  if (pass >= MAX_RECLAIM_PASSES)
    return 0;
  for (;;) {
    while (lo < hi && bm_get (&ck->used, lo))
      lo++;
    while (hi > lo && (!bm_get (&ck->used, hi - 1) ||
                       bm_get (&ck->table, hi - 1)))
      hi--;
    if (lo >= hi)
      break;
    if (add_move (pl, qed_cluster_start (img, hi - 1),
                  qed_cluster_start (img, lo)) == -1)
      return -1;
    bm_set (&ck->used, lo);
    hi--;
  }
  for (uint64_t l = 0; l < img->l1_entries; ++l) {
    uint64_t s = qed_cluster_index (img, img->l1[l]);
    bool moved = false;
    if (img->l1[l] == 0 || s < lo || s >= top)
      continue;
    for (size_t k = 0; k < pl->ntmoves; ++k)
      moved |= pl->tmoves[k].l1i == l;
    if (moved)
      continue;                 /* already going down in this pass */
    if (add_table_move (ck, pl, l, s, pe) == -1)
      return -1;
    pe += img->h.table_size;
  }
  if (img->reclaim_budget != RECLAIM_UNLIMITED &&
      pl->nmoves > img->reclaim_budget) {
    /* Over the budget: leave it all listed. */
    pl->nmoves = nmoves0;
    pl->ntmoves = ntmoves0;
    return 0;
  }
  if (pe > qed_cluster_index (img, img->file_end))
    pl->park_end = pe;
  if (pl->nmoves > 0)
    ck->again = true;
  return 0;
}

/* An L2 table ends at cluster *top (tables are allocated after the
 * data they map, so freed space usually lies below one): move it whole
 * into the lowest run of holes below it.  Returns 1 to go on planning
 * (*top lowered), 0 to stop, or -1.
 */
static int
plan_table_move (struct checker *ck, struct reclaim_plan *pl,
                 unsigned pass, uint64_t first, uint64_t lo, uint64_t *top)
{
  struct qed_image *img = ck->img;
  uint64_t ts = img->h.table_size, t, p, run = 0, i;

  if (*top - first < ts)
    return 0;
  t = *top - ts;
  i = table_owner (ck, pl, t);
  if (i == img->l1_entries)
    return 0;                   /* the L1 or the header */
  for (p = lo; p < t && run < ts; ++p)
    run = bm_get (&ck->used, p) ? 0 : run + 1;
  if (run < ts)
    return plan_sink_and_park (ck, pl, lo, t, *top, pass) == -1 ? -1 : 0;
  p -= ts;
  if (add_table_move (ck, pl, i, t, p) == -1)
    return -1;
  mark (ck, qed_cluster_start (img, p), ts, true);
  if (pl->park_end)
    return 0;
  *top = t;
  return 1;
}

/* Pair the highest data clusters with the lowest holes.  *top is the
 * cluster where the file can end once the moves are done. */
static int
plan_reclaim (struct checker *ck, struct reclaim_plan *pl, unsigned pass,
              uint64_t *top)
{
  struct qed_image *img = ck->img;
  uint64_t first = qed_cluster_index (img, img->header_end), lo = first;

  *top = qed_cluster_index (img, img->file_end);
  for (;;) {
    *top = bm_last_set (&ck->used, first, *top); /* trailing leak: cut */
    while (lo < *top && bm_get (&ck->used, lo))
      lo++;
    if (lo >= *top)
      break;
    /* A limited compaction stops when its budget is spent (what is
     * left free is listed). */
    if (img->reclaim_budget != RECLAIM_UNLIMITED &&
        pl->nmoves + (bm_get (&ck->table, *top - 1) ? img->h.table_size : 1)
        > img->reclaim_budget)
      break;
    if (bm_get (&ck->table, *top - 1)) {
      int r = plan_table_move (ck, pl, pass, first, lo, top);
      if (r == -1)
        return -1;
      if (r == 0)
        break;
      continue;
    }
    if (add_move (pl, qed_cluster_start (img, *top - 1),
                  qed_cluster_start (img, lo)) == -1)
      return -1;
    /* The hole now holds data: the scan for the new end must stop
     * above it, or the truncation would cut the moved clusters. */
    bm_set (&ck->used, lo);
    lo++;
    (*top)--;
  }
  return 0;
}

/* Point the L2 table at t (of L1 index l1i) at the moved clusters'
 * copies. */
static int
relink_table (struct checker *ck, const struct reclaim_plan *pl,
              uint64_t l1i, uint64_t t)
{
  struct qed_image *img = ck->img;
  bool changed = false;

  if (read_table (ck, l1i, t) == -1) {
    qed_error ("%s: cannot read L2 table at 0x%" PRIx64 ": %m",
               img->filename, t);
    return -1;
  }
  for (uint64_t j = 0; j < qed_table_reach (img, l1i); ++j) {
    struct move key = { .src = ck->buf[j] }, *m;
    if (key.src <= QED_ENTRY_ZERO)
      continue;
    m = bsearch (&key, pl->moves, pl->nmoves, sizeof *pl->moves, move_cmp);
    if (m) {
      ck->buf[j] = m->dst;
      changed = true;
    }
  }
  return changed ? write_table (ck, ck->buf, l1i, t) : 0;
}

/* 1. Copy, and make the copies durable.  2. Point the tables at the
 * copies: the L2 entries (in the moved tables' copies, not yet
 * linked), then the L1. */
static int
apply_moves (struct checker *ck, struct reclaim_plan *pl)
{
  struct qed_image *img = ck->img;
  CLEANUP_FREE void *tmp = malloc (COPY_CHUNK);

  if (tmp == NULL) {
    qed_error ("malloc: %m");
    return -1;
  }
  for (uint64_t k = 0; k < pl->nmoves; ++k) {
    qed_progress_step (ck->pg, "moving data", k, pl->nmoves);
    if (copy_cluster (img, pl->moves[k].src, pl->moves[k].dst, tmp) == -1)
      return -1;
  }
  ck->pg->bytes += pl->nmoves * img->cs;
  if (qed_sync (img) == -1) {
    qed_error ("%s: fdatasync: %m", img->filename);
    return -1;
  }
  qsort (pl->moves, pl->nmoves, sizeof *pl->moves, move_cmp);
  /* From here until the L1 is written, the L1 in memory points at the
   * moved tables and the file's at the old ones: a failure cannot be
   * left for later (requests would go through tables the file does not
   * reach, and the next walk would cut the old ones away). */
  for (size_t k = 0; k < pl->ntmoves; ++k)
    img->l1[pl->tmoves[k].l1i] = pl->tmoves[k].dst;
  ck->diverged = pl->ntmoves > 0;
  for (uint64_t i = 0; i < img->l1_entries; ++i)
    if (img->l1[i] != 0 && relink_table (ck, pl, i, img->l1[i]) == -1)
      return -1;
  if (pl->ntmoves > 0 && write_l1 (ck) == -1)
    return -1;
  ck->diverged = false;
  return 0;
}

/* 3. Cut the file.  Returns the number of clusters removed. */
static int64_t
truncate_reclaimed (struct checker *ck, uint64_t new_end, uint64_t nmoves)
{
  struct qed_image *img = ck->img;
  uint64_t removed;

  if (qed_sync (img) == -1 || qed_io_truncate (img->fd, new_end) == -1 ||
      qed_sync (img) == -1) {
    qed_error ("%s: cannot truncate leaked clusters: %m", img->filename);
    return -1;
  }
  if (img->reclaim_budget != RECLAIM_UNLIMITED)
    img->reclaim_budget -= nmoves;
  removed = new_end < img->file_end
    ? qed_cluster_index (img, img->file_end - new_end) : 0;
  qed_debug ("%s: reclaimed %" PRIu64 " leaked clusters (%" PRIu64
             " moved), file now %" PRIu64 " bytes", img->filename,
             removed, nmoves, new_end);
  img->file_end = img->alloc_end = new_end;
  img->tail_garbage = false;
  ck->wrote = true;
  return removed;
}

/* Truncate the leaked clusters at the end of the file (no new space
 * needed).  Returns the number of clusters cut, or -1. */
static int64_t
cut_trailing_leaks (struct checker *ck)
{
  struct qed_image *img = ck->img;
  uint64_t first = qed_cluster_index (img, img->header_end);
  uint64_t end = qed_cluster_index (img, img->file_end), top = end;

  top = bm_last_set (&ck->used, first, end);
  if (top == end)
    return 0;
  if (qed_sync (img) == -1 ||
      qed_io_truncate (img->fd, qed_cluster_start (img, top)) == -1 ||
      qed_sync (img) == -1) {
    qed_error ("%s: cannot truncate leaked clusters: %m", img->filename);
    return -1;
  }
  img->file_end = img->alloc_end = qed_cluster_start (img, top);
  img->tail_garbage = false;
  ck->wrote = true;
  return end - top;
}

/* Plan, apply, truncate.  Returns the number of clusters truncated. */
static int64_t
reclaim (struct checker *ck, unsigned pass)
{
  struct qed_image *img = ck->img;
  struct reclaim_plan pl = { .moves = NULL };
  uint64_t top, new_end;
  int64_t r = -1;

  if (plan_reclaim (ck, &pl, pass, &top) == -1)
    goto out;
  new_end = qed_cluster_start (img, MAX (top, pl.park_end));
  if (new_end == img->file_end && pl.nmoves == 0)
    r = 0;
  else if (pl.nmoves == 0 || apply_moves (ck, &pl) == 0)
    r = truncate_reclaimed (ck, new_end, pl.nmoves);
 out:
  free (pl.moves);
  free (pl.tmoves);
  return r;
}

/* One pass: walk the tables, count the leaks, and reclaim them.
 * ck->again asks for another pass (see plan_sink_and_park). */
static int
check_pass (struct checker *ck, unsigned pass)
{
  struct qed_image *img = ck->img;
  struct qed_check_result *res = ck->res;
  uint64_t n = qed_cluster_index (img, img->file_end);

  memset (res, 0, sizeof *res);
  /* Repairs grow the file from file_end: drop the growth chunk first. */
  if (ck->repair && qed_cut_tail (img) == -1)
    return -1;
  /* The walk reads the tables from the file: write back what is only
   * in memory first (nothing is dirty at open or in qed_compact). */
  if (!img->readonly) {
    bool dirty = img->ndirty > 0;
    for (uint64_t i = 0; i < qed_l1_pages (img); ++i)
      dirty |= img->l1_dirty[i];
    if (dirty && qed_writeback (img) == -1)
      return -1;
  }
  ck->used.n = ck->table.n = n;
  ck->used.bits = calloc ((n + 63) / 64 + 1, 8);
  ck->table.bits = calloc ((n + 63) / 64 + 1, 8);
  ck->buf = malloc (MAX (qed_table_reach (img, 0), (uint64_t) 1) * 8);
  if (!ck->used.bits || !ck->table.bits || !ck->buf) {
    qed_error ("cannot allocate memory for the check: %m");
    return -1;
  }
  /* The header and the L1 table are in use. */
  mark (ck, 0, img->h.header_size, true);
  mark (ck, img->l1_start, img->h.table_size, true);

  if (walk (ck) == -1)
    return -1;
  if (res->check_errors > 0)
    return 0;
  /* Run by run: the number of runs is bounded by the clusters in use,
   * whatever the file's apparent size. */
  for (uint64_t i = qed_cluster_index (img, img->header_end), j; i < n;
       i = j) {
    i = bm_find (&ck->used, i, n, false);
    if (i >= n)
      break;
    j = bm_find (&ck->used, i, n, true);
    res->leaks += j - i;
    /* The free-cluster list is rebuilt from these (offset, count). */
    if (img->leak_sink && !ck->repair &&
        (offset_list_append (img->leak_sink, qed_cluster_start (img, i)) == -1 ||
         offset_list_append (img->leak_sink, j - i) == -1))
      return -1;
  }
  if (res->leaks > 0)
    qed_debug ("%s: %" PRIu64 " leaked clusters", img->filename, res->leaks);
  if (ck->repair && res->leaks > 0) {
    /* Leaks are harmless: what cannot be reclaimed now (a full file
     * system, a failing disk) is kept for a later check, with
     * NEED_CHECK set; it never fails the open.  Cutting the tail first
     * needs no space, and frees some for the moves. */
    int64_t cut = cut_trailing_leaks (ck), k = -1;
    if (cut >= 0)
      k = reclaim (ck, pass);
    if (k == -1 && ck->diverged) {
      qed_error ("%s: the repair could not update the L1 table (%m); the "
                 "file is left consistent, with NEED_CHECK set",
                 img->filename);
      return -1;
    }
    if (k == -1) {
      qed_warning ("%s: could not reclaim all leaked clusters (%m): they "
                   "are kept, and NEED_CHECK stays set", img->filename);
      ck->again = false;
      ck->wrote = true;
      k = 0;
    }
    res->leaks_fixed = MAX (cut, 0) + k;
  }
  return 0;
}

static void
check_pass_free (struct checker *ck)
{
  free (ck->used.bits);
  free (ck->table.bits);
  free (ck->buf);
  ck->used.bits = ck->table.bits = ck->buf = NULL;
}

/* A pass left nothing it could not fix (leaks aside). */
static bool
pass_clean (const struct qed_check_result *res)
{
  return res->check_errors == 0 && res->corruptions == res->corruptions_fixed;
}

/* The end of a pass, after the passes it asked for: the free lists,
 * the cache, and NEED_CHECK.  all_clean: every pass was clean. */
static int
check_finish (struct checker *ck, bool all_clean)
{
  struct qed_image *img = ck->img;
  const struct qed_check_result *res = ck->res;

  /* The free lists described leaks, which are now accounted for (a
   * check without repair leaves them: the clusters are still free). */
  if (ck->repair)
    img->pending_free.len = img->flushed_free.len = img->free_list.len = 0;
  /* Repairs wrote tables behind the L2 cache: drop its stale pages. */
  if (ck->wrote)
    qed_cache_drop (img);
  if (ck->repair && ck->wrote && qed_sync (img) == -1) {
    qed_error ("%s: fdatasync: %m", img->filename);
    return -1;
  }
  /* A repair that did not end clean in every pass (a later pass walks
   * tables that reclaim moved, and may fail where the first did not)
   * leaves the image not known clean: nothing may clear NEED_CHECK
   * before another check succeeds. */
  if (ck->repair && !all_clean) {
    qed_note_leak (img, "the check did not complete");
    return 0;
  }
  /* Clean only when no leaked cluster is left either.  After a limited
   * compaction, leaks may remain: the caller lists them before the
   * image is marked clean. */
  if (ck->repair && img->reclaim_budget == RECLAIM_UNLIMITED) {
    img->leaking = res->leaks > res->leaks_fixed;
    if (img->need_check && !img->leaking &&
        qed_clear_need_check (img) == -1)
      return -1;
  }
  return 0;
}

/* Passes run until one needs no other (at most MAX_RECLAIM_PASSES
 * more); they finish in reverse order, each counting as fixed the
 * leaks that the later passes did not leave.  What a later pass could
 * not fix (a table it could not read) is added to *res, so the caller
 * sees it as if the first pass had found it. */
/* What qed_check's progress lines call the work (qed_compact's). */
static _Thread_local const char *check_what;

int
qed_check (struct qed_image *img, bool repair, struct qed_check_result *res)
{
  struct checker ck[MAX_RECLAIM_PASSES + 1];
  struct qed_check_result later[MAX_RECLAIM_PASSES];
  struct qed_progress pg;
  unsigned n = 0;
  bool all_clean;

  qed_progress_start (&pg, img->filename, check_what ? check_what
                      : repair && !img->readonly ? "repair" : "check");
  do {
    int r;
    ck[n] = (struct checker) {
      .img = img, .repair = (n == 0 ? repair : true) && !img->readonly,
      .res = n == 0 ? res : &later[n - 1], .pg = &pg,
    };
    r = check_pass (&ck[n], n);
    check_pass_free (&ck[n]);
    if (r == -1)
      return -1;
    if (ck[n].again) {
      /* Room was made below a table: another pass moves it (before
       * NEED_CHECK is cleared, so a crash still gets checked). */
      if (qed_sync (img) == -1) {
        qed_error ("%s: fdatasync: %m", img->filename);
        return -1;
      }
      ck[n].wrote = true;
    }
  } while (ck[n++].again);
  assert (n <= MAX_RECLAIM_PASSES + 1);

  all_clean = pass_clean (res);
  for (unsigned i = 1; i < n; ++i) {
    all_clean &= pass_clean (&later[i - 1]);
    res->corruptions += later[i - 1].corruptions;
    res->corruptions_fixed += later[i - 1].corruptions_fixed;
    res->check_errors += later[i - 1].check_errors;
  }
  for (unsigned i = n; i-- > 0; ) {
    if (i + 1 < n) {
      /* Count leaks, not clusters truncated (a parked table's copy was
       * truncated too). */
      const struct qed_check_result *next = ck[i + 1].res;
      struct qed_check_result *r = ck[i].res;
      uint64_t left = next->leaks - MIN (next->leaks, next->leaks_fixed);
      r->leaks_fixed = r->leaks - MIN (r->leaks, left);
    }
    if (check_finish (&ck[i], all_clean) == -1)
      return -1;
  }
  qed_progress_end (&pg, "%" PRIu64 " corruptions repaired, %" PRIu64
                    " clusters freed", res->corruptions_fixed,
                    res->leaks_fixed);
  return 0;
}

/* At close: everything is written back and no request runs.  The
 * clusters freed by zero and trim are leaks now; reclaim them. */
int
qed_compact (struct qed_image *img)
{
  struct qed_check_result res;
  int r;

  qed_cache_drop (img);
  check_what = "compaction";
  r = qed_check (img, true, &res);
  check_what = NULL;
  if (r == -1)
    return -1;
  qed_cache_drop (img);
  qed_debug ("%s: compacted: reclaimed %" PRIu64 " freed clusters",
             img->filename, res.leaks_fixed);
  return 0;
}
