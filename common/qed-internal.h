/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the image structure shared by the core's files.
 *
 * About the locking:
 *
 * img->lock guards all metadata in memory (the L1, the L2 page cache,
 * the allocation pointer, the free lists, the reservations and the
 * NEED_CHECK state).  Data I/O is done without it.  What runs with it
 * held: loading an L2 page (one 4K pread), and in the allocator
 * (alloc.c) setting NEED_CHECK before the first change (a 24-byte
 * header write and an fdatasync), growing the file (ftruncate) and
 * punching reused free clusters again (fallocate); all rare next to
 * the requests they serve.
 *
 * A request that changes the mapping of clusters (an allocating write,
 * a zero or trim, a copy-on-read fill) first *reserves* the run of
 * clusters under img->lock.  Another such request on a reserved cluster
 * waits on img->cond and then looks the cluster up again.  So the
 * lookup, the data write and the commit of a cluster happen as one step
 * with respect to other changes of the same cluster, while different
 * clusters proceed in parallel.  A request holds at most one reserved
 * run and never waits while holding one, so there is no deadlock.
 *
 * img->flush_lock serialises metadata writeback (table.c).  A thread
 * that needs both takes flush_lock first.  Both are error-checking
 * mutexes: taking one the thread already holds aborts (util.h), and the
 * functions that need img->lock held assert it.  Each core file states
 * its rules in its head comment.
 *
 * About crash safety:
 *
 * Table changes are made in memory and marked dirty.  They reach the
 * disk only in writeback, which first fdatasyncs the file (so every
 * cluster a dirty entry points to is durable) and then writes the dirty
 * table pages, then fdatasyncs again.  New clusters are always holes
 * (freshly extended or punched), so a new L2 table needs no write until
 * it has entries.  The on-disk tables therefore never point at data
 * that is not durable, with no fdatasync per allocating write; a crash
 * can only leak clusters, and NEED_CHECK (set durably before the first
 * change after a clean state) makes the next open reclaim them.
 *
 * Freed clusters (zero/trim) are reused only after writeback has made
 * the unlinking durable and no request that might still hold their old
 * address is running (img->active_ops fell to 0 since).
 */

#ifndef NBDKIT_QED_INTERNAL_H
#define NBDKIT_QED_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <pthread.h>
#include <sys/uio.h>

#include "qed.h"
#include "defaults.h"

/* lock.c */
enum qed_lock_role { QED_LOCK_WRITER, QED_LOCK_READER, QED_LOCK_BACKING };
extern int qed_lock_file (int fd, const char *filename,
                          enum qed_lock_role role, enum qed_locking locking);

/* L2 tables are cached in 4K pages (512 entries), so that a cache miss
 * costs one small read and the cache covers many tables sparsely.
 */
#define L2_PAGE_BYTES    4096u
#define L2_PAGE_ENTRIES  (L2_PAGE_BYTES / 8)
#define DEFAULT_L2_CACHE QED_DEFAULT_L2_CACHE   /* defaults.h */
#define MIN_L2_CACHE     (64u * 1024)

struct l2_page {
  uint64_t offset;              /* file offset of the page (the key) */
  uint64_t *entries;            /* L2_PAGE_ENTRIES, host order */
  struct l2_page *hnext;        /* hash chain */
  struct l2_page *prev, *next;  /* LRU list, most recent first */
  struct l2_page *dnext;        /* dirty list */
  bool dirty;
  bool pinned;                  /* being written back: keep in memory */
  bool referenced;              /* used since the eviction scan passed */
  bool backed;                  /* has disk space (table.c: reserve_page) */
};

/* A run of clusters reserved by one request. */
struct reservation {
  uint64_t first, last;         /* guest cluster indexes, inclusive */
  struct reservation *next;
};

/* A growable array of cluster offsets. */
struct offset_list {
  uint64_t *ptr;
  size_t len, cap;
};

struct qed_image {
  char *filename;
  int fd;
  /* The real directory holding the file (O_PATH, after every symbolic
   * link), where its relative backing name resolves; -1 if the image
   * was opened from a descriptor. */
  int dirfd;
  bool readonly;
  struct qed_header h;
  char *backing_name;           /* NUL-terminated, or NULL */

  /* Geometry, derived from the header. */
  uint32_t cs;                  /* cluster size */
  unsigned cs_bits;
  uint64_t table_bytes;         /* ts * cs */
  uint64_t table_entries;       /* entries per table */
  unsigned table_bits;          /* log2 (table_entries) */
  uint64_t header_end;          /* header_size * cs */
  uint64_t l1_start, l1_end;
  uint64_t nr_clusters;         /* guest clusters (rounded up) */

  pthread_mutex_t lock;
  pthread_cond_t cond;
  pthread_mutex_t flush_lock;

  /* L1, always resident: the first l1_entries, the ones the guest size
   * reaches (entries beyond it are ignored, and cleared on disk by a
   * writable open).  A 64M-cluster image has a 1 GiB L1 table, of
   * which a 1 TiB disk uses 64 bytes. */
  uint64_t *l1;
  uint64_t l1_entries;          /* a multiple of L2_PAGE_ENTRIES */
  uint64_t l1_reach;            /* entries the image size reaches */
  uint64_t l1_unreachable;      /* nonzero entries beyond, at open */
  uint64_t l1_unreachable_in_file;  /* of which name a cluster */
  bool *l1_dirty;               /* per 4K page: l1_entries / 512 of them */

  /* L2 page cache: hash for lookup, LRU for eviction. */
  struct l2_page **hash;
  size_t hash_mask;
  struct l2_page lru;           /* sentinel */
  size_t npages, max_pages;
  struct qed_cache_budget *cache_budget;  /* shared with other images */
  struct l2_page *dirty_list;
  size_t ndirty;
  uint64_t hits, misses;

  /* Allocation: clusters are handed out at file_end, the end of the
   * clusters in use.  The file itself is grown in chunks, to alloc_end,
   * so most allocations need no syscall; it is cut back to file_end
   * before NEED_CHECK is cleared (and a crash leaves only a hole at the
   * tail, which the check truncates). */
  uint64_t file_end;
  uint64_t alloc_end;
  bool tail_garbage;            /* a partial cluster follows file_end */
  struct offset_list pending_free;  /* unlinked, not yet durable */
  struct offset_list flushed_free;  /* durable, old users may remain */
  struct offset_list free_list;     /* reusable holes */
  bool can_punch;

  struct reservation *reservations;
  unsigned active_ops;          /* data requests in progress */

  bool need_check;              /* NEED_CHECK is set on disk */
  /* The first failed fdatasync's errno, or 0.  After a writeback error
   * Linux may drop the unsynced pages, so a later fdatasync that
   * succeeds proves nothing: every later sync (and flush) fails, and
   * NEED_CHECK is never cleared, until the image is reopened. */
  int sync_error;
  /* Clusters left the allocator without reaching a table or a free
   * list (a failed write or fill): NEED_CHECK must stay set until a
   * check reclaims them.  Lock held. */
  bool leaking;
  bool has_backing;
  bool backing_raw;

  void *zero_buf;               /* cs bytes of zeros (lazily mapped) */

  /* The free-cluster list (freelist.c). */
  bool freelist;                /* write one at a clean stop */
  uint64_t compact_limit;       /* bytes moved at a clean stop */
  bool demote;
  bool list_record;             /* a list record is on disk */
  bool list_trusted;            /* the list was loaded into free_list */
};

/* A reclaim budget when compaction is not limited. */
#define RECLAIM_UNLIMITED UINT64_MAX

/* The core's files, bottom up (lock.c, with no call into the core,
 * is declared first); each calls only the ones above it in HACKING.md's
 * list.
 */

/* io.c: whole transfers, retrying EINTR and short writes. */
/* Exactly count bytes; a read past the end of the file is an error
 * (EIO): callers read only what the checks at open put in the file. */
extern int pread_full (int fd, void *buf, size_t count, uint64_t off);
/* The same, but the part past the end of the file reads as zeros (for
 * probing files that may be shorter than what is read). */
extern int pread_zeros_past_eof (int fd, void *buf, size_t count,
                                 uint64_t off);
extern int pwrite_full (int fd, const void *buf, size_t count, uint64_t off);
/* Consumes iov (its entries are advanced). */
extern int pwritev_full (int fd, struct iovec *iov, int iovcnt, uint64_t off);
/* fdatasync the image; fails for good after the first failure. */
extern int qed_sync (struct qed_image *img);

/* header.c: fields written in place and made durable. */
extern int qed_header_load (struct qed_image *img, uint64_t file_size);
extern int qed_mark_need_check (struct qed_image *img);   /* lock held */
extern int qed_clear_need_check (struct qed_image *img);
extern int qed_clear_unknown_autoclear (struct qed_image *img);
/* Write the three flag words (features, compat, autoclear) at once. */
extern int qed_write_flags (struct qed_image *img, uint64_t features,
                            uint64_t compat, uint64_t autoclear);

/* alloc.c */
extern int offset_list_append (struct offset_list *l, uint64_t v);
/* Cut the file back to file_end (before it is marked clean). */
extern int qed_cut_tail (struct qed_image *img);
/* Allocate n contiguous zeroed (hole) clusters.  Lock held. */
extern int qed_alloc_clusters (struct qed_image *img, uint64_t n,
                               uint64_t *offset);
/* Allocate 1 to n contiguous zeroed clusters (*got of them: free
 * clusters are reused a run at a time).  Lock held. */
extern int qed_alloc_run (struct qed_image *img, uint64_t n,
                          uint64_t *offset, uint64_t *got);
/* Writeback made the unlinking of the first n clusters of pending_free
 * durable: they may be reused once no request that saw them runs.
 * Lock not held. */
extern void qed_free_durable (struct qed_image *img, size_t n);
/* Note that clusters leaked (lock held, or no request running). */
extern void qed_note_leak (struct qed_image *img, const char *why);

/* Requests in progress (freed clusters are reused only when none
 * runs).  Both take the lock (not held); qed_op_end preserves errno
 * and returns whether dirty table pages fill half the L2 cache, read
 * in the same section (a request that changed the image then writes
 * them back). */
extern void qed_op_begin (struct qed_image *img);
extern bool qed_op_end (struct qed_image *img);

/* table.c */
extern int qed_tables_init (struct qed_image *img, uint64_t cache_bytes);
extern void qed_tables_free (struct qed_image *img);
extern void qed_cache_drop (struct qed_image *img);
/* Look up the L2 entry of a guest cluster; *entry is 0, 1 or a
 * validated data offset.  Lock held. */
extern int qed_get_entry (struct qed_image *img, uint64_t cluster,
                          uint64_t *entry);
/* Set the L2 entry of a guest cluster, allocating its L2 table if
 * needed.  Lock held. */
extern int qed_set_entry (struct qed_image *img, uint64_t cluster,
                          uint64_t entry);
/* Is the L2 table of this cluster absent?  Lock held. */
extern bool qed_table_absent (struct qed_image *img, uint64_t cluster);
/* Write back dirty metadata (flush_lock held, lock not held). */
extern int qed_writeback (struct qed_image *img);
/* Count (and maybe clear on disk) nonzero entries in [from, to). */
extern int qed_scan_unreachable (struct qed_image *img, uint64_t from,
                                 uint64_t to, bool clear, uint64_t *count,
                                 uint64_t *in_file);

/* check.c */
/* qed_check (qed.h) with what the core's own callers add: a repair
 * moves at most budget clusters of data (RECLAIM_UNLIMITED: no limit;
 * a limited repair leaves clearing NEED_CHECK to its caller, which
 * lists the leaks left), and a check without repair appends each run
 * of leaked clusters to leaks as a pair (file offset, clusters) (NULL:
 * not listed). */
extern int qed_check_reclaim (struct qed_image *img, bool repair,
                              uint64_t budget, struct offset_list *leaks,
                              struct qed_check_result *result);
/* Give back free clusters at a clean stop (no request runs), moving at
 * most budget clusters of data. */
extern int qed_compact (struct qed_image *img, uint64_t budget);

/* freelist.c: the free-cluster list (autoclear bit 0x1) and demote. */
extern uint32_t qed_crc32 (const void *buf, size_t len);
/* Where the list record is (0: no room for one: a clean stop then
 * compacts completely). */
extern uint64_t qed_freelist_record_offset (const struct qed_image *img);
/* At open: load a trusted list into free_list; *rebuild says that the
 * free space must be rebuilt from the tables instead. */
extern int qed_freelist_open (struct qed_image *img, bool *rebuild);
extern int qed_freelist_rebuild (struct qed_image *img);
/* Write the free clusters as the list and set the bit (NEED_CHECK set;
 * the caller clears it).  Lock held, everything written back. */
extern int qed_freelist_publish (struct qed_image *img);
extern int qed_demote_zero_clusters (struct qed_image *img);
extern int qed_demote_flags (struct qed_image *img);

#endif /* NBDKIT_QED_INTERNAL_H */
