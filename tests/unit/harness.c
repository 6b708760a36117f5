/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: unit tests of the format core (no nbdkit needed): the
 * harness and main.  The tests are in tests/unit/unit-*.c, one file per
 * core file.
 *
 *   make tests/unit-tests && ./tests/unit-tests [NAME...]
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

#include <ftw.h>

#include "harness.h"
/* ------------------------------------------------------------------ */
/* The seam. */

char last_error[4096];
unsigned long nr_errors;
bool show_debug;

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

void
clear_error (void)
{
  last_error[0] = '\0';
}

/* ------------------------------------------------------------------ */
/* Assertions. */

unsigned long checks, failures;



/* A check that must hold for the test to go on. */


/* ------------------------------------------------------------------ */
/* Helpers. */

char tmpdir[] = "/tmp/qed-unit.XXXXXX";
bool have_qemu_img;

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

const char *
P (const char *name)
{
  static char bufs[8][4096];
  static int i;
  char *b = bufs[i++ % 8];
  snprintf (b, 4096, "%s/%s", tmpdir, name);
  return b;
}

uint64_t rng_state;

uint64_t
rnd (void)
{
  /* splitmix64 */
  uint64_t z = (rng_state += UINT64_C (0x9E3779B97F4A7C15));
  z = (z ^ (z >> 30)) * UINT64_C (0xBF58476D1CE4E5B9);
  z = (z ^ (z >> 27)) * UINT64_C (0x94D049BB133111EB);
  return z ^ (z >> 31);
}

uint64_t
rnd_below (uint64_t n)
{
  return n ? rnd () % n : 0;
}

void
rnd_fill (void *buf, size_t len)
{
  unsigned char *p = buf;
  for (size_t i = 0; i < len; ) {
    uint64_t v = rnd ();
    for (int k = 0; k < 8 && i < len; ++k, ++i)
      p[i] = v >> (k * 8);
  }
}

uint64_t
file_size (const char *path)
{
  struct stat st;
  if (stat (path, &st) == -1)
    return UINT64_MAX;
  return st.st_size;
}

int
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

int
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

uint64_t
rd64 (const char *path, uint64_t off)
{
  uint64_t v = 0;
  read_at (path, &v, 8, off);
  return le64toh (v);
}

void
wr64 (const char *path, uint64_t off, uint64_t v)
{
  v = htole64 (v);
  if (write_at (path, &v, 8, off) == -1)
    fprintf (stderr, "write_at %s: %m\n", path);
}

uint64_t
features_of (const char *path)
{
  return rd64 (path, 16);
}

bool
need_check_set (const char *path)
{
  return features_of (path) & QED_F_NEED_CHECK;
}

/* Copy a file, keeping it sparse (like cp of an image in use: what is
 * in the page cache, not what is durable). */
int
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
int
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


struct qed_image *
open_rw (const char *path)
{
  struct qed_open_options o = { 0 };
  return qed_open (path, &o);
}

struct qed_image *
open_ro (const char *path)
{
  struct qed_open_options o = { .readonly = true };
  return qed_open (path, &o);
}

int
create_img (const char *path, uint64_t size, uint32_t cs, uint32_t ts)
{
  struct qed_create_options o = { .size = size, .cluster_size = cs,
                                  .table_size = ts,
                                  .allow_qemu_incompatible = true };
  return qed_create (path, &o);
}

/* Build an image by hand (any header_size): header, L1 at hs*cs. */
int
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
void
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

/* ------------------------------------------------------------------ */

unsigned char
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

int
pat_read (void *opaque, void *buf, uint64_t count, uint64_t offset)
{
  struct pat_below *pb = opaque;
  unsigned char *p = buf;

  pb->reads++;
  for (uint64_t i = 0; i < count; ++i)
    p[i] = pat_byte (pb, offset + i);
  return 0;
}

int
pat_prefetch (void *opaque, uint64_t count, uint64_t offset)
{
  return 0;
}

/* ------------------------------------------------------------------ */

int
main (int argc, char *argv[])
{
  const char *seed = getenv ("QED_TEST_SEED");
  static const struct unit_test *const suites[] = {
    unit_tests_header,
    unit_tests_image,
    unit_tests_map,
    unit_tests_table,
    unit_tests_write,
    unit_tests_freelist,
    unit_tests_check,
    unit_tests_backing,
    unit_tests_safe_open,
    unit_tests_model,
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

  for (size_t s = 0; s < sizeof suites / sizeof suites[0]; ++s)
    for (const struct unit_test *t = suites[s]; t->name; ++t) {
      unsigned long f0 = failures, c0 = checks;
      bool want = argc <= 1;
      for (int a = 1; a < argc; ++a)
        if (strstr (t->name, argv[a]))
          want = true;
      if (!want)
        continue;
      fprintf (stderr, "=== %s\n", t->name);
      t->fn ();
      fprintf (stderr, "--- %s: %s (%lu checks, %lu failed)\n", t->name,
               failures == f0 ? "ok" : "FAILED", checks - c0, failures - f0);
      ran++;
    }
  printf ("unit-tests: %d tests, %lu checks, %lu failures, %lu core errors "
          "reported\n", ran, checks, failures, nr_errors);
  return failures ? 1 : 0;
}
