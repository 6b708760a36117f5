/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed unit tests: map.c: qed_map runs. */

#include "harness.h"

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

const struct unit_test unit_tests_map[] = {
  { "map", test_map },
  { NULL, NULL }
};
