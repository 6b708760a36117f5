/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: a libFuzzer target over opening and using QED images.
 *
 * Build and run: bash tests/fuzz.sh [--file] [SECONDS] (see there).
 * Built with -DFUZZ_FAST -DFUZZ_MEM (the default target,
 * tests/fuzz-open) the images are files in memory (fuzz-io-mem.c, the
 * core's I/O seam without the kernel) and the work per input is
 * bounded: lookups of at most 1024 clusters, the writable pass (step 3
 * and 4) on one input in 8 chosen by a hash of the input, and
 * qed_error messages formatted only with FUZZ_VERBOSE.  Without them
 * (tests/fuzz-open-file) each input is a file in /dev/shm and takes
 * every step.
 *
 * Reproduce a crash: ./tests/fuzz-open CRASH-FILE
 * FUZZ_VERBOSE=1 prints the core's messages; FUZZ_LEAKS=1 also
 * treats leaked clusters left after a clean close as a failure.
 *
 * Each input is the whole image file.  Per input:
 *  1. qed_header_validate on the (zero-padded) first 64 bytes; its
 *     verdict must agree with qed_open's.
 *  2. A read-only open: qed_map and qed_read at a few offsets (start,
 *     middle, end, L2 table boundaries), a prefetch, and a check without
 *     repair.  The file must not change.
 *  3. A writable open of a copy: a check with repair, then reads,
 *     writes, zero, trim and flush at the same offsets, and close.  If
 *     the repair claimed success, a fresh check must find nothing.
 *  4. Reads through a raw layer beneath (backing-override), so
 *     backing COW paths run too.
 *  5. In memory only, on one trusted input in 4 (step 2 found it clean,
 *     or NEED_CHECK is set): the writable pass with injected I/O
 *     failures (bytes 64-67 of the input choose them), then the
 *     fault-property oracle: no corruption, leaks only with NEED_CHECK
 *     set, every flushed write reads back, and clean after a reopen
 *     and a clean close (see fault_pass).
 * Oracles: the sanitizers, plus abort() on a broken invariant.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <stdarg.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <unistd.h>
#include <sys/stat.h>

#include "qed.h"
#include "seam.h"
#ifdef FUZZ_MEM
#include "fuzz-io-mem.h"
#endif

static bool verbose;
static bool strict_leaks;       /* FUZZ_LEAKS=1: leaks after close abort */
static char last_error[1024];

void
qed_error (const char *fs, ...)
{
  va_list args;
  int e = errno;

#ifdef FUZZ_FAST
  /* Formatting every refusal costs; FUZZ_VERBOSE=1 shows them. */
  if (!verbose) {
    snprintf (last_error, sizeof last_error, "%s", fs);
    errno = e;
    return;
  }
#endif
  va_start (args, fs);
  vsnprintf (last_error, sizeof last_error, fs, args);
  va_end (args);
  if (verbose)
    fprintf (stderr, "qed_error: %s\n", last_error);
  errno = e;
}

void
qed_debug (const char *fs, ...)
{
  va_list args;
  int e = errno;

  if (verbose) {
    va_start (args, fs);
    fprintf (stderr, "qed_debug: ");
    vfprintf (stderr, fs, args);
    fprintf (stderr, "\n");
    va_end (args);
  }
  errno = e;
}

/* Notices and warnings are debug lines here, with their level. */
static void
vlog_level (const char *level, const char *fs, va_list args)
{
  int e = errno;

  if (verbose) {
    fprintf (stderr, "qed_debug: %s: ", level);
    vfprintf (stderr, fs, args);
    fprintf (stderr, "\n");
  }
  errno = e;
}

void
qed_notice (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  vlog_level ("notice", fs, args);
  va_end (args);
}

void
qed_warning (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  vlog_level ("warning", fs, args);
  va_end (args);
}

int
qed_verbose_enabled (void)
{
  return verbose;
}

static char dir[64], ro_path[128], rw_path[128], raw_path[128];

/* The two images an input becomes: the read-only one (step 2) and the
 * writable copy (step 3). */
enum input_copy { RO, RW };
#ifdef FUZZ_MEM
/* Files in memory (tests/fuzz-io-mem.c); the paths name them in the
 * core's messages, and their directory holds the raw layer. */
static struct mem_file *mem[2];
#endif

static void
cleanup (void)
{
  unlink (ro_path);
  unlink (rw_path);
  unlink (raw_path);
  rmdir (dir);
}

static void
init (void)
{
  const char *base = access ("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  unsigned char buf[65536];
  int fd;

  verbose = getenv ("FUZZ_VERBOSE") != NULL;
  strict_leaks = getenv ("FUZZ_LEAKS") != NULL;
  snprintf (dir, sizeof dir, "%s/qed-fuzz.XXXXXX", base);
  if (mkdtemp (dir) == NULL) {
    perror ("mkdtemp");
    abort ();
  }
  snprintf (ro_path, sizeof ro_path, "%s/ro.qed", dir);
  snprintf (rw_path, sizeof rw_path, "%s/rw.qed", dir);
  snprintf (raw_path, sizeof raw_path, "%s/below.raw", dir);
#ifdef FUZZ_MEM
  mem[RO] = mem_file_new ();
  mem[RW] = mem_file_new ();
#endif
  for (size_t i = 0; i < sizeof buf; ++i)
    buf[i] = (i * 7 + 3) | 1;
  fd = open (raw_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd == -1 || write (fd, buf, sizeof buf) != sizeof buf) {
    perror (raw_path);
    abort ();
  }
  close (fd);
  atexit (cleanup);
}

#ifndef FUZZ_MEM
static void
write_file (const char *path, const uint8_t *data, size_t size)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd == -1 || (size && write (fd, data, size) != (ssize_t) size)) {
    perror (path);
    abort ();
  }
  close (fd);
}

static bool
file_equals (const char *path, const uint8_t *data, size_t size)
{
  static uint8_t buf[1 << 20];
  int fd = open (path, O_RDONLY);
  ssize_t r;

  if (fd == -1)
    return false;
  r = read (fd, buf, sizeof buf);
  close (fd);
  return r == (ssize_t) size && memcmp (buf, data, size) == 0;
}

#endif

static void
put_input (enum input_copy which, const uint8_t *data, size_t size)
{
#ifdef FUZZ_MEM
  mem_file_set (mem[which], data, size);
#else
  write_file (which == RO ? ro_path : rw_path, data, size);
#endif
}

static struct qed_image *
open_input (enum input_copy which, struct qed_open_options *o)
{
#ifdef FUZZ_MEM
  o->use_fd = true;
  o->fd = mem_file_open (mem[which], o->readonly);
  o->locking = QED_LOCKING_OFF;   /* OFD locks need a kernel file */
#endif
  return qed_open (which == RO ? ro_path : rw_path, o);
}

static bool
input_unchanged (enum input_copy which, const uint8_t *data, size_t size)
{
#ifdef FUZZ_MEM
  return mem_file_equals (mem[which], data, size);
#else
  return file_equals (which == RO ? ro_path : rw_path, data, size);
#endif
}

/* A few interesting guest offsets. */
static size_t
pick_offsets (const struct qed_header *h, uint64_t *offs)
{
  uint64_t size = h->image_size, cs = h->cluster_size;
  uint64_t cover = (uint64_t) h->table_size * cs / 8 * cs;
  size_t n = 0;

  if (size == 0)
    return 0;
  offs[n++] = 0;
  offs[n++] = size / 2 / 512 * 512;
  offs[n++] = size - 1;
  offs[n++] = size > cs ? size - cs : 0;
  if (cover < size) {
    offs[n++] = cover - 1;
    offs[n++] = cover;
  }
  offs[n++] = size > 4 * cs + 100 ? 4 * cs + 100 : size / 3;
  return n;
}

static void
exercise_reads (struct qed_image *img, const struct qed_below *below,
                const uint64_t *offs, size_t n)
{
  static char buf[3 * 65536 + 4096];
  uint64_t size = qed_get_size (img);

  for (size_t i = 0; i < n; ++i) {
    struct qed_map m;
    uint64_t len = size - offs[i] < sizeof buf ? size - offs[i] : sizeof buf;

    uint64_t map_len = size - offs[i];

#ifdef FUZZ_FAST
    /* Up to 1024 clusters a lookup rather than the core's 65536. */
    if (map_len / 1024 > qed_get_cluster_size (img))
      map_len = 1024 * qed_get_cluster_size (img);
#endif
    if (qed_map (img, offs[i], map_len, &m) == 0) {
      if (m.length == 0 || m.length > map_len)
        abort ();               /* qed_map broke its contract */
    }
    qed_read (img, below, buf, len, offs[i]);
    qed_read (img, below, buf, len < 10 ? len : 10, offs[i]);
  }
  qed_prefetch (img, below, size < (1 << 20) ? size : (1 << 20), 0);
}

static void
exercise_writes (struct qed_image *img, const struct qed_below *below,
                 const uint64_t *offs, size_t n)
{
  static char buf[70000];
  uint64_t size = qed_get_size (img);

  memset (buf, 0x5a, sizeof buf);
  memset (buf + 30000, 0, 30000);
  for (size_t i = 0; i < n; ++i) {
    uint64_t len = size - offs[i] < sizeof buf ? size - offs[i] : sizeof buf;
    uint64_t cs = qed_get_cluster_size (img);
    switch (i % 4) {
    case 0:
      qed_write (img, below, buf, len, offs[i], 0);
      qed_zero (img, below, len < cs ? len : cs, offs[i], QED_ZERO_MAY_UNMAP);
      break;
    case 1:
      qed_write (img, below, buf, len, offs[i], QED_WRITE_DETECT_ZERO);
      qed_trim (img, below, len, offs[i], 0);
      break;
    case 2:
      qed_zero (img, below, len, offs[i], 0);
      qed_write (img, below, buf, len < 100 ? len : 100, offs[i],
                 QED_WRITE_FUA);
      break;
    default:
      qed_fill (img, NULL, len, offs[i] / cs * cs, false, true);
      qed_write (img, below, buf, 1, offs[i], 0);
    }
  }
  qed_flush (img);
}

#if defined (FUZZ_FAST) || defined (FUZZ_MEM)
#define FAULT_BYTES 64

/* FNV-1a over the size and the first 4 KiB (header and L1 start), but
 * for the four fault bytes. */
static uint32_t
input_hash (const uint8_t *data, size_t size)
{
  uint32_t hash = 2166136261u ^ (uint32_t) size;

  for (size_t i = 0; i < size && i < 4096; ++i)
    if (i < FAULT_BYTES || i >= FAULT_BYTES + 4)
      hash = (hash ^ data[i]) * 16777619u;
  return hash;
}

/* The fault pass's parameters: bytes 64-67, just after the header,
 * which the format leaves unused unless a backing file name is put
 * there, so that the fuzzer can move a fault from call to call without
 * changing the image or which steps it takes (they are not hashed). */
static uint32_t
fault_bits (const uint8_t *data, size_t size)
{
  if (size < FAULT_BYTES + 4)
    return input_hash (data, size) >> 3;
  return data[FAULT_BYTES] | data[FAULT_BYTES + 1] << 8 |
    data[FAULT_BYTES + 2] << 16 | (uint32_t) data[FAULT_BYTES + 3] << 24;
}
#endif

#ifdef FUZZ_MEM
/* The writes of the fault pass, in order, and whether the flush after
 * them succeeded: then every acknowledged one must read back. */
static struct written {
  uint64_t off, len;
  uint8_t byte;
  bool acked;
} wlog[8];
static size_t nwlog;
static bool wlog_flushed;

/* One write of a distinct byte at each offset, then a flush. */
static void
logged_writes (struct qed_image *img, const uint64_t *offs, size_t noffs)
{
  static char buf[20000];
  uint64_t size = qed_get_size (img);

  nwlog = 0;
  for (size_t i = 0; i < noffs && i < sizeof wlog / sizeof *wlog; ++i) {
    struct written *w = &wlog[nwlog++];
    w->off = offs[i];
    w->len = size - offs[i] < sizeof buf ? size - offs[i] : sizeof buf;
    w->byte = 0xc0 + i;
    memset (buf, w->byte, w->len);
    w->acked = qed_write (img, NULL, buf, w->len, w->off, 0) == 0;
  }
  wlog_flushed = qed_flush (img) == 0;
}

/* After a successful flush, each byte of an acknowledged write reads
 * as written unless a later write covered it. */
static void
expect_written (struct qed_image *img, const char *when)
{
  static uint8_t buf[20000];

  if (!wlog_flushed)
    return;
  for (size_t k = 0; k < nwlog; ++k) {
    if (!wlog[k].acked)
      continue;
    if (qed_read (img, NULL, buf, wlog[k].len, wlog[k].off) == -1) {
      fprintf (stderr, "%s: cannot read back a flushed write: %s\n", when,
               last_error);
      abort ();
    }
    for (uint64_t p = 0; p < wlog[k].len; ++p) {
      uint64_t at = wlog[k].off + p;
      bool covered = false;
      for (size_t j = k + 1; j < nwlog && !covered; ++j)
        covered = at >= wlog[j].off && at < wlog[j].off + wlog[j].len;
      if (!covered && buf[p] != wlog[k].byte) {
        fprintf (stderr, "%s: a flushed write is lost: 0x%" PRIx64
                 " reads 0x%02x, not 0x%02x\n", when, at, buf[p],
                 wlog[k].byte);
        abort ();
      }
    }
  }
}

/* The image in the writable copy, read-only: it must open, and a check
 * must find no corruption, no I/O error, and leaks only if NEED_CHECK
 * is set (or, with strict, none at all and NEED_CHECK clear); the
 * flushed writes of the fault pass must read back. */
static void
expect_consistent (const char *when, bool strict)
{
  struct qed_open_options o = { .readonly = true };
  struct qed_check_result res;
  struct qed_image *img = open_input (RW, &o);
  bool need_check;

  if (img == NULL) {
    fprintf (stderr, "%s: the image does not open: %s\n", when, last_error);
    abort ();
  }
  need_check = qed_get_header (img)->features & QED_F_NEED_CHECK;
  if (qed_check (img, false, &res) == -1 || res.corruptions ||
      res.check_errors || (res.leaks && (strict || !need_check)) ||
      (strict && need_check)) {
    fprintf (stderr, "%s: %" PRIu64 " corruptions, %" PRIu64 " leaks, %"
             PRIu64 " errors, NEED_CHECK %s\n", when, res.corruptions,
             res.leaks, res.check_errors, need_check ? "set" : "clear");
    abort ();
  }
  expect_written (img, when);
  qed_close (img);
}

/* 5. Faults (in memory only): the writable pass on a trusted input
 * (step 2 found it clean, or it has NEED_CHECK set) with I/O calls
 * failing, as bytes 64-67 of the input say (fault_bits): after 0-63
 * calls of one kind or of any, EIO or ENOSPC, once or from then on.  Whatever
 * failed, the image must then be consistent, and a writable open and
 * a clean close without faults must leave it clean, if the L1 table
 * follows the header as in every image qemu-img or we create: the L1
 * never moves, so leaks below one placed higher are never reclaimed
 * (NEED_CHECK then stays set, which the first oracle checks).  If the
 * flush after the last writes succeeded, they must all read back, after
 * the faults and after the clean close. */
static void
fault_pass (const uint8_t *data, size_t size, uint32_t bits,
            const struct qed_header *h, const uint64_t *offs, size_t noffs)
{
  static const unsigned kinds[] = {
    MEM_OP_READ | MEM_OP_WRITE | MEM_OP_SYNC | MEM_OP_TRUNCATE |
    MEM_OP_FALLOCATE,
    MEM_OP_WRITE, MEM_OP_SYNC, MEM_OP_TRUNCATE | MEM_OP_FALLOCATE,
  };
  struct qed_open_options rw = { .l2_cache_bytes = 65536 };
  struct qed_image *img;

  put_input (RW, data, size);
  mem_fault_set (kinds[bits % 4], (bits >> 2) % 64,
                 (bits >> 8) & 1 ? ENOSPC : EIO, (bits >> 9) & 1);
  nwlog = 0;
  img = open_input (RW, &rw);
  if (img) {
    exercise_reads (img, NULL, offs, noffs);
    exercise_writes (img, NULL, offs, noffs);
    logged_writes (img, offs, noffs);
    qed_close (img);
  }
  mem_fault_clear ();
  expect_consistent ("after faults", false);
  img = open_input (RW, &rw);
  if (img == NULL) {
    fprintf (stderr, "no writable open after faults: %s\n", last_error);
    abort ();
  }
  qed_close (img);
  expect_consistent ("after faults, a writable open and a clean close",
                     h->l1_table_offset ==
                     (uint64_t) h->header_size * h->cluster_size);
}
#endif

/* 1. Header validation alone; encode and decode must round-trip. */
static bool
header_step (const uint8_t *data, size_t size, struct qed_header *h)
{
  unsigned char raw[QED_HEADER_BYTES] = { 0 }, raw2[QED_HEADER_BYTES];
  struct qed_header h2;
  char msg[256];
  bool valid;

  memcpy (raw, data, size < sizeof raw ? size : sizeof raw);
  qed_header_decode (h, raw);
  valid = qed_header_validate (h, size, msg, sizeof msg) == 0;
  qed_header_encode (raw2, h);
  qed_header_decode (&h2, raw2);
  if (memcmp (h, &h2, sizeof *h) != 0 || memcmp (raw, raw2, sizeof raw))
    abort ();
  if (valid) {
    qed_max_image_size (h->cluster_size, h->table_size);
    qed_qemu_can_open (h->cluster_size, h->table_size);
  }
  return valid;
}

/* The raw file beneath img (backing-override), so that the backing
 * paths run too; NULL if the image refuses it. */
static struct qed_chain *
raw_layer_beneath (struct qed_image *img, struct qed_below *below)
{
  struct qed_chain_options co = { .follow = false, .override = raw_path,
                                  .override_format = QED_FORMAT_RAW };
  struct qed_chain *chain;
  bool none;

  chain = qed_chain_open (img, &co, &none);
  if (chain)
    qed_chain_below (chain, below);
  return chain;
}

/* 2. Read-only.  Returns whether the image is trusted: clean, or says
 * it is not (NEED_CHECK), so that the oracles of step 5 hold. */
static bool
readonly_step (const uint8_t *data, size_t size, bool valid,
               const struct qed_header *h, const uint64_t *offs,
               size_t noffs)
{
  struct qed_open_options ro = { .readonly = true, .l2_cache_bytes = 65536 };
  struct qed_chain_options co = { .follow = false };
  struct qed_check_result res;
  struct qed_image *img;
  struct qed_chain *chain;
  struct qed_below below;
  bool none, trusted;

  put_input (RO, data, size);
  img = open_input (RO, &ro);
  if (img && !valid)
    abort ();                   /* open accepted what validate refused */
  if (img == NULL)
    return false;
  exercise_reads (img, NULL, offs, noffs);
  trusted = qed_check (img, false, &res) == 0 && res.corruptions == 0 &&
    res.check_errors == 0 &&
    (res.leaks == 0 || (h->features & QED_F_NEED_CHECK));
  chain = raw_layer_beneath (img, &below);
  if (chain) {
    struct qed_map m;
    exercise_reads (img, &below, offs, noffs);
    for (size_t i = 0; i < noffs; ++i)
      qed_chain_map (chain, offs[i], 100000, &m);
    qed_chain_close (chain);
  }
  /* follow=false on an image naming a backing file must refuse. */
  chain = qed_chain_open (img, &co, &none);
  if (chain || (!none && qed_get_backing_name (img) == NULL))
    abort ();
  qed_close (img);
  if (!input_unchanged (RO, data, size))
    abort ();                   /* a read-only open changed the file */
  return trusted;
}

/* A repaired image used only through the API stays consistent. */
static void
expect_repaired_consistent (void)
{
  struct qed_open_options o = { .readonly = true };
  struct qed_check_result res;
  struct qed_image *img = open_input (RW, &o);

  if (img == NULL) {
    fprintf (stderr, "cannot reopen a repaired image: %s\n", last_error);
    abort ();
  }
  if (qed_check (img, false, &res) == -1 || res.corruptions ||
      res.check_errors || (strict_leaks && res.leaks)) {
    fprintf (stderr, "repaired image corrupted by use: %" PRIu64
             " corruptions, %" PRIu64 " errors, %" PRIu64 " leaks\n",
             res.corruptions, res.check_errors, res.leaks);
    abort ();
  }
  qed_close (img);
}

/* 3 and 4. Writable, on a copy: repair, then use it, also over a raw
 * layer beneath. */
static void
writable_step (const uint8_t *data, size_t size, const uint64_t *offs,
               size_t noffs)
{
  struct qed_open_options rw = { .l2_cache_bytes = 65536 };
  struct qed_check_result res;
  struct qed_image *img;
  struct qed_chain *chain;
  struct qed_below below;
  bool repaired = false;

  put_input (RW, data, size);
  img = open_input (RW, &rw);
  if (img == NULL)
    return;
  if (qed_check (img, true, &res) == 0 && res.check_errors == 0 &&
      res.corruptions == res.corruptions_fixed) {
    repaired = true;
    if (qed_check (img, false, &res) == -1 || res.corruptions ||
        (strict_leaks && res.leaks) || res.check_errors) {
      fprintf (stderr, "after repair: %" PRIu64 " corruptions, %" PRIu64
               " leaks, %" PRIu64 " errors\n", res.corruptions, res.leaks,
               res.check_errors);
      abort ();
    }
  }
  exercise_reads (img, NULL, offs, noffs);
  exercise_writes (img, NULL, offs, noffs);
  chain = raw_layer_beneath (img, &below);
  if (chain) {
    exercise_writes (img, &below, offs, noffs);
    exercise_reads (img, &below, offs, noffs);
    qed_chain_close (chain);
  }
  qed_close (img);
  if (repaired)
    expect_repaired_consistent ();
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  static bool initialised;
  struct qed_header h;
  uint64_t offs[8];
  size_t noffs = 0;
  bool valid, trusted;

  if (!initialised) {
    init ();
    initialised = true;
  }
  if (size > (1 << 20))
    return 0;

  valid = header_step (data, size, &h);
  if (valid)
    noffs = pick_offsets (&h, offs);
  trusted = readonly_step (data, size, valid, &h, offs, noffs);
#ifdef FUZZ_MEM
  if (valid && trusted && input_hash (data, size) % 4 == 1)
    fault_pass (data, size, fault_bits (data, size), &h, offs, noffs);
#else
  (void) trusted;               /* faults need the in-memory file */
#endif
#ifdef FUZZ_FAST
  /* The fast target does the costly writable pass (repair, writes,
   * compaction, reopen) on one input in 8, picked by a hash of the
   * input so that each input always runs the same way. */
  if (!valid || input_hash (data, size) % 8 != 0)
    return 0;
#endif
  writable_step (data, size, offs, noffs);
  return 0;
}
