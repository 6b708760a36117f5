/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed unit tests: backing.c: backing chains. */

#include "harness.h"

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


/* Raw backing shorter than the image, relative name resolved against
 * the overlay's directory (not the cwd). */
static void
test_chain_raw_shorter (void)
{
  struct qed_chain_options co = { .follow = true };
  struct qed_create_options o = { .size = 1 << 20 };
  struct qed_image *img;
  struct qed_chain *ch;
  struct qed_below b;
  struct qed_map mp;
  unsigned char *buf = malloc (1 << 20);
  bool none;
  char cwd[4096];

  REQUIRE (mkdir (P ("sub"), 0755) == 0);
  write_pattern_file (P ("sub/short.raw"), 100000, 1);
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
  free (buf);
}

/* QED backing over raw: top -> mid.qed -> base.raw (probed). */
static void
test_chain_qed_over_raw (void)
{
  struct qed_chain_options co = { .follow = true };
  struct qed_create_options o = { .size = 1 << 20 };
  struct qed_image *img, *mid;
  struct qed_chain *ch;
  struct qed_below b;
  struct qed_map mp;
  unsigned char *buf = malloc (1 << 20);
  bool none;

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
  free (buf);
}

/* No backing file. */
static void
test_chain_nobacking (void)
{
  struct qed_chain_options co = { .follow = true };
  struct qed_image *img;
  bool none;

  REQUIRE (create_img (P ("nobacking.qed"), 1 << 20, 0, 0) == 0);
  img = open_ro (P ("nobacking.qed"));
  REQUIRE (img != NULL);
  CHECK (qed_chain_open (img, &co, &none) == NULL && none);
  qed_close (img);
}

/* Loops: A -> B -> A, and A -> A. */
static void
test_chain_loops (void)
{
  struct qed_chain_options co = { .follow = true };
  struct qed_create_options o = { .size = 1 << 20 };
  struct qed_image *img;
  bool none;

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
}

/* qcow2 backing refused; missing backing file. */
static void
test_chain_bad_layers (void)
{
  struct qed_chain_options co = { .follow = true };
  struct qed_create_options o = { .size = 1 << 20 };
  struct qed_image *img;
  bool none;

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
}

const struct unit_test unit_tests_backing[] = {
  { "chain_raw_shorter", test_chain_raw_shorter },
  { "chain_qed_over_raw", test_chain_qed_over_raw },
  { "chain_nobacking", test_chain_nobacking },
  { "chain_loops", test_chain_loops },
  { "chain_bad_layers", test_chain_bad_layers },
  { NULL, NULL }
};
