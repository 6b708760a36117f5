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
 *
 * Each image that keeps a record (qed-overlay's one overlay, the
 * shared cache, each per-export overlay of qed-overlay-dir) has its
 * own struct origin, made by its owner (origin_new) and freed by it
 * after the image is closed (origin_free).  Lock rule: o->lock guards
 * every field of o; each public function that takes an origin holds it
 * for its whole run, and takes the image's own locks (qed_map, header
 * writes) inside it, never the other way round.  qed-detach's scan
 * (origin_poll_detach) holds o->detach_lock, taken before o->lock.  Two origins never
 * lock each other.  The parameters (qed-origin-id, qed-origin-changed,
 * the thread model) are set before any client and only read after.
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

/* The record in memory of one image (lock). */
struct origin {
  pthread_mutex_t lock;
  bool active;                  /* a record is kept for this overlay */
  uint64_t rec_at;              /* file offset of slot 0 */
  uint64_t generation;
  int cur_slot;                 /* the slot holding the current record */
  uint64_t rec_size;
  uint32_t rec_cs;
  bool rec_has_id;
  bool rec_detached;
  char rec_id[ORIGIN_NAMES_MAX + 1];
  char rec_export[ORIGIN_NAMES_MAX + 1];
  struct sample samples[MAX_SAMPLES];
  unsigned nsamples;
  /* qed-detach: the image stands alone (atomic; written under
   * detach_lock), and every cluster before detach_cursor is in it
   * (detach_lock, taken before lock). */
  bool detached;
  pthread_mutex_t detach_lock;
  uint64_t detach_cursor;
};

struct origin *
origin_new (void)
{
  struct origin *o = calloc (1, sizeof *o);

  if (o == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  pthread_mutex_init (&o->lock, NULL);
  pthread_mutex_init (&o->detach_lock, NULL);
  return o;
}

void
origin_free (struct origin *o)
{
  if (o) {
    pthread_mutex_destroy (&o->lock);
    pthread_mutex_destroy (&o->detach_lock);
    free (o);
  }
}

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
encode_slot (const struct origin *o, unsigned char *raw)
{
  size_t il = o->rec_has_id ? strlen (o->rec_id) : 0;
  size_t el = strlen (o->rec_export);

  memset (raw, 0, SLOT_BYTES);
  memcpy (raw, slot_magic, 8);
  put_le64 (raw + 8, o->generation);
  put_le64 (raw + 16, o->rec_size);
  put_le32 (raw + 24, o->rec_cs);
  raw[28] = o->nsamples & 0xff;
  raw[29] = o->nsamples >> 8;
  raw[30] = il & 0xff;
  raw[31] = il >> 8;
  raw[32] = el & 0xff;
  raw[33] = el >> 8;
  raw[34] = (o->rec_has_id ? FLAG_HAS_ID : 0) |
    (o->rec_detached ? FLAG_DETACHED : 0);
  for (unsigned i = 0; i < o->nsamples; ++i) {
    put_le64 (raw + SAMPLES_AT + i * 16, o->samples[i].offset);
    put_le64 (raw + SAMPLES_AT + i * 16 + 8, o->samples[i].fp);
  }
  memcpy (raw + NAMES_AT, o->rec_id, il);
  memcpy (raw + NAMES_AT + il, o->rec_export, el);
  put_le32 (raw + CRC_AT, qed_crc32 (raw, CRC_AT));
}

/* Decode a slot into o; false if it is not a valid record. */
static bool
decode_slot (struct origin *o, const unsigned char *raw, uint64_t *gen)
{
  unsigned n = raw[28] | raw[29] << 8;
  unsigned il = raw[30] | raw[31] << 8, el = raw[32] | raw[33] << 8;

  if (memcmp (raw, slot_magic, 8) != 0 ||
      get_le32 (raw + CRC_AT) != qed_crc32 (raw, CRC_AT) ||
      n > MAX_SAMPLES || il + el > ORIGIN_NAMES_MAX)
    return false;
  *gen = get_le64 (raw + 8);
  o->rec_size = get_le64 (raw + 16);
  o->rec_cs = get_le32 (raw + 24);
  o->nsamples = n;
  o->rec_has_id = raw[34] & FLAG_HAS_ID;
  o->rec_detached = raw[34] & FLAG_DETACHED;
  for (unsigned i = 0; i < n; ++i) {
    o->samples[i].offset = get_le64 (raw + SAMPLES_AT + i * 16);
    o->samples[i].fp = get_le64 (raw + SAMPLES_AT + i * 16 + 8);
  }
  memcpy (o->rec_id, raw + NAMES_AT, il);
  o->rec_id[il] = '\0';
  memcpy (o->rec_export, raw + NAMES_AT + il, el);
  o->rec_export[el] = '\0';
  return true;
}

/* Write the record in memory to the other slot (synced).  o->lock
 * held. */
static int
write_record (struct origin *o, struct qed_image *img)
{
  unsigned char raw[SLOT_BYTES];
  int slot = !o->cur_slot;

  o->generation++;
  encode_slot (o, raw);
  if (qed_header_area_write (img, raw, SLOT_BYTES,
                             o->rec_at + slot * SLOT_BYTES) == -1) {
    o->generation--;
    return -1;
  }
  o->cur_slot = slot;
  return 0;
}

/* Read the record: 1 if there is a valid one, 0 if not, -1 on error. */
static int
read_record (struct origin *o, struct qed_image *img)
{
  unsigned char raw[2][SLOT_BYTES];
  uint64_t gen[2];
  bool ok[2];
  int best;

  if (qed_header_area_read (img, raw, sizeof raw, o->rec_at) == -1)
    return -1;
  ok[1] = decode_slot (o, raw[1], &gen[1]);
  ok[0] = decode_slot (o, raw[0], &gen[0]);
  if (!ok[0] && !ok[1])
    return 0;
  best = !ok[0] || (ok[1] && gen[1] > gen[0]);
  decode_slot (o, raw[best], &o->generation);
  o->cur_slot = best;
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

/* Forget what o knew and read img's record: 1 if there is a valid one,
 * 0 if not, -1 on error.  o->lock held. */
static int
load_record (struct origin *o, struct qed_image *img)
{
  const struct qed_header *h = qed_get_header (img);

  o->active = false;
  o->nsamples = 0;
  o->rec_detached = false;
  __atomic_store_n (&o->detached, false, __ATOMIC_RELEASE);
  o->detach_cursor = 0;
  o->rec_at = record_place (img);
  if (o->rec_at == 0 || !(h->compat_features & QED_CF_ORIGIN))
    return 0;
  return read_record (o, img);
}

struct verify_job {
  nbdkit_next *next;
  const struct origin *o;
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
    off = j->o->samples[j->idx[k]].offset;
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
 * Fills j; -1 (error logged) if the origin cannot be read.  o->lock
 * held. */
static int
verify_samples (struct origin *o, struct qed_image *img,
                struct verify_job *j)
{
  pthread_t th[VERIFY_THREADS];
  unsigned nt = 0;

  j->n = 0;
  for (unsigned i = 0; i < o->nsamples; ++i) {
    struct qed_map m;

    if (o->samples[i].offset >= j->size)
      continue;
    /* A cluster the overlay no longer holds cannot be stale. */
    if (qed_map (img, o->samples[i].offset, 1, &m) == 0 &&
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
set_names (struct origin *o, const char *exportname)
{
  o->rec_has_id = origin_id != NULL;
  snprintf (o->rec_id, sizeof o->rec_id, "%s", origin_id ? origin_id : "");
  snprintf (o->rec_export, sizeof o->rec_export, "%s", exportname);
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

static int
export_mismatch (const char *path, const char *recorded,
                 const char *exportname)
{
  nbdkit_error ("qed-overlay: %s was made for the plugin's export \"%s\", "
                "not \"%s\": an overlay holds one export's disk (give "
                "each export its own qed-overlay)", path, recorded,
                exportname);
  return -1;
}

/* The bit says there is a record, but neither slot checks out:
 * something else wrote there, so the origin cannot be checked.  1 to
 * discard, 0 to make a new record (keep), -1 refused. */
static int
open_damaged (const char *path)
{
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
  return 0;
}

/* A new overlay, or one made before the record existed (what it holds
 * already is not sampled): make its record.  One of another size is
 * refused by the caller: no record for it.  o->lock held. */
static int
open_new (struct origin *o, struct qed_image *img, int64_t size,
          const char *exportname)
{
  if (qed_get_size (img) != ROUND_UP ((uint64_t) size, 512))
    return 0;
  o->generation = 0;
  o->cur_slot = 1;
  o->rec_size = size;
  o->rec_cs = qed_get_cluster_size (img);
  set_names (o, exportname);
  if (write_record (o, img) == -1 ||
      qed_update_compat (img, QED_CF_ORIGIN, 0) == -1)
    return -1;
  nbdkit_debug ("qed-overlay: %s: origin record made (size %" PRIi64
                ", export \"%s\"%s%s)", qed_get_filename (img), size,
                exportname, origin_id ? ", id " : "",
                origin_id ? origin_id : "");
  o->active = true;
  return 0;
}

/* Compare the origin with the record: what (empty if nothing) says
 * what changed.  The sample is read even when the id differs, so that
 * keep can record the new origin's fingerprints too.  -1 if the origin
 * cannot be read.  o->lock held. */
static int
compare (struct origin *o, struct qed_image *img, struct verify_job *j,
         char *what, size_t what_len)
{
  unsigned changed = 0, first = 0;

  if (j->size == o->rec_size && o->rec_cs == j->cs && o->nsamples > 0) {
    if (verify_samples (o, img, j) == -1)
      return -1;
    for (unsigned k = 0; k < j->n; ++k)
      if (j->fp[k] != o->samples[j->idx[k]].fp) {
        if (changed == 0 ||
            o->samples[j->idx[k]].offset < o->samples[j->idx[first]].offset)
          first = k;
        changed++;
      }
  }
  what[0] = '\0';
  if (origin_id && o->rec_has_id && strcmp (origin_id, o->rec_id) != 0)
    snprintf (what, what_len, "qed-origin-id is \"%s\" but the overlay "
              "was made for \"%s\"", origin_id, o->rec_id);
  else if (j->size != o->rec_size)
    snprintf (what, what_len, "it is an overlay of a %" PRIu64 "-byte "
              "disk, but the plugin's disk is %" PRIu64 " bytes",
              o->rec_size, j->size);
  else if (changed)
    snprintf (what, what_len, "the origin's cluster at guest offset %"
              PRIu64 " changed (%u of the %u sampled clusters differ)",
              o->samples[j->idx[first]].offset, changed, j->n);
  else
    nbdkit_debug ("qed-overlay: %s: origin unchanged (%u sampled clusters "
                  "checked)", qed_get_filename (img), j->n);
  return 0;
}

/* The origin changed (what): act as qed-origin-changed says.  0 to
 * serve (keep), 1 to discard, -1 refused.  o->lock held. */
static int
open_changed (struct origin *o, struct qed_image *img,
              const struct verify_job *j, const char *exportname,
              const char *what)
{
  const char *path = qed_get_filename (img);

  if (changed_mode == ORIGIN_DISCARD) {
    qed_notice ("qed-overlay: %s: the origin changed (%s): discarding "
                "the overlay (qed-origin-changed=discard)", path, what);
    return 1;
  }
  if (changed_mode == ORIGIN_KEEP && j->size == o->rec_size) {
    for (unsigned k = 0; k < j->n; ++k)
      o->samples[j->idx[k]].fp = j->fp[k];
    set_names (o, exportname);
    if (write_record (o, img) == -1)
      return -1;
    qed_warning ("qed-overlay: %s: the origin changed (%s): serving the "
                 "overlay as it is and recording the new origin "
                 "(qed-origin-changed=keep)", path, what);
    o->active = true;
    return 0;
  }
  if (j->size != o->rec_size)
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
origin_open (struct origin *o, struct qed_image *img, nbdkit_next *next,
             int64_t size, const char *exportname)
{
  const char *path = qed_get_filename (img);
  struct verify_job j = { .next = next, .o = o, .size = size,
                          .cs = qed_get_cluster_size (img) };
  bool damaged;
  char what[1200];
  int r;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  r = load_record (o, img);
  if (r == -1)
    return -1;
  if (r == 1 && o->rec_detached) {
    __atomic_store_n (&o->detached, true, __ATOMIC_RELEASE);
    nbdkit_debug ("qed-overlay: %s was detached from its origin "
                  "(qed-detach): it stands alone", path);
    return 2;
  }
  if (check_names_fit (exportname) == -1)
    return -1;
  if (o->rec_at == 0) {
    qed_warning ("qed-overlay: %s: no room for the origin record in the "
                 "header clusters (a long backing file name): the origin "
                 "is not checked", path);
    return 0;
  }
  damaged = r == 0 && qed_get_header (img)->compat_features & QED_CF_ORIGIN;
  if (damaged && (r = open_damaged (path)) != 0)
    return r;
  if (r == 0)
    return open_new (o, img, size, exportname);

  /* The export is the overlay's identity, not a change of the origin. */
  if (strcmp (o->rec_export, exportname) != 0)
    return export_mismatch (path, o->rec_export, exportname);
  if (compare (o, img, &j, what, sizeof what) == -1)
    return -1;
  if (what[0] != '\0')
    return open_changed (o, img, &j, exportname, what);
  o->active = true;
  if (origin_id && !o->rec_has_id) {
    /* The first open that names an id records it. */
    set_names (o, exportname);
    if (write_record (o, img) == -1)
      return -1;
  }
  return 0;
}

int
origin_check_export (struct origin *o, const char *path,
                     const char *exportname)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  if (o->active && strcmp (o->rec_export, exportname) != 0)
    return export_mismatch (path, o->rec_export, exportname);
  return 0;
}

/* Insert cluster c (fingerprint fp) into the sample if its priority
 * is low enough.  true if the sample changed.  o->lock held. */
static bool
sample_offer (struct origin *o, uint64_t off, uint64_t c, uint64_t cs,
              const char *data, uint64_t len)
{
  uint64_t p = priority (c), worst = 0;
  unsigned w = 0;

  for (unsigned i = 0; i < o->nsamples; ++i) {
    uint64_t q = priority (o->samples[i].offset / cs);
    if (o->samples[i].offset == off) {
      o->samples[i].fp = fingerprint (data, len);
      return true;
    }
    if (q >= worst) {
      worst = q;
      w = i;
    }
  }
  if (o->nsamples < MAX_SAMPLES)
    w = o->nsamples++;
  else if (p >= worst)
    return false;
  o->samples[w].offset = off;
  o->samples[w].fp = fingerprint (data, len);
  return true;
}

/* Could cluster c enter the full sample?  A quick "no" for most
 * clusters: only worth a map lookup if lower than some sample. */
static bool
sample_may_take (const struct origin *o, uint64_t c, uint64_t cs)
{
  uint64_t worst = 0;

  if (o->nsamples < MAX_SAMPLES ||
      priority (c) < priority (o->samples[0].offset / cs))
    return true;
  for (unsigned i = 0; i < o->nsamples; ++i)
    worst = MAX (worst, priority (o->samples[i].offset / cs));
  return priority (c) < worst;
}

int
origin_note_fill (struct origin *o, struct qed_image *img, const char *buf,
                  uint64_t start, uint64_t end, int64_t size)
{
  uint64_t cs = qed_get_cluster_size (img);
  bool dirty = false;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  if (!o->active || o->rec_cs != cs)
    return 0;
  for (uint64_t off = start; off < end && off < (uint64_t) size; off += cs) {
    uint64_t c = off / cs, len = MIN (cs, (uint64_t) size - off);
    struct qed_map m;

    if (!sample_may_take (o, c, cs))
      continue;
    /* A cluster the guest wrote first keeps the guest's data. */
    if (qed_map (img, off, 1, &m) == 0 && m.type != QED_MAP_UNALLOCATED)
      continue;
    dirty |= sample_offer (o, off, c, cs, buf + (off - start), len);
  }
  if (dirty && write_record (o, img) == -1)
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
origin_detach (struct origin *o, struct qed_image *img)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  if (!o->active) {
    nbdkit_debug ("qed-detach: %s has no origin record: not detached",
                  qed_get_filename (img));
    return -1;
  }
  o->rec_detached = true;
  if (write_record (o, img) == -1) {
    o->rec_detached = false;
    return -1;
  }
  o->active = false;
  return 0;
}

bool
origin_probe_detached (struct qed_image *img)
{
  struct origin *o = origin_new ();
  bool r;

  if (o == NULL)
    return false;
  r = load_record (o, img) == 1 && o->rec_detached;
  origin_free (o);
  return r;
}

int
origin_offline_open (struct origin *o, struct qed_image *img,
                     const char *exportname, int64_t *size)
{
  const char *path = qed_get_filename (img);
  int r;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
  r = load_record (o, img);
  if (r == -1)
    return -1;
  if (r == 0) {
    /* No record: the size rounded up to 512 is all we know. */
    *size = qed_get_size (img);
    return 0;
  }
  if (o->rec_detached) {
    __atomic_store_n (&o->detached, true, __ATOMIC_RELEASE);
    *size = qed_get_size (img);
    return 2;
  }
  if (strcmp (o->rec_export, exportname) != 0)
    return export_mismatch (path, o->rec_export, exportname);
  if (ROUND_UP (o->rec_size, 512) != qed_get_size (img)) {
    nbdkit_error ("qed-overlay: %s: its origin record (%" PRIu64 " bytes) "
                  "does not match its size", path, o->rec_size);
    return -1;
  }
  *size = o->rec_size;
  return 0;
}

bool
origin_is_detached (const struct origin *o)
{
  return o && __atomic_load_n (&o->detached, __ATOMIC_ACQUIRE);
}

/* qed-detach: once every cluster is in img, remove the origin from its
 * header (one synced header write) and never read the plugin again.
 * Cheap to call after every change: the scan goes on from where the
 * last one stopped (clusters in the image stay there: with a backing
 * file, zero and trim make zero clusters).  true if it detached now. */
bool
origin_poll_detach (struct origin *o, struct qed_image *img)
{
  uint64_t isize = qed_get_size (img);
  bool done = false;

  if (origin_is_detached (o))
    return false;
  /* Not a trylock: the fill that completes the image must see it. */
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->detach_lock);
  if (origin_is_detached (o))
    return false;               /* another thread did it meanwhile */
  while (o->detach_cursor < isize) {
    struct qed_map m;

    if (qed_map (img, o->detach_cursor, isize - o->detach_cursor,
                 &m) == -1 || m.type == QED_MAP_UNALLOCATED)
      break;
    o->detach_cursor += m.length;
  }
  if (o->detach_cursor >= isize) {
    errno = 0;
    /* The record's mark is the commit point; the header write after it
     * is for other readers (a crash in between: done at the next
     * open). */
    if (origin_detach (o, img) == 0 && qed_detach_backing (img, 0) == 0) {
      __atomic_store_n (&o->detached, true, __ATOMIC_RELEASE);
      done = true;
    }
  }
  return done;
}
