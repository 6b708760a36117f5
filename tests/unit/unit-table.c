/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed unit tests: table.c: the L2 cache. */

#include "harness.h"

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

const struct unit_test unit_tests_table[] = {
  { "l2_cache", test_l2_cache },
  { NULL, NULL }
};
