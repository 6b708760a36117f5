/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the core's I/O seam (seam.h) over files in memory.
 *
 * Linked into the fuzz target in place of common/io-file.c, so that an
 * input costs no system call: writing the input to a file, opening,
 * truncating and punching tmpfs pages was half of each execution.
 *
 * A file is sparse, in 4 KiB blocks (a tmpfs page): a block never
 * written is a hole, reads as zeros and is skipped by SEEK_DATA, and a
 * punched block is freed.  Like a small file system, the files share
 * MEM_SPACE bytes of blocks (past it: ENOSPC, so the fuzzer reaches the
 * full-disk paths for free) and a file is at most MEM_MAX_FILE bytes
 * (past it: EFBIG).  fdatasync is free and cannot fail.
 *
 * Blocks come from one arena, reused last-freed-first: no malloc per
 * block (ASan records a stack trace for each) and no fresh page to
 * fault in once the arena is warm.
 *
 * Descriptors are numbered from MEM_FD_BASE, far above any the kernel
 * hands out; any other descriptor goes to the kernel.  Single-threaded,
 * as the fuzz target is.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include "seam.h"
#include "util.h"
#include "fuzz-io-mem.h"

#define BLOCK           4096
#define LEAF_BLOCKS     1024                    /* 4 MiB of file a leaf */
#define MEM_MAX_FILE    (UINT64_C (16) << 30)
#define LEAVES          (MEM_MAX_FILE / BLOCK / LEAF_BLOCKS)
#define MEM_SPACE       (UINT64_C (256) << 20)
#define MEM_FD_BASE     (1 << 29)
#define MEM_FDS         16

struct mem_file {
  uint8_t **leaves[LEAVES];     /* NULL: 4 MiB of holes */
  uint64_t size;
  uint64_t blocks;              /* allocated */
  uint64_t end_block;           /* no block allocated at or past it */
  uint64_t ino;
};

static struct mem_fd {
  struct mem_file *file;        /* NULL: free */
  bool readonly;
} fds[MEM_FDS];

static uint8_t *arena;          /* MEM_SPACE bytes of blocks */
static uint64_t arena_used;     /* blocks handed out at least once */
static uint8_t **free_blocks;   /* freed, reused last first */
static uint64_t nr_free;
static uint64_t next_ino = 1;

static struct {
  unsigned ops;                 /* 0: no fault armed */
  uint64_t after;
  int err;
  bool sticky;
  uint64_t hits;
} fault;

void
mem_fault_set (unsigned ops, uint64_t after, int err, bool sticky)
{
  fault.ops = ops;
  fault.after = after;
  fault.err = err;
  fault.sticky = sticky;
  fault.hits = 0;
}

void
mem_fault_clear (void)
{
  fault.ops = 0;
}

uint64_t
mem_fault_hits (void)
{
  return fault.hits;
}

/* Does this call (of kind op) fail? */
static bool
injected (unsigned op)
{
  if (!(fault.ops & op))
    return false;
  if (fault.after > 0) {
    fault.after--;
    return false;
  }
  if (!fault.sticky)
    fault.ops = 0;
  fault.hits++;
  errno = fault.err;
  return true;
}

static uint8_t *
arena_get (void)
{
  if (arena == NULL) {
    arena = mmap (NULL, MEM_SPACE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    free_blocks = malloc (MEM_SPACE / BLOCK * sizeof *free_blocks);
    if (arena == MAP_FAILED || free_blocks == NULL)
      abort ();
  }
  if (nr_free > 0)
    return free_blocks[--nr_free];
  if (arena_used == MEM_SPACE / BLOCK) {
    errno = ENOSPC;
    return NULL;
  }
  return arena + arena_used++ * BLOCK;
}

static uint8_t *
block_get (const struct mem_file *f, uint64_t b)
{
  uint8_t **leaf = f->leaves[b / LEAF_BLOCKS];

  return leaf ? leaf[b % LEAF_BLOCKS] : NULL;
}

/* The block, allocated (zeroed) if it was a hole.  NULL with errno
 * ENOSPC when the space is used up. */
static uint8_t *
block_alloc (struct mem_file *f, uint64_t b)
{
  uint8_t ***leaf = &f->leaves[b / LEAF_BLOCKS];
  uint8_t **slot;

  if (*leaf == NULL && (*leaf = calloc (LEAF_BLOCKS, sizeof **leaf)) == NULL)
    abort ();
  slot = &(*leaf)[b % LEAF_BLOCKS];
  if (*slot == NULL) {
    if ((*slot = arena_get ()) == NULL)
      return NULL;
    memset (*slot, 0, BLOCK);
    f->blocks++;
    if (b >= f->end_block)
      f->end_block = b + 1;
  }
  return *slot;
}

static void
block_free (struct mem_file *f, uint64_t b)
{
  uint8_t **leaf = f->leaves[b / LEAF_BLOCKS];

  if (leaf && leaf[b % LEAF_BLOCKS]) {
    free_blocks[nr_free++] = leaf[b % LEAF_BLOCKS];
    leaf[b % LEAF_BLOCKS] = NULL;
    f->blocks--;
  }
}

/* Zero [off, off + len): whole blocks become holes, partial ones are
 * cleared in place. */
static void
zero_range (struct mem_file *f, uint64_t off, uint64_t len)
{
  while (len > 0) {
    uint64_t b = off / BLOCK, in = off % BLOCK;
    uint64_t n = BLOCK - in < len ? BLOCK - in : len;
    uint8_t *p = block_get (f, b);

    if (n == BLOCK)
      block_free (f, b);
    else if (p)
      memset (p + in, 0, n);
    off += n;
    len -= n;
  }
}

/* Free every block from block b on (the leaves stay, for reuse). */
static void
free_from (struct mem_file *f, uint64_t b)
{
  for (; b < f->end_block; ++b) {
    if (f->leaves[b / LEAF_BLOCKS] == NULL)
      b = ROUND_DOWN (b, LEAF_BLOCKS) + LEAF_BLOCKS - 1;
    else
      block_free (f, b);
  }
}

struct mem_file *
mem_file_new (void)
{
  struct mem_file *f = calloc (1, sizeof *f);

  if (f == NULL)
    abort ();
  f->ino = next_ino++;
  return f;
}

void
mem_file_free (struct mem_file *f)
{
  free_from (f, 0);
  for (uint64_t l = 0; l < LEAVES; ++l)
    free (f->leaves[l]);
  free (f);
}

void
mem_file_set (struct mem_file *f, const void *data, size_t size)
{
  free_from (f, 0);
  f->end_block = 0;
  for (uint64_t off = 0; off < size; off += BLOCK) {
    uint64_t n = size - off < BLOCK ? size - off : BLOCK;
    uint8_t *p = block_alloc (f, off / BLOCK);
    if (p == NULL)
      abort ();
    memcpy (p, (const uint8_t *) data + off, n);
  }
  f->size = size;
}

int
mem_file_open (struct mem_file *f, bool readonly)
{
  for (int i = 0; i < MEM_FDS; ++i) {
    if (fds[i].file == NULL) {
      fds[i] = (struct mem_fd) { .file = f, .readonly = readonly };
      return MEM_FD_BASE + i;
    }
  }
  fprintf (stderr, "fuzz-io-mem: more than %d descriptors open\n", MEM_FDS);
  abort ();
}

bool
mem_file_equals (const struct mem_file *f, const void *data, size_t size)
{
  if (f->size != size)
    return false;
  for (uint64_t off = 0; off < size; off += BLOCK) {
    uint64_t n = size - off < BLOCK ? size - off : BLOCK;
    const uint8_t *p = block_get (f, off / BLOCK);
    const uint8_t *d = (const uint8_t *) data + off;
    /* A hole matches zeros. */
    if (p ? memcmp (p, d, n) != 0 : d[0] != 0 || memcmp (d, d + 1, n - 1))
      return false;
  }
  return true;
}

uint64_t
mem_file_size (const struct mem_file *f)
{
  return f->size;
}

uint64_t
mem_file_allocated (const struct mem_file *f)
{
  return f->blocks * BLOCK;
}

/* The open memory file behind fd, or NULL for a kernel descriptor
 * (errno EBADF for a closed memory descriptor). */
static struct mem_fd *
mem_fd (int fd, bool *kernel)
{
  *kernel = fd < MEM_FD_BASE || fd >= MEM_FD_BASE + MEM_FDS;
  if (*kernel)
    return NULL;
  if (fds[fd - MEM_FD_BASE].file == NULL) {
    errno = EBADF;
    return NULL;
  }
  return &fds[fd - MEM_FD_BASE];
}

/* A descriptor the caller may change the file through. */
static struct mem_file *
writable (int fd, bool *kernel)
{
  struct mem_fd *m = mem_fd (fd, kernel);

  if (m == NULL)
    return NULL;
  if (m->readonly) {
    errno = EBADF;
    return NULL;
  }
  return m->file;
}

ssize_t
qed_io_pread (int fd, void *buf, size_t count, uint64_t off)
{
  bool kernel;
  struct mem_fd *m = mem_fd (fd, &kernel);
  const struct mem_file *f;
  size_t done = 0;

  if (kernel)
    return pread (fd, buf, count, off);
  if (m == NULL || injected (MEM_OP_READ))
    return -1;
  f = m->file;
  if (off >= f->size)
    return 0;
  if (count > f->size - off)
    count = f->size - off;
  while (done < count) {
    uint64_t b = (off + done) / BLOCK, in = (off + done) % BLOCK;
    size_t n = BLOCK - in < count - done ? BLOCK - in : count - done;
    const uint8_t *p = block_get (f, b);
    if (p)
      memcpy ((uint8_t *) buf + done, p + in, n);
    else
      memset ((uint8_t *) buf + done, 0, n);
    done += n;
  }
  return done;
}

/* Write into f: a short write (or ENOSPC) when the space runs out. */
static ssize_t
file_write (struct mem_file *f, const void *buf, size_t count, uint64_t off)
{
  size_t done = 0;

  if (off >= MEM_MAX_FILE || count > MEM_MAX_FILE - off) {
    errno = EFBIG;
    return -1;
  }
  while (done < count) {
    uint64_t b = (off + done) / BLOCK, in = (off + done) % BLOCK;
    size_t n = BLOCK - in < count - done ? BLOCK - in : count - done;
    uint8_t *p = block_alloc (f, b);
    if (p == NULL)
      break;
    memcpy (p + in, (const uint8_t *) buf + done, n);
    done += n;
  }
  if (done > 0 && off + done > f->size)
    f->size = off + done;
  return done > 0 || count == 0 ? (ssize_t) done : -1;
}

ssize_t
qed_io_pwrite (int fd, const void *buf, size_t count, uint64_t off)
{
  bool kernel;
  struct mem_file *f = writable (fd, &kernel);

  if (kernel)
    return pwrite (fd, buf, count, off);
  if (f == NULL || injected (MEM_OP_WRITE))
    return -1;
  return file_write (f, buf, count, off);
}

ssize_t
qed_io_pwritev (int fd, const struct iovec *iov, int iovcnt, uint64_t off)
{
  bool kernel;
  struct mem_file *f = writable (fd, &kernel);
  ssize_t total = 0;

  if (kernel)
    return pwritev (fd, iov, iovcnt, off);
  if (f == NULL || injected (MEM_OP_WRITE))
    return -1;
  for (int i = 0; i < iovcnt; ++i) {
    ssize_t r = file_write (f, iov[i].iov_base, iov[i].iov_len, off + total);
    if (r == -1)
      return total > 0 ? total : -1;
    total += r;
    if ((size_t) r < iov[i].iov_len)
      break;
  }
  return total;
}

int
qed_io_datasync (int fd)
{
  bool kernel;

  if (mem_fd (fd, &kernel) == NULL)
    return kernel ? fdatasync (fd) : -1;
  return injected (MEM_OP_SYNC) ? -1 : 0;
}

int
qed_io_truncate (int fd, uint64_t size)
{
  bool kernel;
  struct mem_file *f = writable (fd, &kernel);

  if (kernel)
    return ftruncate (fd, size);
  if (f == NULL || injected (MEM_OP_TRUNCATE))
    return -1;
  if (size > MEM_MAX_FILE) {
    errno = EFBIG;
    return -1;
  }
  /* Shrinking drops everything past the new end, blocks reserved
   * beyond the old end too; growing keeps those (as the kernel does). */
  if (size < f->size) {
    if (size % BLOCK) {
      uint8_t *p = block_get (f, size / BLOCK);
      if (p)
        memset (p + size % BLOCK, 0, BLOCK - size % BLOCK);
    }
    free_from (f, (size + BLOCK - 1) / BLOCK);
    if (f->end_block > (size + BLOCK - 1) / BLOCK)
      f->end_block = (size + BLOCK - 1) / BLOCK;
  }
  f->size = size;
  return 0;
}

int
qed_io_fallocate (int fd, int mode, uint64_t off, uint64_t len)
{
  bool kernel;
  struct mem_file *f = writable (fd, &kernel);
  uint64_t end;

  if (kernel)
    return fallocate (fd, mode, off, len);
  if (f == NULL || injected (MEM_OP_FALLOCATE))
    return -1;
  if (len == 0 || off >= MEM_MAX_FILE || len > MEM_MAX_FILE - off) {
    errno = len == 0 ? EINVAL : EFBIG;
    return -1;
  }
  switch (mode) {
  case FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
    /* Past the end too: blocks reserved there go. */
    end = MIN (off + len, f->end_block * BLOCK);
    if (off < end)
      zero_range (f, off, end - off);
    return 0;
  case FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE:
    /* tmpfs has no ZERO_RANGE (the core then writes zeros; the file
     * target runs that); here it behaves as on ext4 or XFS. */
    end = MIN (off + len, f->size);
    if (off < end)
      zero_range (f, off, end - off);
    return 0;
  case FALLOC_FL_KEEP_SIZE:
    /* Reserve the blocks (beyond the end too, as the kernel does). */
    for (uint64_t b = off / BLOCK; b <= (off + len - 1) / BLOCK; ++b)
      if (block_alloc (f, b) == NULL)
        return -1;
    return 0;
  default:
    errno = EOPNOTSUPP;
    return -1;
  }
}

off_t
qed_io_seek (int fd, off_t off, int whence)
{
  bool kernel;
  struct mem_fd *m = mem_fd (fd, &kernel);
  const struct mem_file *f;
  uint64_t b;

  if (kernel)
    return lseek (fd, off, whence);
  if (m == NULL)
    return -1;
  f = m->file;
  if (whence == SEEK_END)
    return f->size + off;
  if (off < 0 || (whence != SEEK_DATA && whence != SEEK_HOLE)) {
    errno = EINVAL;
    return -1;
  }
  if ((uint64_t) off >= f->size) {
    errno = ENXIO;
    return -1;
  }
  for (b = off / BLOCK; b * BLOCK < f->size; ++b) {
    if (f->leaves[b / LEAF_BLOCKS] == NULL) {
      if (whence == SEEK_HOLE)
        break;
      b = ROUND_DOWN (b, LEAF_BLOCKS) + LEAF_BLOCKS - 1;   /* next leaf */
      continue;
    }
    if ((block_get (f, b) != NULL) == (whence == SEEK_DATA))
      break;
  }
  if (b * BLOCK >= f->size) {
    if (whence == SEEK_HOLE)
      return f->size;
    errno = ENXIO;
    return -1;
  }
  return b * BLOCK > (uint64_t) off ? (off_t) (b * BLOCK) : off;
}

void
qed_io_advise (int fd, uint64_t off, uint64_t len)
{
  bool kernel;

  mem_fd (fd, &kernel);
  if (kernel)
    posix_fadvise (fd, off, len, POSIX_FADV_WILLNEED);
}

int
qed_io_fstat (int fd, struct stat *st)
{
  bool kernel;
  struct mem_fd *m = mem_fd (fd, &kernel);

  if (kernel)
    return fstat (fd, st);
  if (m == NULL)
    return -1;
  memset (st, 0, sizeof *st);
  st->st_mode = S_IFREG | 0600;
  st->st_nlink = 1;
  st->st_uid = geteuid ();
  st->st_gid = getegid ();
  st->st_dev = 0xfeed;
  st->st_ino = m->file->ino;
  st->st_size = m->file->size;
  st->st_blksize = BLOCK;
  st->st_blocks = m->file->blocks * (BLOCK / 512);
  return 0;
}

int
qed_io_close (int fd)
{
  bool kernel;
  struct mem_fd *m = mem_fd (fd, &kernel);

  if (kernel)
    return close (fd);
  if (m == NULL)
    return -1;
  m->file = NULL;
  return 0;
}

/* One process, no one else to conflict with: every lock is granted,
 * and a test finds no other holder. */
int
qed_io_lock (int fd, int cmd, struct flock *fl)
{
  bool kernel;
  struct mem_fd *m = mem_fd (fd, &kernel);

  if (kernel)
    return fcntl (fd, cmd, fl);
  if (m == NULL)
    return -1;
  if (cmd == F_OFD_GETLK)
    fl->l_type = F_UNLCK;
  return 0;
}
