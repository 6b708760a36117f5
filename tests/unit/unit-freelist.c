/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed unit tests: freelist.c: the free-cluster list, and hostile
 * lists. */

#include "harness.h"

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

const struct unit_test unit_tests_freelist[] = {
  { "freelist", test_freelist },
  { "freelist_hostile", test_freelist_hostile },
  { NULL, NULL }
};
