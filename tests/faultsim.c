/* SPDX-License-Identifier: BSD-3-Clause
 *
 * nbdkit-qed fault injector: an LD_PRELOAD shim that makes I/O calls on
 * one file fail on demand, so that tests can drive the error paths of
 * the core (a failing disk, a failed fdatasync, a file system that
 * cannot punch holes).
 *
 * Build:  gcc -shared -fPIC -o tests/faultsim.so tests/faultsim.c -ldl
 * Use:    LD_PRELOAD=tests/faultsim.so FAULTSIM_FILE=disk.qed \
 *         FAULTSIM_DIR=faults nbdkit ...
 *
 * Only calls on the file named by FAULTSIM_FILE count (matched by device
 * and inode, so every fd opened on it counts).  A call fails when a
 * trigger file for its kind exists in FAULTSIM_DIR:
 *   pread      pread, pread64, preadv, preadv2
 *   pwrite     pwrite, pwrite64, pwritev, pwritev2
 *   fdatasync  fdatasync, fsync
 *   ftruncate  ftruncate, ftruncate64
 *   fallocate  fallocate, fallocate64
 * holding one line:  ERRNO [SKIP [COUNT]] [WORD...]
 *   ERRNO   EIO, ENOSPC, EOPNOTSUPP, EDQUOT, EROFS or a number;
 *   SKIP    matching calls let through before the first failure (0);
 *   COUNT   calls failed after that, -1 for every one (-1);
 *   WORDs   narrow what matches: punch / zero (fallocate modes),
 *           len>=N, len<N, off>=N, off<N (pread/pwrite/fallocate),
 *           grow (an ftruncate that makes the file longer),
 *           lastwrite=N (only while the last pwrite to the file was at
 *           offset N: lastwrite=16 picks the fdatasync after a header
 *           update).
 * The counters restart whenever the trigger file is rewritten.  Each
 * injected failure is appended to FAULTSIM_DIR/log ("KIND ERRNO off
 * len"), so a test can check that its fault was really hit.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/falloc.h>

enum kind { K_PREAD, K_PWRITE, K_SYNC, K_TRUNC, K_FALLOC, NKINDS };
static const char *kind_names[NKINDS] = {
  "pread", "pwrite", "fdatasync", "ftruncate", "fallocate"
};

struct trigger {
  ino_t ino;                    /* trigger file identity: re-armed on */
  struct timespec mtime;        /* change */
  off_t size;
  int err;
  long skip, count;
  bool punch, zero, grow;
  uint64_t len_min, len_max, off_min, off_max;
  uint64_t last_write;          /* UINT64_MAX: any */
  long seen;                    /* matching calls so far */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct trigger trig[NKINDS];
static const char *dir;
static uint64_t last_write_off = UINT64_MAX;  /* of the target file */

static int
errno_of (const char *s)
{
  static const struct { const char *name; int e; } names[] = {
    { "EIO", EIO }, { "ENOSPC", ENOSPC }, { "EOPNOTSUPP", EOPNOTSUPP },
    { "EDQUOT", EDQUOT }, { "EROFS", EROFS }, { "ENOMEM", ENOMEM },
  };
  for (size_t i = 0; i < sizeof names / sizeof names[0]; ++i)
    if (strcmp (s, names[i].name) == 0)
      return names[i].e;
  return atoi (s) > 0 ? atoi (s) : EIO;
}

static void
parse (struct trigger *t, char *line)
{
  char *save = NULL, *w;
  int field = 0;

  t->err = EIO;
  t->skip = 0;
  t->count = -1;
  t->punch = t->zero = t->grow = false;
  t->len_min = t->off_min = 0;
  t->len_max = t->off_max = t->last_write = UINT64_MAX;
  t->seen = 0;
  for (w = strtok_r (line, " \t\n", &save); w;
       w = strtok_r (NULL, " \t\n", &save), field++) {
    if (field == 0) t->err = errno_of (w);
    else if (strcmp (w, "punch") == 0) t->punch = true;
    else if (strcmp (w, "zero") == 0) t->zero = true;
    else if (strcmp (w, "grow") == 0) t->grow = true;
    else if (strncmp (w, "len>=", 5) == 0) t->len_min = strtoull (w + 5, 0, 0);
    else if (strncmp (w, "len<", 4) == 0) t->len_max = strtoull (w + 4, 0, 0);
    else if (strncmp (w, "off>=", 5) == 0) t->off_min = strtoull (w + 5, 0, 0);
    else if (strncmp (w, "off<", 4) == 0) t->off_max = strtoull (w + 4, 0, 0);
    else if (strncmp (w, "lastwrite=", 10) == 0)
      t->last_write = strtoull (w + 10, 0, 0);
    else if (field == 1) t->skip = atol (w);
    else if (field == 2) t->count = atol (w);
  }
}

static bool
is_target (int fd)
{
  const char *file = getenv ("FAULTSIM_FILE");
  struct stat a, b;

  return file && fstat (fd, &a) == 0 && stat (file, &b) == 0 &&
    a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

static void
log_fault (enum kind k, int err, uint64_t off, uint64_t len)
{
  char path[4096], line[160];
  int fd, n;

  snprintf (path, sizeof path, "%s/log", dir);
  fd = open (path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd == -1)
    return;
  n = snprintf (line, sizeof line, "%s %d %llu %llu\n", kind_names[k], err,
                (unsigned long long) off, (unsigned long long) len);
  if (write (fd, line, n) != n) { /* the log is best effort */ }
  close (fd);
}

/* Returns the errno to fail with, or 0 to let the call through.
 * extra: fallocate mode, or for ftruncate 1 if the file grows. */
static int
fault (enum kind k, int fd, uint64_t off, uint64_t len, int extra)
{
  char path[4096], line[256];
  struct stat st;
  struct trigger *t = &trig[k];
  int err = 0;
  FILE *fp;

  if (dir == NULL && (dir = getenv ("FAULTSIM_DIR")) == NULL)
    return 0;
  snprintf (path, sizeof path, "%s/%s", dir, kind_names[k]);
  if (stat (path, &st) == -1) {
    if (k == K_PWRITE && is_target (fd))
      last_write_off = off;     /* racy across threads: tests only */
    return 0;
  }
  if (!is_target (fd))
    return 0;

  pthread_mutex_lock (&mu);
  if (st.st_ino != t->ino || st.st_size != t->size ||
      st.st_mtim.tv_sec != t->mtime.tv_sec ||
      st.st_mtim.tv_nsec != t->mtime.tv_nsec) {
    line[0] = '\0';
    if ((fp = fopen (path, "re")) != NULL) {
      if (fgets (line, sizeof line, fp) == NULL)
        line[0] = '\0';
      fclose (fp);
    }
    parse (t, line);
    t->ino = st.st_ino;
    t->size = st.st_size;
    t->mtime = st.st_mtim;
  }
  if (k == K_FALLOC && t->punch && !(extra & FALLOC_FL_PUNCH_HOLE))
    goto out;
  if (k == K_FALLOC && t->zero && !(extra & FALLOC_FL_ZERO_RANGE))
    goto out;
  if (k == K_TRUNC && t->grow && !extra)
    goto out;
  if (t->last_write != UINT64_MAX && t->last_write != last_write_off)
    goto out;
  if (len < t->len_min || len >= t->len_max ||
      off < t->off_min || off >= t->off_max)
    goto out;
  t->seen++;
  if (t->seen > t->skip && (t->count < 0 || t->seen <= t->skip + t->count)) {
    err = t->err;
    log_fault (k, err, off, len);
  }
 out:
  if (k == K_PWRITE && err == 0)
    last_write_off = off;
  pthread_mutex_unlock (&mu);
  return err;
}

#define REAL(name) \
  static __typeof__ (name) *real_##name; \
  if (real_##name == NULL) real_##name = dlsym (RTLD_NEXT, #name)
#define FAIL_IF(k, fd, off, len, extra) \
  do { int e_ = fault (k, fd, off, len, extra); \
       if (e_) { errno = e_; return -1; } } while (0)

static uint64_t
iov_len (const struct iovec *iov, int n)
{
  uint64_t s = 0;
  for (int i = 0; i < n; ++i)
    s += iov[i].iov_len;
  return s;
}

ssize_t
pread (int fd, void *buf, size_t count, off_t off)
{
  REAL (pread);
  FAIL_IF (K_PREAD, fd, off, count, 0);
  return real_pread (fd, buf, count, off);
}

ssize_t
pread64 (int fd, void *buf, size_t count, off_t off)
{
  REAL (pread64);
  FAIL_IF (K_PREAD, fd, off, count, 0);
  return real_pread64 (fd, buf, count, off);
}

ssize_t
preadv (int fd, const struct iovec *iov, int n, off_t off)
{
  REAL (preadv);
  FAIL_IF (K_PREAD, fd, off, iov_len (iov, n), 0);
  return real_preadv (fd, iov, n, off);
}

ssize_t
preadv2 (int fd, const struct iovec *iov, int n, off_t off, int flags)
{
  REAL (preadv2);
  FAIL_IF (K_PREAD, fd, off, iov_len (iov, n), 0);
  return real_preadv2 (fd, iov, n, off, flags);
}

ssize_t
pwrite (int fd, const void *buf, size_t count, off_t off)
{
  REAL (pwrite);
  FAIL_IF (K_PWRITE, fd, off, count, 0);
  return real_pwrite (fd, buf, count, off);
}

ssize_t
pwrite64 (int fd, const void *buf, size_t count, off_t off)
{
  REAL (pwrite64);
  FAIL_IF (K_PWRITE, fd, off, count, 0);
  return real_pwrite64 (fd, buf, count, off);
}

ssize_t
pwritev (int fd, const struct iovec *iov, int n, off_t off)
{
  REAL (pwritev);
  FAIL_IF (K_PWRITE, fd, off, iov_len (iov, n), 0);
  return real_pwritev (fd, iov, n, off);
}

ssize_t
pwritev2 (int fd, const struct iovec *iov, int n, off_t off, int flags)
{
  REAL (pwritev2);
  FAIL_IF (K_PWRITE, fd, off, iov_len (iov, n), 0);
  return real_pwritev2 (fd, iov, n, off, flags);
}

int
fdatasync (int fd)
{
  REAL (fdatasync);
  FAIL_IF (K_SYNC, fd, 0, 0, 0);
  return real_fdatasync (fd);
}

int
fsync (int fd)
{
  REAL (fsync);
  FAIL_IF (K_SYNC, fd, 0, 0, 0);
  return real_fsync (fd);
}

static int
grows (int fd, off_t len)
{
  struct stat st;
  return fstat (fd, &st) == 0 && len > st.st_size;
}

int
ftruncate (int fd, off_t len)
{
  REAL (ftruncate);
  FAIL_IF (K_TRUNC, fd, len, 0, grows (fd, len));
  return real_ftruncate (fd, len);
}

int
ftruncate64 (int fd, off_t len)
{
  REAL (ftruncate64);
  FAIL_IF (K_TRUNC, fd, len, 0, grows (fd, len));
  return real_ftruncate64 (fd, len);
}

int
fallocate (int fd, int mode, off_t off, off_t len)
{
  REAL (fallocate);
  FAIL_IF (K_FALLOC, fd, off, len, mode);
  return real_fallocate (fd, mode, off, len);
}

int
fallocate64 (int fd, int mode, off_t off, off_t len)
{
  REAL (fallocate64);
  FAIL_IF (K_FALLOC, fd, off, len, mode);
  return real_fallocate64 (fd, mode, off, len);
}
