/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the read path and block status.
 *
 * qed_map answers, from the tables alone, what the run of clusters at
 * an offset is (data at a file offset, a zero cluster, or unallocated);
 * reads, extents and the filter's copy-on-read are built on it.
 *
 * Locking: called without img->lock; qed_map takes it for each lookup,
 * and data is read without it.
 */

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>

#include "qed-internal.h"
#include "geometry.h"
#include "seam.h"
#include "util.h"

/* Bound the clusters examined under the lock in one call. */
#define MAX_MAP_CLUSTERS 65536

static enum qed_map_type
type_of (uint64_t e)
{
  return e == QED_ENTRY_UNALLOCATED ? QED_MAP_UNALLOCATED
    : e == QED_ENTRY_ZERO ? QED_MAP_ZERO : QED_MAP_DATA;
}

int
qed_map (struct qed_image *img, uint64_t offset, uint64_t count,
         struct qed_map *map)
{
  uint64_t c = qed_cluster_index (img, offset), e, end = offset + count, pos;
  unsigned n = 0;

  assert (count > 0 && offset < img->h.image_size);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  if (qed_get_entry (img, c, &e) == -1)
    return -1;
  map->type = type_of (e);
  map->file_offset = e > QED_ENTRY_ZERO
    ? e + qed_offset_into_cluster (img, offset) : 0;

  /* pos is the end of the run found so far. */
  pos = MIN (end, qed_cluster_start (img, c + 1));
  while (pos < end && n++ < MAX_MAP_CLUSTERS) {
    uint64_t nc = qed_cluster_index (img, pos);
    if (map->type == QED_MAP_UNALLOCATED && qed_table_absent (img, nc)) {
      /* Skip a whole absent table at once. */
      uint64_t next_table = nc + clusters_left_in_table (img, nc);
      pos = MIN (end, qed_cluster_start (img, next_table));
      continue;
    }
    if (qed_get_entry (img, nc, &e) == -1)
      return -1;
    if (type_of (e) != map->type ||
        (map->type == QED_MAP_DATA && e != map->file_offset + (pos - offset)))
      break;
    pos = MIN (end, qed_cluster_start (img, nc + 1));
  }
  map->length = pos - offset;
  return 0;
}

/* Read the run m at offset into p. */
static int
read_run (struct qed_image *img, const struct qed_below *below,
          char *p, uint64_t offset, const struct qed_map *m)
{
  switch (m->type) {
  case QED_MAP_DATA:
    if (pread_full (img->fd, p, m->length, m->file_offset) == -1) {
      qed_error ("%s: read at 0x%" PRIx64 ": %m", img->filename,
                 m->file_offset);
      return -1;
    }
    return 0;
  case QED_MAP_ZERO:
    memset (p, 0, m->length);
    return 0;
  case QED_MAP_UNALLOCATED:
    if (below == NULL)
      memset (p, 0, m->length);
    else if (below->read (below->opaque, p, m->length, offset) == -1) {
      if (errno == 0)
        errno = EIO;
      return -1;
    }
    return 0;
  }
  abort ();
}

int
qed_read (struct qed_image *img, const struct qed_below *below,
          void *buf, uint64_t count, uint64_t offset)
{
  char *p = buf;
  int r = 0;

  assert (offset <= img->h.image_size && count <= img->h.image_size - offset);
  qed_op_begin (img);
  while (count > 0) {
    struct qed_map m;

    if (qed_map (img, offset, count, &m) == -1 ||
        read_run (img, below, p, offset, &m) == -1) {
      r = -1;
      break;
    }
    p += m.length;
    offset += m.length;
    count -= m.length;
  }
  qed_op_end (img);
  return r;
}

int
qed_prefetch (struct qed_image *img, const struct qed_below *below,
              uint64_t count, uint64_t offset)
{
  while (count > 0) {
    struct qed_map m;

    if (qed_map (img, offset, count, &m) == -1)
      return -1;
    if (m.type == QED_MAP_DATA)
      qed_io_advise (img->fd, m.file_offset, m.length);
    else if (m.type == QED_MAP_UNALLOCATED && below && below->prefetch &&
             below->prefetch (below->opaque, m.length, offset) == -1)
      return -1;
    offset += m.length;
    count -= m.length;
  }
  return 0;
}
