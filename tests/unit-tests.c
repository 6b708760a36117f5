/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: unit tests of the format core (no nbdkit needed).
 *
 *   make tests/unit-tests && ./tests/unit-tests
 *   make tests/unit-tests-asan && ./tests/unit-tests-asan
 *
 * Environment:
 *   QED_TEST_DEBUG=1    show the core's debug messages
 *   QED_TEST_SEED=N     seed of the random tests (default fixed)
 *   QED_TEST_OPS=N      operations per random model run (default 400)
 *
 * Each test works in a private directory under /tmp, removed at exit.
 * Exit status: 0 if every check passed, 1 otherwise.
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
#include <ftw.h>
#include <endian.h>
#include <sys/stat.h>
#include <pthread.h>

#include "qed.h"
#include "seam.h"
#include "safe-open.h"

/* ------------------------------------------------------------------ */
/* The seam. */

static char last_error[4096];
static unsigned long nr_errors;
static bool show_debug;

void
qed_error (const char *fs, ...)
{
  va_list args;
  int e = errno;

  va_start (args, fs);
  errno = e;                    /* for %m */
  vsnprintf (last_error, sizeof last_error, fs, args);
  va_end (args);
  nr_errors++;
  fprintf (stderr, "  [qed_error] %s\n", last_error);
  errno = e;
}

/* Notices and warnings are messages the user sees too: counted with the
 * errors (nr_errors), as they were when they went through qed_error. */
static void
message (const char *level, const char *fs, va_list args)
{
  char msg[4096];
  int e = errno;

  vsnprintf (msg, sizeof msg, fs, args);
  nr_errors++;
  fprintf (stderr, "  [qed_%s] %s\n", level, msg);
  errno = e;
}

void
qed_notice (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  message ("notice", fs, args);
  va_end (args);
}

void
qed_warning (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  message ("warning", fs, args);
  va_end (args);
}

void
qed_debug (const char *fs, ...)
{
  va_list args;
  int e = errno;

  if (show_debug) {
    va_start (args, fs);
    fprintf (stderr, "  [qed_debug] ");
    errno = e;
    vfprintf (stderr, fs, args);
    fprintf (stderr, "\n");
    va_end (args);
  }
  errno = e;
}

/* Always format the verbose lines (under ASan too); shown with -d. */
int
qed_verbose_enabled (void)
{
  return 1;
}

static void
clear_error (void)
{
  last_error[0] = '\0';
}

/* ------------------------------------------------------------------ */
/* Assertions. */

static unsigned long checks, failures;

#define CHECK(cond)                                                     \
  do {                                                                  \
    checks++;                                                           \
    if (!(cond)) {                                                      \
      failures++;                                                       \
      fprintf (stderr, "%s:%d: FAIL: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                   \
  } while (0)

#define CHECKF(cond, ...)                                               \
  do {                                                                  \
    checks++;                                                           \
    if (!(cond)) {                                                      \
      failures++;                                                       \
      fprintf (stderr, "%s:%d: FAIL: %s: ", __FILE__, __LINE__, #cond); \
      fprintf (stderr, __VA_ARGS__);                                    \
      fprintf (stderr, "\n");                                           \
    }                                                                   \
  } while (0)

/* A check that must hold for the test to go on. */
#define REQUIRE(cond)                                                   \
  do {                                                                  \
    checks++;                                                           \
    if (!(cond)) {                                                      \
      failures++;                                                       \
      fprintf (stderr, "%s:%d: FAIL (fatal for this test): %s (%m)\n",   \
               __FILE__, __LINE__, #cond);                              \
      return;                                                           \
    }                                                                   \
  } while (0)

#define CHECK_ERR(cond, err, substr)                                    \
  do {                                                                  \
    int _e;                                                             \
    clear_error ();                                                     \
    errno = 0;                                                          \
    bool _c = (cond);                                                   \
    _e = errno;                                                         \
    CHECKF (_c, "expected failure");                                    \
    CHECKF (_e == (err), "errno %d (%s), expected %d (%s)",             \
            _e, strerror (_e), (err), strerror (err));                  \
    CHECKF (strstr (last_error, (substr)) != NULL,                      \
            "message \"%s\" lacks \"%s\"", last_error, (substr));       \
  } while (0)

/* ------------------------------------------------------------------ */
/* Helpers. */

static char tmpdir[] = "/tmp/qed-unit.XXXXXX";
static bool have_qemu_img;

static int
rm_one (const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
  return remove (path);
}

static void
cleanup_tmpdir (void)
{
  nftw (tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static const char *
P (const char *name)
{
  static char bufs[8][4096];
  static int i;
  char *b = bufs[i++ % 8];
  snprintf (b, 4096, "%s/%s", tmpdir, name);
  return b;
}

static uint64_t rng_state;

static uint64_t
rnd (void)
{
  /* splitmix64 */
  uint64_t z = (rng_state += UINT64_C (0x9E3779B97F4A7C15));
  z = (z ^ (z >> 30)) * UINT64_C (0xBF58476D1CE4E5B9);
  z = (z ^ (z >> 27)) * UINT64_C (0x94D049BB133111EB);
  return z ^ (z >> 31);
}

static uint64_t
rnd_below (uint64_t n)
{
  return n ? rnd () % n : 0;
}

static void
rnd_fill (void *buf, size_t len)
{
  unsigned char *p = buf;
  for (size_t i = 0; i < len; ) {
    uint64_t v = rnd ();
    for (int k = 0; k < 8 && i < len; ++k, ++i)
      p[i] = v >> (k * 8);
  }
}

static uint64_t
file_size (const char *path)
{
  struct stat st;
  if (stat (path, &st) == -1)
    return UINT64_MAX;
  return st.st_size;
}

static int
read_at (const char *path, void *buf, size_t len, uint64_t off)
{
  int fd = open (path, O_RDONLY);
  ssize_t r;
  if (fd == -1)
    return -1;
  memset (buf, 0, len);
  r = pread (fd, buf, len, off);
  close (fd);
  return r < 0 ? -1 : 0;
}

static int
write_at (const char *path, const void *buf, size_t len, uint64_t off)
{
  int fd = open (path, O_WRONLY);
  ssize_t r;
  if (fd == -1)
    return -1;
  r = pwrite (fd, buf, len, off);
  close (fd);
  return r == (ssize_t) len ? 0 : -1;
}

static uint64_t
rd64 (const char *path, uint64_t off)
{
  uint64_t v = 0;
  read_at (path, &v, 8, off);
  return le64toh (v);
}

static void
wr64 (const char *path, uint64_t off, uint64_t v)
{
  v = htole64 (v);
  if (write_at (path, &v, 8, off) == -1)
    fprintf (stderr, "write_at %s: %m\n", path);
}

static uint64_t
features_of (const char *path)
{
  return rd64 (path, 16);
}

static bool
need_check_set (const char *path)
{
  return features_of (path) & QED_F_NEED_CHECK;
}

/* Copy a file, keeping it sparse (like cp of an image in use: what is
 * in the page cache, not what is durable). */
static int
copy_file (const char *from, const char *to)
{
  int in = open (from, O_RDONLY), out;
  char buf[65536];
  uint64_t off = 0;
  ssize_t r;
  struct stat st;

  if (in == -1)
    return -1;
  out = open (to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (out == -1) {
    close (in);
    return -1;
  }
  fstat (in, &st);
  while ((r = pread (in, buf, sizeof buf, off)) > 0) {
    bool z = true;
    for (ssize_t i = 0; i < r; ++i)
      if (buf[i]) {
        z = false;
        break;
      }
    if (!z && pwrite (out, buf, r, off) != r)
      break;
    off += r;
  }
  r = ftruncate (out, st.st_size);
  close (in);
  close (out);
  return r;
}

/* qemu-img check; returns its exit status, or -1 if not available. */
static int
qemu_check (const char *path)
{
  char cmd[8192];
  int r;

  if (!have_qemu_img)
    return -1;
  snprintf (cmd, sizeof cmd,
            "qemu-img check -f qed '%s' >'%s.qc' 2>&1", path, path);
  r = system (cmd);
  r = WIFEXITED (r) ? WEXITSTATUS (r) : 128;
  if (r != 0) {
    snprintf (cmd, sizeof cmd, "sed 's/^/    qemu-img: /' '%s.qc' >&2", path);
    if (system (cmd)) { /* ignore */ }
  }
  snprintf (cmd, sizeof cmd, "%s.qc", path);
  unlink (cmd);
  return r;
}

#define CHECK_QEMU(path)                                                \
  do {                                                                  \
    int _q = qemu_check (path);                                         \
    CHECKF (_q == -1 || _q == 0, "qemu-img check %s exited %d", (path), _q); \
  } while (0)

static struct qed_image *
open_rw (const char *path)
{
  struct qed_open_options o = { 0 };
  return qed_open (path, &o);
}

static struct qed_image *
open_ro (const char *path)
{
  struct qed_open_options o = { .readonly = true };
  return qed_open (path, &o);
}

static int
create_img (const char *path, uint64_t size, uint32_t cs, uint32_t ts)
{
  struct qed_create_options o = { .size = size, .cluster_size = cs,
                                  .table_size = ts,
                                  .allow_qemu_incompatible = true };
  return qed_create (path, &o);
}

/* Build an image by hand (any header_size): header, L1 at hs*cs. */
static int
make_image (const char *path, uint32_t cs, uint32_t ts, uint32_t hs,
            uint64_t size)
{
  struct qed_header h = {
    .magic = QED_MAGIC, .cluster_size = cs, .table_size = ts,
    .header_size = hs, .l1_table_offset = (uint64_t) hs * cs,
    .image_size = size,
  };
  unsigned char raw[QED_HEADER_BYTES];
  int fd = open (path, O_WRONLY | O_CREAT | O_EXCL, 0644);
  int r;

  if (fd == -1)
    return -1;
  qed_header_encode (raw, &h);
  r = pwrite (fd, raw, sizeof raw, 0) == sizeof raw &&
    ftruncate (fd, (uint64_t) (hs + ts) * cs) == 0 ? 0 : -1;
  close (fd);
  return r;
}

/* Checks an image with a fresh read-only open: no corruptions, no
 * leaks, NEED_CHECK clear. */
static void
check_clean (const char *path, int line)
{
  struct qed_image *img;
  struct qed_check_result r;

  checks++;
  if (need_check_set (path)) {
    failures++;
    fprintf (stderr, "%s:%d: FAIL: %s: NEED_CHECK is set\n", __FILE__, line,
             path);
  }
  img = open_ro (path);
  checks++;
  if (img == NULL) {
    failures++;
    fprintf (stderr, "%s:%d: FAIL: %s: cannot open: %m\n", __FILE__, line,
             path);
    return;
  }
  checks++;
  if (qed_check (img, false, &r) == -1 || r.corruptions || r.leaks ||
      r.check_errors) {
    failures++;
    fprintf (stderr, "%s:%d: FAIL: %s: check: %" PRIu64 " corruptions, %"
             PRIu64 " leaks, %" PRIu64 " errors\n", __FILE__, line, path,
             r.corruptions, r.leaks, r.check_errors);
  }
  qed_close (img);
}
#define CHECK_CLEAN(path) check_clean ((path), __LINE__)

/* ------------------------------------------------------------------ */
/* A layer beneath: a deterministic pattern, zeros past `end`. */

struct pat_below {
  uint64_t end;
  uint64_t seed;
  uint64_t reads;
};

static unsigned char
pat_byte (const struct pat_below *pb, uint64_t pos)
{
  uint64_t x;
  if (pos >= pb->end)
    return 0;
  x = (pos >> 3) * UINT64_C (0x9E3779B97F4A7C15) + pb->seed;
  x ^= x >> 29;
  x *= UINT64_C (0xBF58476D1CE4E5B9);
  x ^= x >> 32;
  return (x >> ((pos & 7) * 8)) | 1;    /* never zero */
}

static int
pat_read (void *opaque, void *buf, uint64_t count, uint64_t offset)
{
  struct pat_below *pb = opaque;
  unsigned char *p = buf;

  pb->reads++;
  for (uint64_t i = 0; i < count; ++i)
    p[i] = pat_byte (pb, offset + i);
  return 0;
}

static int
pat_prefetch (void *opaque, uint64_t count, uint64_t offset)
{
  return 0;
}

/* ------------------------------------------------------------------ */
/* Header encoding and validation. */

static void
test_header_roundtrip (void)
{
  static const unsigned char expect[16] = {
    'Q', 'E', 'D', 0, 0x00, 0x00, 0x01, 0x00, 4, 0, 0, 0, 1, 0, 0, 0
  };
  struct qed_header h = { .magic = QED_MAGIC, .cluster_size = 65536,
                          .table_size = 4, .header_size = 1 }, h2;
  unsigned char raw[QED_HEADER_BYTES], raw2[QED_HEADER_BYTES];

  qed_header_encode (raw, &h);
  CHECK (memcmp (raw, expect, sizeof expect) == 0);

  for (int i = 0; i < 2000; ++i) {
    rnd_fill (&h, sizeof h);
    rnd_fill (raw, sizeof raw);
    qed_header_encode (raw, &h);
    qed_header_decode (&h2, raw);
    CHECK (memcmp (&h, &h2, sizeof h) == 0);
    rnd_fill (raw, sizeof raw);
    qed_header_decode (&h, raw);
    qed_header_encode (raw2, &h);
    CHECK (memcmp (raw, raw2, sizeof raw) == 0);
  }
  /* Little-endian field placement. */
  memset (&h, 0, sizeof h);
  h.image_size = UINT64_C (0x0102030405060708);
  h.backing_filename_size = 0xa0b0c0d0;
  qed_header_encode (raw, &h);
  CHECK (raw[48] == 0x08 && raw[55] == 0x01);
  CHECK (raw[60] == 0xd0 && raw[63] == 0xa0);
}

static struct qed_header
good_header (void)
{
  return (struct qed_header) {
    .magic = QED_MAGIC, .cluster_size = 65536, .table_size = 4,
    .header_size = 1, .l1_table_offset = 65536,
    .image_size = UINT64_C (1) << 30,
  };
}

#define GOOD_FILE 327680

#define VALIDATE_FAILS(hdr, fsize, err, substr)                         \
  do {                                                                  \
    char _msg[256] = "";                                                \
    struct qed_header _h = (hdr);                                       \
    errno = 0;                                                          \
    int _r = qed_header_validate (&_h, (fsize), _msg, sizeof _msg);     \
    int _e = errno;                                                     \
    CHECKF (_r == -1, "accepted: expected \"%s\"", (substr));           \
    CHECKF (_e == (err), "errno %d, expected %d (%s)", _e, (err), _msg); \
    CHECKF (strstr (_msg, (substr)) != NULL,                            \
            "message \"%s\" lacks \"%s\"", _msg, (substr));             \
  } while (0)

#define VALIDATE_OK(hdr, fsize)                                         \
  do {                                                                  \
    char _msg[256] = "";                                                \
    struct qed_header _h = (hdr);                                       \
    CHECKF (qed_header_validate (&_h, (fsize), _msg, sizeof _msg) == 0, \
            "rejected: %s", _msg);                                      \
  } while (0)

static void
test_header_validate (void)
{
  struct qed_header h;

  VALIDATE_OK (good_header (), GOOD_FILE);
  /* A trailing partial cluster is ignored. */
  VALIDATE_OK (good_header (), GOOD_FILE + 100);

  h = good_header (); h.magic = 0x00444552;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "not a QED image");
  h = good_header (); h.magic = 0;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "not a QED image");

  VALIDATE_FAILS (good_header (), 63, EINVAL, "too short");
  VALIDATE_FAILS (good_header (), 0, EINVAL, "too short");

  h = good_header (); h.features = 0x8;
  VALIDATE_FAILS (h, GOOD_FILE, ENOTSUP, "0x8");
  h = good_header (); h.features = QED_F_NEED_CHECK | 0x100;
  VALIDATE_FAILS (h, GOOD_FILE, ENOTSUP, "0x100");
  h = good_header (); h.features = UINT64_C (1) << 63;
  VALIDATE_FAILS (h, GOOD_FILE, ENOTSUP, "0x8000000000000000");
  /* Unknown compat and autoclear bits are fine. */
  h = good_header (); h.compat_features = ~UINT64_C (0);
  h.autoclear_features = ~UINT64_C (0);
  VALIDATE_OK (h, GOOD_FILE);
  h = good_header (); h.features = QED_F_KNOWN & ~QED_F_BACKING_FILE;
  VALIDATE_OK (h, GOOD_FILE);

  h = good_header (); h.cluster_size = 65536 + 4096;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "cluster_size");
  h = good_header (); h.cluster_size = 2048; h.l1_table_offset = 2048;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "cluster_size");
  h = good_header (); h.cluster_size = 128u << 20;
  VALIDATE_FAILS (h, UINT64_C (1) << 40, EINVAL, "cluster_size");
  h = good_header (); h.cluster_size = 0;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "cluster_size");
  h = good_header (); h.cluster_size = 0x80000000;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "cluster_size");

  h = good_header (); h.table_size = 0;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "table_size");
  h = good_header (); h.table_size = 3;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "table_size");
  h = good_header (); h.table_size = 32;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "table_size");

  h = good_header (); h.header_size = 0;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "header_size 0");
  h = good_header (); h.header_size = 65536; /* 4 GiB of header */
  h.l1_table_offset = UINT64_C (1) << 32;
  VALIDATE_FAILS (h, UINT64_C (1) << 40, EINVAL, "header too large");
  h = good_header (); h.header_size = 0xffffffff;
  VALIDATE_FAILS (h, UINT64_C (1) << 50, EINVAL, "header");

  h = good_header (); h.image_size = 513;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "multiple of 512");
  h = good_header (); h.image_size = (UINT64_C (64) << 40) + 512;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "larger than");
  h = good_header (); h.image_size = UINT64_C (64) << 40;
  VALIDATE_OK (h, GOOD_FILE);
  h = good_header (); h.image_size = UINT64_MAX - 511;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "larger than");
  /* Big geometry: the maximum saturates, the size must fit int64. */
  h = good_header (); h.cluster_size = 64u << 20; h.table_size = 16;
  h.l1_table_offset = 64u << 20; h.image_size = UINT64_MAX - 511;
  VALIDATE_FAILS (h, UINT64_C (17) << 26, EINVAL, "larger than");
  h.image_size = UINT64_C (1) << 62;
  VALIDATE_OK (h, UINT64_C (17) << 26);

  h = good_header (); h.l1_table_offset = 65536 + 512;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "l1_table_offset");
  h = good_header (); h.l1_table_offset = 0;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "l1_table_offset");
  h = good_header (); h.header_size = 2;
  VALIDATE_FAILS (h, GOOD_FILE + 65536, EINVAL, "l1_table_offset");
  h = good_header (); h.l1_table_offset = 10 * 65536;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "l1_table_offset");
  h = good_header (); h.l1_table_offset = 2 * 65536;     /* straddles EOF */
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "l1_table_offset");
  /* ... also when the tail is a partial cluster. */
  VALIDATE_FAILS (h, GOOD_FILE + 65535, EINVAL, "l1_table_offset");
  VALIDATE_OK (h, GOOD_FILE + 65536);
  h = good_header (); h.l1_table_offset = UINT64_MAX - 65535;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "l1_table_offset");
  VALIDATE_FAILS (good_header (), GOOD_FILE - 1, EINVAL, "l1_table_offset");

  h = good_header (); h.features = QED_F_BACKING_FILE;
  h.backing_filename_offset = 65000; h.backing_filename_size = 1000;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "backing file name location");
  h.backing_filename_offset = 0xffffffff; h.backing_filename_size = 4000;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "backing file name location");
  h.backing_filename_offset = 32; h.backing_filename_size = 10;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "backing file name location");
  h.backing_filename_offset = 0; h.backing_filename_size = 64;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "backing file name location");
  h.backing_filename_offset = 64; h.backing_filename_size = 4096;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "too long");
  h.backing_filename_offset = 64; h.backing_filename_size = 0xffffffff;
  VALIDATE_FAILS (h, GOOD_FILE, EINVAL, "too long");
  h.backing_filename_offset = 64; h.backing_filename_size = 4095;
  VALIDATE_OK (h, GOOD_FILE);
  h.backing_filename_offset = 65536 - 10; h.backing_filename_size = 10;
  VALIDATE_OK (h, GOOD_FILE);
  h.backing_filename_size = 0;  /* no name: no backing file */
  VALIDATE_OK (h, GOOD_FILE);
  /* Backing fields are ignored without BACKING_FILE. */
  h = good_header (); h.backing_filename_offset = 3;
  h.backing_filename_size = 0xffffffff;
  VALIDATE_OK (h, GOOD_FILE);

  /* Valid edge cases. */
  h = good_header (); h.cluster_size = 4096; h.table_size = 1;
  h.l1_table_offset = 4096; h.image_size = 1 << 20;
  VALIDATE_OK (h, 8192);
  h = good_header (); h.cluster_size = 64u << 20; h.table_size = 1;
  h.l1_table_offset = 64u << 20;
  VALIDATE_OK (h, UINT64_C (128) << 20);
  h = good_header (); h.image_size = 0;
  VALIDATE_OK (h, GOOD_FILE);
  h = good_header (); h.header_size = 3; h.l1_table_offset = 3 * 65536;
  VALIDATE_OK (h, 7 * 65536);
  h = good_header (); h.l1_table_offset = 9 * 65536;     /* L1 not first */
  VALIDATE_OK (h, 13 * 65536);
}

static void
test_max_size (void)
{
  CHECK (qed_max_image_size (65536, 4) == UINT64_C (64) << 40);
  CHECK (qed_max_image_size (4096, 4) == UINT64_C (16) << 30);
  CHECK (qed_max_image_size (4096, 16) == UINT64_C (256) << 30);
  CHECK (qed_max_image_size (4096, 1) == UINT64_C (1) << 30);
  CHECK (qed_max_image_size (64u << 20, 16) == UINT64_MAX);
  CHECK (qed_max_image_size (4u << 20, 4) == UINT64_MAX);
  CHECK (qed_max_image_size (2u << 20, 8) == UINT64_C (1) << 63);

  CHECK (qed_qemu_can_open (65536, 4));
  CHECK (qed_qemu_can_open (4096, 2));
  CHECK (qed_qemu_can_open (4096, 16));
  CHECK (!qed_qemu_can_open (4096, 1));
  CHECK (!qed_qemu_can_open (65536, 1));
  CHECK (!qed_qemu_can_open (2u << 20, 16));
  CHECK (!qed_qemu_can_open (4u << 20, 4));
  CHECK (!qed_qemu_can_open (8u << 20, 1));
  CHECK (!qed_qemu_can_open (8u << 20, 2));
  CHECK (!qed_qemu_can_open (64u << 20, 16));
  CHECK (qed_qemu_can_open (2u << 20, 8));
  CHECK (qed_qemu_can_open (4u << 20, 2));
  for (uint32_t ts = 2; ts <= 16; ts *= 2)
    CHECK (qed_qemu_can_open (1u << 20, ts));
}

/* ------------------------------------------------------------------ */
/* Create. */

static void
test_create (void)
{
  const char *f = P ("create.qed"), *g = P ("create-b.qed");
  struct qed_create_options o = { .size = UINT64_C (1) << 30 };
  unsigned char raw[QED_HEADER_BYTES], name[16];
  struct qed_header h;
  struct qed_image *img;

  REQUIRE (qed_create (f, &o) == 0);
  CHECK (file_size (f) == 327680);
  read_at (f, raw, sizeof raw, 0);
  qed_header_decode (&h, raw);
  CHECK (h.magic == QED_MAGIC);
  CHECK (h.cluster_size == 65536 && h.table_size == 4);
  CHECK (h.header_size == 1 && h.l1_table_offset == 65536);
  CHECK (h.features == 0 && h.compat_features == 0 &&
         h.autoclear_features == 0);
  CHECK (h.image_size == UINT64_C (1) << 30);
  CHECK (h.backing_filename_offset == 0 && h.backing_filename_size == 0);
  CHECK (memcmp (raw, "QED\0", 4) == 0);
  {
    /* The L1 is written out and zero. */
    unsigned char *l1 = malloc (4 * 65536);
    bool z = true;
    read_at (f, l1, 4 * 65536, 65536);
    for (size_t i = 0; i < 4 * 65536; ++i)
      if (l1[i]) z = false;
    CHECK (z);
    free (l1);
  }
  CHECK_QEMU (f);

  /* Refuses an existing file. */
  CHECK_ERR (qed_create (f, &o) == -1, EEXIST, "cannot create");
  CHECK (file_size (f) == 327680);

  /* Backing name at 64, bits set. */
  o.backing_name = "base.raw";
  o.backing_raw = true;
  o.size = 1000;
  REQUIRE (qed_create (g, &o) == 0);
  read_at (g, raw, sizeof raw, 0);
  qed_header_decode (&h, raw);
  CHECK (h.features == (QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE));
  CHECK (h.backing_filename_offset == 64 && h.backing_filename_size == 8);
  CHECK (h.image_size == 1024);
  read_at (g, name, 9, 64);
  CHECK (memcmp (name, "base.raw", 9) == 0);   /* not NUL-terminated: the
                                                   rest is a hole */
  img = open_ro (g);
  REQUIRE (img != NULL);
  CHECK (strcmp (qed_get_backing_name (img), "base.raw") == 0);
  CHECK (qed_get_backing_raw (img));
  CHECK (qed_get_size (img) == 1024);
  qed_close (img);

  o.backing_raw = false;
  o.backing_name = "x.qed";
  REQUIRE (qed_create (P ("create-c.qed"), &o) == 0);
  CHECK (features_of (P ("create-c.qed")) == QED_F_BACKING_FILE);

  /* Geometries QEMU cannot open are refused unless allowed. */
  o = (struct qed_create_options) { .size = 1 << 20, .cluster_size = 4096,
                                    .table_size = 1 };
  CHECK_ERR (qed_create (P ("c1.qed"), &o) == -1, EINVAL, "table-size 1");
  CHECK (access (P ("c1.qed"), F_OK) == -1);
  o.cluster_size = 4u << 20; o.table_size = 4;
  CHECK_ERR (qed_create (P ("c2.qed"), &o) == -1, EINVAL, "QEMU");
  o.cluster_size = 8u << 20; o.table_size = 0;  /* default 4 */
  CHECK_ERR (qed_create (P ("c3.qed"), &o) == -1, EINVAL, "QEMU");
  o.allow_qemu_incompatible = true;
  o.cluster_size = 4096; o.table_size = 1;
  CHECK (qed_create (P ("c4.qed"), &o) == 0);
  CHECK (file_size (P ("c4.qed")) == 8192);
  o.allow_qemu_incompatible = false;
  o.cluster_size = 4u << 20; o.table_size = 2;
  CHECK (qed_create (P ("c5.qed"), &o) == 0);
  CHECK_QEMU (P ("c5.qed"));

  /* Bad parameters. */
  o = (struct qed_create_options) { .size = 1 << 20, .cluster_size = 5000 };
  CHECK_ERR (qed_create (P ("c6.qed"), &o) == -1, EINVAL, "cluster-size");
  o = (struct qed_create_options) { .size = 1 << 20, .table_size = 3 };
  CHECK_ERR (qed_create (P ("c7.qed"), &o) == -1, EINVAL, "table-size");
  o = (struct qed_create_options) { .size = (UINT64_C (16) << 30) + 512,
                                    .cluster_size = 4096, .table_size = 4 };
  CHECK_ERR (qed_create (P ("c8.qed"), &o) == -1, EINVAL, "maximum");
  o.size = UINT64_C (16) << 30;
  CHECK (qed_create (P ("c9.qed"), &o) == 0);
  o = (struct qed_create_options) { .size = UINT64_MAX };
  CHECK_ERR (qed_create (P ("c10.qed"), &o) == -1, EINVAL, "too large");
  {
    char longname[5000];
    memset (longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    o = (struct qed_create_options) { .size = 1 << 20,
                                      .backing_name = longname };
    CHECK_ERR (qed_create (P ("c11.qed"), &o) == -1, ENAMETOOLONG, "too long");
    longname[4095] = 0;
    o.cluster_size = 4096;
    CHECK_ERR (qed_create (P ("c12.qed"), &o) == -1, ENAMETOOLONG, "too long");
    longname[4096 - 64] = 0;
    CHECK (qed_create (P ("c13.qed"), &o) == 0);
    img = open_ro (P ("c13.qed"));
    CHECK (img && strlen (qed_get_backing_name (img)) == 4096 - 64);
    qed_close (img);
  }
  /* Size 0 works and rounds up. */
  o = (struct qed_create_options) { .size = 0 };
  REQUIRE (qed_create (P ("c14.qed"), &o) == 0);
  img = open_rw (P ("c14.qed"));
  REQUIRE (img != NULL);
  CHECK (qed_get_size (img) == 0);
  CHECK (qed_close (img) == 0);
  CHECK_QEMU (P ("c14.qed"));
}

/* Opening: special header fields. */
static void
test_open_fields (void)
{
  const char *f = P ("fields.qed");
  struct qed_image *img;
  char buf[4096];

  REQUIRE (create_img (f, 1 << 20, 0, 0) == 0);
  wr64 (f, 24, 0x10);           /* unknown compat bit */
  wr64 (f, 32, 0x5);            /* unknown autoclear bits */
  img = open_ro (f);
  REQUIRE (img != NULL);
  qed_close (img);
  CHECK (rd64 (f, 32) == 0x5);  /* read-only: left alone */
  img = open_rw (f);
  REQUIRE (img != NULL);
  CHECK (rd64 (f, 32) == 0);    /* writable: cleared at open */
  memset (buf, 0x55, sizeof buf);
  CHECK (qed_write (img, NULL, buf, sizeof buf, 0, 0) == 0);
  CHECK (qed_close (img) == 0);
  CHECK (rd64 (f, 24) == 0x10); /* compat preserved */
  CHECK (features_of (f) == 0);

  /* Read-only images refuse writes. */
  img = open_ro (f);
  REQUIRE (img != NULL);
  CHECK (qed_is_readonly (img));
  errno = 0;
  CHECK (qed_write (img, NULL, buf, 1, 0, 0) == -1 && errno == EROFS);
  errno = 0;
  CHECK (qed_zero (img, NULL, 1, 0, 0) == -1 && errno == EROFS);
  errno = 0;
  CHECK (qed_trim (img, NULL, 1, 0, 0) == -1 && errno == EROFS);
  CHECK (qed_flush (img) == 0);
  CHECK (qed_close (img) == 0);

  /* Trailing garbage after the last whole cluster is cut before it
   * can show through in a new cluster. */
  {
    char junk[100];
    uint64_t sz = file_size (f);
    memset (junk, 0xee, sizeof junk);
    REQUIRE (write_at (f, junk, sizeof junk, sz) == 0);
    img = open_rw (f);
    REQUIRE (img != NULL);
    CHECK (qed_write (img, NULL, "x", 1, 65536 * 3, 0) == 0);
    memset (buf, 1, sizeof buf);
    CHECK (qed_read (img, NULL, buf, 200, 65536 * 3) == 0);
    CHECK (buf[0] == 'x');
    {
      bool z = true;
      for (int i = 1; i < 200; ++i)
        if (buf[i]) z = false;
      CHECK (z);
    }
    CHECK (qed_close (img) == 0);
    CHECK (file_size (f) % 65536 == 0);
    CHECK_CLEAN (f);
    CHECK_QEMU (f);
  }

  /* Not a regular file, missing file. */
  CHECK_ERR (open_ro ("/dev/null") == NULL, EINVAL, "not a regular file");
  CHECK_ERR (open_ro (P ("missing.qed")) == NULL, ENOENT, "missing.qed");
  /* A NUL inside the backing name. */
  {
    struct qed_create_options o = { .size = 1 << 20, .backing_name = "ab" };
    REQUIRE (qed_create (P ("nul.qed"), &o) == 0);
    REQUIRE (write_at (P ("nul.qed"), "a\0b", 3, 64) == 0);
    wr64 (P ("nul.qed"), 56, (UINT64_C (3) << 32) | 64);
    CHECK_ERR (open_ro (P ("nul.qed")) == NULL, EINVAL, "NUL");
  }
}

/* ------------------------------------------------------------------ */
/* The random model test. */

struct window {
  uint64_t start, len;
  unsigned char *model;
};

struct model {
  const char *path;
  uint32_t cs, ts;
  uint64_t size;
  uint64_t l2_cache;
  bool use_below;
  struct pat_below pb;
  struct qed_below below;
  struct window win[4];
  int nwin;
  struct qed_image *img;
  /* Points near which requests cluster: L2 table boundaries, the
   * image end, the end of the layer beneath. */
  uint64_t special[16];
  int nspecial;
};

static const struct qed_below *
below_of (struct model *m)
{
  return m->use_below ? &m->below : NULL;
}

static void
model_open (struct model *m)
{
  struct qed_open_options o = { .l2_cache_bytes = m->l2_cache };
  m->img = qed_open (m->path, &o);
}

/* Verify the whole model against the image. */
static void
model_verify (struct model *m, int line)
{
  unsigned char *buf = malloc (1 << 20);

  for (int w = 0; w < m->nwin; ++w) {
    struct window *win = &m->win[w];
    for (uint64_t off = 0; off < win->len; off += 1 << 20) {
      uint64_t n = win->len - off < (1 << 20) ? win->len - off : (1 << 20);
      checks++;
      if (qed_read (m->img, below_of (m), buf, n, win->start + off) == -1) {
        failures++;
        fprintf (stderr, "%s:%d: FAIL: read at %" PRIu64 ": %m\n",
                 __FILE__, line, win->start + off);
        continue;
      }
      if (memcmp (buf, win->model + off, n) != 0) {
        uint64_t i = 0;
        while (buf[i] == win->model[off + i])
          i++;
        failures++;
        fprintf (stderr, "%s:%d: FAIL: %s: data differs at %" PRIu64
                 " (got 0x%02x, expected 0x%02x)\n", __FILE__, line,
                 m->path, win->start + off + i, buf[i], win->model[off + i]);
      }
    }
  }
  free (buf);
}

/* Check qed_map against the model: types and file data. */
static void
model_check_map (struct model *m, int line)
{
  int fd = open (m->path, O_RDONLY);
  unsigned char *buf = malloc (1 << 20);

  for (int w = 0; w < m->nwin; ++w) {
    struct window *win = &m->win[w];
    uint64_t off = win->start, end = win->start + win->len;
    while (off < end) {
      struct qed_map mp;
      uint64_t n;
      bool ok = true;
      checks++;
      if (qed_map (m->img, off, end - off, &mp) == -1 || mp.length == 0 ||
          mp.length > end - off) {
        failures++;
        fprintf (stderr, "%s:%d: FAIL: qed_map at %" PRIu64 "\n", __FILE__,
                 line, off);
        break;
      }
      n = mp.length < (1 << 20) ? mp.length : (1 << 20);
      if (mp.type == QED_MAP_DATA) {
        if (pread (fd, buf, n, mp.file_offset) != (ssize_t) n)
          memset (buf, 0, n);
        ok = memcmp (buf, win->model + (off - win->start), n) == 0;
      }
      else {
        for (uint64_t i = 0; i < n && ok; ++i) {
          unsigned char expect = mp.type == QED_MAP_UNALLOCATED &&
            m->use_below ? pat_byte (&m->pb, off + i) : 0;
          ok = win->model[off - win->start + i] == expect;
        }
      }
      if (!ok) {
        failures++;
        fprintf (stderr, "%s:%d: FAIL: map type %d at %" PRIu64
                 " (length %" PRIu64 ") does not match the data\n",
                 __FILE__, line, mp.type, off, mp.length);
      }
      off += mp.length;
    }
  }
  free (buf);
  close (fd);
}

/* Pick a request [off, off+len) inside one window. */
static void
pick_range (struct model *m, uint64_t maxlen, int *wp, uint64_t *offp,
            uint64_t *lenp)
{
  int w = rnd_below (m->nwin);
  struct window *win = &m->win[w];
  uint64_t off, len;

  switch (rnd_below (4)) {
  case 0: {                     /* near a special point */
    uint64_t s = m->special[rnd_below (m->nspecial)];
    uint64_t d = rnd_below (3 * m->cs);
    off = rnd_below (2) ? s + d : (s > d ? s - d : 0);
    break;
  }
  case 1:                       /* cluster aligned */
    off = win->start + rnd_below (win->len) / m->cs * m->cs;
    break;
  default:
    off = win->start + rnd_below (win->len);
  }
  if (off < win->start || off >= win->start + win->len)
    off = win->start + rnd_below (win->len);
  switch (rnd_below (4)) {
  case 0: len = 1 + rnd_below (512); break;
  case 1: len = m->cs * (1 + rnd_below (3)); break;
  case 2: len = 1 + rnd_below (4 * m->cs); break;
  default: len = 1 + rnd_below (maxlen);
  }
  if (len > maxlen)
    len = maxlen;
  if (len > win->start + win->len - off)
    len = win->start + win->len - off;
  *wp = w;
  *offp = off;
  *lenp = len;
}

/* After an operation whose result per byte may be old data or zeros
 * (trim, a failed fast zero), read back and accept either. */
static void
model_readback_old_or_zero (struct model *m, struct window *win,
                            uint64_t off, uint64_t len, int line)
{
  unsigned char *buf = malloc (len);
  bool ok = true;

  checks++;
  if (qed_read (m->img, below_of (m), buf, len, off) == -1) {
    failures++;
    fprintf (stderr, "%s:%d: FAIL: read back: %m\n", __FILE__, line);
    free (buf);
    return;
  }
  for (uint64_t i = 0; i < len; ++i) {
    unsigned char *mp = &win->model[off - win->start + i];
    if (buf[i] != *mp && buf[i] != 0) {
      if (ok)
        fprintf (stderr, "%s:%d: FAIL: after trim at %" PRIu64
                 ": byte %" PRIu64 " is 0x%02x, expected 0x%02x or 0\n",
                 __FILE__, line, off, off + i, buf[i], *mp);
      ok = false;
    }
    *mp = buf[i];
  }
  if (!ok)
    failures++;
  free (buf);
}

static void
model_run (const char *name, uint32_t cs, uint32_t ts, uint64_t size,
           bool use_below, uint64_t below_end, uint64_t l2_cache, int nops)
{
  struct model m = { .path = P (name), .cs = cs, .ts = ts, .size = size,
                     .l2_cache = l2_cache, .use_below = use_below };
  uint64_t table_cover = (uint64_t) ts * cs / 8 * cs;
  uint64_t maxlen = 1 << 20;
  unsigned long fail0 = failures;
  unsigned char *buf;
  int reopen_every = nops / 4 + 1;
  unsigned long counts[8] = { 0 };

  fprintf (stderr, "model %s: cs=%" PRIu32 " ts=%" PRIu32 " size=%" PRIu64
           " below=%s cache=%" PRIu64 "\n", name, cs, ts, size,
           use_below ? "yes" : "no", l2_cache);
  m.pb = (struct pat_below) { .end = below_end, .seed = rnd () };
  m.below = (struct qed_below) { pat_read, pat_prefetch, &m.pb };

  /* Windows: the whole image if small, else three 1M windows at the
   * start, around the first L2 boundary and at the end. */
  if (size <= (16 << 20)) {
    m.win[0] = (struct window) { 0, size };
    m.nwin = 1;
  }
  else {
    m.win[0] = (struct window) { 0, 1 << 20 };
    m.win[1] = (struct window) { table_cover - (512 << 10), 1 << 20 };
    m.win[2] = (struct window) { size - (1 << 20), 1 << 20 };
    m.nwin = 3;
  }
  for (int w = 0; w < m.nwin; ++w) {
    m.win[w].model = malloc (m.win[w].len);
    for (uint64_t i = 0; i < m.win[w].len; ++i)
      m.win[w].model[i] = use_below ? pat_byte (&m.pb, m.win[w].start + i) : 0;
  }
  for (uint64_t s = table_cover; s < size && m.nspecial < 12; s += table_cover)
    m.special[m.nspecial++] = s;
  m.special[m.nspecial++] = size;
  m.special[m.nspecial++] = below_end;
  m.special[m.nspecial++] = 0;

  REQUIRE (create_img (m.path, size, cs, ts) == 0);
  model_open (&m);
  REQUIRE (m.img != NULL);
  buf = malloc (maxlen);

  for (int op = 0; op < nops; ++op) {
    int w, kind = rnd_below (100);
    uint64_t off, len;
    struct window *win;
    unsigned char *mp;

    pick_range (&m, maxlen, &w, &off, &len);
    win = &m.win[w];
    mp = win->model + (off - win->start);

    if (kind < 35) {            /* write */
      unsigned flags = rnd_below (3) == 0 ? QED_WRITE_DETECT_ZERO : 0;
      if (rnd_below (8) == 0)
        flags |= QED_WRITE_FUA;
      switch (rnd_below (4)) {
      case 0:
        memset (buf, 0, len);
        break;
      case 1:                   /* zero clusters inside data */
        rnd_fill (buf, len);
        for (uint64_t z = rnd_below (len); z < len; z += 1 + rnd_below (3 * cs)) {
          uint64_t zl = rnd_below (2 * cs);
          memset (buf + z, 0, zl < len - z ? zl : len - z);
        }
        break;
      default:
        rnd_fill (buf, len);
      }
      checks++;
      if (qed_write (m.img, below_of (&m), buf, len, off, flags) == -1) {
        failures++;
        fprintf (stderr, "%s:%d: FAIL: write %" PRIu64 "@%" PRIu64 ": %m\n",
                 __FILE__, __LINE__, len, off);
      }
      else
        memcpy (mp, buf, len);
      counts[0]++;
    }
    else if (kind < 50) {       /* zero */
      unsigned flags = rnd_below (2) ? QED_ZERO_MAY_UNMAP : 0;
      int r;
      if (rnd_below (6) == 0)
        flags |= QED_ZERO_FAST;
      if (rnd_below (8) == 0)
        flags |= QED_WRITE_FUA;
      r = qed_zero (m.img, below_of (&m), len, off, flags);
      if (r == 0)
        memset (mp, 0, len);
      else if (errno == ENOTSUP && (flags & QED_ZERO_FAST))
        model_readback_old_or_zero (&m, win, off, len, __LINE__);
      else {
        checks++;
        failures++;
        fprintf (stderr, "%s:%d: FAIL: zero %" PRIu64 "@%" PRIu64 ": %m\n",
                 __FILE__, __LINE__, len, off);
      }
      counts[1]++;
    }
    else if (kind < 60) {       /* trim */
      checks++;
      if (qed_trim (m.img, below_of (&m), len, off, 0) == -1) {
        failures++;
        fprintf (stderr, "%s:%d: FAIL: trim: %m\n", __FILE__, __LINE__);
      }
      else
        model_readback_old_or_zero (&m, win, off, len, __LINE__);
      counts[2]++;
    }
    else if (kind < 64) {       /* flush */
      CHECK (qed_flush (m.img) == 0);
      counts[3]++;
    }
    else if (kind < 67) {       /* idle: may clear NEED_CHECK */
      struct qed_stats st;
      CHECK (qed_idle (m.img) == 0);
      /* Idle clears NEED_CHECK unless freed clusters await compaction. */
      qed_get_stats (m.img, &st);
      CHECK (st.free_clusters > 0 || !need_check_set (m.path));
      counts[4]++;
    }
    else if (kind < 70) {
      CHECK (qed_prefetch (m.img, below_of (&m), len, off) == 0);
    }
    else {                      /* read */
      checks++;
      if (qed_read (m.img, below_of (&m), buf, len, off) == -1) {
        failures++;
        fprintf (stderr, "%s:%d: FAIL: read: %m\n", __FILE__, __LINE__);
      }
      else if (memcmp (buf, mp, len) != 0) {
        uint64_t i = 0;
        while (buf[i] == mp[i])
          i++;
        failures++;
        fprintf (stderr, "%s:%d: FAIL: %s op %d: read %" PRIu64 "@%" PRIu64
                 " differs at %" PRIu64 "\n", __FILE__, __LINE__, name, op,
                 len, off, off + i);
      }
      counts[5]++;
    }

    if (failures - fail0 > 10) {
      fprintf (stderr, "model %s: too many failures, stopping\n", name);
      break;
    }
    if ((op + 1) % reopen_every == 0) {
      model_check_map (&m, __LINE__);
      CHECK (qed_close (m.img) == 0);
      CHECK (!need_check_set (m.path));
      CHECK_CLEAN (m.path);
      model_open (&m);
      REQUIRE (m.img != NULL);
      model_verify (&m, __LINE__);
      counts[6]++;
    }
  }
  model_verify (&m, __LINE__);
  model_check_map (&m, __LINE__);
  CHECK (qed_close (m.img) == 0);
  CHECK (!need_check_set (m.path));
  CHECK_CLEAN (m.path);
  if (qed_qemu_can_open (cs, ts))
    CHECK_QEMU (m.path);
  fprintf (stderr, "model %s: %lu writes, %lu zeros, %lu trims, %lu flushes,"
           " %lu idles, %lu reads, %lu reopens, file %" PRIu64 " bytes%s\n",
           name, counts[0], counts[1], counts[2], counts[3], counts[4],
           counts[5], counts[6], file_size (m.path),
           failures == fail0 ? "" : " (FAILED)");
  free (buf);
  for (int w = 0; w < m.nwin; ++w)
    free (m.win[w].model);
}

static void
test_model (void)
{
  const char *e = getenv ("QED_TEST_OPS");
  int n = e ? atoi (e) : 400;
  uint64_t M = 1 << 20;

  model_run ("m-4k1.qed", 4096, 1, 6 * M + 1536, false, 0, 65536, n);
  model_run ("m-4k1-b.qed", 4096, 1, 6 * M + 1536, true, 5 * M + 777,
             65536, n);
  model_run ("m-4k2.qed", 4096, 2, 9 * M + 1024, false, 0, 0, n);
  model_run ("m-4k2-b.qed", 4096, 2, 9 * M + 1024, true, 4 * M + 4097, 0, n);
  model_run ("m-64k4.qed", 65536, 4, (UINT64_C (4) << 30) + 65536 + 512,
             false, 0, 0, n);
  model_run ("m-64k4-b.qed", 65536, 4, (UINT64_C (4) << 30) + 65536 + 512,
             true, (UINT64_C (2) << 30) + 100000, 0, n);
  /* The last guest cluster is partial; below ends inside it. */
  model_run ("m-64k2-b.qed", 65536, 2, 3 * M + 512, true, 3 * M + 100, 0, n);
}

/* ------------------------------------------------------------------ */
/* qed_map. */

static void
test_map (void)
{
  const char *f = P ("map.qed");
  const uint32_t cs = 4096;
  struct qed_image *img;
  struct qed_map mp;
  struct pat_below pb = { .end = 1 << 30, .seed = 7 };
  struct qed_below below = { pat_read, NULL, &pb };
  char *buf = malloc (8 * cs);
  uint64_t size = 64 << 20;

  REQUIRE (create_img (f, size, cs, 2) == 0);
  img = open_rw (f);
  REQUIRE (img != NULL);

  /* Empty image: one unallocated run over absent tables. */
  REQUIRE (qed_map (img, 0, size, &mp) == 0);
  CHECK (mp.type == QED_MAP_UNALLOCATED && mp.length == size);
  REQUIRE (qed_map (img, 12345, 100, &mp) == 0);
  CHECK (mp.type == QED_MAP_UNALLOCATED && mp.length == 100);

  /* Clusters 0-2 data (one write: contiguous), 3-4 unallocated,
   * 5 zero, 6.. unallocated. */
  memset (buf, 0xab, 3 * cs);
  CHECK (qed_write (img, &below, buf, 3 * cs, 0, 0) == 0);
  CHECK (qed_zero (img, &below, cs, 5 * cs, 0) == 0);
  REQUIRE (qed_map (img, 0, size, &mp) == 0);
  CHECK (mp.type == QED_MAP_DATA && mp.length == 3 * cs);
  CHECK (mp.file_offset % cs == 0 && mp.file_offset >= 3 * cs);
  {
    uint64_t fo = mp.file_offset;
    REQUIRE (qed_map (img, 100, size - 100, &mp) == 0);
    CHECK (mp.type == QED_MAP_DATA && mp.length == 3 * cs - 100 &&
           mp.file_offset == fo + 100);
    REQUIRE (qed_map (img, cs, cs, &mp) == 0);
    CHECK (mp.type == QED_MAP_DATA && mp.length == cs &&
           mp.file_offset == fo + cs);
  }
  REQUIRE (qed_map (img, 3 * cs, size - 3 * cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_UNALLOCATED && mp.length == 2 * cs);
  REQUIRE (qed_map (img, 5 * cs, size - 5 * cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_ZERO && mp.length == cs);
  REQUIRE (qed_map (img, 6 * cs, size - 6 * cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_UNALLOCATED && mp.length == size - 6 * cs);
  /* Zero without a layer beneath leaves unallocated clusters alone. */
  CHECK (qed_zero (img, NULL, cs, 7 * cs, 0) == 0);
  REQUIRE (qed_map (img, 7 * cs, cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_UNALLOCATED);
  /* Separate writes: not contiguous in the file. */
  CHECK (qed_write (img, &below, buf, 10, 20 * cs, 0) == 0);
  CHECK (qed_write (img, &below, buf, 10, 21 * cs, 0) == 0);
  REQUIRE (qed_map (img, 20 * cs, 2 * cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_DATA);
  /* A partial write into an unallocated cluster copied from below. */
  REQUIRE (qed_read (img, NULL, buf, cs, 20 * cs) == 0);
  CHECK ((unsigned char) buf[10] == pat_byte (&pb, 20 * cs + 10));
  CHECK ((unsigned char) buf[cs - 1] == pat_byte (&pb, 21 * cs - 1));
  /* Zero cluster then partial write: the rest stays zero (QEMU bug 1). */
  CHECK (qed_write (img, &below, "y", 1, 5 * cs + 7, 0) == 0);
  REQUIRE (qed_read (img, &below, buf, cs, 5 * cs) == 0);
  CHECK (buf[7] == 'y' && buf[0] == 0 && buf[cs - 1] == 0);
  REQUIRE (qed_map (img, 5 * cs, cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_DATA);

  /* Runs end at the last guest cluster; the map crosses L2 tables:
   * 4K/2 covers 4M per table. */
  memset (buf, 0xcd, 2 * cs);
  CHECK (qed_write (img, &below, buf, 2 * cs, (4 << 20) - cs, 0) == 0);
  REQUIRE (qed_map (img, (4 << 20) - cs, 2 * cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_DATA && mp.length == 2 * cs);
  CHECK (qed_zero (img, &below, 3 * cs, (8 << 20) - cs, 0) == 0);
  REQUIRE (qed_map (img, (8 << 20) - cs, size - (8 << 20) + cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_ZERO && mp.length == 3 * cs);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);
  free (buf);
}

/* ------------------------------------------------------------------ */
/* L2 cache: a tiny cache over many tables. */

static void
test_l2_cache (void)
{
  const char *f = P ("cache.qed");
  const uint32_t cs = 4096;
  const uint64_t cover = 512 * 4096;   /* 4K/1: 2M per L2 table */
  const int ntables = 100;
  struct qed_open_options o = { .l2_cache_bytes = 65536 };
  struct qed_image *img;
  struct qed_stats st;
  uint64_t v;

  REQUIRE (create_img (f, ntables * cover, cs, 1) == 0);
  img = qed_open (f, &o);
  REQUIRE (img != NULL);
  qed_get_stats (img, &st);
  CHECK (st.l2_cache_max_pages == 16);
  /* Dirty pages cannot be evicted: they are written back when they
   * fill half the cache, so the cache stays bounded. */
  for (int t = 0; t < ntables; ++t) {
    v = t * 1000 + 1;
    CHECK (qed_write (img, NULL, &v, 8, t * cover + (t % 512) * cs, 0) == 0);
  }
  qed_get_stats (img, &st);
  CHECKF (st.l2_cache_pages <= st.l2_cache_max_pages, "%" PRIu64 " pages",
          st.l2_cache_pages);
  CHECK (qed_flush (img) == 0);
  for (int round = 0; round < 3; ++round) {
    for (int t = 0; t < ntables; ++t) {
      v = 0;
      CHECK (qed_read (img, NULL, &v, 8, t * cover + (t % 512) * cs) == 0);
      CHECKF (v == (uint64_t) t * 1000 + 1, "table %d: %" PRIu64, t, v);
    }
    qed_get_stats (img, &st);
    CHECKF (st.l2_cache_pages <= st.l2_cache_max_pages,
            "%" PRIu64 " pages", st.l2_cache_pages);
  }
  CHECK (st.l2_cache_misses >= 3 * ntables);
  /* Rewrites in place and new clusters in tables that were evicted. */
  for (int t = ntables - 1; t >= 0; --t) {
    v = t * 1000 + 2;
    CHECK (qed_write (img, NULL, &v, 8, t * cover + (t % 512) * cs, 0) == 0);
    CHECK (qed_write (img, NULL, &v, 8, t * cover + 511 * cs, 0) == 0);
    if (t % 10 == 0)
      CHECK (qed_flush (img) == 0);
  }
  /* Hits: the same page again and again. */
  for (int i = 0; i < 100; ++i)
    CHECK (qed_read (img, NULL, &v, 8, 0) == 0);
  qed_get_stats (img, &st);
  CHECK (st.l2_cache_hits >= 100);
  CHECK (qed_close (img) == 0);
  img = qed_open (f, &o);
  REQUIRE (img != NULL);
  for (int t = 0; t < ntables; ++t) {
    CHECK (qed_read (img, NULL, &v, 8, t * cover + (t % 512) * cs) == 0);
    CHECK (v == (uint64_t) t * 1000 + 2);
    CHECK (qed_read (img, NULL, &v, 8, t * cover + 511 * cs) == 0);
    CHECK (v == (uint64_t) t * 1000 + 2);
  }
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);

  /* 64K/4 tables span 64 cache pages each. */
  f = P ("cache2.qed");
  REQUIRE (create_img (f, UINT64_C (16) << 30, 65536, 4) == 0);
  img = qed_open (f, &o);
  REQUIRE (img != NULL);
  for (uint64_t off = 0; off < (UINT64_C (16) << 30); off += 97 << 20) {
    v = off;
    CHECK (qed_write (img, NULL, &v, 8, off, 0) == 0);
  }
  CHECK (qed_flush (img) == 0);
  for (uint64_t off = 0; off < (UINT64_C (16) << 30); off += 97 << 20) {
    v = 1;
    CHECK (qed_read (img, NULL, &v, 8, off) == 0);
    CHECK (v == off);
  }
  qed_get_stats (img, &st);
  CHECK (st.l2_cache_pages <= st.l2_cache_max_pages);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);
}

/* ------------------------------------------------------------------ */
/* Copy-on-read fills. */

static void
test_fill (void)
{
  const char *f = P ("fill.qed");
  const uint32_t cs = 65536;
  const uint64_t size = 10 * 65536 + 1024;     /* last cluster partial */
  struct pat_below pb = { .end = size, .seed = 99 };
  struct qed_below below = { pat_read, NULL, &pb };
  struct qed_image *img;
  struct qed_map mp;
  unsigned char *buf = malloc (11 * cs), *rb = malloc (11 * cs);

  REQUIRE (create_img (f, size, cs, 4) == 0);
  img = open_rw (f);
  REQUIRE (img != NULL);

  /* Cluster 1 written by the guest, cluster 2 zeroed: a fill of 0-4
   * must leave both alone.  Cluster 3 is all zeros beneath. */
  memset (buf, 'A', 100);
  CHECK (qed_write (img, &below, buf, 100, cs + 5, 0) == 0);
  CHECK (qed_zero (img, &below, cs, 2 * cs, 0) == 0);
  pat_read (&pb, buf, 5 * cs, 0);
  memset (buf + 3 * cs, 0, cs);
  CHECK (qed_fill (img, buf, 5 * cs, 0, true, false) == 0);
  REQUIRE (qed_map (img, 0, cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_DATA);
  REQUIRE (qed_map (img, 2 * cs, cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_ZERO);
  REQUIRE (qed_map (img, 3 * cs, cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_ZERO);          /* detect_zero */
  REQUIRE (qed_map (img, 4 * cs, cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_DATA);
  /* Read with nothing beneath: the fill made it self-contained. */
  REQUIRE (qed_read (img, NULL, rb, 5 * cs, 0) == 0);
  CHECK (memcmp (rb, buf, cs) == 0);
  CHECK (memcmp (rb + cs + 5, "AAAA", 4) == 0);
  CHECK (rb[cs] == pat_byte (&pb, cs));     /* COW of the write */
  CHECK (rb[2 * cs] == 0 && rb[3 * cs + 77] == 0);
  CHECK (memcmp (rb + 4 * cs, buf + 4 * cs, cs) == 0);

  /* Without detect_zero a zero buffer is stored as data. */
  memset (buf, 0, cs);
  CHECK (qed_fill (img, buf, cs, 5 * cs, false, false) == 0);
  REQUIRE (qed_map (img, 5 * cs, cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_DATA);
  /* known_zero: no buffer needed. */
  CHECK (qed_fill (img, NULL, 2 * cs, 6 * cs, false, true) == 0);
  REQUIRE (qed_map (img, 6 * cs, 2 * cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_ZERO && mp.length == 2 * cs);
  /* Ending at the image size (partial last cluster). */
  pat_read (&pb, buf, 2 * cs + 1024, 8 * cs);
  CHECK (qed_fill (img, buf, 2 * cs + 1024, 8 * cs, true, false) == 0);
  REQUIRE (qed_map (img, 8 * cs, 2 * cs + 1024, &mp) == 0);
  CHECK (mp.type == QED_MAP_DATA && mp.length == 2 * cs + 1024);
  REQUIRE (qed_read (img, NULL, rb, 2 * cs + 1024, 8 * cs) == 0);
  CHECK (memcmp (rb, buf, 2 * cs + 1024) == 0);
  /* A second fill over allocated clusters changes nothing. */
  memset (buf, 'Z', 11 * cs);
  CHECK (qed_fill (img, buf, size, 0, false, false) == 0);
  REQUIRE (qed_read (img, NULL, rb, cs, 0) == 0);
  CHECK (rb[0] == pat_byte (&pb, 0));
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* Read-only: a no-op. */
  img = open_ro (f);
  REQUIRE (img != NULL);
  CHECK (qed_fill (img, buf, cs, 0, false, false) == 0);
  qed_close (img);
  free (buf);
  free (rb);
}

/* ------------------------------------------------------------------ */
/* Freed clusters: reuse and compaction. */

static void
test_punch_reuse (void)
{
  const char *f = P ("punch.qed");
  const uint32_t cs = 65536;
  struct qed_image *img;
  struct qed_stats st, st2;
  unsigned char *buf = malloc (cs);
  uint64_t fs_before;

  REQUIRE (create_img (f, 64 << 20, cs, 4) == 0);
  img = open_rw (f);
  REQUIRE (img != NULL);
  for (int i = 0; i < 10; ++i) {
    memset (buf, 'a' + i, cs);
    CHECK (qed_write (img, NULL, buf, cs, (uint64_t) i * cs, 0) == 0);
  }
  CHECK (qed_flush (img) == 0);
  qed_get_stats (img, &st);
  /* Free clusters 2-5 (MAY_UNMAP), make it durable. */
  CHECK (qed_zero (img, NULL, 4 * cs, 2 * cs, QED_ZERO_MAY_UNMAP) == 0);
  qed_get_stats (img, &st2);
  CHECK (st2.free_clusters == 4);
  CHECK (qed_flush (img) == 0);
  /* Reuse: single-cluster allocations come from the free list. */
  for (int i = 0; i < 4; ++i) {
    memset (buf, 'A' + i, cs);
    CHECK (qed_write (img, NULL, buf, cs, (uint64_t) (100 + i) * cs, 0) == 0);
  }
  qed_get_stats (img, &st2);
  CHECK (st2.file_end == st.file_end);
  CHECK (st2.free_clusters == 0);
  for (int i = 0; i < 10; ++i) {
    CHECK (qed_read (img, NULL, buf, cs, (uint64_t) i * cs) == 0);
    CHECK (buf[0] == (i >= 2 && i <= 5 ? 0 : 'a' + i) && buf[cs - 1] == buf[0]);
  }
  for (int i = 0; i < 4; ++i) {
    CHECK (qed_read (img, NULL, buf, cs, (uint64_t) (100 + i) * cs) == 0);
    CHECK (buf[0] == 'A' + i && buf[cs - 1] == 'A' + i);
  }
  /* A partial write into a reused cluster: the rest reads zeros. */
  CHECK (qed_trim (img, NULL, cs, 100 * cs, 0) == 0);
  CHECK (qed_flush (img) == 0);
  CHECK (qed_write (img, NULL, "q", 1, 200 * cs + 10, 0) == 0);
  CHECK (qed_read (img, NULL, buf, cs, 200 * cs) == 0);
  CHECK (buf[10] == 'q' && buf[0] == 0 && buf[cs - 1] == 0);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* Trim without reuse, then close: compaction gives the space back. */
  img = open_rw (f);
  REQUIRE (img != NULL);
  fs_before = file_size (f);
  CHECK (qed_trim (img, NULL, 6 * cs, 0, 0) == 0);
  CHECK (qed_close (img) == 0);
  /* Guest 2-5's clusters were reused by 101-103 and 200: two holes. */
  CHECKF (file_size (f) == fs_before - 2 * cs, "%" PRIu64 " -> %" PRIu64,
          fs_before, file_size (f));
  CHECK_CLEAN (f);
  CHECK_QEMU (f);
  img = open_ro (f);
  REQUIRE (img != NULL);
  for (int i = 0; i < 10; ++i) {
    CHECK (qed_read (img, NULL, buf, cs, (uint64_t) i * cs) == 0);
    CHECK (buf[0] == (i < 6 ? 0 : 'a' + i));
  }
  for (int i = 1; i < 4; ++i) {
    CHECK (qed_read (img, NULL, buf, cs, (uint64_t) (100 + i) * cs) == 0);
    CHECK (buf[0] == 'A' + i && buf[cs - 1] == 'A' + i);
  }
  CHECK (qed_read (img, NULL, buf, cs, 200 * cs) == 0);
  CHECK (buf[10] == 'q');
  qed_close (img);
  free (buf);
}

/* Compaction at close must leave no leaked cluster wherever the freed
 * clusters lie: below an L2 table at the end of the file, between
 * stacked tables, scattered. */
static void
test_compaction (void)
{
  char *buf = malloc (3 * 65536);
  struct qed_image *img;
  const char *f;

  memset (buf, 0xa5, 3 * 65536);

  /* A freed cluster below the last table (64K/4: 4-cluster tables). */
  f = P ("compact1.qed");
  REQUIRE (create_img (f, UINT64_C (16) << 30, 65536, 4) == 0);
  img = open_rw (f);
  REQUIRE (img != NULL);
  CHECK (qed_write (img, NULL, buf, 65536, 0, 0) == 0);
  CHECK (qed_write (img, NULL, buf, 65536, 65536, 0) == 0);
  CHECK (qed_write (img, NULL, buf, 65536, UINT64_C (2) << 30, 0) == 0);
  CHECK (qed_trim (img, NULL, 65536, 0, 0) == 0);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* One hole below stacked tables: [H][L1][--][T0][D][T2][T1]. */
  f = P ("compact2.qed");
  REQUIRE (create_img (f, 12 << 20, 4096, 2) == 0);
  img = open_rw (f);
  REQUIRE (img != NULL);
  {
    uint64_t size = 12 << 20, offs[3] = { 0, size - 1, 6 << 20 };
    for (int i = 0; i < 3; ++i) {
      uint64_t n = size - offs[i] < 4096 ? size - offs[i] : 4096;
      CHECK (qed_write (img, NULL, buf, n, offs[i], 0) == 0);
      CHECK (qed_zero (img, NULL, n, offs[i], 0) == 0);
      CHECK (qed_trim (img, NULL, n, offs[i], 0) == 0);
    }
  }
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* Random: data and tables interleaved, frees everywhere, with a model
   * of the contents: compaction moves live clusters and tables. */
  {
    static const uint32_t geo[][2] = { { 4096, 2 }, { 4096, 8 },
                                       { 8192, 4 }, { 4096, 1 } };
    const uint64_t size = 48 << 20;
    unsigned char *model = malloc (size), *rb = malloc (1 << 20);
    for (size_t g = 0; g < sizeof geo / sizeof geo[0]; ++g) {
      uint32_t cs = geo[g][0];
      char name[64];
      snprintf (name, sizeof name, "compact-%u-%u.qed", cs, geo[g][1]);
      f = P (name);
      REQUIRE (create_img (f, size, cs, geo[g][1]) == 0);
      memset (model, 0, size);
      for (int round = 0; round < 6; ++round) {
        img = open_rw (f);
        REQUIRE (img != NULL);
        for (int i = 0; i < 80; ++i) {
          uint64_t off = rnd_below (size / cs) * cs;
          uint64_t len = cs * (1 + rnd_below (3));
          int kind = rnd_below (6);
          if (off + len > size)
            len = size - off;
          if (kind == 0) {
            CHECK (qed_trim (img, NULL, len, off, 0) == 0);
            memset (model + off, 0, len);   /* punched: reads zeros */
          }
          else if (kind == 1) {
            CHECK (qed_zero (img, NULL, len, off, QED_ZERO_MAY_UNMAP) == 0);
            memset (model + off, 0, len);
          }
          else {
            memset (buf, 1 + rnd_below (255), len);
            CHECK (qed_write (img, NULL, buf, len, off, 0) == 0);
            memcpy (model + off, buf, len);
          }
          if (rnd_below (10) == 0)
            CHECK (qed_flush (img) == 0);
        }
        CHECK (qed_close (img) == 0);
        CHECK_CLEAN (f);
        img = open_ro (f);
        REQUIRE (img != NULL);
        for (uint64_t off = 0; off < size; off += 1 << 20) {
          CHECK (qed_read (img, NULL, rb, 1 << 20, off) == 0);
          CHECKF (memcmp (rb, model + off, 1 << 20) == 0,
                  "%s round %d: data differs in [%" PRIu64 ", +1M)",
                  name, round, off);
        }
        qed_close (img);
      }
      if (qed_qemu_can_open (cs, geo[g][1]))
        CHECK_QEMU (f);
    }
    free (model);
    free (rb);
  }
  free (buf);
}

/* ------------------------------------------------------------------ */
/* The free-cluster list: random rounds with random compaction limits;
 * after each clean close the data matches the model, NEED_CHECK is
 * clear, and any leak is explained by a list (autoclear bit 0x1).  Some
 * rounds damage the list (a byte of it, or the bit cleared by "an older
 * writer" that also linked a listed cluster): it must not be trusted. */

static int
freelist_damage (const char *f, int how, unsigned char *model, uint32_t cs)
{
  uint64_t rec = cs - 64, list = rd64 (f, rec + 8);
  uint64_t first = rd64 (f, list), l1 = rd64 (f, 24 + 16);

  if (!(rd64 (f, 32) & QED_AF_FREELIST) || list == 0)
    return 0;
  if (how == 0) {                       /* a bit flipped in the list */
    unsigned char b;
    read_at (f, &b, 1, list + 3);
    b ^= 0x10;
    write_at (f, &b, 1, list + 3);
  }
  else {
    /* An older writer: bit cleared, the first listed cluster linked at
     * guest cluster 0 (if its L2 table exists), with data in it. */
    uint64_t t = rd64 (f, l1);
    wr64 (f, 32, 0);
    if (t != 0) {
      uint64_t old = rd64 (f, t);
      unsigned char *d = malloc (cs);
      memset (d, 0x77, cs);
      write_at (f, d, cs, first);
      wr64 (f, t, first);
      memset (model, 0x77, cs);
      (void) old;                       /* leaked now, as QEMU leaks */
      free (d);
    }
  }
  return 1;
}

static void
test_freelist (void)
{
  static const uint32_t geo[][2] = { { 4096, 2 }, { 4096, 1 }, { 8192, 4 },
                                     { 65536, 4 } };
  const uint64_t size = 48 << 20;
  unsigned char *model = malloc (size), *rb = malloc (1 << 20);
  char *buf = malloc (3 * 65536);
  int damaged = 0;

  for (size_t g = 0; g < sizeof geo / sizeof geo[0]; ++g) {
    uint32_t cs = geo[g][0];
    char name[64];
    const char *f;
    snprintf (name, sizeof name, "freelist-%u-%u.qed", cs, geo[g][1]);
    f = P (name);
    REQUIRE (create_img (f, size, cs, geo[g][1]) == 0);
    memset (model, 0, size);
    for (int round = 0; round < 8; ++round) {
      struct qed_open_options o = {
        .freelist = true,
        .compact_limit = round % 3 == 2 || rnd_below (3) == 0 ? 0
                         : rnd_below (40) * cs,
      };
      struct qed_check_result r;
      struct qed_image *img = qed_open (f, &o);
      REQUIRE (img != NULL);
      for (int i = 0; i < 60; ++i) {
        /* Dense (trims free clusters), sometimes far (new tables). */
        uint64_t span = rnd_below (8) ? 512 * (uint64_t) cs : size;
        uint64_t off = rnd_below (span / cs) * cs;
        uint64_t len = cs * (1 + rnd_below (3));
        int kind = rnd_below (5);
        if (off + len > size)
          len = size - off;
        if (kind <= 1) {
          CHECK (qed_trim (img, NULL, len, off, 0) == 0);
          memset (model + off, 0, len);
        }
        else {
          memset (buf, 1 + rnd_below (255), len);
          CHECK (qed_write (img, NULL, buf, len, off, 0) == 0);
          memcpy (model + off, buf, len);
        }
        if (rnd_below (10) == 0)
          CHECK (qed_flush (img) == 0);
        if (rnd_below (25) == 0)
          CHECK (qed_idle (img) == 0);  /* lists without moving data */
      }
      CHECK (qed_close (img) == 0);
      CHECKF (!need_check_set (f), "%s round %d: NEED_CHECK set", name, round);
      img = open_ro (f);
      REQUIRE (img != NULL);
      CHECK (qed_check (img, false, &r) == 0);
      CHECKF (r.corruptions == 0, "%s round %d: %" PRIu64 " corruptions",
              name, round, r.corruptions);
      CHECKF (r.leaks == 0 || (rd64 (f, 32) & QED_AF_FREELIST),
              "%s round %d: %" PRIu64 " leaks without a list", name, round,
              r.leaks);
      for (uint64_t off = 0; off < size; off += 1 << 20) {
        CHECK (qed_read (img, NULL, rb, 1 << 20, off) == 0);
        CHECKF (memcmp (rb, model + off, 1 << 20) == 0,
                "%s round %d: data differs in [%" PRIu64 ", +1M)",
                name, round, off);
      }
      qed_close (img);
      if (getenv ("QED_TEST_DEBUG"))
        fprintf (stderr, "%s round %d: limit %" PRIu64 ", %" PRIu64
                 " leaks, bit %d\n", name, round, o.compact_limit, r.leaks,
                 (int) (rd64 (f, 32) & 1));
      if (round % 3 == 2)
        damaged += freelist_damage (f, round % 2, model, cs);
    }
    /* Demote: no list, no leaks. */
    {
      struct qed_open_options o = { .demote = true };
      struct qed_image *img = qed_open (f, &o);
      REQUIRE (img != NULL);
      CHECK (qed_close (img) == 0);
      CHECK_CLEAN (f);
      CHECK ((rd64 (f, 32) & QED_AF_FREELIST) == 0);
      if (qed_qemu_can_open (cs, geo[g][1]))
        CHECK_QEMU (f);
    }
  }
  CHECKF (damaged >= 4, "only %d lists were damaged", damaged);
  free (model);
  free (rb);
  free (buf);
}

/* Hostile free-cluster lists: checksums right, contents wrong.  Each
 * must be refused (with a message), the image served, and nothing
 * handed out twice. */
extern uint32_t qed_crc32 (const void *buf, size_t len);

static void
write_list (const char *f, uint32_t cs, uint64_t list_off,
            const uint64_t *runs, uint64_t nruns, uint64_t count_adj)
{
  unsigned char rec[64] = "QEDFREEL";
  uint64_t le[32], total = 0, v;
  uint32_t crc;

  for (uint64_t i = 0; i < nruns; ++i) {
    le[2*i] = htole64 (runs[2*i]);
    le[2*i+1] = htole64 (runs[2*i+1]);
    total += runs[2*i+1];
  }
  write_at (f, le, nruns * 16, list_off);
  v = htole64 (list_off); memcpy (rec + 8, &v, 8);
  v = htole64 (nruns * 16); memcpy (rec + 16, &v, 8);
  v = htole64 (total + count_adj); memcpy (rec + 24, &v, 8);
  crc = htole32 (qed_crc32 (le, nruns * 16)); memcpy (rec + 32, &crc, 4);
  crc = htole32 (qed_crc32 (rec, 60)); memcpy (rec + 60, &crc, 4);
  write_at (f, rec, 64, cs - 64);
  wr64 (f, 32, QED_AF_FREELIST);
}

static void
test_freelist_hostile (void)
{
  const uint32_t cs = 65536;
  char *buf = malloc (4 * cs), *rb = malloc (4 * cs);
  uint64_t data = 5 * (uint64_t) cs;    /* after the header and the L1 */
  struct {
    const char *what;
    uint64_t list_off, runs[4], nruns, adj;
  } cases[] = {
    { "a run over the L1", 0, { cs, 2 }, 1, 0 },
    { "a run past the end", 0, { 100 * (uint64_t) cs, 2 }, 1, 0 },
    { "a run over the header", 0, { 0, 1 }, 1, 0 },
    { "a misaligned run", 0, { 0, 1 }, 1, 0 },
    { "overlapping runs", 0, { 0, 2, 0, 1 }, 2, 0 },
    { "a wrong count", 0, { 0, 1 }, 1, 5 },
    { "the list inside a run", 1, { 0, 3 }, 1, 0 },
  };

  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; ++k) {
    const char *f = P ("hostile-list.qed");
    struct qed_image *img;
    struct qed_check_result r;
    uint64_t file_end, list_off, runs[4];
    unlink (f);
    REQUIRE (create_img (f, 64 << 20, cs, 4) == 0);
    img = open_rw (f);
    REQUIRE (img != NULL);
    memset (buf, 0x3c, 4 * cs);
    /* Data at clusters 5..8, then a table, then a free tail cluster. */
    CHECK (qed_write (img, NULL, buf, 4 * cs, 0, 0) == 0);
    CHECK (qed_close (img) == 0);
    file_end = file_size (f);
    {
      int fd = open (f, O_WRONLY);
      REQUIRE (fd >= 0 && ftruncate (fd, file_end + 2 * cs) == 0);
      close (fd);
    }
    list_off = file_end + cs;
    memcpy (runs, cases[k].runs, sizeof runs);
    /* Runs given as 0 point at the data clusters (in use!). */
    for (uint64_t i = 0; i < cases[k].nruns; ++i)
      if (runs[2*i] == 0 && k != 2)
        runs[2*i] = data;
    if (k == 3)
      runs[0] = data + 512;
    if (cases[k].list_off) {    /* the free tail, holding the list */
      runs[0] = file_end;
      runs[1] = 2;
    }
    write_list (f, cs, list_off, runs, cases[k].nruns, cases[k].adj);
    nr_errors = 0;
    {
      struct qed_open_options o = { .freelist = true };
      img = qed_open (f, &o);
    }
    REQUIRE (img != NULL);
    CHECKF (nr_errors > 0, "%s: accepted without a message", cases[k].what);
    /* Allocate: nothing may land on the data clusters. */
    memset (buf, 0x5e, 4 * cs);
    CHECK (qed_write (img, NULL, buf, 4 * cs, 32 << 20, 0) == 0);
    CHECK (qed_read (img, NULL, rb, 4 * cs, 0) == 0);
    memset (buf, 0x3c, 4 * cs);
    CHECKF (memcmp (rb, buf, 4 * cs) == 0, "%s: data overwritten",
            cases[k].what);
    CHECK (qed_close (img) == 0);
    img = open_ro (f);
    REQUIRE (img != NULL);
    CHECK (qed_check (img, false, &r) == 0);
    CHECKF (r.corruptions == 0, "%s: %" PRIu64 " corruptions",
            cases[k].what, r.corruptions);
    qed_close (img);
  }
  free (buf);
  free (rb);
}

/* ------------------------------------------------------------------ */
/* A crash: copy the file while it is open. */

static void
test_crash (void)
{
  const char *f = P ("crash.qed"), *c = P ("crash-copy.qed");
  const uint32_t cs = 65536;
  struct qed_image *img;
  struct qed_check_result r;
  unsigned char *buf = malloc (4 * cs);

  REQUIRE (create_img (f, 1 << 30, cs, 4) == 0);
  img = open_rw (f);
  REQUIRE (img != NULL);
  memset (buf, 'F', 4 * cs);
  CHECK (qed_write (img, NULL, buf, 4 * cs, 0, 0) == 0);
  CHECK (qed_write (img, NULL, buf, 100, (UINT64_C (600) << 20), 0) == 0);
  CHECK (qed_flush (img) == 0);
  CHECK (need_check_set (f));
  /* Unflushed: new clusters (a new table too) and an in-place write. */
  memset (buf, 'U', 4 * cs);
  CHECK (qed_write (img, NULL, buf, 3 * cs, 10 * cs, 0) == 0);
  CHECK (qed_write (img, NULL, buf, 100, (UINT64_C (900) << 20), 0) == 0);
  CHECK (qed_write (img, NULL, buf, 10, cs, 0) == 0);
  CHECK (qed_zero (img, NULL, cs, 2 * cs, QED_ZERO_MAY_UNMAP) == 0);
  REQUIRE (copy_file (f, c) == 0);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);

  CHECK (need_check_set (c));
  img = open_rw (c);            /* runs the check and repairs */
  REQUIRE (img != NULL);
  CHECK (!need_check_set (c));
  CHECK (qed_read (img, NULL, buf, 4 * cs, 0) == 0);
  CHECK (buf[0] == 'F' && buf[4 * cs - 1] == 'F');
  CHECK (buf[cs + 9] == 'U' && buf[cs + 10] == 'F');   /* in place */
  CHECK (qed_read (img, NULL, buf, 100, UINT64_C (600) << 20) == 0);
  CHECK (buf[0] == 'F' && buf[99] == 'F');
  /* The unflushed allocations are gone, nothing points past EOF. */
  CHECK (qed_read (img, NULL, buf, 3 * cs, 10 * cs) == 0);
  CHECK (buf[0] == 0 && buf[3 * cs - 1] == 0);
  CHECK (qed_read (img, NULL, buf, 100, UINT64_C (900) << 20) == 0);
  CHECK (buf[0] == 0);
  CHECK (qed_check (img, false, &r) == 0);
  CHECK (r.corruptions == 0 && r.leaks == 0);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (c);
  CHECK_QEMU (c);

  /* Read-only open of a crashed copy: no repair, data readable. */
  img = open_rw (f);
  REQUIRE (img != NULL);
  CHECK (qed_write (img, NULL, buf, 100, 50 * cs, 0) == 0);
  unlink (c);
  REQUIRE (copy_file (f, c) == 0);
  CHECK (qed_close (img) == 0);
  {
    uint64_t sz = file_size (c);
    img = open_ro (c);
    REQUIRE (img != NULL);
    CHECK (qed_read (img, NULL, buf, 4 * cs, 0) == 0);
    CHECK (buf[0] == 'F');
    qed_close (img);
    CHECK (need_check_set (c));
    CHECK (file_size (c) == sz);
  }
  free (buf);
}

/* ------------------------------------------------------------------ */
/* Check and repair of hand-corrupted images. */

struct layout {
  uint32_t cs;
  uint64_t l1, l2;              /* offsets of the L1 and of L1[0]'s table */
  uint64_t data[8];             /* file offsets of guest clusters 0..7 */
};

/* A 64K/4 image with guest clusters 0..7 written one by one. */
static int
make_populated (const char *f, const char *backing, struct layout *lay,
                uint32_t hs)
{
  const uint32_t cs = 65536;
  struct qed_image *img;
  unsigned char *buf = malloc (cs);

  if (hs > 1) {
    if (make_image (f, cs, 4, hs, UINT64_C (16) << 30) == -1)
      return -1;
  }
  else {
    struct qed_create_options o = { .size = UINT64_C (16) << 30,
                                    .backing_name = backing,
                                    .backing_raw = true };
    if (qed_create (f, &o) == -1)
      return -1;
  }
  img = open_rw (f);
  if (img == NULL)
    return -1;
  for (int i = 0; i < 8; ++i) {
    memset (buf, '0' + i, cs);
    qed_write (img, NULL, buf, cs, (uint64_t) i * cs, 0);
  }
  if (qed_close (img) == -1)
    return -1;
  free (buf);
  lay->cs = cs;
  lay->l1 = rd64 (f, 40);
  lay->l2 = rd64 (f, lay->l1);
  for (int i = 0; i < 8; ++i)
    lay->data[i] = rd64 (f, lay->l2 + 8 * i);
  return 0;
}

/* Opens f, expects `n` corruptions without repair and a reading error
 * at guest cluster `bad`, then repairs and checks again. */
static struct qed_image *
check_and_repair2 (const char *f, uint64_t corruptions,
                   uint64_t rep_corruptions, uint64_t leaks,
                   int64_t bad_guest, const char *msg, int line)
{
  struct qed_image *img = open_rw (f);
  struct qed_check_result r;
  char b[16];

  checks++;
  if (img == NULL) {
    failures++;
    fprintf (stderr, "%s:%d: FAIL: open %s: %m\n", __FILE__, line, f);
    return NULL;
  }
  if (bad_guest >= 0) {
    clear_error ();
    errno = 0;
    checks++;
    if (qed_read (img, NULL, b, sizeof b, bad_guest) != -1 || errno != EIO ||
        strstr (last_error, msg) == NULL) {
      failures++;
      fprintf (stderr, "%s:%d: FAIL: read of bad entry: errno %d, "
               "message \"%s\" (expected \"%s\")\n", __FILE__, line, errno,
               last_error, msg);
    }
  }
  checks++;
  if (qed_check (img, false, &r) == -1 || r.corruptions != corruptions ||
      r.leaks != leaks || r.corruptions_fixed || r.leaks_fixed) {
    failures++;
    fprintf (stderr, "%s:%d: FAIL: check: %" PRIu64 " corruptions (expected %"
             PRIu64 "), %" PRIu64 " leaks (expected %" PRIu64 ")\n",
             __FILE__, line, r.corruptions, corruptions, r.leaks, leaks);
  }
  checks++;
  if (qed_check (img, true, &r) == -1 || r.corruptions != rep_corruptions ||
      r.corruptions_fixed != rep_corruptions || r.leaks != leaks ||
      r.leaks_fixed != leaks) {
    failures++;
    fprintf (stderr, "%s:%d: FAIL: repair: %" PRIu64 "/%" PRIu64
             " corruptions fixed, %" PRIu64 "/%" PRIu64 " leaks fixed\n",
             __FILE__, line, r.corruptions_fixed, r.corruptions,
             r.leaks_fixed, r.leaks);
  }
  checks++;
  if (qed_check (img, false, &r) == -1 || r.corruptions || r.leaks) {
    failures++;
    fprintf (stderr, "%s:%d: FAIL: after repair: %" PRIu64 " corruptions, %"
             PRIu64 " leaks\n", __FILE__, line, r.corruptions, r.leaks);
  }
  return img;
}
#define check_and_repair(f, c, l, g, m, line) \
  check_and_repair2 ((f), (c), (c), (l), (g), (m), (line))

/* Every guest cluster 0..7 reads its pattern, except `except`. */
static void
check_pattern (struct qed_image *img, int except, int line)
{
  unsigned char *buf = malloc (65536);
  for (int i = 0; i < 8; ++i) {
    if (i == except)
      continue;
    checks++;
    if (qed_read (img, NULL, buf, 65536, (uint64_t) i * 65536) == -1 ||
        buf[0] != '0' + i || buf[65535] != '0' + i) {
      failures++;
      fprintf (stderr, "%s:%d: FAIL: guest cluster %d lost its data\n",
               __FILE__, line, i);
    }
  }
  free (buf);
}

static void
test_check_repair (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  struct qed_map mp;
  unsigned char *buf = malloc (cs);
  const char *f;
  uint64_t sz;

  /* L2 entry beyond EOF. */
  f = P ("bad-l2-eof.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  sz = file_size (f);
  wr64 (f, lay.l2 + 8 * 10, sz + 10 * cs);     /* was unallocated */
  wr64 (f, lay.l2 + 8 * 3, sz + 20 * cs);      /* leaks data[3] */
  img = check_and_repair (f, 2, 1, 10 * cs, "beyond the end of the file",
                          __LINE__);
  REQUIRE (img != NULL);
  /* The repair must reach the cache: the entries were read above. */
  CHECK (qed_read (img, NULL, buf, cs, 10 * cs) == 0);
  CHECK (buf[0] == 0 && buf[cs - 1] == 0);
  CHECK (qed_read (img, NULL, buf, cs, 3 * cs) == 0);
  CHECK (buf[0] == 0 && buf[cs - 1] == 0);
  check_pattern (img, 3, __LINE__);
  CHECK (qed_close (img) == 0);
  CHECK (file_size (f) == sz - cs);   /* the unlinked cluster reclaimed */
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* Misaligned (reserved low bits set). */
  f = P ("bad-l2-misaligned.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  wr64 (f, lay.l2 + 8 * 2, lay.data[2] + 512);
  img = check_and_repair (f, 1, 1, 2 * cs, "reserved low bits", __LINE__);
  REQUIRE (img != NULL);
  check_pattern (img, 2, __LINE__);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);
  wr64 (f, lay.l2 + 8 * 2, 0);

  /* Into the header (header_size 2). */
  f = P ("bad-l2-header.qed");
  REQUIRE (make_populated (f, NULL, &lay, 2) == 0);
  CHECK (lay.l1 == 2 * cs);
  wr64 (f, lay.l2 + 8 * 4, cs);
  img = check_and_repair (f, 1, 1, 4 * cs, "points into the header", __LINE__);
  REQUIRE (img != NULL);
  check_pattern (img, 4, __LINE__);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* Into the L1. */
  f = P ("bad-l2-l1.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  wr64 (f, lay.l2 + 8 * 5, lay.l1 + cs);
  img = check_and_repair (f, 1, 1, 5 * cs, "L1 table", __LINE__);
  REQUIRE (img != NULL);
  check_pattern (img, 5, __LINE__);
  CHECK (qed_close (img) == 0);
  CHECK (rd64 (f, lay.l1) == lay.l2);       /* the L1 is intact */
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* Duplicate reference: guest 6 -> guest 1's cluster.  The repair
   * gives the second user a copy; both read guest 1's data. */
  f = P ("bad-l2-dup.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  sz = file_size (f);
  wr64 (f, lay.l2 + 8 * 6, lay.data[1]);
  img = check_and_repair (f, 1, 1, -1, "", __LINE__);
  REQUIRE (img != NULL);
  check_pattern (img, 6, __LINE__);
  CHECK (qed_read (img, NULL, buf, cs, 6 * cs) == 0);
  CHECK (buf[0] == '1' && buf[cs - 1] == '1');
  memset (buf, 'X', cs);
  CHECK (qed_write (img, NULL, buf, cs, 6 * cs, 0) == 0);
  check_pattern (img, 6, __LINE__);           /* independent copies */
  CHECK (qed_close (img) == 0);
  CHECK (file_size (f) == sz);                /* copy in the leaked hole */
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* Duplicate reference to an L2 table (a data entry pointing at the
   * table that maps it). */
  f = P ("bad-l2-dup-table.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  wr64 (f, lay.l2 + 8 * 7, lay.l2);
  img = check_and_repair (f, 1, 1, -1, "", __LINE__);
  REQUIRE (img != NULL);
  check_pattern (img, 7, __LINE__);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* L1 entry beyond EOF. */
  f = P ("bad-l1-eof.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  wr64 (f, lay.l1 + 8 * 5, file_size (f) + 100 * cs);
  img = check_and_repair (f, 1, 0, (UINT64_C (5) << 31) + 12345,
                          "invalid L1 entry", __LINE__);
  REQUIRE (img != NULL);
  check_pattern (img, -1, __LINE__);
  CHECK (qed_read (img, NULL, buf, 100, (UINT64_C (5) << 31) + 12345) == 0);
  CHECK (buf[0] == 0);
  CHECK (qed_write (img, NULL, "w", 1, UINT64_C (5) << 31, 0) == 0);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* L1 entry misaligned, and two L1 entries sharing a table. */
  f = P ("bad-l1-misc.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  wr64 (f, lay.l1 + 8 * 1, lay.l2 + 4096);
  wr64 (f, lay.l1 + 8 * 2, lay.l2);
  /* Without repair the shared table is not walked; with repair its
   * copy shares the 8 data clusters, which get copies too. */
  img = check_and_repair2 (f, 2, 10, 0, UINT64_C (1) << 31,
                           "invalid L1 entry", __LINE__);
  REQUIRE (img != NULL);
  check_pattern (img, -1, __LINE__);
  /* L1[2] got its own copy of the table: same data, independent. */
  CHECK (qed_read (img, NULL, buf, cs, UINT64_C (2) << 31) == 0);
  CHECK (buf[0] == '0');
  memset (buf, 'Y', cs);
  CHECK (qed_write (img, NULL, buf, cs, UINT64_C (2) << 31, 0) == 0);
  check_pattern (img, -1, __LINE__);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* Leaked clusters at the end. */
  f = P ("leak-end.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  sz = file_size (f);
  memset (buf, 'L', cs);
  for (int i = 0; i < 3; ++i)
    REQUIRE (write_at (f, buf, cs, sz + (uint64_t) i * cs) == 0);
  img = check_and_repair (f, 0, 3, -1, "", __LINE__);
  REQUIRE (img != NULL);
  CHECK (file_size (f) == sz);
  check_pattern (img, -1, __LINE__);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* Leaked clusters in the middle: unlink guest clusters 1 and 2. */
  f = P ("leak-mid.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  sz = file_size (f);
  wr64 (f, lay.l2 + 8 * 1, 0);
  wr64 (f, lay.l2 + 8 * 2, 0);
  img = check_and_repair (f, 0, 2, -1, "", __LINE__);
  REQUIRE (img != NULL);
  CHECK (file_size (f) == sz - 2 * cs);
  for (int i = 0; i < 8; ++i) {
    CHECK (qed_read (img, NULL, buf, cs, (uint64_t) i * cs) == 0);
    CHECK (buf[0] == (i == 1 || i == 2 ? 0 : '0' + i) &&
           buf[cs - 1] == buf[0]);
  }
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* With a backing file a bad entry becomes a zero cluster (never
   * exposing backing data). */
  f = P ("bad-l2-backing.qed");
  {
    int fd = open (P ("base.raw"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    memset (buf, 0x77, cs);
    for (int i = 0; i < 16; ++i)
      if (pwrite (fd, buf, cs, (uint64_t) i * cs) != cs) break;
    close (fd);
  }
  REQUIRE (make_populated (f, "base.raw", &lay, 1) == 0);
  wr64 (f, lay.l2 + 8 * 3, 12345 * cs);
  wr64 (f, lay.l1 + 8 * 1, 12345 * cs);
  img = check_and_repair (f, 2, 1, 3 * cs, "beyond", __LINE__);
  REQUIRE (img != NULL);
  REQUIRE (qed_map (img, 3 * cs, cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_ZERO);
  REQUIRE (qed_map (img, (UINT64_C (1) << 31) + cs, cs, &mp) == 0);
  CHECK (mp.type == QED_MAP_ZERO);
  check_pattern (img, 3, __LINE__);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* NEED_CHECK + corruption: a writable open repairs; a read-only open
   * refuses (it cannot repair) and changes nothing. */
  f = P ("bad-needcheck.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  wr64 (f, lay.l2 + 8 * 3, lay.data[3] + 8);
  wr64 (f, 16, QED_F_NEED_CHECK);
  sz = file_size (f);
  CHECK_ERR (open_ro (f) == NULL, EIO, "corruptions");
  CHECK (need_check_set (f) && file_size (f) == sz);
  img = open_rw (f);
  REQUIRE (img != NULL);
  CHECK (!need_check_set (f));
  check_pattern (img, 3, __LINE__);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);

  /* force_check on a clean image finds nothing. */
  {
    struct qed_open_options o = { .force_check = true };
    img = qed_open (f, &o);
    REQUIRE (img != NULL);
    CHECK (qed_close (img) == 0);
    CHECK_CLEAN (f);
  }
  free (buf);
}

/* ------------------------------------------------------------------ */
/* Backing chains (backing.c). */

static void
write_pattern_file (const char *path, uint64_t size, unsigned char base)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  unsigned char buf[4096];
  for (uint64_t off = 0; off < size; off += sizeof buf) {
    size_t n = size - off < sizeof buf ? size - off : sizeof buf;
    for (size_t i = 0; i < n; ++i)
      buf[i] = base + ((off + i) / 4096) % 100;
    if (pwrite (fd, buf, n, off) != (ssize_t) n)
      break;
  }
  close (fd);
}

/* ------------------------------------------------------------------ */
/* Backing files opened as the image's owner: the switch of fsuid,
 * fsgid and groups is the opening thread's alone, and undone. */

static volatile bool creds_stop;
static volatile unsigned long creds_changed;

/* The calling thread's Uid, Gid and Groups lines. */
static void
thread_creds (char *out, size_t n)
{
  FILE *fp = fopen ("/proc/thread-self/status", "r");
  char line[512];
  size_t len = 0;

  out[0] = '\0';
  if (fp == NULL)
    return;
  while (fgets (line, sizeof line, fp))
    if ((strncmp (line, "Uid:", 4) == 0 || strncmp (line, "Gid:", 4) == 0 ||
         strncmp (line, "Groups:", 7) == 0) && len + strlen (line) < n) {
      strcpy (out + len, line);
      len += strlen (line);
    }
  fclose (fp);
}

static void *
watch_creds (void *arg)
{
  const char *want = arg;
  char now[2048];

  while (!creds_stop) {
    thread_creds (now, sizeof now);
    if (strcmp (now, want) != 0)
      creds_changed++;
  }
  return NULL;
}

static void
test_owner_identity (void)
{
  char secret[256], open_file[256], before[2048], after[2048];
  struct qed_backing_open bo = { .dirfd = AT_FDCWD, .as_owner = true,
                                 .uid = 65534 };
  pthread_t watcher;
  struct stat st;
  int fd;

  if (geteuid () != 0) {
    fprintf (stderr, "  not root: the owner's identity is not tested\n");
    return;
  }
  snprintf (secret, sizeof secret, "%s/secret", tmpdir);
  snprintf (open_file, sizeof open_file, "%s/public", tmpdir);
  fd = open (secret, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  REQUIRE (fd >= 0);
  close (fd);
  fd = open (open_file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  REQUIRE (fd >= 0);
  close (fd);
  REQUIRE (chmod (tmpdir, 0711) == 0);
  thread_creds (before, sizeof before);
  REQUIRE (strstr (before, "Uid:") != NULL);
  creds_stop = false;
  REQUIRE (pthread_create (&watcher, NULL, watch_creds, before) == 0);
  for (int i = 0; i < 300; ++i) {
    bo.path = bo.name = secret;
    CHECK_ERR (qed_open_backing (&bo, &st, NULL) == -1, EACCES,
               "as the image's owner (uid 65534)");
    bo.path = bo.name = open_file;
    fd = qed_open_backing (&bo, &st, NULL);
    CHECK (fd >= 0);
    if (fd >= 0)
      close (fd);
  }
  creds_stop = true;
  pthread_join (watcher, NULL);
  CHECKF (creds_changed == 0, "another thread saw its credentials change "
          "%lu times", creds_changed);
  thread_creds (after, sizeof after);
  CHECKF (strcmp (before, after) == 0, "credentials not restored:\n%s\n%s",
          before, after);
  /* As the server (no owner), the secret opens. */
  bo.as_owner = false;
  bo.path = bo.name = secret;
  fd = qed_open_backing (&bo, &st, NULL);
  CHECK (fd >= 0);
  if (fd >= 0)
    close (fd);
  chmod (tmpdir, 0700);
}

static void
test_chain (void)
{
  struct qed_chain_options co = { .follow = true };
  struct qed_create_options o = { .size = 1 << 20 };
  struct qed_image *img, *mid;
  struct qed_chain *ch;
  struct qed_below b;
  struct qed_map mp;
  unsigned char *buf = malloc (1 << 20);
  bool none;
  char cwd[4096];

  REQUIRE (mkdir (P ("sub"), 0755) == 0);
  write_pattern_file (P ("sub/short.raw"), 100000, 1);

  /* Raw backing shorter than the image, relative name resolved against
   * the overlay's directory (not the cwd). */
  o.backing_name = "short.raw";
  o.backing_raw = true;
  REQUIRE (qed_create (P ("sub/ov.qed"), &o) == 0);
  REQUIRE (getcwd (cwd, sizeof cwd) != NULL);
  REQUIRE (chdir ("/") == 0);
  img = open_rw (P ("sub/ov.qed"));
  REQUIRE (img != NULL);
  ch = qed_chain_open (img, &co, &none);
  REQUIRE (ch != NULL);
  CHECK (!none);
  CHECK (strstr (qed_chain_describe (ch), "short.raw") != NULL);
  qed_chain_below (ch, &b);
  CHECK (qed_read (img, &b, buf, 1 << 20, 0) == 0);
  CHECK (buf[0] == 1 && buf[99999] == 1 + 99999 / 4096 % 100);
  CHECK (buf[100000] == 0 && buf[(1 << 20) - 1] == 0);
  REQUIRE (qed_chain_map (ch, 0, 1 << 20, &mp) == 0);
  CHECK (mp.type == QED_MAP_DATA && mp.length >= 4096 && mp.length <= 100000);
  REQUIRE (qed_chain_map (ch, 200000, 1000, &mp) == 0);
  CHECK (mp.type == QED_MAP_UNALLOCATED && mp.length == 1000);
  /* COW of a cluster straddling the backing EOF. */
  CHECK (qed_write (img, &b, "w", 1, 65536 + 5, 0) == 0);
  CHECK (qed_read (img, NULL, buf, 65536, 65536) == 0);
  CHECK (buf[5] == 'w' && buf[4] == 1 + 16 && buf[100000 - 65536 - 1] != 0 &&
         buf[100000 - 65536] == 0);
  CHECK (qed_prefetch (img, &b, 1 << 20, 0) == 0);
  qed_chain_close (ch);
  CHECK (qed_close (img) == 0);
  CHECK_QEMU (P ("sub/ov.qed"));
  REQUIRE (chdir (cwd) == 0);

  /* QED backing over raw: top -> mid.qed -> base.raw (probed). */
  write_pattern_file (P ("base2.raw"), 1 << 20, 10);
  o.backing_name = "base2.raw";
  o.backing_raw = false;                      /* probe: raw by magic */
  REQUIRE (qed_create (P ("mid.qed"), &o) == 0);
  mid = open_rw (P ("mid.qed"));
  REQUIRE (mid != NULL);
  CHECK (qed_write (mid, NULL, "MMMM", 4, 300000, 0) == 0);
  CHECK (qed_zero (mid, NULL, 65536, 0, 0) == 0);  /* no below: no-op */
  CHECK (qed_close (mid) == 0);
  {
    /* A zero cluster in mid hides base (through a real below). */
    struct qed_chain *mc;
    mid = open_rw (P ("mid.qed"));
    REQUIRE (mid != NULL);
    mc = qed_chain_open (mid, &co, &none);
    REQUIRE (mc != NULL);
    qed_chain_below (mc, &b);
    CHECK (qed_zero (mid, &b, 65536, 65536 * 8, 0) == 0);
    qed_chain_close (mc);
    CHECK (qed_close (mid) == 0);
  }
  o.backing_name = P ("mid.qed");             /* absolute name */
  REQUIRE (qed_create (P ("top.qed"), &o) == 0);
  img = open_rw (P ("top.qed"));
  REQUIRE (img != NULL);
  ch = qed_chain_open (img, &co, &none);
  REQUIRE (ch != NULL);
  CHECK (strstr (qed_chain_describe (ch), "mid.qed") != NULL &&
         strstr (qed_chain_describe (ch), "base2.raw") != NULL);
  qed_chain_below (ch, &b);
  CHECK (qed_write (img, &b, "T", 1, 600000, 0) == 0);
  CHECK (qed_read (img, &b, buf, 1 << 20, 0) == 0);
  /* mid's write at 300000 had no below: the rest of its cluster is
   * zeros. */
  CHECKF (buf[0] == 10 && buf[300000] == 'M' && buf[300004] == 0 &&
          buf[3 * 65536 + 1] == 10 + 48, "%d %d %d %d", buf[0], buf[300000],
          buf[300004], buf[3 * 65536 + 1]);
  CHECK (buf[65536 * 8] == 0 && buf[65536 * 9 - 1] == 0 &&
         buf[65536 * 9] == 10 + 144 % 100);
  CHECK (buf[600000] == 'T' && buf[600001] == 10 + 146 % 100);
  REQUIRE (qed_chain_map (ch, 300000, 100, &mp) == 0);
  CHECK (mp.type == QED_MAP_DATA);
  REQUIRE (qed_chain_map (ch, 65536 * 8, 65536, &mp) == 0);
  CHECK (mp.type == QED_MAP_UNALLOCATED);     /* mid's zero cluster */
  qed_chain_close (ch);

  /* follow=false refuses, override works. */
  co.follow = false;
  CHECK_ERR (qed_chain_open (img, &co, &none) == NULL, EPERM,
             "follow-backing=false");
  CHECK (!none);
  co.override = P ("base2.raw");
  co.override_format = QED_FORMAT_RAW;
  ch = qed_chain_open (img, &co, &none);
  CHECK (ch != NULL);
  qed_chain_close (ch);
  /* ... but an overridden QED layer that names its own backing file
   * still needs follow. */
  co.override = P ("mid.qed");
  co.override_format = QED_FORMAT_PROBE;
  CHECK_ERR (qed_chain_open (img, &co, &none) == NULL, EPERM, "follow");
  co = (struct qed_chain_options) { .follow = true };
  CHECK (qed_close (img) == 0);

  /* No backing file. */
  REQUIRE (create_img (P ("nobacking.qed"), 1 << 20, 0, 0) == 0);
  img = open_ro (P ("nobacking.qed"));
  REQUIRE (img != NULL);
  CHECK (qed_chain_open (img, &co, &none) == NULL && none);
  qed_close (img);

  /* Loops: A -> B -> A, and A -> A. */
  o.backing_name = "loopB.qed";
  REQUIRE (qed_create (P ("loopA.qed"), &o) == 0);
  o.backing_name = "loopA.qed";
  REQUIRE (qed_create (P ("loopB.qed"), &o) == 0);
  img = open_ro (P ("loopA.qed"));
  REQUIRE (img != NULL);
  CHECK_ERR (qed_chain_open (img, &co, &none) == NULL, ELOOP, "loops");
  qed_close (img);
  o.backing_name = "self.qed";
  REQUIRE (qed_create (P ("self.qed"), &o) == 0);
  img = open_ro (P ("self.qed"));
  REQUIRE (img != NULL);
  CHECK_ERR (qed_chain_open (img, &co, &none) == NULL, ELOOP, "loops");
  qed_close (img);
  /* A loop through a symlink is the same file. */
  REQUIRE (symlink (P ("lnk.qed"), P ("lnk2.qed")) == 0);
  o.backing_name = "lnk2.qed";
  REQUIRE (qed_create (P ("lnk.qed"), &o) == 0);
  img = open_ro (P ("lnk.qed"));
  REQUIRE (img != NULL);
  CHECK_ERR (qed_chain_open (img, &co, &none) == NULL, ELOOP, "loops");
  qed_close (img);

  /* qcow2 backing refused; missing backing file. */
  {
    int fd = open (P ("fake.qcow2"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (write (fd, "QFI\xfb\0\0\0\3", 8) != 8) { /* ignore */ }
    close (fd);
  }
  o.backing_name = "fake.qcow2";
  REQUIRE (qed_create (P ("onqcow2.qed"), &o) == 0);
  img = open_ro (P ("onqcow2.qed"));
  REQUIRE (img != NULL);
  CHECK_ERR (qed_chain_open (img, &co, &none) == NULL, ENOTSUP, "qcow2");
  qed_close (img);
  o.backing_name = "missing.raw";
  REQUIRE (qed_create (P ("onmissing.qed"), &o) == 0);
  img = open_ro (P ("onmissing.qed"));
  REQUIRE (img != NULL);
  CHECK_ERR (qed_chain_open (img, &co, &none) == NULL, ENOENT, "missing.raw");
  qed_close (img);
  /* Neither a FIFO nor a directory may be a layer (nor hang). */
  REQUIRE (mkfifo (P ("fifo"), 0644) == 0);
  o.backing_name = "fifo";
  REQUIRE (qed_create (P ("onfifo.qed"), &o) == 0);
  img = open_ro (P ("onfifo.qed"));
  REQUIRE (img != NULL);
  CHECK_ERR (qed_chain_open (img, &co, &none) == NULL, EINVAL,
             "not a regular file");
  qed_close (img);
  o.backing_name = "sub";
  REQUIRE (qed_create (P ("ondir.qed"), &o) == 0);
  img = open_ro (P ("ondir.qed"));
  REQUIRE (img != NULL);
  CHECK_ERR (qed_chain_open (img, &co, &none) == NULL, EINVAL,
             "not a regular file");
  qed_close (img);
  CHECK_ERR (open_ro (P ("fifo")) == NULL, EINVAL, "not a regular file");
  CHECK_ERR (open_rw (P ("fifo")) == NULL, EINVAL, "not a regular file");
  /* A corrupt QED backing file fails the chain with its message. */
  REQUIRE (create_img (P ("badmid.qed"), 1 << 20, 0, 0) == 0);
  wr64 (P ("badmid.qed"), 16, 0x40);
  o.backing_name = "badmid.qed";
  REQUIRE (qed_create (P ("onbad.qed"), &o) == 0);
  img = open_ro (P ("onbad.qed"));
  REQUIRE (img != NULL);
  CHECK_ERR (qed_chain_open (img, &co, &none) == NULL, ENOTSUP, "0x40");
  qed_close (img);
  free (buf);
}

/* ------------------------------------------------------------------ */

int
main (int argc, char *argv[])
{
  const char *seed = getenv ("QED_TEST_SEED");
  struct {
    const char *name;
    void (*fn) (void);
  } tests[] = {
    { "header_roundtrip", test_header_roundtrip },
    { "header_validate", test_header_validate },
    { "max_size", test_max_size },
    { "create", test_create },
    { "open_fields", test_open_fields },
    { "map", test_map },
    { "l2_cache", test_l2_cache },
    { "fill", test_fill },
    { "freelist", test_freelist },
    { "freelist_hostile", test_freelist_hostile },
    { "punch_reuse", test_punch_reuse },
    { "compaction", test_compaction },
    { "crash", test_crash },
    { "check_repair", test_check_repair },
    { "chain", test_chain },
    { "owner_identity", test_owner_identity },
    { "model", test_model },
  };
  int ran = 0;

  show_debug = getenv ("QED_TEST_DEBUG") != NULL;
  rng_state = seed ? strtoull (seed, NULL, 0) : 20240601;
  fprintf (stderr, "seed %" PRIu64 "\n", rng_state);
  if (mkdtemp (tmpdir) == NULL) {
    perror ("mkdtemp");
    exit (1);
  }
  atexit (cleanup_tmpdir);
  have_qemu_img = system ("qemu-img --version >/dev/null 2>&1") == 0;
  if (!have_qemu_img)
    fprintf (stderr, "qemu-img not found: skipping the qemu-img checks\n");

  for (size_t i = 0; i < sizeof tests / sizeof tests[0]; ++i) {
    unsigned long f0 = failures, c0 = checks;
    bool want = argc <= 1;
    for (int a = 1; a < argc; ++a)
      if (strstr (tests[i].name, argv[a]))
        want = true;
    if (!want)
      continue;
    fprintf (stderr, "=== %s\n", tests[i].name);
    tests[i].fn ();
    fprintf (stderr, "--- %s: %s (%lu checks, %lu failed)\n", tests[i].name,
             failures == f0 ? "ok" : "FAILED", checks - c0, failures - f0);
    ran++;
  }
  printf ("unit-tests: %d tests, %lu checks, %lu failures, %lu core errors "
          "reported\n", ran, checks, failures, nr_errors);
  return failures ? 1 : 0;
}
