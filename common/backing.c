/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: backing files, for the plugin.
 *
 * Beneath an image lies a chain of layers, each a raw file or a QED
 * image, all opened read-only.  Relative names resolve against the
 * directory of the image that names them (as QEMU does).  A layer
 * reads as zeros past its end.  Loops are found by device and inode.
 * The stored format is used when NO_PROBE says raw; otherwise the file
 * is probed by its magic, like QEMU.
 *
 * Each file is opened as the owner of the image that names it, and
 * devices, pseudo file systems and magic links are refused
 * (safe-open.c); with follow-backing=beneath every name must resolve
 * beneath the top image's directory.  A file the user named
 * (backing-override) is opened as the server.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <unistd.h>
#include <sys/stat.h>

#include "qed-internal.h"
#include "safe-open.h"
#include "seam.h"
#include "util.h"

struct layer {
  char *path;
  int fd;                       /* raw layers */
  uint64_t size;
  struct qed_image *qed;        /* QED layers */
  struct layer *below;
  struct qed_below below_ops;   /* how a QED layer reads its below */
};

struct qed_chain {
  struct layer *top;
  char *desc;
};

struct visited {
  dev_t dev;
  ino_t ino;
  const struct visited *next;
};

static int
layer_read (void *opaque, void *buf, uint64_t count, uint64_t offset)
{
  struct layer *l = opaque;
  uint64_t n = offset < l->size ? MIN (count, l->size - offset) : 0;

  if (n < count)
    memset ((char *) buf + n, 0, count - n);
  if (n == 0)
    return 0;
  if (l->qed)
    return qed_read (l->qed, l->below ? &l->below_ops : NULL, buf, n, offset);
  if (pread_full (l->fd, buf, n, offset) == -1) {
    qed_error ("backing file %s: read at 0x%" PRIx64 ": %m", l->path, offset);
    return -1;
  }
  return 0;
}

static int
layer_prefetch (void *opaque, uint64_t count, uint64_t offset)
{
  struct layer *l = opaque;

  if (offset >= l->size)
    return 0;
  count = MIN (count, l->size - offset);
  if (l->qed)
    return qed_prefetch (l->qed, l->below ? &l->below_ops : NULL,
                         count, offset);
  qed_io_advise (l->fd, offset, count);
  return 0;
}

static void
layer_free (struct layer *l)
{
  while (l) {
    struct layer *below = l->below;
    if (l->qed)
      qed_close (l->qed);
    if (l->fd >= 0)
      qed_io_close (l->fd);
    free (l->path);
    free (l);
    l = below;
  }
}

/* name relative to the directory of `base`. */
static char *
resolve (const char *base, const char *name)
{
  const char *slash = strrchr (base, '/');
  char *r;

  if (name[0] == '/' || slash == NULL)
    return strdup (name);
  if (asprintf (&r, "%.*s/%s", (int) (slash - base), base, name) == -1)
    return NULL;
  return r;
}

/* One walk down the chain. */
struct walk {
  const struct qed_chain_options *o;
  int dirfd;                    /* follow-backing=beneath: the top's dir */
  char *dir;                    /* its name */
};

/* Who names a backing file. */
struct namer {
  const char *path;             /* the image naming it */
  uid_t uid;                    /* its owner */
  gid_t gid;
};

static struct layer *open_layer (const struct walk *w, const char *path,
                                 int format, const struct namer *namer,
                                 const struct visited *seen);

/* path (resolved as QEMU does) relative to the walk's directory, for
 * openat2 RESOLVE_BENEATH; an absolute path elsewhere stays as it is,
 * and is refused. */
static const char *
beneath_name (const struct walk *w, const char *path)
{
  size_t len = strlen (w->dir);

  if (strcmp (w->dir, "/") == 0 && path[0] == '/')
    return path + 1;
  if (strncmp (path, w->dir, len) == 0 && path[len] == '/')
    return path + len + 1;
  return path;                  /* relative to "." already, or refused */
}

/* Open what lies beneath the QED layer `l` (whose own file is `st`). */
static int
open_below (const struct walk *w, struct layer *l, const char *name,
            bool raw, const struct namer *namer, const struct visited *seen)
{
  CLEANUP_FREE char *bpath = NULL;

  if (!w->o->follow) {
    qed_error ("%s names a backing file (%s) but following backing files "
               "is disabled (follow-backing=false)", l->path, name);
    errno = EPERM;
    return -1;
  }
  bpath = resolve (l->path, name);
  if (bpath == NULL) {
    qed_error ("malloc: %m");
    return -1;
  }
  l->below = open_layer (w, bpath, raw ? QED_FORMAT_RAW : QED_FORMAT_PROBE,
                         namer, seen);
  if (l->below == NULL)
    return -1;
  l->below_ops.read = layer_read;
  l->below_ops.prefetch = layer_prefetch;
  l->below_ops.opaque = l->below;
  return 0;
}

/* Open the file of a layer.  namer == NULL: the user named it
 * (backing-override), so it is opened as the server. */
static int
open_layer_file (const struct walk *w, const char *path,
                 const struct namer *namer, struct stat *st)
{
  struct qed_backing_open bo = {
    .path = path, .dirfd = AT_FDCWD, .name = path, .devices = w->o->devices,
  };

  if (namer) {
    bo.as_owner = true;
    bo.uid = namer->uid;
    bo.gid = namer->gid;
    if (w->dirfd >= 0) {
      bo.beneath = true;
      bo.dirfd = w->dirfd;
      bo.name = beneath_name (w, path);
    }
  }
  return qed_open_backing (&bo, st);
}

/* Probe the format of a layer by its magic. */
static int
probe_format (struct layer *l)
{
  unsigned char magic[4] = { 0 };

  if (pread_zeros_past_eof (l->fd, magic, 4, 0) == -1) {
    qed_error ("backing file %s: read: %m", l->path);
    return -1;
  }
  if (memcmp (magic, "QED\0", 4) == 0)
    return QED_FORMAT_QED;
  if (memcmp (magic, "QFI\xfb", 4) == 0) {
    qed_error ("backing file %s is a qcow2 image: only raw and QED "
               "backing files are supported", l->path);
    errno = ENOTSUP;
    return -1;
  }
  return QED_FORMAT_RAW;
}

static bool warned_probe;

/* Open the QED layer l, whose file is open as l->fd (taken over). */
static int
open_qed_layer (const struct walk *w, struct layer *l, bool probed,
                const struct namer *namer, const struct stat *st,
                const struct visited *me)
{
  struct qed_open_options oo = { .readonly = true,
                                 .l2_cache_bytes = w->o->l2_cache_bytes,
                                 .locking = w->o->locking,
                                 .backing_layer = true,
                                 .use_fd = true, .fd = l->fd };
  struct namer next = { .path = l->path,
                        .uid = st->st_uid, .gid = st->st_gid };
  const char *name;

  l->fd = -1;
  l->qed = qed_open (l->path, &oo);
  if (l->qed == NULL)
    return -1;
  l->size = qed_get_size (l->qed);
  name = qed_get_backing_name (l->qed);
  if (name == NULL)
    return 0;
  /* A raw disk holding a QED header (a guest can write one) would be
   * taken for a QED image here, and its name followed.  Said once: the
   * plugin opens the chain at start-up and again for its first client. */
  if (probed && namer && !__atomic_test_and_set (&warned_probe,
                                                 __ATOMIC_RELAXED))
    qed_error ("warning: %s names %s without a format, which was probed "
               "as QED and names a backing file of its own (%s); if %s is "
               "a raw disk, record that: qemu-img rebase -u -f qed -F raw "
               "-b %s %s", namer->path, l->path, name, l->path, l->path,
               namer->path);
  return open_below (w, l, name, qed_get_backing_raw (l->qed), &next, me);
}

static struct layer *
open_layer (const struct walk *w, const char *path, int format,
            const struct namer *namer, const struct visited *seen)
{
  struct layer *l;
  struct stat st;
  struct visited me;
  bool probed = format == QED_FORMAT_PROBE;

  l = calloc (1, sizeof *l);
  if (l == NULL || (l->path = strdup (path)) == NULL) {
    free (l);
    qed_error ("malloc: %m");
    return NULL;
  }
  l->fd = open_layer_file (w, path, namer, &st);
  if (l->fd == -1)
    goto err;
  for (const struct visited *v = seen; v; v = v->next) {
    if (v->dev == st.st_dev && v->ino == st.st_ino) {
      qed_error ("backing file %s: the backing chain loops", path);
      errno = ELOOP;
      goto err;
    }
  }
  me = (struct visited) { st.st_dev, st.st_ino, seen };

  if (format == QED_FORMAT_PROBE && (format = probe_format (l)) == -1)
    goto err;
  if (format == QED_FORMAT_QED) {
    if (open_qed_layer (w, l, probed, namer, &st, &me) == -1)
      goto err;
    return l;
  }

  if (qed_lock_file (l->fd, path, QED_LOCK_BACKING, w->o->locking) == -1)
    goto err;
  if (S_ISBLK (st.st_mode)) {
    off_t end = qed_io_seek (l->fd, 0, SEEK_END);
    if (end == -1) {
      qed_error ("backing file %s: lseek: %m", path);
      goto err;
    }
    l->size = end;
  }
  else
    l->size = st.st_size;
  return l;

 err:
  {
    int e = errno;
    layer_free (l);
    errno = e;
  }
  return NULL;
}

static char *
describe (struct layer *top)
{
  char *desc = NULL;
  size_t len = 0;
  FILE *fp = open_memstream (&desc, &len);

  if (fp == NULL)
    return NULL;
  for (struct layer *l = top; l; l = l->below)
    fprintf (fp, "%s%s (%s, %" PRIu64 " bytes)", l == top ? "" : " <- ",
             l->path, l->qed ? "qed" : "raw", l->size);
  fclose (fp);
  return desc;
}

/* follow-backing=beneath: names must stay beneath the directory of
 * `top` (the image, or the override the user chose). */
static int
walk_init (struct walk *w, const struct qed_chain_options *o,
           const char *top)
{
  *w = (struct walk) { .o = o, .dirfd = -1 };
  if (!o->beneath)
    return 0;
  w->dir = dir_of (top);
  if (w->dir == NULL) {
    qed_error ("malloc: %m");
    return -1;
  }
  w->dirfd = open (w->dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (w->dirfd == -1) {
    qed_error ("%s: %m", w->dir);
    free (w->dir);
    return -1;
  }
  return 0;
}

struct qed_chain *
qed_chain_open (struct qed_image *img, const struct qed_chain_options *o,
                bool *none)
{
  struct qed_chain *chain;
  struct stat st;
  struct visited top;
  struct walk w;
  const char *name = qed_get_backing_name (img);
  CLEANUP_FREE char *path = NULL;
  struct namer namer = { .path = qed_get_filename (img) };
  int format;

  *none = false;
  if (o->override) {
    path = strdup (o->override);
    format = o->override_format;
  }
  else if (name) {
    if (!o->follow) {
      qed_error ("%s names a backing file (%s) but following backing files "
                 "is disabled (follow-backing=false); use "
                 "backing-override=PATH to choose one",
                 qed_get_filename (img), name);
      errno = EPERM;
      return NULL;
    }
    path = resolve (qed_get_filename (img), name);
    format = qed_get_backing_raw (img) ? QED_FORMAT_RAW : QED_FORMAT_PROBE;
  }
  else {
    *none = true;
    return NULL;
  }
  if (path == NULL) {
    qed_error ("malloc: %m");
    return NULL;
  }
  if (qed_io_fstat (img->fd, &st) == -1) {
    qed_error ("%s: fstat: %m", qed_get_filename (img));
    return NULL;
  }
  top = (struct visited) { st.st_dev, st.st_ino, NULL };
  namer.uid = st.st_uid;
  namer.gid = st.st_gid;

  chain = calloc (1, sizeof *chain);
  if (chain == NULL) {
    qed_error ("calloc: %m");
    return NULL;
  }
  if (walk_init (&w, o, o->override ? o->override
                 : qed_get_filename (img)) == -1) {
    free (chain);
    return NULL;
  }
  chain->top = open_layer (&w, path, format, o->override ? NULL : &namer,
                           &top);
  if (w.dirfd >= 0)
    close (w.dirfd);
  free (w.dir);
  if (chain->top == NULL) {
    free (chain);
    return NULL;
  }
  chain->desc = describe (chain->top);
  return chain;
}

void
qed_chain_close (struct qed_chain *chain)
{
  if (chain) {
    layer_free (chain->top);
    free (chain->desc);
    free (chain);
  }
}

void
qed_chain_below (struct qed_chain *chain, struct qed_below *b)
{
  b->read = layer_read;
  b->prefetch = layer_prefetch;
  b->opaque = chain->top;
}

const char *
qed_chain_describe (struct qed_chain *chain)
{
  return chain->desc ? chain->desc : "";
}

static int
layer_map (struct layer *l, uint64_t offset, uint64_t count,
           struct qed_map *map)
{
  map->file_offset = 0;
  if (l == NULL || offset >= l->size) {
    map->type = QED_MAP_UNALLOCATED;
    map->length = count;
    return 0;
  }
  count = MIN (count, l->size - offset);
  if (l->qed) {
    if (qed_map (l->qed, offset, count, map) == -1)
      return -1;
    if (map->type == QED_MAP_ZERO)
      map->type = QED_MAP_UNALLOCATED;
    else if (map->type == QED_MAP_UNALLOCATED)
      return layer_map (l->below, offset, map->length, map);
    return 0;
  }
  /* A raw file: holes read as zeros. */
  {
    off_t data = qed_io_seek (l->fd, offset, SEEK_DATA), hole;
    if (data == -1 && errno == ENXIO) {
      map->type = QED_MAP_UNALLOCATED;
      map->length = count;
      return 0;
    }
    if (data == -1) {             /* no SEEK_DATA: all data */
      map->type = QED_MAP_DATA;
      map->length = count;
      return 0;
    }
    if ((uint64_t) data > offset) {
      map->type = QED_MAP_UNALLOCATED;
      map->length = MIN (count, (uint64_t) data - offset);
      return 0;
    }
    hole = qed_io_seek (l->fd, offset, SEEK_HOLE);
    map->type = QED_MAP_DATA;
    map->length = hole == -1 ? count : MIN (count, (uint64_t) hole - offset);
    if (map->length == 0)
      map->length = count;
    return 0;
  }
}

int
qed_chain_map (struct qed_chain *chain, uint64_t offset, uint64_t count,
               struct qed_map *map)
{
  return layer_map (chain ? chain->top : NULL, offset, count, map);
}
