/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed unit tests: write.c: copy-on-read fills, punch and reuse. */

#include "harness.h"

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

const struct unit_test unit_tests_write[] = {
  { "fill", test_fill },
  { "punch_reuse", test_punch_reuse },
  { NULL, NULL }
};
