/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: whole reads and writes of the image file.
 *
 * The bottom of the core: every byte the core moves goes through these,
 * which retry on EINTR and on short transfers.  Nothing here knows the
 * format.
 *
 * Locking: none taken, none needed (qed_sync's sticky error is atomic).
 */

#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <sys/uio.h>

#include "qed-internal.h"
#include "seam.h"

/* Read exactly count bytes.  *got is how many bytes the file had
 * before its end (count unless the file is shorter). */
static int
pread_upto (int fd, void *buf, size_t count, uint64_t off, size_t *got)
{
  *got = 0;
  while (*got < count) {
    ssize_t r = qed_io_pread (fd, (char *) buf + *got, count - *got,
                              off + *got);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0)
      break;
    *got += r;
  }
  return 0;
}

int
pread_full (int fd, void *buf, size_t count, uint64_t off)
{
  size_t got;

  if (pread_upto (fd, buf, count, off, &got) == -1)
    return -1;
  if (got < count) {
    /* Every caller reads metadata or data that the checks at open put
     * inside the file: a short read means the file shrank under us. */
    errno = EIO;
    return -1;
  }
  return 0;
}

int
pread_zeros_past_eof (int fd, void *buf, size_t count, uint64_t off)
{
  size_t got;

  if (pread_upto (fd, buf, count, off, &got) == -1)
    return -1;
  memset ((char *) buf + got, 0, count - got);
  return 0;
}

int
pwrite_full (int fd, const void *buf, size_t count, uint64_t off)
{
  while (count > 0) {
    ssize_t r = qed_io_pwrite (fd, buf, count, off);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    buf = (const char *) buf + r;
    count -= r;
    off += r;
  }
  return 0;
}

int
pwritev_full (int fd, struct iovec *iov, int iovcnt, uint64_t off)
{
  while (iovcnt > 0) {
    ssize_t r = qed_io_pwritev (fd, iov, iovcnt, off);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    off += r;
    while (iovcnt > 0 && (size_t) r >= iov->iov_len) {
      r -= iov->iov_len;
      iov++;
      iovcnt--;
    }
    if (iovcnt > 0) {
      iov->iov_base = (char *) iov->iov_base + r;
      iov->iov_len -= r;
    }
  }
  return 0;
}

int
qed_sync (struct qed_image *img)
{
  int err = __atomic_load_n (&img->sync_error, __ATOMIC_ACQUIRE);

  if (err) {
    errno = err;
    return -1;
  }
  if (qed_io_datasync (img->fd) == -1) {
    err = errno ? errno : EIO;
    __atomic_store_n (&img->sync_error, err, __ATOMIC_RELEASE);
    qed_error ("%s: fdatasync failed: %m; every later flush fails until "
               "the image is reopened (and checked)", img->filename);
    errno = err;
    return -1;
  }
  return 0;
}
