/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed unit tests: header.c: encoding, validation, the maximum size. */

#include "harness.h"

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

const struct unit_test unit_tests_header[] = {
  { "header_roundtrip", test_header_roundtrip },
  { "header_validate", test_header_validate },
  { "max_size", test_max_size },
  { NULL, NULL }
};
