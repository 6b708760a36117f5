/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: backing files, for the plugin.
 *
 * Beneath an image lies a chain of layers, each a raw file or a QED
 * image, all opened read-only.  Relative names resolve against the
 * real directory of the image that names them, the one its file was
 * found in after every symbolic link (QEMU resolves them against the
 * path string).  A layer reads as zeros past its end.  Loops are found
 * by device and inode.  The stored format is used when NO_PROBE says
 * raw; otherwise the file is probed by its magic, like QEMU.
 *
 * The identity only drops down a chain: each layer is opened with the
 * least-privileged identity seen so far from the top, which starts as
 * the top image's owner and becomes a layer's owner when the identity
 * in force is root's and the layer's owner is not.  A root-owned layer
 * below a user's is read with the user's identity, and so are the
 * names inside it (a guest of root's raw disk may have written them);
 * between two users, the identity already in force stays.  Symbolic
 * links, devices, pseudo file systems and magic links are judged in
 * safe-open.c; with follow-backing=beneath every file must lie beneath
 * the top image's real directory.  A file the user named
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
  char *path;                   /* for messages */
  int dirfd;                    /* the real directory holding it */
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
    if (l->dirfd >= 0)
      close (l->dirfd);
    free (l->path);
    free (l);
    l = below;
  }
}

/* name relative to the directory of `base` (for messages only: names
 * are opened relative to the real directory of the file that names
 * them). */
static char *
display_path (const char *base, const char *name)
{
  const char *slash = strrchr (base, '/');
  char *r;

  if (name[0] == '/' || slash == NULL)
    return strdup (name);
  if (asprintf (&r, "%.*s/%s", (int) (slash - base), base, name) == -1)
    return NULL;
  return r;
}

/* The directory part of path. */
static char *
dir_of (const char *path)
{
  const char *slash = strrchr (path, '/');

  if (slash == NULL)
    return strdup (".");
  if (slash == path)
    return strdup ("/");
  return strndup (path, slash - path);
}

/* One walk down the chain. */
struct walk {
  const struct qed_chain_options *o;
  int beneath;                  /* follow-backing=beneath: the top's dir */
};

/* Who names a backing file, and with whose identity it is opened. */
struct namer {
  const char *path;             /* the image naming it */
  int dirfd;                    /* its real directory */
  bool as_server;               /* the user named it (backing-override) */
  uid_t uid;                    /* the identity in force (0: the server) */
};

static struct layer *open_layer (struct walk *w, const char *name,
                                 int format, const struct namer *namer,
                                 const struct visited *seen);

/* The identity for what lies below a layer owned by `owner`, opened
 * with `uid`: it only drops.  Root's layer below a user's is read with
 * the user's identity, and so are the names inside it; between two
 * users, the one in force stays. */
static uid_t
next_identity (uid_t uid, uid_t owner)
{
  return uid == 0 ? owner : uid;
}

/* Open what lies beneath the QED layer `l`. */
static int
open_below (struct walk *w, struct layer *l, const char *name,
            bool raw, const struct namer *namer, const struct visited *seen)
{
  if (!w->o->follow) {
    qed_error ("%s names a backing file (%s) but following backing files "
               "is disabled (follow-backing=false)", l->path, name);
    errno = EPERM;
    return -1;
  }
  l->below = open_layer (w, name, raw ? QED_FORMAT_RAW : QED_FORMAT_PROBE,
                         namer, seen);
  if (l->below == NULL)
    return -1;
  l->below_ops.read = layer_read;
  l->below_ops.prefetch = layer_prefetch;
  l->below_ops.opaque = l->below;
  return 0;
}

/* Open the file of a layer, named `name` by namer: relative to the
 * real directory of the image that names it, with the identity in
 * force (as the server for backing-override).  l->dirfd gets the
 * directory it was found in. */
static int
open_layer_file (struct walk *w, struct layer *l, const char *name,
                 const struct namer *namer, struct stat *st)
{
  struct qed_backing_open bo = {
    .path = l->path, .dirfd = namer->dirfd, .name = name,
    .devices = w->o->devices,
  };
  int fd;

  if (!namer->as_server) {
    bo.as_owner = true;
    bo.uid = namer->uid;
    bo.beneath = w->beneath >= 0;
    bo.beneath_dirfd = w->beneath;
  }
  fd = qed_open_backing (&bo, st, &l->dirfd);
  /* follow-backing=beneath keeps names below the top's directory, or
   * below the directory of the override the user chose. */
  if (fd >= 0 && namer->as_server && w->o->beneath)
    w->beneath = l->dirfd;
  return fd;
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
open_qed_layer (struct walk *w, struct layer *l, bool probed,
                const struct namer *namer, const struct stat *st,
                const struct visited *me)
{
  struct qed_open_options oo = { .readonly = true,
                                 .l2_cache_bytes = w->o->l2_cache_bytes,
                                 .cache_budget = w->o->cache_budget,
                                 .locking = w->o->locking,
                                 .backing_layer = true,
                                 .use_fd = true, .fd = l->fd };
  struct namer next = { .path = l->path, .dirfd = l->dirfd,
                        .uid = namer->as_server ? st->st_uid
                        : next_identity (namer->uid, st->st_uid) };
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
  if (probed && !namer->as_server && !__atomic_test_and_set (&warned_probe,
                                                 __ATOMIC_RELAXED))
    qed_warning ("%s names %s without a format, which was probed "
                 "as QED and names a backing file of its own (%s); if %s is "
                 "a raw disk, record that: qemu-img rebase -u -f qed -F raw "
                 "-b %s %s", namer->path, l->path, name, l->path, l->path,
                 namer->path);
  return open_below (w, l, name, qed_get_backing_raw (l->qed), &next, me);
}

static struct layer *
open_layer (struct walk *w, const char *name, int format,
            const struct namer *namer, const struct visited *seen)
{
  struct layer *l;
  struct stat st;
  struct visited me;
  bool probed = format == QED_FORMAT_PROBE;
  const char *path;

  l = calloc (1, sizeof *l);
  if (l == NULL) {
    qed_error ("malloc: %m");
    return NULL;
  }
  l->fd = l->dirfd = -1;
  l->path = namer->as_server ? strdup (name)
    : display_path (namer->path, name);
  if (l->path == NULL) {
    qed_error ("malloc: %m");
    goto err;
  }
  path = l->path;
  l->fd = open_layer_file (w, l, name, namer, &st);
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

struct qed_chain *
qed_chain_open (struct qed_image *img, const struct qed_chain_options *o,
                bool *none)
{
  struct qed_chain *chain;
  struct stat st;
  struct visited top;
  struct walk w = { .o = o, .beneath = -1 };
  const char *name = qed_get_backing_name (img);
  struct namer namer = { .path = qed_get_filename (img), .dirfd = -1 };
  int format, dirfd = -1;

  *none = false;
  if (o->override) {
    name = o->override;
    format = o->override_format;
    namer.as_server = true;
    namer.dirfd = AT_FDCWD;
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
    format = qed_get_backing_raw (img) ? QED_FORMAT_RAW : QED_FORMAT_PROBE;
    /* The real directory of the image that was opened. */
    namer.dirfd = img->dirfd;
    if (namer.dirfd == -1) {
      CLEANUP_FREE char *dir = dir_of (qed_get_filename (img));
      if (dir == NULL ||
          (dirfd = open (dir, O_PATH | O_DIRECTORY | O_CLOEXEC)) == -1) {
        qed_error ("%s: %m", dir ? dir : qed_get_filename (img));
        return NULL;
      }
      namer.dirfd = dirfd;
    }
    if (o->beneath)
      w.beneath = namer.dirfd;
  }
  else {
    *none = true;
    return NULL;
  }
  if (qed_io_fstat (img->fd, &st) == -1) {
    qed_error ("%s: fstat: %m", qed_get_filename (img));
    goto err;
  }
  top = (struct visited) { st.st_dev, st.st_ino, NULL };
  /* The identity starts as the top image's owner (for names it holds;
   * backing-override, which the user named, is opened as the server,
   * and names below it as its owner). */
  namer.uid = st.st_uid;

  chain = calloc (1, sizeof *chain);
  if (chain == NULL) {
    qed_error ("calloc: %m");
    goto err;
  }
  chain->top = open_layer (&w, name, format, &namer, &top);
  if (chain->top == NULL) {
    free (chain);
    goto err;
  }
  if (dirfd >= 0)
    close (dirfd);
  chain->desc = describe (chain->top);
  return chain;

 err:
  if (dirfd >= 0)
    close (dirfd);
  return NULL;
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
