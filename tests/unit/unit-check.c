/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed unit tests: check.c: compaction, crash copies, check and
 * repair. */

#include "harness.h"

/* Compaction at close must leave no leaked cluster wherever the freed
 * clusters lie: below an L2 table at the end of the file, between
 * stacked tables, scattered. */
/* A freed cluster below the last table (64K/4: 4-cluster tables). */
static void
test_compaction_below_table (void)
{
  char *buf = malloc (3 * 65536);
  struct qed_image *img;
  const char *f;

  memset (buf, 0xa5, 3 * 65536);
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
  free (buf);
}

/* One hole below stacked tables: [H][L1][--][T0][D][T2][T1]. */
static void
test_compaction_stacked_tables (void)
{
  char *buf = malloc (3 * 65536);
  struct qed_image *img;
  const char *f;

  memset (buf, 0xa5, 3 * 65536);
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
  free (buf);
}

/* Random: data and tables interleaved, frees everywhere, with a model
 * of the contents: compaction moves live clusters and tables. */
static void
test_compaction_random (void)
{
  char *buf = malloc (3 * 65536);
  struct qed_image *img;
  const char *f;
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
  free (buf);
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

/* L2 entry beyond EOF. */
static void
test_check_bad_l2_eof (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  unsigned char *buf = malloc (cs);
  const char *f;
  uint64_t sz;

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
  free (buf);
}

/* Misaligned (reserved low bits set). */
static void
test_check_bad_l2_misaligned (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  const char *f;

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
}

/* Into the header (header_size 2). */
static void
test_check_bad_l2_header (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  const char *f;

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
}

/* Into the L1. */
static void
test_check_bad_l2_l1 (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  const char *f;

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
}

/* Duplicate reference: guest 6 -> guest 1's cluster.  The repair
 * gives the second user a copy; both read guest 1's data. */
static void
test_check_bad_l2_dup (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  unsigned char *buf = malloc (cs);
  const char *f;
  uint64_t sz;

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
  free (buf);
}

/* Duplicate reference to an L2 table (a data entry pointing at the
 * table that maps it). */
static void
test_check_bad_l2_dup_table (void)
{
  struct layout lay;
  struct qed_image *img;
  const char *f;

  f = P ("bad-l2-dup-table.qed");
  REQUIRE (make_populated (f, NULL, &lay, 1) == 0);
  wr64 (f, lay.l2 + 8 * 7, lay.l2);
  img = check_and_repair (f, 1, 1, -1, "", __LINE__);
  REQUIRE (img != NULL);
  check_pattern (img, 7, __LINE__);
  CHECK (qed_close (img) == 0);
  CHECK_CLEAN (f);
  CHECK_QEMU (f);
}

/* L1 entry beyond EOF. */
static void
test_check_bad_l1_eof (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  unsigned char *buf = malloc (cs);
  const char *f;

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
  free (buf);
}

/* L1 entry misaligned, and two L1 entries sharing a table. */
static void
test_check_bad_l1_misc (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  unsigned char *buf = malloc (cs);
  const char *f;

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
  free (buf);
}

/* Leaked clusters at the end. */
static void
test_check_leak_end (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  unsigned char *buf = malloc (cs);
  const char *f;
  uint64_t sz;

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
  free (buf);
}

/* Leaked clusters in the middle: unlink guest clusters 1 and 2. */
static void
test_check_leak_mid (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  unsigned char *buf = malloc (cs);
  const char *f;
  uint64_t sz;

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
  free (buf);
}

/* With a backing file a bad entry becomes a zero cluster (never
 * exposing backing data). */
static void
test_check_bad_l2_backing (void)
{
  const uint32_t cs = 65536;
  struct layout lay;
  struct qed_image *img;
  struct qed_map mp;
  unsigned char *buf = malloc (cs);
  const char *f;

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
  free (buf);
}

/* NEED_CHECK + corruption: a writable open repairs; a read-only open
 * refuses (it cannot repair) and changes nothing. */
static void
test_check_bad_needcheck (void)
{
  struct layout lay;
  struct qed_image *img;
  const char *f;
  uint64_t sz;

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
}

const struct unit_test unit_tests_check[] = {
  { "compaction_below_table", test_compaction_below_table },
  { "compaction_stacked_tables", test_compaction_stacked_tables },
  { "compaction_random", test_compaction_random },
  { "crash", test_crash },
  { "check_bad_l2_eof", test_check_bad_l2_eof },
  { "check_bad_l2_misaligned", test_check_bad_l2_misaligned },
  { "check_bad_l2_header", test_check_bad_l2_header },
  { "check_bad_l2_l1", test_check_bad_l2_l1 },
  { "check_bad_l2_dup", test_check_bad_l2_dup },
  { "check_bad_l2_dup_table", test_check_bad_l2_dup_table },
  { "check_bad_l1_eof", test_check_bad_l1_eof },
  { "check_bad_l1_misc", test_check_bad_l1_misc },
  { "check_leak_end", test_check_leak_end },
  { "check_leak_mid", test_check_leak_mid },
  { "check_bad_l2_backing", test_check_bad_l2_backing },
  { "check_bad_needcheck", test_check_bad_needcheck },
  { NULL, NULL }
};
