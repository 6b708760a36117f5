/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed crash simulator: an LD_PRELOAD shim that journals every
 * mutation of one file, so that tests/crash-harness.py can rebuild the
 * states a power loss could leave behind.
 *
 * Build:  gcc -shared -fPIC -o tests/crashsim.so tests/crashsim.c -ldl
 * Use:    LD_PRELOAD=tests/crashsim.so CRASHSIM_FILE=disk.qed \
 *         CRASHSIM_JOURNAL=disk.journal nbdkit ...
 *
 * For the file named by CRASHSIM_FILE (matched by device and inode, so
 * every fd opened on it counts), each mutation -- write, pwrite,
 * pwritev, pwritev2 (and their *64 aliases), ftruncate, fallocate
 * (including PUNCH_HOLE and ZERO_RANGE) -- is performed on the real
 * file and then appended to the journal together with its data.  The
 * real call and the append happen under one mutex, so the journal order
 * is the order in which the mutations reached the page cache.
 *
 * fdatasync/fsync (barriers) run outside that mutex.  Before calling
 * the real function the shim notes how many records the journal holds
 * (every mutation among them completed before the barrier started, so
 * the barrier makes it durable); when the call returns it appends a
 * BARRIER record carrying that count.  Every record carries the
 * CLOCK_MONOTONIC time at which it was appended, which the harness
 * compares with the client's own timestamps: a flush the client saw
 * complete before time T had its fdatasyncs journalled before T.
 *
 * Record layout (little-endian, 48 bytes, then `len` data bytes for
 * WRITE records only):
 *   u32 magic 'CSJ1'  u32 type  u64 seq  u64 t_ns  u64 off  u64 len  u64 aux
 * types: 0 START (off = file size, aux = pid)
 *        1 WRITE (off, len, data)
 *        2 TRUNCATE (off = new size)
 *        3 FALLOCATE (off, len, aux = mode)
 *        4 BARRIER (off = t_ns at start, len = 0 fdatasync / 1 fsync,
 *                   aux = number of records before the barrier started)
 * A SIGKILL can cut the last record short: readers ignore a partial tail.
 * If the file does not exist yet, the shim looks for it again at every
 * call, so a file created by the server is journalled from the first
 * call after its name appears.  With CRASHSIM_SNAPSHOT=PATH the shim
 * copies the file to PATH at that moment (the state START describes).
 *
 * Not journalled: writes through mmap, sync_file_range, copy_file_range
 * and directory operations (link, rename, unlink).  The QED core uses
 * none of them on an open image (strace of a workload shows exactly the
 * pwrite64/pwritev/ftruncate/fallocate/fdatasync calls journalled); the
 * creation of a new image (a link of a synced temporary file) happens
 * before the name exists, so the journal starts with the complete file.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x314a5343u       /* "CSJ1" */
enum { R_START, R_WRITE, R_TRUNCATE, R_FALLOCATE, R_BARRIER };

struct rec {
  uint32_t magic, type;
  uint64_t seq, t_ns, off, len, aux;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int inited;              /* 0 not yet, 1 journalling, -1 disabled */
static dev_t target_dev;
static ino_t target_ino;
static int jfd = -1;
static uint64_t nrecs;          /* records appended so far */

static ssize_t (*real_pwrite) (int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64) (int, const void *, size_t, off_t);
static ssize_t (*real_write) (int, const void *, size_t);
static ssize_t (*real_pwritev) (int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64) (int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev2) (int, const struct iovec *, int, off_t, int);
static ssize_t (*real_pwritev64v2) (int, const struct iovec *, int, off_t,
                                    int);
static int (*real_ftruncate) (int, off_t);
static int (*real_ftruncate64) (int, off_t);
static int (*real_fallocate) (int, int, off_t, off_t);
static int (*real_fallocate64) (int, int, off_t, off_t);
static int (*real_fdatasync) (int);
static int (*real_fsync) (int);

static void
resolve (void)
{
  static int done;
  if (__atomic_load_n (&done, __ATOMIC_ACQUIRE))
    return;
#define R(name) real_##name = dlsym (RTLD_NEXT, #name)
  R (pwrite); R (pwrite64); R (write); R (pwritev); R (pwritev64);
  R (pwritev2); R (pwritev64v2); R (ftruncate); R (ftruncate64);
  R (fallocate); R (fallocate64); R (fdatasync); R (fsync);
#undef R
  __atomic_store_n (&done, 1, __ATOMIC_RELEASE);
}

static uint64_t
now_ns (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (uint64_t) ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void
raw_write_all (const void *buf, size_t n)
{
  const char *p = buf;
  while (n > 0) {
    ssize_t r = syscall (SYS_write, jfd, p, n);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      abort ();                 /* a lost record would make results lie */
    }
    p += r;
    n -= r;
  }
}

/* Append one record (mutex held).  iov/iovcnt supply `len` data bytes
 * for WRITE records. */
static void
append (uint32_t type, uint64_t off, uint64_t len, uint64_t aux,
        const struct iovec *iov, int iovcnt)
{
  struct rec r = { MAGIC, type, nrecs, now_ns (), off, len, aux };
  raw_write_all (&r, sizeof r);
  if (type == R_WRITE) {
    uint64_t left = len;
    for (int i = 0; i < iovcnt && left > 0; ++i) {
      size_t n = iov[i].iov_len < left ? iov[i].iov_len : left;
      raw_write_all (iov[i].iov_base, n);
      left -= n;
    }
  }
  nrecs++;
}

/* Copy the target as it is now to CRASHSIM_SNAPSHOT (if set), sparse.
 * Mutex held, so raw syscalls only (our own wrappers would deadlock). */
static void
snapshot (const char *path)
{
  static char buf[1 << 20];
  int in = open (getenv ("CRASHSIM_FILE"), O_RDONLY | O_CLOEXEC);
  int out = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  off_t off = 0;
  ssize_t r;

  if (in == -1 || out == -1)
    abort ();
  while ((r = pread (in, buf, sizeof buf, off)) > 0) {
    ssize_t i = 0;
    while (i < r && buf[i] == 0)
      i++;
    if (i < r && syscall (SYS_pwrite64, out, buf, r, off) != r)
      abort ();
    off += r;
  }
  if (r == -1 || syscall (SYS_ftruncate, out, off) == -1)
    abort ();
  close (in);
  close (out);
}

/* Set up the target and the journal once. */
static void
init_once (void)
{
  struct stat st;

  if (__atomic_load_n (&inited, __ATOMIC_ACQUIRE) != 0)
    return;
  pthread_mutex_lock (&mu);
  if (inited == 0) {
    const char *f = getenv ("CRASHSIM_FILE");
    const char *j = getenv ("CRASHSIM_JOURNAL");
    if (f == NULL || j == NULL)
      __atomic_store_n (&inited, -1, __ATOMIC_RELEASE);
    else if (stat (f, &st) == -1)
      ;                         /* not created yet: try again later */
    else {
      target_dev = st.st_dev;
      target_ino = st.st_ino;
      jfd = open (j, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      if (jfd == -1)
        abort ();
      if (getenv ("CRASHSIM_SNAPSHOT"))
        snapshot (getenv ("CRASHSIM_SNAPSHOT"));
      append (R_START, st.st_size, 0, getpid (), NULL, 0);
      __atomic_store_n (&inited, 1, __ATOMIC_RELEASE);
    }
  }
  pthread_mutex_unlock (&mu);
}

/* Is fd the target file?  (No lock needed: the target never changes.) */
static int
is_target (int fd)
{
  struct stat st;

  resolve ();
  init_once ();
  if (__atomic_load_n (&inited, __ATOMIC_ACQUIRE) != 1 ||
      fstat (fd, &st) == -1)
    return 0;
  return st.st_dev == target_dev && st.st_ino == target_ino;
}

/* The common body of every write-like call: CALL performs it. */
#define WRITE_BODY(OFF_EXPR, IOV, IOVCNT, CALL)                         \
  do {                                                                  \
    ssize_t r_;                                                         \
    int saved_;                                                         \
    if (!is_target (fd))                                                \
      return CALL;                                                      \
    pthread_mutex_lock (&mu);                                           \
    {                                                                   \
      off_t o_ = (OFF_EXPR);                                            \
      r_ = CALL;                                                        \
      saved_ = errno;                                                   \
      if (r_ > 0)                                                       \
        append (R_WRITE, o_, r_, 0, (IOV), (IOVCNT));                   \
    }                                                                   \
    pthread_mutex_unlock (&mu);                                         \
    errno = saved_;                                                     \
    return r_;                                                          \
  } while (0)

ssize_t
pwrite (int fd, const void *buf, size_t n, off_t off)
{
  struct iovec iov = { (void *) buf, n };
  WRITE_BODY (off, &iov, 1, real_pwrite (fd, buf, n, off));
}

ssize_t
pwrite64 (int fd, const void *buf, size_t n, off_t off)
{
  struct iovec iov = { (void *) buf, n };
  WRITE_BODY (off, &iov, 1,
              (real_pwrite64 ? real_pwrite64 : real_pwrite) (fd, buf, n, off));
}

ssize_t
write (int fd, const void *buf, size_t n)
{
  struct iovec iov = { (void *) buf, n };
  int fl;
  /* With O_APPEND the data goes to the end of the file. */
  WRITE_BODY (((fl = fcntl (fd, F_GETFL)) != -1 && (fl & O_APPEND))
              ? lseek (fd, 0, SEEK_END) : lseek (fd, 0, SEEK_CUR),
              &iov, 1, real_write (fd, buf, n));
}

ssize_t
pwritev (int fd, const struct iovec *iov, int cnt, off_t off)
{
  WRITE_BODY (off, iov, cnt, real_pwritev (fd, iov, cnt, off));
}

ssize_t
pwritev64 (int fd, const struct iovec *iov, int cnt, off_t off)
{
  WRITE_BODY (off, iov, cnt,
              (real_pwritev64 ? real_pwritev64 : real_pwritev)
              (fd, iov, cnt, off));
}

ssize_t
pwritev2 (int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
  WRITE_BODY (off == -1 ? lseek (fd, 0, SEEK_CUR) : off, iov, cnt,
              real_pwritev2 (fd, iov, cnt, off, flags));
}

ssize_t
pwritev64v2 (int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
  WRITE_BODY (off == -1 ? lseek (fd, 0, SEEK_CUR) : off, iov, cnt,
              (real_pwritev64v2 ? real_pwritev64v2 : real_pwritev2)
              (fd, iov, cnt, off, flags));
}

static int
do_ftruncate (int (*f) (int, off_t), int fd, off_t len)
{
  int r, saved;

  if (!is_target (fd))
    return f (fd, len);
  pthread_mutex_lock (&mu);
  r = f (fd, len);
  saved = errno;
  if (r == 0)
    append (R_TRUNCATE, len, 0, 0, NULL, 0);
  pthread_mutex_unlock (&mu);
  errno = saved;
  return r;
}

int
ftruncate (int fd, off_t len)
{
  resolve ();
  return do_ftruncate (real_ftruncate, fd, len);
}

int
ftruncate64 (int fd, off_t len)
{
  resolve ();
  return do_ftruncate (real_ftruncate64 ? real_ftruncate64 : real_ftruncate,
                       fd, len);
}

static int
do_fallocate (int (*f) (int, int, off_t, off_t), int fd, int mode,
              off_t off, off_t len)
{
  int r, saved;

  if (!is_target (fd))
    return f (fd, mode, off, len);
  pthread_mutex_lock (&mu);
  r = f (fd, mode, off, len);
  saved = errno;
  if (r == 0)
    append (R_FALLOCATE, off, len, (unsigned) mode, NULL, 0);
  pthread_mutex_unlock (&mu);
  errno = saved;
  return r;
}

int
fallocate (int fd, int mode, off_t off, off_t len)
{
  resolve ();
  return do_fallocate (real_fallocate, fd, mode, off, len);
}

int
fallocate64 (int fd, int mode, off_t off, off_t len)
{
  resolve ();
  return do_fallocate (real_fallocate64 ? real_fallocate64 : real_fallocate,
                       fd, mode, off, len);
}

static int
do_sync (int (*f) (int), int fd, int kind)
{
  uint64_t before, t0;
  int r, saved;

  if (!is_target (fd))
    return f (fd);
  pthread_mutex_lock (&mu);
  before = nrecs;
  t0 = now_ns ();
  pthread_mutex_unlock (&mu);

  r = f (fd);
  saved = errno;
  if (r == 0) {
    pthread_mutex_lock (&mu);
    append (R_BARRIER, t0, kind, before, NULL, 0);
    pthread_mutex_unlock (&mu);
  }
  errno = saved;
  return r;
}

int
fdatasync (int fd)
{
  resolve ();
  return do_sync (real_fdatasync, fd, 0);
}

int
fsync (int fd)
{
  resolve ();
  return do_sync (real_fsync, fd, 1);
}
