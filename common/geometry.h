/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the image's geometry, named.
 *
 * Every conversion between bytes, clusters and table indexes goes
 * through these (QEMU's block/qed.h has the same set: its
 * qed_offset_into_cluster, qed_l1_index, qed_l2_index, ...), so that no
 * file open-codes a shift or a mask.  A "cluster" is an index (guest
 * or file offset divided by the cluster size); an "offset" is in bytes.
 */

#ifndef NBDKIT_QED_GEOMETRY_H
#define NBDKIT_QED_GEOMETRY_H

#include <stdbool.h>
#include <stdint.h>

#include "qed-internal.h"

/* The cluster holding byte offset off. */
static inline uint64_t
qed_cluster_index (const struct qed_image *img, uint64_t off)
{
  return off >> img->cs_bits;
}

/* The first byte of cluster c. */
static inline uint64_t
qed_cluster_start (const struct qed_image *img, uint64_t c)
{
  return c << img->cs_bits;
}

/* n clusters in bytes. */
static inline uint64_t
qed_clusters_to_bytes (const struct qed_image *img, uint64_t n)
{
  return n << img->cs_bits;
}

/* The clusters that bytes [0, bytes) touch. */
static inline uint64_t
qed_bytes_to_clusters (const struct qed_image *img, uint64_t bytes)
{
  return (bytes + img->cs - 1) >> img->cs_bits;
}

static inline uint64_t
qed_offset_into_cluster (const struct qed_image *img, uint64_t off)
{
  return off & (img->cs - 1);
}

static inline bool
qed_offset_is_cluster_aligned (const struct qed_image *img, uint64_t off)
{
  return qed_offset_into_cluster (img, off) == 0;
}

/* The end of guest cluster c, clipped to the image size. */
static inline uint64_t
qed_cluster_end (const struct qed_image *img, uint64_t c)
{
  uint64_t end = qed_cluster_start (img, c + 1);
  return end < img->h.image_size ? end : img->h.image_size;
}

/* The L1 entry (L2 table) that maps guest cluster c. */
static inline uint64_t
qed_l1_index (const struct qed_image *img, uint64_t c)
{
  return c >> img->table_bits;
}

/* Guest cluster c's entry within its L2 table. */
static inline uint64_t
qed_l2_index (const struct qed_image *img, uint64_t c)
{
  return c & (img->table_entries - 1);
}

/* The first guest cluster that L1 entry l1i maps. */
static inline uint64_t
qed_l1_first_cluster (const struct qed_image *img, uint64_t l1i)
{
  return l1i << img->table_bits;
}

/* The number of clusters from c to the end of its L2 table. */
static inline uint64_t
clusters_left_in_table (const struct qed_image *img, uint64_t c)
{
  return img->table_entries - qed_l2_index (img, c);
}

/* Pages of the resident L1 (each has an l1_dirty flag). */
static inline uint64_t
qed_l1_pages (const struct qed_image *img)
{
  return img->l1_entries / L2_PAGE_ENTRIES;
}

/* Entries of the L2 table of L1 index l1i that guest offsets reach (a
 * 64M/16 table is 1 GiB: a 1 GiB disk reaches 128 bytes of it). */
static inline uint64_t
qed_table_reach (const struct qed_image *img, uint64_t l1i)
{
  uint64_t first = qed_l1_first_cluster (img, l1i);

  if (first >= img->nr_clusters)
    return 0;
  return img->nr_clusters - first < img->table_entries
    ? img->nr_clusters - first : img->table_entries;
}

/* Entry checks.  A data cluster (or table) of len bytes must be aligned
 * (reserved low bits clear), after the header, inside the file and not
 * in the L1.
 */
static inline bool
valid_cluster_offset (const struct qed_image *img, uint64_t off, uint64_t len)
{
  return qed_offset_is_cluster_aligned (img, off) &&
    off >= img->header_end &&
    off <= img->file_end && img->file_end - off >= len &&
    (off >= img->l1_end || off + len <= img->l1_start);
}

/* Room past what the tables and data of a valid image take: the
 * growth chunk, and clusters freed by requests still in flight when
 * the file grew. */
#define QED_VALID_END_SLACK (UINT64_C (264) << 20)

/* The end a valid image of this geometry can reach at most: the
 * header, the L1 table, an L2 table for every resident L1 entry, every
 * guest cluster, a free-cluster list of all of them, and the slack.
 * Clusters past it can only be leaks: memory and time spent on them
 * follow the disk size, never the file's apparent size. */
static inline uint64_t
qed_valid_end (const struct qed_image *img)
{
  uint64_t end = img->header_end + img->table_bytes * (1 + img->l1_entries) +
    (img->nr_clusters << img->cs_bits);
  uint64_t list = ((end >> img->cs_bits) / 2 + 1) * 16;

  return end + ((list + img->cs - 1) & ~((uint64_t) img->cs - 1)) +
    QED_VALID_END_SLACK;
}

#endif /* NBDKIT_QED_GEOMETRY_H */
