/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed unit tests: image.c: create and the fields open sets. */

#include "harness.h"

/* ------------------------------------------------------------------ */
/* Create. */

/* A new image of the default geometry: the header, a zero L1, and
 * QEMU's check; an existing file is refused. */
static void
test_create_defaults (void)
{
  const char *f = P ("create.qed");
  struct qed_create_options o = { .size = UINT64_C (1) << 30 };
  unsigned char raw[QED_HEADER_BYTES];
  struct qed_header h;

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
}

/* Backing name at 64, bits set. */
static void
test_create_backing_name (void)
{
  const char *g = P ("create-b.qed");
  struct qed_create_options o = { .size = UINT64_C (1) << 30 };
  unsigned char raw[QED_HEADER_BYTES], name[16];
  struct qed_header h;
  struct qed_image *img;

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
}

/* Geometries QEMU cannot open are refused unless allowed. */
static void
test_create_qemu_geometries (void)
{
  struct qed_create_options o;

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
}

/* Bad parameters, names too long for the header, and size 0. */
static void
test_create_bad_parameters (void)
{
  struct qed_create_options o;
  struct qed_image *img;

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

const struct unit_test unit_tests_image[] = {
  { "create_defaults", test_create_defaults },
  { "create_backing_name", test_create_backing_name },
  { "create_qemu_geometries", test_create_qemu_geometries },
  { "create_bad_parameters", test_create_bad_parameters },
  { "open_fields", test_open_fields },
  { NULL, NULL }
};
