/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the free bytes of the header clusters, for records kept
 * there by a user of the core (the filter's origin record), and
 * removing the backing file from the header (the filter's detach).
 *
 * The header clusters hold the 64-byte header, the backing file name
 * (QEMU puts it right after the header) and, in their last 64 bytes,
 * the free-cluster list record (freelist.c).  Nothing else of the
 * format uses them, and QEMU writes only the header and the name
 * (qemu-img rebase -u: a longer name may reach further), so bytes in
 * between survive any QEMU writer that keeps the name short enough.
 *
 * Locking: the functions that read or change the header's fields
 * (qed_header_area_free, qed_update_compat, qed_detach_backing) take
 * img->lock themselves, so the caller must not hold it; the free bytes
 * belong to the caller, which orders its own reads and writes of them.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <sys/stat.h>

#include "qed-internal.h"
#include "seam.h"
#include "util.h"

int
qed_header_area_free (struct qed_image *img, uint64_t *start, uint64_t *end)
{
  uint64_t s = QED_HEADER_BYTES, e = img->header_end - 64;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  if (img->h.features & QED_F_BACKING_FILE)
    s = MAX (s, (uint64_t) img->h.backing_filename_offset +
             img->h.backing_filename_size);
  *start = s;
  *end = e > s ? e : s;
  return 0;
}

/* Only the bytes between the name and the list record may be used. */
static int
check_range (struct qed_image *img, size_t len, uint64_t off)
{
  uint64_t s, e;

  qed_header_area_free (img, &s, &e);
  if (off < s || off > e || len > e - off) {
    qed_error ("%s: [%" PRIu64 ", +%zu) is not a free part of the header "
               "clusters", img->filename, off, len);
    errno = ENOSPC;
    return -1;
  }
  return 0;
}

int
qed_header_area_read (struct qed_image *img, void *buf, size_t len,
                      uint64_t off)
{
  if (check_range (img, len, off) == -1)
    return -1;
  if (pread_full (img->fd, buf, len, off) == -1) {
    qed_error ("%s: cannot read the header clusters: %m", img->filename);
    return -1;
  }
  return 0;
}

int
qed_header_area_write (struct qed_image *img, const void *buf, size_t len,
                       uint64_t off)
{
  if (img->readonly) {
    errno = EROFS;
    return -1;
  }
  if (check_range (img, len, off) == -1)
    return -1;
  if (pwrite_full (img->fd, buf, len, off) == -1 || qed_sync (img) == -1) {
    qed_error ("%s: cannot write the header clusters: %m", img->filename);
    return -1;
  }
  return 0;
}

int
qed_update_compat (struct qed_image *img, uint64_t set, uint64_t clear)
{
  uint64_t compat;

  if (img->readonly) {
    errno = EROFS;
    return -1;
  }
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  compat = (img->h.compat_features | set) & ~clear;
  if (compat == img->h.compat_features)
    return 0;
  return qed_write_flags (img, img->h.features, compat,
                          img->h.autoclear_features);
}

int
qed_detach_backing (struct qed_image *img, uint64_t clear_compat)
{
  unsigned char raw[QED_HEADER_BYTES];
  struct qed_header h;

  if (img->readonly) {
    errno = EROFS;
    return -1;
  }
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&img->lock);
  h = img->h;
  h.features &= ~(uint64_t) (QED_F_BACKING_FILE |
                             QED_F_BACKING_FORMAT_NO_PROBE);
  h.compat_features &= ~clear_compat;
  h.backing_filename_offset = 0;
  h.backing_filename_size = 0;
  qed_header_encode (raw, &h);
  /* One write of the 64-byte header (a sector: atomic on any disk),
   * then a sync: either the old origin or none. */
  if (pwrite_full (img->fd, raw, sizeof raw, 0) == -1 ||
      qed_sync (img) == -1) {
    qed_error ("%s: cannot remove the backing file from the header: %m",
               img->filename);
    return -1;
  }
  /* Only the fields that changed: others read image_size and the
   * geometry without the lock. */
  img->h.features = h.features;
  img->h.compat_features = h.compat_features;
  img->h.backing_filename_offset = 0;
  img->h.backing_filename_size = 0;
  img->has_backing = false;
  img->backing_raw = false;
  free (img->backing_name);
  img->backing_name = NULL;
  return 0;
}

int
qed_get_file_id (struct qed_image *img, uint64_t *dev, uint64_t *ino)
{
  struct stat st;

  if (qed_io_fstat (img->fd, &st) == -1)
    return -1;
  *dev = st.st_dev;
  *ino = st.st_ino;
  return 0;
}
