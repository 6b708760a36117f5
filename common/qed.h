/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the QED format core.
 *
 * This is the interface the plugin, the filter and the unit tests use,
 * with safe-open.h beside it for opening files that someone else may
 * have named or planted (the filter opens its overlay with it; those
 * rules are kept in one header of their own).  The core knows nothing
 * of nbdkit: messages go out through the
 * seam in seam.h, and the layer beneath an image (its backing file, or
 * the filter's backend) is reached through struct qed_below.
 *
 * Every function that can fail returns -1 with errno set, after
 * reporting a message through qed_error().
 */

#ifndef NBDKIT_QED_H
#define NBDKIT_QED_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>

/* On-disk constants (docs/interop/qed_spec.txt). */
#define QED_MAGIC                  0x00444551 /* "QED\0" little-endian */
#define QED_HEADER_BYTES           64
#define QED_F_BACKING_FILE         0x1
#define QED_F_NEED_CHECK           0x2
#define QED_F_BACKING_FORMAT_NO_PROBE 0x4
#define QED_F_KNOWN                0x7
/* This project's compat and autoclear bits (QEMU defines none for QED,
 * ignores unknown compat bits and clears unknown autoclear bits on a
 * writable open).  nbdkit-qed.pod, "FEATURE BITS", has the details. */
#define QED_CF_COPY_ON_READ        0x1  /* compat: copy-on-read hint */
#define QED_AF_FREELIST            0x1  /* autoclear: valid free-cluster list */
#define QED_CF_ORIGIN              0x2  /* compat: the filter's origin record */
#define QED_MIN_CLUSTER_SIZE       4096u
#define QED_MAX_CLUSTER_SIZE       (64u * 1024 * 1024)
#define QED_DEFAULT_CLUSTER_SIZE   65536u
#define QED_MIN_TABLE_SIZE         1u
#define QED_MAX_TABLE_SIZE         16u
#define QED_DEFAULT_TABLE_SIZE     4u
#define QED_MAX_BACKING_NAME       4095u

/* Table entry values with a special meaning. */
#define QED_ENTRY_UNALLOCATED      0
#define QED_ENTRY_ZERO             1  /* L2 only: the cluster reads as zeros */

/* The 64-byte header, in host byte order. */
struct qed_header {
  uint32_t magic;
  uint32_t cluster_size;
  uint32_t table_size;          /* in clusters */
  uint32_t header_size;         /* in clusters */
  uint64_t features;
  uint64_t compat_features;
  uint64_t autoclear_features;
  uint64_t l1_table_offset;
  uint64_t image_size;
  uint32_t backing_filename_offset;
  uint32_t backing_filename_size;
};

/* header.c */
extern void qed_header_decode (struct qed_header *h,
                               const unsigned char raw[QED_HEADER_BYTES]);
extern void qed_header_encode (unsigned char raw[QED_HEADER_BYTES],
                               const struct qed_header *h);
/* Largest image_size the geometry can address (saturates at UINT64_MAX). */
extern uint64_t qed_max_image_size (uint32_t cluster_size, uint32_t table_size);
/* Would QEMU 7.2 open an image of this geometry?  (It refuses table_size
 * 1, and sizes whose maximum overflows: docs/qemu-differences.md.) */
extern bool qed_qemu_can_open (uint32_t cluster_size, uint32_t table_size);
/* Validate every header field against a file of file_size bytes.  On
 * failure returns -1 and writes a message (without the file name) to
 * msg; errno is ENOTSUP for unknown features, EINVAL otherwise.
 */
extern int qed_header_validate (const struct qed_header *h,
                                uint64_t file_size, char *msg, size_t msglen);

/* The layer beneath an image.  read must fill the whole buffer,
 * returning zeros past the end of the layer.  A NULL qed_below means
 * "nothing beneath": unallocated clusters read as zeros.
 */
struct qed_below {
  int (*read) (void *opaque, void *buf, uint64_t count, uint64_t offset);
  /* Optional: hint that a range will be read soon. */
  int (*prefetch) (void *opaque, uint64_t count, uint64_t offset);
  void *opaque;
};

struct qed_image;               /* opaque */

/* Image locking compatible with QEMU's (lock.c).  AUTO: lock, unless
 * the file system has no locks. */
enum qed_locking { QED_LOCKING_AUTO = 0, QED_LOCKING_ON, QED_LOCKING_OFF };
/* "auto", or a boolean (on/off, true/false, yes/no, 1/0).  -1 if not. */
extern int qed_parse_locking (const char *value, enum qed_locking *locking);
/* Open filename only to hold a reader's locks on it (until the
 * returned descriptor is closed).  -1 on error or conflict. */
extern int qed_hold_reader_locks (const char *filename,
                                  enum qed_locking locking);

/* An L2 cache budget shared by several images (the plugin's dir=:
 * l2-cache is the budget of the whole process).  Each image may grow
 * its cache up to the whole budget while the images together hold
 * less; beyond it, an image that needs a page evicts one of its own
 * (keeping at least MIN_L2_CACHE).  Set max_bytes, pages = 0; it must
 * outlive the images that use it. */
struct qed_cache_budget {
  uint64_t max_bytes;
  uint64_t pages;               /* held by all its images (atomic) */
};

struct qed_open_options {
  bool readonly;
  enum qed_locking locking;
  bool backing_layer;           /* lock as a backing file (shared) */
  uint64_t l2_cache_bytes;      /* 0 = default */
  struct qed_cache_budget *cache_budget;  /* NULL: l2_cache_bytes */
  /* Run the check (and repair unless readonly) even if NEED_CHECK is
   * clear. */
  bool force_check;
  /* Only validate the header and L1 (for early errors at start-up). */
  bool skip_check;
  /* Use this open descriptor instead of opening filename (taken over:
   * closed with the image, or on failure). */
  bool use_fd;
  int fd;
  /* At a clean stop, move at most compact_limit bytes of data to give
   * back freed clusters, and record the rest in a free-cluster list
   * (else compact completely). */
  bool freelist;
  uint64_t compact_limit;
  /* At a clean stop, remove what an older reader would not know:
   * compact completely, no list, no copy-on-read hint, and zero
   * clusters become unallocated when there is no backing file. */
  bool demote;
};

struct qed_create_options {
  uint64_t size;                /* rounded up to 512 */
  uint32_t cluster_size;        /* 0 = default */
  uint32_t table_size;          /* 0 = default */
  const char *backing_name;     /* stored as given; NULL = none */
  bool backing_raw;             /* sets BACKING_FORMAT_NO_PROBE */
  bool private_file;            /* mode 0600 whatever the umask */
  uint64_t compat_features;     /* e.g. QED_CF_COPY_ON_READ */
  /* Allow geometries QEMU cannot open (only for tests). */
  bool allow_qemu_incompatible;
};

/* image.c */
extern int qed_create (const char *filename,
                       const struct qed_create_options *opts);
extern struct qed_image *qed_open (const char *filename,
                                   const struct qed_open_options *opts);
/* Flush, clear NEED_CHECK when clean, free everything.  Returns -1 if
 * the final flush failed (the image is still closed). */
extern int qed_close (struct qed_image *img);
/* Free everything without writing anything back (for a temporary
 * image that is deleted anyway: the filter's unnamed overlay). */
extern void qed_discard (struct qed_image *img);
extern const struct qed_header *qed_get_header (const struct qed_image *img);
extern uint64_t qed_get_size (const struct qed_image *img);
extern uint32_t qed_get_cluster_size (const struct qed_image *img);
extern bool qed_is_readonly (const struct qed_image *img);
/* The stored backing file name, or NULL (NUL-terminated copy). */
extern const char *qed_get_backing_name (const struct qed_image *img);
extern bool qed_get_backing_raw (const struct qed_image *img);
extern const char *qed_get_filename (const struct qed_image *img);

/* table.c: make every completed write durable (data, then metadata). */
extern int qed_flush (struct qed_image *img);
/* image.c: if nothing is pending, flush and clear NEED_CHECK (idle timer). */
extern int qed_idle (struct qed_image *img);

/* map.c: reads and block status. */
extern int qed_read (struct qed_image *img, const struct qed_below *below,
                     void *buf, uint64_t count, uint64_t offset);

/* Prefetch: advise the kernel of the data clusters in the range and
 * pass unallocated runs to below->prefetch. */
extern int qed_prefetch (struct qed_image *img, const struct qed_below *below,
                         uint64_t count, uint64_t offset);

enum qed_map_type {
  QED_MAP_DATA,                 /* allocated in this image */
  QED_MAP_ZERO,                 /* zero cluster */
  QED_MAP_UNALLOCATED,          /* falls through to the layer beneath */
};
struct qed_map {
  enum qed_map_type type;
  uint64_t length;              /* bytes from offset with this type */
  uint64_t file_offset;         /* DATA only */
};
/* The mapping of the run of clusters that starts at offset, at most
 * count bytes (count > 0, offset < size). */
extern int qed_map (struct qed_image *img, uint64_t offset, uint64_t count,
                    struct qed_map *map);

/* write.c: the write path. */
#define QED_WRITE_FUA        0x1  /* durable before returning */
#define QED_ZERO_MAY_UNMAP   0x2  /* zero: may free space */
#define QED_ZERO_FAST        0x4  /* zero: fail with ENOTSUP unless cheap */
#define QED_WRITE_DETECT_ZERO 0x8 /* write: whole zero clusters become zero */

extern int qed_write (struct qed_image *img, const struct qed_below *below,
                      const void *buf, uint64_t count, uint64_t offset,
                      unsigned flags);
extern int qed_zero (struct qed_image *img, const struct qed_below *below,
                     uint64_t count, uint64_t offset, unsigned flags);
extern int qed_trim (struct qed_image *img, const struct qed_below *below,
                     uint64_t count, uint64_t offset, unsigned flags);
/* Copy-on-read fill: store data read from beneath into clusters that
 * are still unallocated.  buf holds the contents of the whole clusters
 * [offset, offset+count) (cluster aligned, except that count may end
 * at the image size).  Clusters that became allocated or zero
 * meanwhile are left alone: a concurrent write always wins.  With
 * detect_zero, all-zero clusters become zero clusters.  known_zero
 * says the whole range is known to read as zeros (buf may be NULL).
 */
extern int qed_fill (struct qed_image *img, const void *buf,
                     uint64_t count, uint64_t offset,
                     bool detect_zero, bool known_zero);

/* check.c */
struct qed_check_result {
  uint64_t corruptions;         /* found */
  uint64_t corruptions_fixed;
  uint64_t leaks;               /* found */
  uint64_t leaks_fixed;
  uint64_t check_errors;        /* I/O errors during the walk */
  uint64_t allocated_clusters;
};
/* Walk all tables.  With repair, fix what can be fixed (the image must
 * be writable).  Every problem is logged with its guest offset. */
extern int qed_check (struct qed_image *img, bool repair,
                      struct qed_check_result *result);

/* idle.c: a thread that writes back and clears NEED_CHECK once writes
 * have stopped for `seconds`.  get_image is asked for the image each
 * time (it may not be open yet: NULL).  note_write and stop accept NULL.
 */
struct qed_idle_timer;
extern struct qed_idle_timer *qed_idle_timer_start
  (unsigned seconds, struct qed_image *(*get_image) (void));
extern void qed_idle_timer_note_write (struct qed_idle_timer *t);
extern void qed_idle_timer_stop (struct qed_idle_timer *t);

/* backing.c: the chain of read-only backing files beneath a plugin
 * image.  Each layer is a raw file or a QED image.
 */
struct qed_chain;
struct qed_chain_options {
  bool follow;                  /* follow stored names (else refuse) */
  bool beneath;                 /* only names beneath the top's directory */
  bool devices;                 /* allow block devices as backing files */
  const char *override;         /* open this instead of the stored name */
  int override_format;          /* 0 = probe, 1 = raw, 2 = qed */
  uint64_t l2_cache_bytes;
  struct qed_cache_budget *cache_budget;  /* NULL: l2_cache_bytes */
  enum qed_locking locking;
};
#define QED_FORMAT_PROBE 0
#define QED_FORMAT_RAW   1
#define QED_FORMAT_QED   2
/* The chain beneath img, or NULL with *none set if it has none. */
extern struct qed_chain *qed_chain_open (struct qed_image *img,
                                         const struct qed_chain_options *o,
                                         bool *none);
extern void qed_chain_close (struct qed_chain *chain);
/* A qed_below that reads through the chain. */
extern void qed_chain_below (struct qed_chain *chain, struct qed_below *b);
/* What the chain holds at offset: DATA or UNALLOCATED (reads as zeros)
 * for at most count bytes. */
extern int qed_chain_map (struct qed_chain *chain, uint64_t offset,
                          uint64_t count, struct qed_map *map);
/* Human-readable description (for debug messages). */
extern const char *qed_chain_describe (struct qed_chain *chain);

/* header-area.c: the header clusters' free bytes, between the
 * backing file name and the free-cluster list record (the last 64
 * bytes), for records of a user of the core; reads and writes must
 * lie in [*start, *end).  Writes are synced. */
extern int qed_header_area_free (struct qed_image *img, uint64_t *start,
                                 uint64_t *end);
extern int qed_header_area_read (struct qed_image *img, void *buf,
                                 size_t len, uint64_t off);
extern int qed_header_area_write (struct qed_image *img, const void *buf,
                                  size_t len, uint64_t off);
/* Set and clear compat feature bits (one synced header write). */
extern int qed_update_compat (struct qed_image *img, uint64_t set,
                              uint64_t clear);
/* Remove the backing file (and clear_compat) in one synced write of
 * the 64-byte header: the image stands alone from then on. */
extern int qed_detach_backing (struct qed_image *img, uint64_t clear_compat);
/* CRC-32 (IEEE 802.3, as zlib's crc32), freelist.c. */
extern uint32_t qed_crc32 (const void *buf, size_t len);
/* The image file's device and inode. */
extern int qed_get_file_id (struct qed_image *img, uint64_t *dev,
                            uint64_t *ino);

/* Statistics for debugging and tests. */
struct qed_stats {
  uint64_t l2_cache_pages;
  uint64_t l2_cache_max_pages;
  uint64_t l2_cache_hits, l2_cache_misses;
  uint64_t file_end;
  uint64_t free_clusters;
};
extern void qed_get_stats (struct qed_image *img, struct qed_stats *st);

#endif /* NBDKIT_QED_H */
