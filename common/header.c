/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the on-disk header.
 *
 * The header is 64 little-endian bytes at offset 0.  We decode it once
 * into host order and validate every field before anything else looks
 * at the file.  Our checks are a superset of QEMU's (magic, known
 * features, cluster and table size, image size, L1 offset, backing name
 * inside the header clusters; see docs/qemu-differences.md): we also
 * refuse header_size 0 (the L1 would overlap the header) and backing
 * names that overlap the 64-byte header, and we compute the maximum
 * image size without QEMU's 64-bit overflow.
 *
 * Updates rewrite only the fields they change (the three flag words,
 * 24 bytes at offset 16, or the autoclear word at 32) and are made
 * durable at once, never the bytes after the header.
 *
 * Locking: qed_mark_need_check runs with img->lock held (asserted: the
 * allocator and the table code call it); the other writers run with it
 * held or with no request running (open, the check, close).
 */

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <endian.h>
#include <inttypes.h>
#include <unistd.h>

#include "qed-internal.h"
#include "seam.h"
#include "util.h"

void
qed_header_decode (struct qed_header *h, const unsigned char raw[64])
{
  h->magic = get_le32 (raw + 0);
  h->cluster_size = get_le32 (raw + 4);
  h->table_size = get_le32 (raw + 8);
  h->header_size = get_le32 (raw + 12);
  h->features = get_le64 (raw + 16);
  h->compat_features = get_le64 (raw + 24);
  h->autoclear_features = get_le64 (raw + 32);
  h->l1_table_offset = get_le64 (raw + 40);
  h->image_size = get_le64 (raw + 48);
  h->backing_filename_offset = get_le32 (raw + 56);
  h->backing_filename_size = get_le32 (raw + 60);
}

void
qed_header_encode (unsigned char raw[64], const struct qed_header *h)
{
  put_le32 (raw + 0, h->magic);
  put_le32 (raw + 4, h->cluster_size);
  put_le32 (raw + 8, h->table_size);
  put_le32 (raw + 12, h->header_size);
  put_le64 (raw + 16, h->features);
  put_le64 (raw + 24, h->compat_features);
  put_le64 (raw + 32, h->autoclear_features);
  put_le64 (raw + 40, h->l1_table_offset);
  put_le64 (raw + 48, h->image_size);
  put_le32 (raw + 56, h->backing_filename_offset);
  put_le32 (raw + 60, h->backing_filename_size);
}

/* Each L1 entry covers (entries per table) clusters, and there are as
 * many L1 entries as L2 entries: max = (ts*cs/8)^2 * cs.  Work in
 * log2 so that no geometry can overflow.
 */
uint64_t
qed_max_image_size (uint32_t cluster_size, uint32_t table_size)
{
  unsigned entries_bits = log_2 (table_size) + log_2 (cluster_size) - 3;
  unsigned bits = 2 * entries_bits + log_2 (cluster_size);

  if (bits >= 64)
    return UINT64_MAX;
  return UINT64_C (1) << bits;
}

/* QEMU computes the same maximum in uint64 and gets 0 when it
 * overflows, and its L1 range check rejects every table_size 1 image.
 */
bool
qed_qemu_can_open (uint32_t cluster_size, uint32_t table_size)
{
  unsigned bits = 2 * (log_2 (table_size) + log_2 (cluster_size) - 3)
    + log_2 (cluster_size);
  return table_size >= 2 && bits < 64;
}

/* What a file that is not QED looks like, from its first 64 bytes, for
 * the error message: users hand us the wrong kind of image more often
 * than a damaged one. */
static const char *
describe_non_qed (const unsigned char raw[64])
{
  static const unsigned char zeros[64];

  if (memcmp (raw, "QFI\xfb", 4) == 0)
    return get_le32 (raw + 4) == 0x01000000 ? "this is a qcow (version 1) image"
      : "this is a qcow2 image";
  if (memcmp (raw, "KDMV", 4) == 0 || memcmp (raw, "# Disk DescriptorFile", 21) == 0)
    return "this is a VMDK image";
  if (memcmp (raw, "conectix", 8) == 0)
    return "this is a VHD (vpc) image";
  if (memcmp (raw, "vhdxfile", 8) == 0)
    return "this is a VHDX image";
  if (memcmp (raw, "<<< ", 4) == 0 && memmem (raw, 64, "Disk Image", 10))
    return "this is a VDI (VirtualBox) image";
  if (memcmp (raw, "LUKS\xba\xbe", 6) == 0)
    return "this is a LUKS encrypted volume";
  if (memcmp (raw, zeros, 64) == 0)
    return "it starts with zeros: a raw disk image?";
  if (raw[0] == 0xeb || raw[0] == 0xe9 || raw[0] == 0xfa)
    return "it starts with x86 boot code: a raw disk image?";
  return "no QED magic: a raw disk image, or some other file?";
}

int
qed_header_validate (const struct qed_header *h, uint64_t file_size,
                     char *msg, size_t msglen)
{
  uint64_t cs = h->cluster_size, header_bytes, table_bytes, file_clusters_end;

#define FAIL(err, ...)                          \
  do {                                          \
    snprintf (msg, msglen, __VA_ARGS__);        \
    errno = (err);                              \
    return -1;                                  \
  } while (0)

  if (file_size < QED_HEADER_BYTES)
    FAIL (EINVAL, "file is too short to be a QED image (%" PRIu64 " bytes)",
          file_size);
  if (h->magic != QED_MAGIC) {
    unsigned char raw[64];
    qed_header_encode (raw, h);
    FAIL (EINVAL, "not a QED image: %s (convert an image with: qemu-img "
          "convert -O qed)", describe_non_qed (raw));
  }
  if (h->features & ~(uint64_t) QED_F_KNOWN)
    FAIL (ENOTSUP, "unsupported QED features 0x%" PRIx64
          " (the image needs a newer program)",
          h->features & ~(uint64_t) QED_F_KNOWN);
  if (!is_power_of_2 (cs) ||
      cs < QED_MIN_CLUSTER_SIZE || cs > QED_MAX_CLUSTER_SIZE)
    FAIL (EINVAL, "invalid cluster_size %" PRIu32
          " (must be a power of 2 from 4K to 64M)", h->cluster_size);
  if (!is_power_of_2 (h->table_size) ||
      h->table_size < QED_MIN_TABLE_SIZE || h->table_size > QED_MAX_TABLE_SIZE)
    FAIL (EINVAL, "invalid table_size %" PRIu32
          " (must be a power of 2 from 1 to 16)", h->table_size);
  if (h->header_size == 0)
    FAIL (EINVAL, "invalid header_size 0 (the header needs a cluster)");
  header_bytes = (uint64_t) h->header_size * cs;
  if (header_bytes > UINT32_MAX)
    FAIL (EINVAL, "invalid header_size %" PRIu32 " (header too large)",
          h->header_size);
  if (h->image_size % 512 != 0)
    FAIL (EINVAL, "invalid image_size %" PRIu64 " (not a multiple of 512)",
          h->image_size);
  if (h->image_size > qed_max_image_size (h->cluster_size, h->table_size) ||
      h->image_size > INT64_MAX)
    FAIL (EINVAL, "invalid image_size %" PRIu64
          " (larger than the tables can address)", h->image_size);

  /* The L1 table must lie wholly inside the file, after the header.
   * A trailing partial cluster of the file does not count (as QEMU).
   */
  table_bytes = (uint64_t) h->table_size * cs;
  file_clusters_end = ROUND_DOWN (file_size, cs);
  if (!IS_ALIGNED (h->l1_table_offset, cs) ||
      h->l1_table_offset < header_bytes ||
      h->l1_table_offset > file_clusters_end ||
      file_clusters_end - h->l1_table_offset < table_bytes)
    FAIL (EINVAL, "invalid l1_table_offset 0x%" PRIx64
          " (must be cluster aligned, after the header and inside the file)",
          h->l1_table_offset);

  if ((h->features & QED_F_BACKING_FILE) && h->backing_filename_size > 0) {
    uint64_t end = (uint64_t) h->backing_filename_offset
      + h->backing_filename_size;
    if (h->backing_filename_size > QED_MAX_BACKING_NAME)
      FAIL (EINVAL, "backing file name is too long (%" PRIu32 " bytes)",
            h->backing_filename_size);
    if (h->backing_filename_offset < QED_HEADER_BYTES || end > header_bytes)
      FAIL (EINVAL, "invalid backing file name location (offset %" PRIu32
            ", size %" PRIu32 "): it must lie in the header clusters "
            "after the first 64 bytes",
            h->backing_filename_offset, h->backing_filename_size);
  }
  return 0;
#undef FAIL
}

/* Read, decode and validate the header of img->fd (file_size bytes
 * long), and read the backing file name.  Messages name the file.
 */
int
qed_header_load (struct qed_image *img, uint64_t file_size)
{
  unsigned char raw[QED_HEADER_BYTES];
  char msg[256];

  /* A file shorter than the header reads zero-padded and fails the
   * size check below with a clear message. */
  if (pread_zeros_past_eof (img->fd, raw, sizeof raw, 0) == -1) {
    qed_error ("%s: cannot read the QED header: %m", img->filename);
    return -1;
  }
  qed_header_decode (&img->h, raw);
  if (qed_header_validate (&img->h, file_size, msg, sizeof msg) == -1) {
    int e = errno;
    qed_error ("%s: %s", img->filename, msg);
    errno = e;
    return -1;
  }
  if (img->h.features & QED_F_BACKING_FILE &&
      img->h.backing_filename_size > 0) {
    size_t n = img->h.backing_filename_size;
    img->backing_name = calloc (1, n + 1);
    if (img->backing_name == NULL) {
      qed_error ("calloc: %m");
      return -1;
    }
    if (pread_full (img->fd, img->backing_name, n,
                    img->h.backing_filename_offset) == -1) {
      qed_error ("%s: cannot read the backing file name: %m", img->filename);
      return -1;
    }
    if (strlen (img->backing_name) != n) {
      qed_error ("%s: the backing file name contains a NUL byte",
                 img->filename);
      errno = EINVAL;
      return -1;
    }
    img->has_backing = true;
    img->backing_raw = img->h.features & QED_F_BACKING_FORMAT_NO_PROBE;
  }
  return 0;
}

/* Write one 8-byte field of the header durably. */
static int
write_field (struct qed_image *img, uint64_t offset, uint64_t value,
             const char *what)
{
  uint64_t le = htole64 (value);

  if (pwrite_full (img->fd, &le, 8, offset) == -1 ||
      qed_sync (img) == -1) {
    qed_error ("%s: cannot %s: %m", img->filename, what);
    return -1;
  }
  return 0;
}

static int
write_features (struct qed_image *img, uint64_t features)
{
  if (write_field (img, 16, features, "update the header") == -1)
    return -1;
  img->h.features = features;
  return 0;
}

int
qed_write_flags (struct qed_image *img, uint64_t features, uint64_t compat,
                 uint64_t autoclear)
{
  uint64_t raw[3] = { htole64 (features), htole64 (compat),
                      htole64 (autoclear) };

  if (pwrite_full (img->fd, raw, sizeof raw, 16) == -1 ||
      qed_sync (img) == -1) {
    qed_error ("%s: cannot update the header: %m", img->filename);
    return -1;
  }
  img->h.features = features;
  img->h.compat_features = compat;
  img->h.autoclear_features = autoclear;
  return 0;
}

int
qed_mark_need_check (struct qed_image *img)
{
  assert (qed_lock_is_held (&img->lock));
  if (img->need_check)
    return 0;
  if (img->readonly) {
    errno = EROFS;
    return -1;
  }
  /* One write: the free-cluster list stops being trusted the moment
   * anything may change. */
  if (qed_write_flags (img, img->h.features | QED_F_NEED_CHECK,
                       img->h.compat_features,
                       img->h.autoclear_features &
                       ~(uint64_t) QED_AF_FREELIST) == -1)
    return -1;
  img->need_check = true;
  return 0;
}

/* The cleared flag may be in the page cache even if the write or its
 * fdatasync failed: write the set flag back, or, if even that fails,
 * forget that it is set, so that the next change sets it first. */
int
qed_clear_need_check (struct qed_image *img)
{
  uint64_t le = htole64 (img->h.features | QED_F_NEED_CHECK);
  int err;

  assert (!img->readonly);
  if (write_features (img, img->h.features & ~(uint64_t) QED_F_NEED_CHECK)
      == 0) {
    img->need_check = false;
    return 0;
  }
  err = errno;
  if (pwrite_full (img->fd, &le, 8, 16) == -1)
    img->need_check = false;
  errno = err;
  return -1;
}

/* Unknown autoclear bits guard data we may be about to make stale:
 * clear them on a writable open (durably), leave them when read-only.
 */
int
qed_clear_unknown_autoclear (struct qed_image *img)
{
  /* A free-cluster list we trust keeps its bit until the first change
   * (qed_mark_need_check); one we do not is as good as unknown. */
  uint64_t keep = img->list_trusted ? QED_AF_FREELIST : 0;
  uint64_t unknown = img->h.autoclear_features & ~keep;

  if (img->readonly || unknown == 0)
    return 0;
  if (write_field (img, 32, img->h.autoclear_features & keep,
                   "clear autoclear features") == -1)
    return -1;
  qed_debug ("%s: cleared autoclear features 0x%" PRIx64,
             img->filename, unknown);
  img->h.autoclear_features &= keep;
  return 0;
}
