/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the filter's origin guard.
 *
 * A persistent overlay is only right over the origin it was filled
 * from: the clusters it copied must still be what the origin holds, or
 * the guest sees old clusters beside new ones, a disk that never
 * existed.  So the overlay records its origin:
 *
 * - the origin's size in bytes (the plugin's, exactly);
 * - qed-origin-id, a string the user gives (an image version, an ETag)
 *   at the overlay's creation or at the first open that names one;
 * - the plugin export the overlay was made for (each connection must
 *   ask for that export: one overlay holds one disk);
 * - a sample of up to 64 clusters copied from the origin, each with a
 *   fingerprint (FNV-1a, 64 bits) of the origin's bytes: always the
 *   first cluster of the disk once it was copied (file systems rewrite
 *   their superblock on nearly every change), and the 63 others with
 *   the lowest priority (a fixed hash of the cluster index), which is a
 *   uniform sample of what was copied, spread across it, that needs no
 *   count of the copied clusters.
 *
 * At the overlay's open the sampled clusters the overlay still holds
 * are read from the plugin again (at most 64 cluster reads, several at
 * once when the plugin's thread model allows) and compared.
 *
 * The record (the manual's "ORIGIN RECORD" section is the reference)
 * is two slots of 1536 bytes just before the free-cluster list record,
 * at the end of the header clusters, guarded by compat feature bit 0x2:
 * QEMU keeps compat bits it does not know and never writes there, and
 * nothing QEMU does to the overlay can make the record wrong (it is
 * about the origin, not about the overlay's clusters).  A new record
 * goes to the slot that does not hold the current one, and is synced,
 * so that a torn write leaves the previous one.  A sample is written
 * (and synced) before the fill of its cluster, so that a cluster that
 * reached the overlay's disk is covered by a durable sample.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "qed.h"
#include "seam.h"
#include "util.h"
#include "origin.h"

#define SLOT_BYTES    1536u
#define MAX_SAMPLES   64u
#define SAMPLES_AT    64u
#define NAMES_AT      (SAMPLES_AT + MAX_SAMPLES * 16)   /* 1088 */
#define CRC_AT        (SLOT_BYTES - 4)                  /* 1532 */
#define FLAG_HAS_ID   0x1
#define FLAG_DETACHED 0x2
#define VERIFY_THREADS 8
static const char slot_magic[8] = "QEDORIGN";

/* Parameters. */
static char *origin_id;
static enum origin_changed changed_mode = ORIGIN_ERROR;
static bool parallel;

struct sample {
  uint64_t offset;              /* guest offset, cluster aligned */
  uint64_t fp;                  /* fingerprint of the origin's bytes */
};

/* The record in memory (lock). */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static bool active;             /* a record is kept for this overlay */
static uint64_t rec_at;         /* file offset of slot 0 */
static uint64_t generation;
static int cur_slot;            /* the slot holding the current record */
static uint64_t rec_size;
static uint32_t rec_cs;
static bool rec_has_id;
static bool rec_detached;
static char rec_id[ORIGIN_NAMES_MAX + 1];
static char rec_export[ORIGIN_NAMES_MAX + 1];
static struct sample samples[MAX_SAMPLES];
static unsigned nsamples;

int
origin_set_id (const char *id)
{
  if (*id == '\0' || strlen (id) > ORIGIN_ID_MAX) {
    nbdkit_error ("qed-origin-id: the id must have 1 to %u bytes",
                  ORIGIN_ID_MAX);
    return -1;
  }
  free (origin_id);
  origin_id = strdup (id);
  if (origin_id == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  return 0;
}

int
origin_set_changed (const char *value)
{
  if (strcmp (value, "error") == 0)
    changed_mode = ORIGIN_ERROR;
  else if (strcmp (value, "keep") == 0)
    changed_mode = ORIGIN_KEEP;
  else if (strcmp (value, "discard") == 0)
    changed_mode = ORIGIN_DISCARD;
  else {
    nbdkit_error ("qed-origin-changed: expected error, keep or discard, "
                  "not '%s'", value);
    return -1;
  }
  return 0;
}

void
origin_set_parallel (bool p)
{
  parallel = p;
}

void
origin_unload (void)
{
  free (origin_id);
  origin_id = NULL;
}

/* FNV-1a, 64 bits. */
static uint64_t
fingerprint (const void *buf, size_t len)
{
  const unsigned char *p = buf;
  uint64_t h = 0xcbf29ce484222325ULL;

  while (len--) {
    h ^= *p++;
    h *= 0x100000001b3ULL;
  }
  return h;
}

/* The sampling priority of a cluster: the lowest are kept.  The first
 * cluster always has the lowest. */
static uint64_t
priority (uint64_t cluster)
{
  uint64_t z = cluster + 0x9e3779b97f4a7c15ULL;

  if (cluster == 0)
    return 0;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return (z ^ (z >> 31)) | 1;
}

static void
encode_slot (unsigned char *raw)
{
  size_t il = rec_has_id ? strlen (rec_id) : 0, el = strlen (rec_export);

  memset (raw, 0, SLOT_BYTES);
  memcpy (raw, slot_magic, 8);
  put_le64 (raw + 8, generation);
  put_le64 (raw + 16, rec_size);
  put_le32 (raw + 24, rec_cs);
  raw[28] = nsamples & 0xff;
  raw[29] = nsamples >> 8;
  raw[30] = il & 0xff;
  raw[31] = il >> 8;
  raw[32] = el & 0xff;
  raw[33] = el >> 8;
  raw[34] = (rec_has_id ? FLAG_HAS_ID : 0) |
    (rec_detached ? FLAG_DETACHED : 0);
  for (unsigned i = 0; i < nsamples; ++i) {
    put_le64 (raw + SAMPLES_AT + i * 16, samples[i].offset);
    put_le64 (raw + SAMPLES_AT + i * 16 + 8, samples[i].fp);
  }
  memcpy (raw + NAMES_AT, rec_id, il);
  memcpy (raw + NAMES_AT + il, rec_export, el);
  put_le32 (raw + CRC_AT, qed_crc32 (raw, CRC_AT));
}

/* Decode a slot into the globals; false if it is not a valid record. */
static bool
decode_slot (const unsigned char *raw, uint64_t *gen)
{
  unsigned n = raw[28] | raw[29] << 8;
  unsigned il = raw[30] | raw[31] << 8, el = raw[32] | raw[33] << 8;

  if (memcmp (raw, slot_magic, 8) != 0 ||
      get_le32 (raw + CRC_AT) != qed_crc32 (raw, CRC_AT) ||
      n > MAX_SAMPLES || il + el > ORIGIN_NAMES_MAX)
    return false;
  *gen = get_le64 (raw + 8);
  rec_size = get_le64 (raw + 16);
  rec_cs = get_le32 (raw + 24);
  nsamples = n;
  rec_has_id = raw[34] & FLAG_HAS_ID;
  rec_detached = raw[34] & FLAG_DETACHED;
  for (unsigned i = 0; i < n; ++i) {
    samples[i].offset = get_le64 (raw + SAMPLES_AT + i * 16);
    samples[i].fp = get_le64 (raw + SAMPLES_AT + i * 16 + 8);
  }
  memcpy (rec_id, raw + NAMES_AT, il);
  rec_id[il] = '\0';
  memcpy (rec_export, raw + NAMES_AT + il, el);
  rec_export[el] = '\0';
  return true;
}

/* Write the record in memory to the other slot (synced).  lock held. */
static int
write_record (struct qed_image *img)
{
  unsigned char raw[SLOT_BYTES];
  int slot = !cur_slot;

  generation++;
  encode_slot (raw);
  if (qed_header_area_write (img, raw, SLOT_BYTES,
                             rec_at + slot * SLOT_BYTES) == -1) {
    generation--;
    return -1;
  }
  cur_slot = slot;
  return 0;
}

/* Read the record: 1 if there is a valid one, 0 if not, -1 on error. */
static int
read_record (struct qed_image *img)
{
  unsigned char raw[2][SLOT_BYTES];
  uint64_t gen[2];
  bool ok[2];
  int best;

  if (qed_header_area_read (img, raw, sizeof raw, rec_at) == -1)
    return -1;
  ok[1] = decode_slot (raw[1], &gen[1]);
  ok[0] = decode_slot (raw[0], &gen[0]);
  if (!ok[0] && !ok[1])
    return 0;
  best = !ok[0] || (ok[1] && gen[1] > gen[0]);
  decode_slot (raw[best], &generation);
  cur_slot = best;
  return 1;
}

/* Where the record goes: 0 if the header clusters have no room. */
static uint64_t
record_place (struct qed_image *img)
{
  uint64_t s, e;

  qed_header_area_free (img, &s, &e);
  if (e - s < ORIGIN_RECORD_BYTES)
    return 0;
  return e - ORIGIN_RECORD_BYTES;
}

struct verify_job {
  nbdkit_next *next;
  uint64_t cs, size;
  unsigned n, next_i;           /* next_i: atomic */
  unsigned idx[MAX_SAMPLES];    /* which samples to check */
  uint64_t fp[MAX_SAMPLES];     /* the origin's now */
  int err;                      /* atomic: first error */
};

static void *
verify_worker (void *arg)
{
  struct verify_job *j = arg;
  CLEANUP_FREE char *buf = malloc (j->cs);

  if (buf == NULL) {
    __atomic_store_n (&j->err, ENOMEM, __ATOMIC_RELAXED);
    return NULL;
  }
  for (;;) {
    unsigned k = __atomic_fetch_add (&j->next_i, 1, __ATOMIC_RELAXED);
    uint64_t off, len;
    int err = 0;

    if (k >= j->n || __atomic_load_n (&j->err, __ATOMIC_RELAXED))
      break;
    off = samples[j->idx[k]].offset;
    len = MIN (j->cs, j->size - off);
    if (j->next->pread (j->next, buf, len, off, 0, &err) == -1) {
      nbdkit_debug ("origin guard: reading the cluster at %" PRIu64
                    " failed: %s", off, strerror (err ? err : EIO));
      __atomic_store_n (&j->err, err ? err : EIO, __ATOMIC_RELAXED);
      break;
    }
    j->fp[k] = fingerprint (buf, len);
  }
  return NULL;
}

/* Read the sampled clusters the overlay still holds from the origin.
 * Fills j; -1 (error logged) if the origin cannot be read. */
static int
verify_samples (struct qed_image *img, struct verify_job *j)
{
  pthread_t th[VERIFY_THREADS];
  unsigned nt = 0;

  j->n = 0;
  for (unsigned i = 0; i < nsamples; ++i) {
    struct qed_map m;

    if (samples[i].offset >= j->size)
      continue;
    /* A cluster the overlay no longer holds cannot be stale. */
    if (qed_map (img, samples[i].offset, 1, &m) == 0 &&
        m.type == QED_MAP_UNALLOCATED)
      continue;
    j->idx[j->n++] = i;
  }
  if (parallel)
    for (; nt < MIN (j->n, (unsigned) VERIFY_THREADS); ++nt)
      if (pthread_create (&th[nt], NULL, verify_worker, j) != 0)
        break;
  if (nt == 0)
    verify_worker (j);
  for (unsigned t = 0; t < nt; ++t)
    pthread_join (th[t], NULL);
  if (j->err) {
    nbdkit_error ("qed-overlay: %s: cannot read the origin to check that "
                  "it is the one the overlay was made for: %s",
                  qed_get_filename (img), strerror (j->err));
    return -1;
  }
  return 0;
}

static void
set_names (const char *exportname)
{
  rec_has_id = origin_id != NULL;
  snprintf (rec_id, sizeof rec_id, "%s", origin_id ? origin_id : "");
  snprintf (rec_export, sizeof rec_export, "%s", exportname);
}

static int
check_names_fit (const char *exportname)
{
  size_t n = strlen (exportname) + (origin_id ? strlen (origin_id) : 0);

  if (n > ORIGIN_NAMES_MAX) {
    nbdkit_error ("qed-overlay: the export name and qed-origin-id are too "
                  "long for the overlay's origin record (%zu bytes, at "
                  "most %u together)", n, ORIGIN_NAMES_MAX);
    return -1;
  }
  return 0;
}

int
origin_open (struct qed_image *img, nbdkit_next *next, int64_t size,
             const char *exportname)
{
  const char *path = qed_get_filename (img);
  uint64_t cs = qed_get_cluster_size (img);
  struct verify_job j = { .next = next, .cs = cs, .size = size };
  const struct qed_header *h = qed_get_header (img);
  char what[1200];
  unsigned changed = 0, first = 0;
  int r;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  active = false;
  nsamples = 0;
  rec_detached = false;
  rec_at = record_place (img);
  r = rec_at && h->compat_features & QED_CF_ORIGIN ? read_record (img) : 0;
  if (r == -1)
    return -1;
  if (r == 1 && rec_detached) {
    nbdkit_debug ("qed-overlay: %s was detached from its origin "
                  "(qed-detach): it stands alone", path);
    return 2;
  }
  if (check_names_fit (exportname) == -1)
    return -1;
  if (rec_at == 0) {
    qed_warning ("qed-overlay: %s: no room for the origin record in the "
                  "header clusters (a long backing file name): the origin "
                  "is not checked", path);
    return 0;
  }
  if (r == 0 && rec_at && h->compat_features & QED_CF_ORIGIN) {
    /* The bit says there is a record, but neither slot checks out:
     * something else wrote there.  The origin cannot be checked. */
    if (changed_mode == ORIGIN_DISCARD) {
      qed_notice ("qed-overlay: %s: its origin record is damaged: "
                    "discarding the overlay (qed-origin-changed=discard)",
                    path);
      return 1;
    }
    if (changed_mode != ORIGIN_KEEP) {
      nbdkit_error ("qed-overlay: %s: its origin record is damaged, so the "
                    "origin cannot be checked; use qed-origin-changed=keep "
                    "to serve the overlay anyway and record the origin "
                    "afresh, or qed-origin-changed=discard to keep it as "
                    "%s.stale and start a new one", path, path);
      return -1;
    }
    qed_warning ("qed-overlay: %s: its origin record is damaged: a new "
                  "one is made (qed-origin-changed=keep)", path);
  }
  if (r == 0) {
    /* A new overlay, or one made before the record existed (what it
     * holds already is not sampled).  One of another size is refused
     * by the caller: no record for it. */
    if (qed_get_size (img) != ROUND_UP ((uint64_t) size, 512))
      return 0;
    generation = 0;
    cur_slot = 1;
    rec_size = size;
    rec_cs = cs;
    set_names (exportname);
    if (write_record (img) == -1 ||
        qed_update_compat (img, QED_CF_ORIGIN, 0) == -1)
      return -1;
    nbdkit_debug ("qed-overlay: %s: origin record made (size %" PRIi64
                  ", export \"%s\"%s%s)", path, size, exportname,
                  origin_id ? ", id " : "", origin_id ? origin_id : "");
    active = true;
    return 0;
  }

  /* The export is the overlay's identity, not a change of the origin. */
  if (strcmp (rec_export, exportname) != 0) {
    nbdkit_error ("qed-overlay: %s was made for the plugin's export \"%s\", "
                  "not \"%s\": an overlay holds one export's disk (give "
                  "each export its own qed-overlay)", path, rec_export,
                  exportname);
    return -1;
  }

  /* The sample is read even when the id differs, so that keep can
   * record the new origin's fingerprints too. */
  if ((uint64_t) size == rec_size && rec_cs == cs && nsamples > 0) {
    if (verify_samples (img, &j) == -1)
      return -1;
    for (unsigned k = 0; k < j.n; ++k)
      if (j.fp[k] != samples[j.idx[k]].fp) {
        if (changed == 0 ||
            samples[j.idx[k]].offset < samples[j.idx[first]].offset)
          first = k;
        changed++;
      }
  }
  what[0] = '\0';
  if (origin_id && rec_has_id && strcmp (origin_id, rec_id) != 0)
    snprintf (what, sizeof what, "qed-origin-id is \"%s\" but the overlay "
              "was made for \"%s\"", origin_id, rec_id);
  else if ((uint64_t) size != rec_size)
    snprintf (what, sizeof what, "it is an overlay of a %" PRIu64 "-byte "
              "disk, but the plugin's disk is %" PRIi64 " bytes",
              rec_size, size);
  else if (changed)
    snprintf (what, sizeof what, "the origin's cluster at guest offset %"
              PRIu64 " changed (%u of the %u sampled clusters differ)",
              samples[j.idx[first]].offset, changed, j.n);
  else
    nbdkit_debug ("qed-overlay: %s: origin unchanged (%u sampled clusters "
                  "checked)", path, j.n);

  if (what[0] == '\0') {
    active = true;
    if (origin_id && !rec_has_id) {
      /* The first open that names an id records it. */
      set_names (exportname);
      if (write_record (img) == -1)
        return -1;
    }
    return 0;
  }
  if (changed_mode == ORIGIN_DISCARD) {
    qed_notice ("qed-overlay: %s: the origin changed (%s): discarding "
                  "the overlay (qed-origin-changed=discard)", path, what);
    return 1;
  }
  if (changed_mode == ORIGIN_KEEP && (uint64_t) size == rec_size) {
    for (unsigned k = 0; k < j.n; ++k)
      samples[j.idx[k]].fp = j.fp[k];
    set_names (exportname);
    if (write_record (img) == -1)
      return -1;
    qed_warning ("qed-overlay: %s: the origin changed (%s): serving the "
                  "overlay as it is and recording the new origin "
                  "(qed-origin-changed=keep)", path, what);
    active = true;
    return 0;
  }
  if ((uint64_t) size != rec_size)
    nbdkit_error ("qed-overlay: %s: the origin is not the one the overlay "
                  "was made for: %s; serve the origin it was made for, or "
                  "use qed-origin-changed=discard (the overlay is kept as "
                  "%s.stale and a new one started)", path, what, path);
  else
    nbdkit_error ("qed-overlay: %s: the origin is not the one the overlay "
                  "was made for: %s; use qed-origin-changed=keep to serve "
                  "the overlay anyway and record the new origin, or "
                  "qed-origin-changed=discard to keep it as %s.stale and "
                  "start a new one", path, what, path);
  return -1;
}

int
origin_check_export (const char *path, const char *exportname)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  if (active && strcmp (rec_export, exportname) != 0) {
    nbdkit_error ("qed-overlay: %s was made for the plugin's export \"%s\", "
                  "not \"%s\": an overlay holds one export's disk (give "
                  "each export its own qed-overlay)", path, rec_export,
                  exportname);
    return -1;
  }
  return 0;
}

/* Insert cluster c (fingerprint fp) into the sample if its priority
 * is low enough.  true if the sample changed.  lock held. */
static bool
sample_offer (uint64_t off, uint64_t c, uint64_t cs, const char *data,
              uint64_t len)
{
  uint64_t p = priority (c), worst = 0;
  unsigned w = 0;

  for (unsigned i = 0; i < nsamples; ++i) {
    uint64_t q = priority (samples[i].offset / cs);
    if (samples[i].offset == off) {
      samples[i].fp = fingerprint (data, len);
      return true;
    }
    if (q >= worst) {
      worst = q;
      w = i;
    }
  }
  if (nsamples < MAX_SAMPLES)
    w = nsamples++;
  else if (p >= worst)
    return false;
  samples[w].offset = off;
  samples[w].fp = fingerprint (data, len);
  return true;
}

int
origin_note_fill (struct qed_image *img, const char *buf,
                  uint64_t start, uint64_t end, int64_t size)
{
  uint64_t cs = qed_get_cluster_size (img);
  bool dirty = false;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  if (!active || rec_cs != cs)
    return 0;
  for (uint64_t off = start; off < end && off < (uint64_t) size; off += cs) {
    uint64_t c = off / cs, len = MIN (cs, (uint64_t) size - off);
    struct qed_map m;

    if (nsamples == MAX_SAMPLES &&
        priority (c) >= priority (samples[0].offset / cs)) {
      /* A quick "no" for most clusters once the sample is full: only
       * worth the full scan if lower than some sample. */
      uint64_t worst = 0;
      for (unsigned i = 0; i < nsamples; ++i)
        worst = MAX (worst, priority (samples[i].offset / cs));
      if (priority (c) >= worst)
        continue;
    }
    /* A cluster the guest wrote first keeps the guest's data. */
    if (qed_map (img, off, 1, &m) == 0 && m.type != QED_MAP_UNALLOCATED)
      continue;
    dirty |= sample_offer (off, c, cs, buf + (off - start), len);
  }
  if (dirty && write_record (img) == -1)
    return -1;
  return 0;
}

int
origin_discard (struct qed_image *img, const char *path)
{
  const char *slash = strrchr (path, '/');
  CLEANUP_FREE char *dir = NULL, *stale = NULL;
  const char *base;
  uint64_t dev, ino;
  struct stat st;
  int dfd, fd, r = -1;

  if (qed_get_file_id (img, &dev, &ino) == -1) {
    nbdkit_error ("qed-overlay: %s: fstat: %m", path);
    qed_close (img);
    return -1;
  }
  /* A clean stop first: the stale overlay is a clean QED image. */
  if (qed_close (img) == -1) {
    nbdkit_error ("qed-overlay: %s: closing failed: not discarded", path);
    return -1;
  }
  dir = slash == NULL ? strdup (".")
    : slash == path ? strdup ("/") : strndup (path, slash - path);
  base = slash ? slash + 1 : path;
  if (dir == NULL || asprintf (&stale, "%s.stale", base) == -1) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  dfd = open (dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd == -1) {
    nbdkit_error ("qed-overlay: %s: %m", dir);
    return -1;
  }
  /* The name in that directory must be the very file that was opened
   * and checked, not a symbolic link to it. */
  if (fstatat (dfd, base, &st, AT_SYMLINK_NOFOLLOW) == -1 ||
      !S_ISREG (st.st_mode) || st.st_dev != dev || st.st_ino != ino) {
    nbdkit_error ("qed-overlay: %s: not discarded: the name is a symbolic "
                  "link or no longer the overlay that was opened (move "
                  "the overlay aside yourself)", path);
    goto out;
  }
  fd = openat (dfd, base, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd == -1 || fstat (fd, &st) == -1 || st.st_ino != ino ||
      fchmod (fd, 0600) == -1) {
    nbdkit_error ("qed-overlay: %s: cannot make it private (0600): %m",
                  path);
    if (fd >= 0)
      close (fd);
    goto out;
  }
  close (fd);
  /* Replaces an older OVERLAY.stale (a symbolic link there is
   * replaced, never followed). */
  if (renameat (dfd, base, dfd, stale) == -1) {
    nbdkit_error ("qed-overlay: cannot rename %s to %s.stale: %m",
                  path, path);
    goto out;
  }
  fsync (dfd);
  qed_notice ("qed-overlay: the origin changed: %s renamed to %s.stale "
                "(qed-origin-changed=discard); starting a new overlay",
                path, path);
  r = 0;
 out:
  close (dfd);
  return r;
}

int
origin_detach (struct qed_image *img)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  if (!active) {
    nbdkit_debug ("qed-detach: %s has no origin record: not detached",
                  qed_get_filename (img));
    return -1;
  }
  rec_detached = true;
  if (write_record (img) == -1) {
    rec_detached = false;
    return -1;
  }
  active = false;
  return 0;
}

bool
origin_probe_detached (struct qed_image *img)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  rec_detached = false;
  rec_at = record_place (img);
  return rec_at && qed_get_header (img)->compat_features & QED_CF_ORIGIN &&
    read_record (img) == 1 && rec_detached;
}

int
origin_offline_open (struct qed_image *img, const char *exportname,
                     int64_t *size)
{
  const char *path = qed_get_filename (img);
  const struct qed_header *h = qed_get_header (img);
  int r;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  active = false;
  rec_detached = false;
  rec_at = record_place (img);
  r = rec_at && h->compat_features & QED_CF_ORIGIN ? read_record (img) : 0;
  if (r == -1)
    return -1;
  if (r == 0) {
    /* No record: the size rounded up to 512 is all we know. */
    *size = qed_get_size (img);
    return 0;
  }
  if (rec_detached) {
    *size = qed_get_size (img);
    return 2;
  }
  if (strcmp (rec_export, exportname) != 0) {
    nbdkit_error ("qed-overlay: %s was made for the plugin's export \"%s\", "
                  "not \"%s\": an overlay holds one export's disk (give "
                  "each export its own qed-overlay)", path, rec_export,
                  exportname);
    return -1;
  }
  if (ROUND_UP (rec_size, 512) != qed_get_size (img)) {
    nbdkit_error ("qed-overlay: %s: its origin record (%" PRIu64 " bytes) "
                  "does not match its size", path, rec_size);
    return -1;
  }
  *size = rec_size;
  return 0;
}
