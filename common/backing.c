/* nbdkit-qed: backing files, for the plugin.
 *
 * Beneath an image lies a chain of layers, each a raw file or a QED
 * image, all opened read-only.  Relative names resolve against the
 * directory of the image that names them (as QEMU does).  A layer
 * reads as zeros past its end.  Loops are found by device and inode.
 * The stored format is used when NO_PROBE says raw; otherwise the file
 * is probed by its magic, like QEMU.
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
  posix_fadvise (l->fd, offset, count, POSIX_FADV_WILLNEED);
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
      close (l->fd);
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

static struct layer *open_layer (const char *path, int format,
                                 const struct qed_chain_options *o,
                                 const struct visited *seen);

/* Open what lies beneath the QED layer `l` (whose own file is `st`). */
static int
open_below (struct layer *l, const char *path, const char *name, bool raw,
            const struct qed_chain_options *o, const struct visited *seen)
{
  CLEANUP_FREE char *bpath = NULL;

  if (!o->follow) {
    qed_error ("%s names a backing file (%s) but following backing files "
               "is disabled (follow-backing=false)", path, name);
    errno = EPERM;
    return -1;
  }
  bpath = resolve (path, name);
  if (bpath == NULL) {
    qed_error ("malloc: %m");
    return -1;
  }
  l->below = open_layer (bpath, raw ? QED_FORMAT_RAW : QED_FORMAT_PROBE,
                         o, seen);
  if (l->below == NULL)
    return -1;
  l->below_ops.read = layer_read;
  l->below_ops.prefetch = layer_prefetch;
  l->below_ops.opaque = l->below;
  return 0;
}

static struct layer *
open_layer (const char *path, int format, const struct qed_chain_options *o,
            const struct visited *seen)
{
  struct layer *l;
  struct stat st;
  struct visited me;
  unsigned char magic[4] = { 0 };

  l = calloc (1, sizeof *l);
  if (l == NULL || (l->path = strdup (path)) == NULL) {
    free (l);
    qed_error ("malloc: %m");
    return NULL;
  }
  /* O_NONBLOCK: a hostile name (a FIFO) must not hang the open. */
  l->fd = open (path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (l->fd == -1) {
    qed_error ("cannot open backing file %s: %m", path);
    goto err;
  }
  if (fstat (l->fd, &st) == -1) {
    qed_error ("backing file %s: fstat: %m", path);
    goto err;
  }
  if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode)) {
    qed_error ("backing file %s is not a regular file or a block device",
               path);
    errno = EINVAL;
    goto err;
  }
  fcntl (l->fd, F_SETFL, fcntl (l->fd, F_GETFL) & ~O_NONBLOCK);
  for (const struct visited *v = seen; v; v = v->next) {
    if (v->dev == st.st_dev && v->ino == st.st_ino) {
      qed_error ("backing file %s: the backing chain loops", path);
      errno = ELOOP;
      goto err;
    }
  }
  me = (struct visited) { st.st_dev, st.st_ino, seen };

  if (format == QED_FORMAT_PROBE) {
    if (pread_full (l->fd, magic, 4, 0) == -1) {
      qed_error ("backing file %s: read: %m", path);
      goto err;
    }
    if (memcmp (magic, "QED\0", 4) == 0)
      format = QED_FORMAT_QED;
    else if (memcmp (magic, "QFI\xfb", 4) == 0) {
      qed_error ("backing file %s is a qcow2 image: only raw and QED "
                 "backing files are supported", path);
      errno = ENOTSUP;
      goto err;
    }
    else
      format = QED_FORMAT_RAW;
  }

  if (format == QED_FORMAT_RAW) {
    if (qed_lock_file (l->fd, path, QED_LOCK_BACKING, o->locking) == -1)
      goto err;
    if (S_ISBLK (st.st_mode)) {
      off_t end = lseek (l->fd, 0, SEEK_END);
      if (end == -1) {
        qed_error ("backing file %s: lseek: %m", path);
        goto err;
      }
      l->size = end;
    }
    else
      l->size = st.st_size;
    return l;
  }

  /* A QED layer. */
  close (l->fd);
  l->fd = -1;
  {
    struct qed_open_options oo = { .readonly = true,
                                   .l2_cache_bytes = o->l2_cache_bytes,
                                   .locking = o->locking,
                                   .backing_layer = true };
    const char *name;
    l->qed = qed_open (path, &oo);
    if (l->qed == NULL)
      goto err;
    l->size = qed_get_size (l->qed);
    name = qed_get_backing_name (l->qed);
    if (name && open_below (l, path, name, qed_get_backing_raw (l->qed),
                            o, &me) == -1)
      goto err;
  }
  return l;

 err:
  {
    int e = errno;
    layer_free (l);
    errno = e;
  }
  return NULL;
}

struct qed_chain *
qed_chain_open (struct qed_image *img, const struct qed_chain_options *o,
                bool *none)
{
  struct qed_chain *chain;
  struct stat st;
  struct visited top;
  const char *name = qed_get_backing_name (img);
  CLEANUP_FREE char *path = NULL;
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
  if (stat (qed_get_filename (img), &st) == -1) {
    qed_error ("%s: stat: %m", qed_get_filename (img));
    return NULL;
  }
  top = (struct visited) { st.st_dev, st.st_ino, NULL };

  chain = calloc (1, sizeof *chain);
  if (chain == NULL) {
    qed_error ("calloc: %m");
    return NULL;
  }
  chain->top = open_layer (path, format, o, &top);
  if (chain->top == NULL) {
    free (chain);
    return NULL;
  }
  {
    size_t len = 0;
    FILE *fp = open_memstream (&chain->desc, &len);
    if (fp) {
      for (struct layer *l = chain->top; l; l = l->below)
        fprintf (fp, "%s%s (%s, %" PRIu64 " bytes)", l == chain->top ? ""
                 : " <- ", l->path, l->qed ? "qed" : "raw", l->size);
      fclose (fp);
    }
  }
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
    off_t data = lseek (l->fd, offset, SEEK_DATA), hole;
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
    hole = lseek (l->fd, offset, SEEK_HOLE);
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
