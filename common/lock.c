/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: image locking that QEMU understands.
 *
 * QEMU (block/file-posix.c) locks single bytes of an image file with
 * open file description (OFD) locks, all of them shared (F_RDLCK):
 *
 *   byte 100 + P   "I use permission P"
 *   byte 200 + P   "I do not let anyone else use permission P"
 *
 * with P = 0 consistent read, 1 write, 3 resize.  Observed with
 * qemu-nbd 7.2: a writable image holds 100, 101, 103, 201 and 203; a
 * read-only one 100, 201 and 203; a backing file only 100 (it lets
 * others write it).  A conflict is a lock of someone else's on the
 * facing byte, found with F_OFD_GETLK (our own locks on the same open
 * file never conflict with each other).  We set our bytes before
 * testing, as QEMU does: of two programs opening at once, both may
 * fail, but never both succeed.
 *
 * Taking the same locks means qemu-img, qemu-io, qemu-nbd and QEMU
 * refuse an image we serve writable ("Failed to get shared "write"
 * lock"), and we refuse one they have open for writing.  Locks go
 * away with the file descriptor, also when the process is killed.
 */

#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "qed-internal.h"
#include "seam.h"

#define PERM_BASE   100
#define SHARED_BASE 200

enum { PERM_READ = 0, PERM_WRITE = 1, PERM_RESIZE = 3 };
#define BIT(p) (1u << (p))

static const char *
perm_name (unsigned p)
{
  switch (p) {
  case PERM_READ: return "consistent read";
  case PERM_WRITE: return "write";
  case PERM_RESIZE: return "resize";
  default: return "?";
  }
}

static int
lock_byte (int fd, off_t byte, int cmd, short type)
{
  struct flock fl = {
    .l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
  };
  if (fcntl (fd, cmd, &fl) == -1)
    return -1;
  return cmd == F_OFD_GETLK ? fl.l_type != F_UNLCK : 0;
}

/* Errors that mean "this file system has no OFD locks". */
static bool
unsupported (int e)
{
  return e == EINVAL || e == ENOLCK || e == ENOTSUP || e == EOPNOTSUPP ||
    e == ENOSYS;
}

/* Protection that silently went away is said once (in the log). */
static bool warned_off, warned_unsupported;

int
qed_lock_file (int fd, const char *filename, enum qed_lock_role role,
               enum qed_locking locking)
{
  unsigned use, unshare;

  if (locking == QED_LOCKING_OFF) {
    if (!__atomic_test_and_set (&warned_off, __ATOMIC_RELAXED))
      qed_warning ("%s: locking is off: another writer (QEMU, "
                   "qemu-img, another nbdkit) can corrupt the image", filename);
    return 0;
  }
  switch (role) {
  case QED_LOCK_WRITER:
    use = BIT (PERM_READ) | BIT (PERM_WRITE) | BIT (PERM_RESIZE);
    unshare = BIT (PERM_WRITE) | BIT (PERM_RESIZE);
    break;
  case QED_LOCK_READER:
    use = BIT (PERM_READ);
    unshare = BIT (PERM_WRITE) | BIT (PERM_RESIZE);
    break;
  case QED_LOCK_BACKING:
  default:
    use = BIT (PERM_READ);
    unshare = 0;
    break;
  }

  /* Set, then test. */
  for (unsigned p = 0; p < 8; ++p) {
    int r = 0;
    if (use & BIT (p))
      r = lock_byte (fd, PERM_BASE + p, F_OFD_SETLK, F_RDLCK);
    if (r == 0 && (unshare & BIT (p)))
      r = lock_byte (fd, SHARED_BASE + p, F_OFD_SETLK, F_RDLCK);
    if (r == -1)
      goto lock_error;
  }
  for (unsigned p = 0; p < 8; ++p) {
    int r;
    if (use & BIT (p)) {
      r = lock_byte (fd, SHARED_BASE + p, F_OFD_GETLK, F_WRLCK);
      if (r == -1)
        goto lock_error;
      if (r == 1) {
        qed_error ("%s: failed to get the \"%s\" lock: another process "
                   "(QEMU, qemu-nbd, qemu-img or nbdkit) has the image "
                   "open and does not share it (override with locking=off, "
                   "or qed-locking=off in the filter)",
                   filename, perm_name (p));
        goto conflict;
      }
    }
    if (unshare & BIT (p)) {
      r = lock_byte (fd, PERM_BASE + p, F_OFD_GETLK, F_WRLCK);
      if (r == -1)
        goto lock_error;
      if (r == 1) {
        qed_error ("%s: failed to get the shared \"%s\" lock: another "
                   "process (QEMU, qemu-nbd, qemu-img or nbdkit) has the "
                   "image open for %s (override with locking=off, or "
                   "qed-locking=off in the filter)",
                   filename, perm_name (p),
                   p == PERM_WRITE ? "writing" : "resizing");
        goto conflict;
      }
    }
  }
  return 0;

 lock_error:
  if (locking == QED_LOCKING_AUTO && unsupported (errno)) {
    if (!__atomic_test_and_set (&warned_unsupported, __ATOMIC_RELAXED))
      qed_warning ("%s: this file system has no OFD locks (%m): the "
                   "image is not locked, so QEMU or another nbdkit could "
                   "write it at the same time", filename);
    qed_unlock_file (fd);
    return 0;
  }
  qed_error ("%s: cannot lock the image: %m", filename);
  qed_unlock_file (fd);
  return -1;

 conflict:
  qed_unlock_file (fd);
  errno = EAGAIN;
  return -1;
}

int
qed_parse_locking (const char *value, enum qed_locking *locking)
{
  static const char *const on[] = { "on", "true", "yes", "1", NULL };
  static const char *const off[] = { "off", "false", "no", "0", NULL };

  if (strcasecmp (value, "auto") == 0) {
    *locking = QED_LOCKING_AUTO;
    return 0;
  }
  for (size_t i = 0; on[i]; ++i) {
    if (strcasecmp (value, on[i]) == 0) {
      *locking = QED_LOCKING_ON;
      return 0;
    }
    if (strcasecmp (value, off[i]) == 0) {
      *locking = QED_LOCKING_OFF;
      return 0;
    }
  }
  return -1;
}

int
qed_hold_reader_locks (const char *filename, enum qed_locking locking)
{
  int fd = open (filename, O_RDONLY | O_CLOEXEC | O_NONBLOCK);

  if (fd == -1) {
    qed_error ("%s: %m", filename);
    return -1;
  }
  if (qed_lock_file (fd, filename, QED_LOCK_READER, locking) == -1) {
    close (fd);
    return -1;
  }
  return fd;
}

void
qed_unlock_file (int fd)
{
  struct flock fl = {
    .l_type = F_UNLCK, .l_whence = SEEK_SET,
    .l_start = PERM_BASE, .l_len = SHARED_BASE + 8 - PERM_BASE,
  };
  int e = errno;
  fcntl (fd, F_OFD_SETLK, &fl);
  errno = e;
}
