/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: creating, opening and closing images; flush and the
 * NEED_CHECK epoch.
 *
 * NEED_CHECK is set (and made durable) before the first change after a
 * clean state, and cleared only when everything is written back, no
 * request is running and no cluster is leaked: at close, and from the
 * host's idle timer (header.c writes the flag).
 */

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <endian.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/mman.h>

#include "qed-internal.h"
#include "geometry.h"
#include "safe-open.h"
#include "seam.h"
#include "util.h"

/* The header of a new image, after checking the options. */
static int
new_header (const struct qed_create_options *opts, struct qed_header *h)
{
  uint32_t cs = opts->cluster_size ? opts->cluster_size
    : QED_DEFAULT_CLUSTER_SIZE;
  uint32_t ts = opts->table_size ? opts->table_size : QED_DEFAULT_TABLE_SIZE;
  uint64_t size = ROUND_UP (opts->size, 512);
  size_t name_len = opts->backing_name ? strlen (opts->backing_name) : 0;

  if (opts->size > INT64_MAX - 511) {
    qed_error ("size %" PRIu64 " is too large", opts->size);
    errno = EINVAL;
    return -1;
  }
  if (!is_power_of_2 (cs) || cs < QED_MIN_CLUSTER_SIZE ||
      cs > QED_MAX_CLUSTER_SIZE) {
    qed_error ("cluster-size must be a power of 2 from 4K to 64M");
    errno = EINVAL;
    return -1;
  }
  if (!is_power_of_2 (ts) || ts > QED_MAX_TABLE_SIZE) {
    qed_error ("table-size must be a power of 2 from 1 to 16");
    errno = EINVAL;
    return -1;
  }
  if (!opts->allow_qemu_incompatible && !qed_qemu_can_open (cs, ts)) {
    qed_error ("cluster-size %" PRIu32 " with table-size %" PRIu32
               " makes an image QEMU cannot open%s", cs, ts,
               ts < 2 ? " (QEMU rejects table-size 1)"
               : " (QEMU overflows computing its maximum size)");
    errno = EINVAL;
    return -1;
  }
  if (size > qed_max_image_size (cs, ts) || size > INT64_MAX) {
    qed_error ("size %" PRIu64 " is larger than the maximum %" PRIu64
               " for cluster-size %" PRIu32 " and table-size %" PRIu32,
               size, qed_max_image_size (cs, ts), cs, ts);
    errno = EINVAL;
    return -1;
  }
  if (name_len > QED_MAX_BACKING_NAME || name_len > cs - QED_HEADER_BYTES) {
    qed_error ("backing file name is too long (%zu bytes)", name_len);
    errno = ENAMETOOLONG;
    return -1;
  }

  *h = (struct qed_header) {
    .magic = QED_MAGIC, .cluster_size = cs, .table_size = ts,
    .header_size = 1, .l1_table_offset = cs, .image_size = size,
    .compat_features = opts->compat_features,
  };
  if (name_len > 0) {
    h->features |= QED_F_BACKING_FILE;
    if (opts->backing_raw)
      h->features |= QED_F_BACKING_FORMAT_NO_PROBE;
    h->backing_filename_offset = QED_HEADER_BYTES;
    h->backing_filename_size = name_len;
  }
  return 0;
}

/* Create a file with a unique temporary name in the directory dfd. */
static int
create_temporary (const char *filename, int dfd, char *tmpname,
                  mode_t mode)
{
  int fd;

  for (unsigned i = 0; ; ++i) {
    sprintf (tmpname, ".qed-create.%ld.%u", (long) getpid (), i);
    fd = openat (dfd, tmpname, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
                 O_CLOEXEC, mode);
    if (fd >= 0 || errno != EEXIST || i >= 1000)
      break;
  }
  if (fd == -1)
    qed_error ("%s: cannot create: %m", filename);
  return fd;
}

/* Like qemu-img: header, name at 64, an explicitly written zero L1,
 * and the rest of the header cluster left as a hole.  Then sync.  A
 * private file is made 0600 whatever the umask. */
static int
write_new_image (int fd, const struct qed_header *h, const char *name,
                 bool private_file)
{
  unsigned char hdr[QED_HEADER_BYTES];
  size_t l1_bytes = (size_t) h->table_size * h->cluster_size;
  CLEANUP_FREE void *zeros = calloc (1, l1_bytes);

  qed_header_encode (hdr, h);
  if (zeros == NULL ||
      (private_file && fchmod (fd, 0600) == -1) ||
      pwrite_full (fd, hdr, sizeof hdr, 0) == -1 ||
      (h->backing_filename_size &&
       pwrite_full (fd, name, h->backing_filename_size,
                    QED_HEADER_BYTES) == -1) ||
      pwrite_full (fd, zeros, l1_bytes, h->cluster_size) == -1 ||
      fsync (fd) == -1)
    return -1;
  return 0;
}

/* Link the complete temporary file to its name, durably. */
static int
link_into_place (const char *filename, int dfd, const char *last,
                 const char *tmpname)
{
  int sfd;

  if (linkat (dfd, tmpname, dfd, last, 0) == -1) {
    qed_error ("%s: cannot create: %m", filename);
    unlinkat (dfd, tmpname, 0);
    return -1;
  }
  unlinkat (dfd, tmpname, 0);
  /* Make the new name durable (an O_PATH descriptor cannot be
   * synced). */
  sfd = openat (dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (sfd == -1 || fsync (sfd) == -1) {
    qed_error ("%s: cannot sync the directory: %m", filename);
    if (sfd >= 0)
      close (sfd);
    unlinkat (dfd, last, 0);
    return -1;
  }
  close (sfd);
  return 0;
}

/* The image is written under a temporary name in the same directory
 * and linked into place only when complete and durable: a crash must
 * never leave a partial image at `filename`, which every later start
 * would refuse.  link() fails if `filename` exists, as O_EXCL did.
 * The directory is walked once (every symbolic link on the way judged
 * by its owner, safe-open.c) and both names are made in the directory
 * found, not wherever the path string leads later.
 */
int
qed_create (const char *filename, const struct qed_create_options *opts)
{
  struct qed_header h;
  CLEANUP_FREE char *last = NULL;
  char tmpname[64];
  int fd, dfd, r = -1;

  if (new_header (opts, &h) == -1)
    return -1;
  dfd = qed_open_parent (filename, "cannot create", &last);
  if (dfd == -1)
    return -1;
  fd = create_temporary (filename, dfd, tmpname,
                         opts->private_file ? 0600 : 0644);
  if (fd == -1)
    goto out;
  if (write_new_image (fd, &h, opts->backing_name,
                       opts->private_file) == -1) {
    qed_error ("%s: cannot write the new image: %m", filename);
    close (fd);
    unlinkat (dfd, tmpname, 0);
    goto out;
  }
  if (close (fd) == -1) {
    qed_error ("%s: close: %m", filename);
    unlinkat (dfd, tmpname, 0);
    goto out;
  }
  r = link_into_place (filename, dfd, last, tmpname);
 out:
  close (dfd);
  return r;
}

static void
image_free (struct qed_image *img)
{
  if (img == NULL)
    return;
  qed_tables_free (img);
  if (img->fd >= 0)
    qed_io_close (img->fd);
  if (img->dirfd >= 0)
    close (img->dirfd);
  if (img->zero_buf)
    munmap (img->zero_buf, img->cs);
  pthread_mutex_destroy (&img->lock);
  pthread_mutex_destroy (&img->flush_lock);
  pthread_cond_destroy (&img->cond);
  free (img->pending_free.ptr);
  free (img->flushed_free.ptr);
  free (img->free_list.ptr);
  free (img->backing_name);
  free (img->filename);
  free (img);
}

/* A new image structure; it takes over opts->fd with use_fd (closed
 * on failure too). */
static struct qed_image *
image_new (const char *filename, const struct qed_open_options *opts)
{
  struct qed_image *img = calloc (1, sizeof *img);

  if (img == NULL) {
    qed_error ("calloc: %m");
    if (opts->use_fd)
      qed_io_close (opts->fd);
    return NULL;
  }
  img->fd = opts->use_fd ? opts->fd : -1;
  img->dirfd = -1;
  pthread_mutex_init (&img->lock, NULL);
  pthread_mutex_init (&img->flush_lock, NULL);
  pthread_cond_init (&img->cond, NULL);
  img->readonly = opts->readonly;
  img->can_punch = true;
  img->demote = opts->demote;
  img->freelist = opts->freelist && !opts->demote;
  img->compact_limit = opts->compact_limit;
  img->cache_budget = opts->cache_budget;
  img->reclaim_budget = RECLAIM_UNLIMITED;
  img->filename = strdup (filename);
  if (img->filename == NULL) {
    qed_error ("strdup: %m");
    image_free (img);
    return NULL;
  }
  return img;
}

/* Open and lock the file: a regular file, locked before anything is
 * read (a repair must not race another writer). */
static int
open_file (struct qed_image *img, const struct qed_open_options *opts,
           struct stat *st)
{
  const char *filename = img->filename;

  /* O_NONBLOCK: opening a FIFO must fail below, not hang.  Every
   * symbolic link on the path is judged by its owner (safe-open.c). */
  if (!opts->use_fd) {
    img->fd = qed_open_image_fd (filename, (opts->readonly ? O_RDONLY
                                            : O_RDWR) | O_NONBLOCK,
                                 &img->dirfd);
    if (img->fd == -1)
      return -1;
  }
  if (qed_io_fstat (img->fd, st) == -1) {
    qed_error ("%s: fstat: %m", filename);
    return -1;
  }
  if (!S_ISREG (st->st_mode)) {
    qed_error ("%s: not a regular file", filename);
    errno = EINVAL;
    return -1;
  }
  /* A descriptor we were given is the caller's (safe_open clears
   * O_NONBLOCK itself). */
  if (!opts->use_fd)
    fcntl (img->fd, F_SETFL, fcntl (img->fd, F_GETFL) & ~O_NONBLOCK);
  return qed_lock_file (img->fd, filename,
                        opts->backing_layer ? QED_LOCK_BACKING :
                        opts->readonly ? QED_LOCK_READER : QED_LOCK_WRITER,
                        opts->locking);
}

/* The geometry and allocation state, from the validated header and
 * the file size. */
static void
set_geometry (struct qed_image *img, uint64_t file_size)
{
  img->cs = img->h.cluster_size;
  img->cs_bits = log_2 (img->cs);
  img->table_bytes = (uint64_t) img->h.table_size * img->cs;
  img->table_entries = img->table_bytes / 8;
  img->table_bits = log_2 (img->table_entries);
  img->header_end = (uint64_t) img->h.header_size * img->cs;
  img->l1_start = img->h.l1_table_offset;
  img->l1_end = img->l1_start + img->table_bytes;
  img->nr_clusters = qed_bytes_to_clusters (img, img->h.image_size);
  img->file_end = img->alloc_end = ROUND_DOWN (file_size, img->cs);
  img->tail_garbage = file_size != img->file_end;
  img->need_check = img->h.features & QED_F_NEED_CHECK;
}

/* A cluster of zeros for fills: an anonymous mapping costs no memory
 * until written, and we never write it.
 */
static int
map_zero_buf (struct qed_image *img)
{
  img->zero_buf = mmap (NULL, img->cs, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0);
  if (img->zero_buf == MAP_FAILED) {
    img->zero_buf = NULL;
    qed_error ("mmap: %m");
    return -1;
  }
  return 0;
}

/* L1 entries beyond what the image size reaches are never followed.
 * A writable open clears them on disk (QEMU would follow them); if one
 * named a cluster inside the file, with NEED_CHECK set first: the check
 * then reclaims what it pointed at. */
static int
clear_unreachable_l1 (struct qed_image *img)
{
  uint64_t n, in_file;

  if (img->l1_unreachable == 0)
    return 0;
  qed_error ("%s: %" PRIu64 " L1 entries beyond the image size are %s",
             img->filename, img->l1_unreachable,
             img->readonly ? "ignored" : "ignored and cleared");
  if (img->readonly)
    return 0;
  if ((img->l1_unreachable_in_file > 0 && qed_mark_need_check (img) == -1) ||
      qed_scan_unreachable (img, img->l1_start + img->l1_reach * 8,
                            img->l1_end, true, &n, &in_file) == -1 ||
      qed_sync (img) == -1)
    return -1;
  return 0;
}

/* The check at open, if NEED_CHECK is set or asked for: repair unless
 * read-only, and refuse the image if corruptions remain. */
static int
check_at_open (struct qed_image *img, const struct qed_open_options *opts)
{
  const char *filename = img->filename;
  struct qed_check_result res;
  bool repair = !img->readonly;
  int r;

  if ((!img->need_check && !opts->force_check) || opts->skip_check)
    return 0;
  qed_debug ("%s: %s, checking the image%s", filename,
             img->need_check ? "NEED_CHECK is set" : "check requested",
             repair ? " and repairing it" : " (read-only: no repair)");
  /* With a list to write, leaks beyond the limit are listed, not
   * moved: a repair after a crash is as fast as a clean stop. */
  if (repair && img->freelist)
    img->reclaim_budget = qed_cluster_index (img, img->compact_limit);
  r = qed_check (img, repair, &res);
  img->reclaim_budget = RECLAIM_UNLIMITED;
  if (r == -1)
    return -1;
  /* Said once, as a notice: leaks are what an unclean stop leaves
   * (routine); a corruption repaired means something else damaged the
   * image, and the manual tells operators to alert on it. */
  if (res.corruptions_fixed > 0 || res.leaks_fixed > 0)
    qed_notice ("%s: repaired %" PRIu64 " corruptions and reclaimed %"
                PRIu64 " leaked clusters", filename,
                res.corruptions_fixed, res.leaks_fixed);
  if (res.check_errors > 0) {
    qed_error ("%s: the consistency check failed with I/O errors",
               filename);
    errno = EIO;
    return -1;
  }
  if (res.corruptions > res.corruptions_fixed) {
    qed_error ("%s: %" PRIu64 " corruptions %s; NEED_CHECK stays set",
               filename, res.corruptions - res.corruptions_fixed,
               img->readonly ? "found (read-only: not repaired)"
               : "could not be repaired");
    errno = EIO;
    return -1;
  }
  return 0;
}

static int try_clear_need_check (struct qed_image *img);

/* A trusted free-cluster list is loaded (unless a check will run: its
 * bookkeeping replaces the list).  *rebuild: free space must come from
 * the tables instead. */
static int
open_freelist (struct qed_image *img, const struct qed_open_options *opts,
               bool *rebuild)
{
  bool check = (img->need_check || opts->force_check) && !opts->skip_check;

  if (qed_freelist_open (img, rebuild) == -1)
    return -1;
  if (img->list_trusted && check) {
    img->list_trusted = false;
    img->free_list.len = 0;
  }
  /* What a limited repair leaves is listed. */
  *rebuild |= check && img->freelist;
  return 0;
}

/* Free space from the tables, after an older writer (or a damaged
 * list, or a limited repair).  Leaks must be explained before the
 * image is clean: by NEED_CHECK (compacted at the stop), or by a new
 * list. */
static int
rebuild_at_open (struct qed_image *img, const struct qed_open_options *opts,
                 bool rebuild)
{
  int r = 0;

  if (img->readonly || !rebuild || opts->skip_check)
    return 0;
  /* Leaks are harmless: a list that cannot be written now (a full file
   * system) never fails the open; NEED_CHECK stays set instead. */
  if (qed_freelist_rebuild (img) == -1)
    goto kept;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
    if (img->free_list.len > 0 && qed_mark_need_check (img) == -1)
      return -1;
  }
  if (img->need_check || img->list_record) {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->flush_lock);
    r = try_clear_need_check (img);
  }
  if (r == 0)
    return 0;
 kept:
  qed_error ("%s: the free clusters could not be listed (%m): NEED_CHECK "
             "stays set", img->filename);
  return img->need_check ? 0 : -1;
}

struct qed_image *
qed_open (const char *filename, const struct qed_open_options *opts)
{
  struct qed_image *img = image_new (filename, opts);
  struct stat st;
  bool rebuild;

  if (img == NULL)
    return NULL;
  if (open_file (img, opts, &st) == -1 ||
      qed_header_load (img, st.st_size) == -1)
    goto err;
  set_geometry (img, st.st_size);
  if (map_zero_buf (img) == -1 ||
      qed_tables_init (img, opts->l2_cache_bytes) == -1 ||
      open_freelist (img, opts, &rebuild) == -1 ||
      qed_clear_unknown_autoclear (img) == -1 ||
      clear_unreachable_l1 (img) == -1 ||
      check_at_open (img, opts) == -1 ||
      rebuild_at_open (img, opts, rebuild) == -1)
    goto err;
  return img;

 err:
  {
    int e = errno;
    image_free (img);
    errno = e ? e : EIO;
  }
  return NULL;
}

/* Clear NEED_CHECK if the image is clean on disk.  flush_lock held. */
static int
try_clear_need_check (struct qed_image *img)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);

  if (img->active_ops || img->reservations || img->ndirty ||
      img->pending_free.len || img->leaking || img->sync_error)
    return 0;
  /* Free clusters are leaks on disk: clean only if compacted away, or
   * listed. */
  if (!img->freelist && (img->flushed_free.len || img->free_list.len))
    return 0;
  for (uint64_t i = 0; i < qed_l1_pages (img); ++i)
    if (img->l1_dirty[i])
      return 0;
  if (!img->need_check) {
    /* A stale record of a list left by a writer that cleared the bit
     * would make every writable open walk the tables. */
    if (img->list_record &&
        !(img->h.autoclear_features & QED_AF_FREELIST))
      return qed_freelist_publish (img);
    return 0;
  }
  if (qed_cut_tail (img) == -1 || qed_freelist_publish (img) == -1)
    return -1;
  if (img->leaking)
    return 0;                   /* free clusters that could not be listed */
  if (qed_clear_need_check (img) == -1)
    return -1;
  qed_debug ("%s: clean: NEED_CHECK cleared", img->filename);
  return 0;
}

static bool
need_check_is_set (struct qed_image *img)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  return img->need_check;
}

int
qed_idle (struct qed_image *img)
{
  if (img->readonly || !need_check_is_set (img))
    return 0;
  if (qed_flush (img) == -1)
    return -1;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->flush_lock);
  return try_clear_need_check (img);
}

/* At a clean stop: give back the space freed by zero and trim, moving
 * at most compact_limit of data when the rest can be listed, so that
 * the image is left with no unexplained leak.  flush_lock held. */
static int
close_compact (struct qed_image *img)
{
  int r;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
    if (!img->flushed_free.len && !img->free_list.len && !img->leaking)
      return 0;
    /* A list on disk (from the idle timer, or the open) is still
     * valid; with no data to move, leave it. */
    if (!img->need_check && img->freelist && img->compact_limit < img->cs &&
        qed_freelist_record_offset (img) != 0)
      return 0;
    if (qed_mark_need_check (img) == -1)
      return -1;
  }
  /* (With no room for the list's record, compact completely.) */
  if (img->freelist && qed_freelist_record_offset (img) != 0)
    img->reclaim_budget = qed_cluster_index (img, img->compact_limit);
  r = qed_compact (img);
  img->reclaim_budget = RECLAIM_UNLIMITED;
  if (r == 0 && img->freelist)
    r = qed_freelist_rebuild (img);
  return r;
}

/* Write everything back, give back the space freed by zero and trim
 * (compacted, or listed), then mark it clean; demote last. */
static int
close_clean (struct qed_image *img)
{
  if ((img->demote && qed_demote_zero_clusters (img) == -1) ||
      qed_flush (img) == -1)
    return -1;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->flush_lock);
  /* Nothing is marked clean after a failed fdatasync. */
  if (img->sync_error)
    return -1;
  if (close_compact (img) == -1 || try_clear_need_check (img) == -1)
    return -1;
  if (img->demote)
    return qed_demote_flags (img);
  return 0;
}

int
qed_close (struct qed_image *img)
{
  int r = 0;

  if (img == NULL)
    return 0;
  if (!img->readonly)
    r = close_clean (img);
  image_free (img);
  return r;
}

void
qed_discard (struct qed_image *img)
{
  image_free (img);
}

const struct qed_header *
qed_get_header (const struct qed_image *img)
{
  return &img->h;
}

uint64_t
qed_get_size (const struct qed_image *img)
{
  return img->h.image_size;
}

uint32_t
qed_get_cluster_size (const struct qed_image *img)
{
  return img->cs;
}

bool
qed_is_readonly (const struct qed_image *img)
{
  return img->readonly;
}

const char *
qed_get_backing_name (const struct qed_image *img)
{
  return img->backing_name;
}

bool
qed_get_backing_raw (const struct qed_image *img)
{
  return img->backing_raw;
}

const char *
qed_get_filename (const struct qed_image *img)
{
  return img->filename;
}

void
qed_get_stats (struct qed_image *img, struct qed_stats *st)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  st->l2_cache_pages = img->npages;
  st->l2_cache_max_pages = img->max_pages;
  st->l2_cache_hits = img->hits;
  st->l2_cache_misses = img->misses;
  st->file_end = img->file_end;
  st->free_clusters = img->free_list.len + img->flushed_free.len +
    img->pending_free.len;
}
