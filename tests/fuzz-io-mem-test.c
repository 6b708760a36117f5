/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the fuzz target's in-memory file checked against tmpfs.
 *
 * The fuzz target trusts tests/fuzz-io-mem.c to behave as a file: a
 * mistake there would hide bugs (or invent them).  This runs the same
 * random operations on an in-memory file and on a file in DIR (a tmpfs,
 * whose holes come in the same 4 KiB pages) and compares every result:
 * return values, errno, sizes, contents, allocated blocks, and
 * SEEK_DATA/SEEK_HOLE.
 *   tests/fuzz-io-mem-test DIR [SEQUENCES]
 * Exit 0 when all agree; the first difference is printed, exit 1.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include "seam.h"
#include "fuzz-io-mem.h"

#define SPAN (1 << 20)          /* offsets and sizes stay below this */

static uint64_t rng_state;

static uint64_t
rnd (uint64_t n)
{
  rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return (rng_state >> 33) % n;
}

/* An offset or length, biased to page boundaries and small values. */
static uint64_t
pick (void)
{
  switch (rnd (4)) {
  case 0: return rnd (SPAN / 4096) * 4096;
  case 1: return rnd (SPAN / 4096) * 4096 + rnd (2) * 4095;
  case 2: return rnd (9000);
  default: return rnd (SPAN);
  }
}

static unsigned seq, step;
static const char *what;

static void
differ (const char *fs, int64_t file, int64_t mem)
{
  fprintf (stderr, "fuzz-io-mem-test: sequence %u step %u (%s): %s: "
           "file %" PRId64 ", memory %" PRId64 "\n",
           seq, step, what, fs, file, mem);
  exit (1);
}

/* Both calls returned r1/r2 with errno e1/e2. */
static void
same_result (int64_t r1, int e1, int64_t r2, int e2)
{
  if (r1 != r2)
    differ ("return value", r1, r2);
  if (r1 == -1 && e1 != e2)
    differ ("errno", e1, e2);
}

static void
compare_state (int ffd, int mfd, bool seeks)
{
  static uint8_t b1[SPAN + 8192], b2[SPAN + 8192];
  struct stat s1, s2;
  ssize_t r1, r2;

  if (fstat (ffd, &s1) == -1 || qed_io_fstat (mfd, &s2) == -1)
    differ ("fstat failed", 0, 0);
  if (s1.st_size != s2.st_size)
    differ ("size", s1.st_size, s2.st_size);
  if (s1.st_blocks != s2.st_blocks)
    differ ("st_blocks", s1.st_blocks, s2.st_blocks);
  r1 = pread (ffd, b1, sizeof b1, 0);
  r2 = qed_io_pread (mfd, b2, sizeof b2, 0);
  if (r1 != r2)
    differ ("whole read", r1, r2);
  if (r1 > 0 && memcmp (b1, b2, r1) != 0)
    for (ssize_t i = 0; i < r1; ++i)
      if (b1[i] != b2[i])
        differ ("byte differs at", i, b2[i]);
  if (!seeks)
    return;
  for (int i = 0; i < 4; ++i) {
    off_t o = i == 0 ? 0 : pick ();
    for (int w = 0; w < 2; ++w) {
      int whence = w ? SEEK_HOLE : SEEK_DATA;
      off_t a, b;
      int ea, eb;
      errno = 0; a = lseek (ffd, o, whence); ea = errno;
      errno = 0; b = qed_io_seek (mfd, o, whence); eb = errno;
      what = whence == SEEK_DATA ? "SEEK_DATA" : "SEEK_HOLE";
      same_result (a, ea, b, eb);
    }
  }
}

/* One random operation on both files. */
static bool
random_op (int ffd, int mfd)
{
  static uint8_t buf[65536 * 2];
  uint64_t off = pick (), len = pick () % sizeof buf;
  int64_t r1, r2;
  int e1, e2;
  bool prealloc = false;

  for (size_t i = 0; i < len; ++i)
    buf[i] = rnd (3) ? 0 : (uint8_t) rnd (256);
  switch (rnd (7)) {
  case 0: case 1:
    what = "pwrite";
    errno = 0; r1 = pwrite (ffd, buf, len, off); e1 = errno;
    errno = 0; r2 = qed_io_pwrite (mfd, buf, len, off); e2 = errno;
    break;
  case 2: {
    struct iovec iov[3] = { { buf, len / 3 }, { buf + len / 3, 1 },
                            { buf + len / 3 + 1, len - len / 3 - 1 } };
    what = "pwritev";
    if (len < 2)
      return false;
    errno = 0; r1 = pwritev (ffd, iov, 3, off); e1 = errno;
    errno = 0; r2 = qed_io_pwritev (mfd, iov, 3, off); e2 = errno;
    break;
  }
  case 3:
    what = "ftruncate";
    errno = 0; r1 = ftruncate (ffd, off); e1 = errno;
    errno = 0; r2 = qed_io_truncate (mfd, off); e2 = errno;
    break;
  case 4: case 5:
    what = "punch";
    errno = 0;
    r1 = fallocate (ffd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
    e1 = errno;
    errno = 0;
    r2 = qed_io_fallocate (mfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           off, len);
    e2 = errno;
    break;
  default:
    /* tmpfs counts preallocated pages as holes for SEEK_DATA until
     * written: after this, compare everything but the seeks. */
    what = "preallocate";
    prealloc = true;
    errno = 0; r1 = fallocate (ffd, FALLOC_FL_KEEP_SIZE, off, len); e1 = errno;
    errno = 0; r2 = qed_io_fallocate (mfd, FALLOC_FL_KEEP_SIZE, off, len);
    e2 = errno;
  }
  same_result (r1, e1, r2, e2);
  return prealloc;
}

int
main (int argc, char *argv[])
{
  unsigned sequences = argc > 2 ? atoi (argv[2]) : 300;
  char path[4096];
  struct mem_file *mf = mem_file_new ();
  uint8_t byte = 1;

  if (argc < 2) {
    fprintf (stderr, "usage: %s DIR [SEQUENCES]\n", argv[0]);
    return 2;
  }
  snprintf (path, sizeof path, "%s/fuzz-io-mem-test.file", argv[1]);
  for (seq = 0; seq < sequences; ++seq) {
    int ffd = open (path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    int mfd, rofd;
    bool preallocated = false;

    if (ffd == -1) {
      perror (path);
      return 2;
    }
    rng_state = seq + 1;
    mem_file_set (mf, NULL, 0);
    mfd = mem_file_open (mf, false);
    for (step = 0; step < 60; ++step) {
      preallocated |= random_op (ffd, mfd);
      compare_state (ffd, mfd, !preallocated);
    }
    /* A read-only descriptor changes nothing. */
    rofd = mem_file_open (mf, true);
    what = "read-only descriptor";
    if (qed_io_pwrite (rofd, &byte, 1, 0) != -1 || errno != EBADF ||
        qed_io_truncate (rofd, 0) != -1 || errno != EBADF ||
        qed_io_fallocate (rofd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          0, 4096) != -1 || errno != EBADF)
      differ ("a change through it did not fail with EBADF", 0, errno);
    compare_state (ffd, mfd, !preallocated);
    /* Closed descriptors are gone. */
    qed_io_close (rofd);
    qed_io_close (mfd);
    what = "closed descriptor";
    if (qed_io_pread (mfd, &byte, 1, 0) != -1 || errno != EBADF)
      differ ("a read through it did not fail with EBADF", 0, errno);
    close (ffd);
  }
  unlink (path);
  mem_file_free (mf);
  printf ("fuzz-io-mem-test: %u sequences of 60 operations agree with %s\n",
          sequences, argv[1]);
  return 0;
}
