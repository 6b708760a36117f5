/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed unit tests: the read and write paths (map.c, write.c) against
 * a model, random operations. */

#include "harness.h"

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

/* One random write of [off, off+len) (model bytes at mp): zeros, data
 * with zero clusters inside, or data; sometimes zero detection, FUA. */
static void
model_write (struct model *m, unsigned char *buf, unsigned char *mp,
             uint64_t off, uint64_t len)
{
  uint32_t cs = m->cs;
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
  if (qed_write (m->img, below_of (m), buf, len, off, flags) == -1) {
    failures++;
    fprintf (stderr, "%s:%d: FAIL: write %" PRIu64 "@%" PRIu64 ": %m\n",
             __FILE__, __LINE__, len, off);
  }
  else
    memcpy (mp, buf, len);
}

/* A zero request, sometimes fast (which may refuse) or with FUA. */
static void
model_zero (struct model *m, struct window *win, unsigned char *mp,
            uint64_t off, uint64_t len)
{
  unsigned flags = rnd_below (2) ? QED_ZERO_MAY_UNMAP : 0;
  int r;
  if (rnd_below (6) == 0)
    flags |= QED_ZERO_FAST;
  if (rnd_below (8) == 0)
    flags |= QED_WRITE_FUA;
  r = qed_zero (m->img, below_of (m), len, off, flags);
  if (r == 0)
    memset (mp, 0, len);
  else if (errno == ENOTSUP && (flags & QED_ZERO_FAST))
    model_readback_old_or_zero (m, win, off, len, __LINE__);
  else {
    checks++;
    failures++;
    fprintf (stderr, "%s:%d: FAIL: zero %" PRIu64 "@%" PRIu64 ": %m\n",
             __FILE__, __LINE__, len, off);
  }
}

/* A trim: the range then reads as before or as zeros. */
static void
model_trim (struct model *m, struct window *win, uint64_t off, uint64_t len)
{
  checks++;
  if (qed_trim (m->img, below_of (m), len, off, 0) == -1) {
    failures++;
    fprintf (stderr, "%s:%d: FAIL: trim: %m\n", __FILE__, __LINE__);
  }
  else
    model_readback_old_or_zero (m, win, off, len, __LINE__);
}

/* The idle writeback: it clears NEED_CHECK unless freed clusters await
 * compaction. */
static void
model_idle (struct model *m)
{
  struct qed_stats st;
  CHECK (qed_idle (m->img) == 0);
  /* Idle clears NEED_CHECK unless freed clusters await compaction. */
  qed_get_stats (m->img, &st);
  CHECK (st.free_clusters > 0 || !need_check_set (m->path));
}

/* A read, compared with the model. */
static void
model_read (struct model *m, const char *name, int op, unsigned char *buf,
            const unsigned char *mp, uint64_t off, uint64_t len)
{
  checks++;
  if (qed_read (m->img, below_of (m), buf, len, off) == -1) {
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
      model_write (&m, buf, mp, off, len);
      counts[0]++;
    }
    else if (kind < 50) {       /* zero */
      model_zero (&m, win, mp, off, len);
      counts[1]++;
    }
    else if (kind < 60) {       /* trim */
      model_trim (&m, win, off, len);
      counts[2]++;
    }
    else if (kind < 64) {       /* flush */
      CHECK (qed_flush (m.img) == 0);
      counts[3]++;
    }
    else if (kind < 67) {       /* idle: may clear NEED_CHECK */
      model_idle (&m);
      counts[4]++;
    }
    else if (kind < 70) {
      CHECK (qed_prefetch (m.img, below_of (&m), len, off) == 0);
    }
    else {                      /* read */
      model_read (&m, name, op, buf, mp, off, len);
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

const struct unit_test unit_tests_model[] = {
  { "model", test_model },
  { NULL, NULL }
};
