/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the image file's system calls (the I/O seam, seam.h).
 *
 * Thin on purpose: the retries, the error policy and the meaning of
 * each call stay in the core (io.c and up), so that a replacement (the
 * fuzz target's in-memory file) runs the same code above it.
 */

#include <stdint.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include "seam.h"

ssize_t
qed_io_pread (int fd, void *buf, size_t count, uint64_t off)
{
  return pread (fd, buf, count, off);
}

ssize_t
qed_io_pwrite (int fd, const void *buf, size_t count, uint64_t off)
{
  return pwrite (fd, buf, count, off);
}

ssize_t
qed_io_pwritev (int fd, const struct iovec *iov, int iovcnt, uint64_t off)
{
  return pwritev (fd, iov, iovcnt, off);
}

int
qed_io_datasync (int fd)
{
  return fdatasync (fd);
}

int
qed_io_truncate (int fd, uint64_t size)
{
  return ftruncate (fd, size);
}

int
qed_io_fallocate (int fd, int mode, uint64_t off, uint64_t len)
{
  return fallocate (fd, mode, off, len);
}

off_t
qed_io_seek (int fd, off_t off, int whence)
{
  return lseek (fd, off, whence);
}

void
qed_io_advise (int fd, uint64_t off, uint64_t len)
{
  posix_fadvise (fd, off, len, POSIX_FADV_WILLNEED);
}

int
qed_io_fstat (int fd, struct stat *st)
{
  return fstat (fd, st);
}

int
qed_io_close (int fd)
{
  return close (fd);
}

int
qed_io_lock (int fd, int cmd, struct flock *fl)
{
  return fcntl (fd, cmd, fl);
}
