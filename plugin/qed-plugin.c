/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the QED plugin.
 *
 *   nbdkit qed [file=]IMAGE [create=true size=SIZE ...] [zero-detect=BOOL]
 *              [l2-cache=SIZE] [follow-backing=true|false|beneath]
 *              [backing-devices=BOOL] [backing-override=PATH
 *              backing-override-format=raw|qed] [locking=on|off|auto]
 *              [compact-limit=SIZE] [freelist=BOOL] [demote=BOOL]
 *              [copy-on-read=BOOL]
 *
 * One image is shared by all connections (one L2 cache, one allocator),
 * so a flush on any connection covers every connection's writes and
 * multi-conn is safe.  The image is opened at the first connection,
 * read-only if that connection is (nbdkit -r), and closed at exit,
 * which writes back the tables, reclaims freed space and clears
 * NEED_CHECK.  The start-up checks (get_ready) only read the file.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <unistd.h>
#include <time.h>
#include <pthread.h>
#include <sys/stat.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qed.h"
#include "glue-nbdkit.h"
#include "seam.h"
#include "util.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

/* Parameters. */
static char *filename;
/* create=true (CREATE_ALWAYS) or create=if-missing. */
enum { CREATE_NO = 0, CREATE_ALWAYS, CREATE_IF_MISSING };
static int create;
/* We created the image at start-up: removed again if start-up fails, so
 * that a retry of the same command line is not refused. */
static bool created;
static int64_t create_size = -1;
static uint32_t create_cluster_size, create_table_size;
static char *create_backing;
static int create_backing_format = QED_FORMAT_PROBE;
static bool zero_detect;
static int64_t l2_cache;
static bool follow_backing = true;
static bool follow_beneath;             /* follow-backing=beneath */
static bool backing_devices;
static char *backing_override;
static int backing_override_format = QED_FORMAT_PROBE;
static unsigned idle_clean = 5;          /* seconds, 0 = never */
static enum qed_locking locking = QED_LOCKING_AUTO;
static uint64_t compact_limit = 64 * 1024 * 1024;
static bool freelist = true;
static bool demote;
static int copy_on_read = -1;            /* -1: the image's compat bit */
static bool file_writable;

/* The image's backing chain, opened with the image by the first
 * connection (the image itself: glue_image). */
static struct qed_chain *chain;
static struct qed_below below;
static bool have_below;
static bool cor;                /* copy-on-read from the chain */

static void
qed_plugin_unload (void)
{
  free (filename);
  free (create_backing);
  free (backing_override);
}

static int
parse_format (const char *key, const char *value, int *format)
{
  if (strcmp (value, "raw") == 0)
    *format = QED_FORMAT_RAW;
  else if (strcmp (value, "qed") == 0)
    *format = QED_FORMAT_QED;
  else {
    nbdkit_error ("%s: unknown format '%s' (use raw or qed)", key, value);
    return -1;
  }
  return 0;
}

/* The keys of the feature bits: the free-cluster list, demote, and
 * copy-on-read. */
static int
config_features (const char *key, const char *value)
{
  bool b;

  if (strcmp (key, "compact-limit") == 0) {
    int64_t v = glue_parse_size (key, value);
    if (v == -1)
      return -1;
    compact_limit = v;
    return 0;
  }
  if (glue_parse_bool (key, value, &b) == -1)
    return -1;
  if (strcmp (key, "freelist") == 0)
    freelist = b;
  else if (strcmp (key, "demote") == 0)
    demote = b;
  else
    copy_on_read = b;
  return 0;
}

static int
qed_plugin_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0) {
    free (filename);
    /* The image may not exist yet (create=true). */
    filename = nbdkit_absolute_path (value);
    return filename ? 0 : -1;
  }
  else if (strcmp (key, "create") == 0) {
    bool b;
    if (strcmp (value, "if-missing") == 0) {
      create = CREATE_IF_MISSING;
      return 0;
    }
    if (glue_parse_bool (key, value, &b) == -1)
      return -1;
    create = b ? CREATE_ALWAYS : CREATE_NO;
    return 0;
  }
  else if (strcmp (key, "size") == 0) {
    create_size = glue_parse_size (key, value);
    return create_size == -1 ? -1 : 0;
  }
  else if (strcmp (key, "cluster-size") == 0)
    return glue_parse_power_of_2 (key, value, QED_MIN_CLUSTER_SIZE,
                                  QED_MAX_CLUSTER_SIZE,
                                  &create_cluster_size);
  else if (strcmp (key, "table-size") == 0) {
    uint32_t v;
    if (nbdkit_parse_uint32_t (key, value, &v) == -1)
      return -1;
    if (v < 1 || v > 16 || !is_power_of_2 (v)) {
      nbdkit_error ("table-size: must be 1, 2, 4, 8 or 16");
      return -1;
    }
    create_table_size = v;
    return 0;
  }
  else if (strcmp (key, "backing") == 0) {
    free (create_backing);
    create_backing = strdup (value);    /* stored as given */
    return create_backing ? 0 : -1;
  }
  else if (strcmp (key, "backing-format") == 0)
    return parse_format (key, value, &create_backing_format);
  else if (strcmp (key, "zero-detect") == 0)
    return glue_parse_bool (key, value, &zero_detect);
  else if (strcmp (key, "l2-cache") == 0) {
    l2_cache = glue_parse_size (key, value);
    if (l2_cache == -1)
      return -1;
    if (l2_cache < 65536 || l2_cache > (INT64_C (1) << 40)) {
      nbdkit_error ("l2-cache: must be between 64K and 1T");
      return -1;
    }
    return 0;
  }
  else if (strcmp (key, "follow-backing") == 0) {
    follow_beneath = strcmp (value, "beneath") == 0;
    if (follow_beneath) {
      follow_backing = true;
      return 0;
    }
    return glue_parse_bool (key, value, &follow_backing);
  }
  else if (strcmp (key, "backing-devices") == 0)
    return glue_parse_bool (key, value, &backing_devices);
  else if (strcmp (key, "backing-override") == 0) {
    free (backing_override);
    backing_override = nbdkit_realpath (value);
    return backing_override ? 0 : -1;
  }
  else if (strcmp (key, "backing-override-format") == 0)
    return parse_format (key, value, &backing_override_format);
  else if (strcmp (key, "idle-clean") == 0)
    return nbdkit_parse_unsigned (key, value, &idle_clean);
  else if (strcmp (key, "locking") == 0)
    return glue_parse_locking (key, value, &locking);
  else if (strcmp (key, "compact-limit") == 0 ||
           strcmp (key, "freelist") == 0 || strcmp (key, "demote") == 0 ||
           strcmp (key, "copy-on-read") == 0)
    return config_features (key, value);
  else {
    nbdkit_error ("unknown parameter '%s'", key);
    return -1;
  }
}

#define qed_plugin_config_help \
  "[file=]<IMAGE>            (required) The QED image to serve.\n" \
  "create=true size=<SIZE>   Create IMAGE first (it must not exist).\n" \
  "create=if-missing size=<SIZE>  Create IMAGE unless it exists.\n" \
  "cluster-size=<SIZE>       Cluster size of a new image (default 64K).\n" \
  "table-size=<N>            Table size of a new image (default 4).\n" \
  "backing=<PATH>            Backing file of a new image.\n" \
  "backing-format=raw|qed    Its format (required with backing).\n" \
  "zero-detect=<BOOL>        Store zero clusters for all-zero writes.\n" \
  "l2-cache=<SIZE>           Memory for cached L2 tables (default 32M).\n" \
  "follow-backing=true|false|beneath  Open the backing files images\n" \
  "                          name (default true); beneath: only names\n" \
  "                          beneath the image's directory.\n" \
  "backing-devices=<BOOL>    Allow block devices as backing files.\n" \
  "backing-override=<PATH>   Use PATH as the backing file instead.\n" \
  "backing-override-format=raw|qed  Its format (required with it).\n" \
  "idle-clean=<SECONDS>      Clear NEED_CHECK after this long without\n" \
  "                          writes (default 5, 0 = only at exit).\n" \
  "locking=on|off|auto       Lock the image as QEMU does (default auto).\n" \
  "compact-limit=<SIZE>      At a clean stop move at most SIZE of data to\n" \
  "                          give back freed space; list the rest\n" \
  "                          (default 64M).\n" \
  "freelist=false            Never write a free-cluster list (compact\n" \
  "                          completely).\n" \
  "demote=true               At the stop, remove every feature an older\n" \
  "                          reader would not know.\n" \
  "copy-on-read=<BOOL>       Store what is read from the backing chain\n" \
  "                          (default: the image's copy-on-read hint)."

/* The cheap checks of backing= before anything is created (the whole
 * chain is validated by get_ready, which removes the new image if it
 * fails): the file must exist and be a file or a block device. */
static int
check_new_backing (void)
{
  CLEANUP_FREE char *path = NULL;
  const char *slash = strrchr (filename, '/');
  struct stat st;

  if (create_backing == NULL)
    return 0;
  /* A relative name is relative to the image's directory. */
  if (create_backing[0] == '/')
    path = strdup (create_backing);
  else if (asprintf (&path, "%.*s/%s", (int) (slash - filename), filename,
                     create_backing) == -1)
    path = NULL;
  if (path == NULL) {
    nbdkit_error ("malloc: %m");
    return -1;
  }
  if (stat (path, &st) == -1) {
    nbdkit_error ("backing=%s: %s: %m (nothing was created)",
                  create_backing, path);
    return -1;
  }
  if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode)) {
    nbdkit_error ("backing=%s: %s is not a regular file or a block device "
                  "(nothing was created)", create_backing, path);
    return -1;
  }
  return 0;
}

static int
qed_plugin_config_complete (void)
{
  if (filename == NULL) {
    nbdkit_error ("you must supply the file=<IMAGE> parameter "
                  "after the plugin name on the command line");
    return -1;
  }
  /* A raw disk that is probed could be taken for a QED image whose
   * header (written by a guest) names any file. */
  if (create && create_backing && create_backing_format == QED_FORMAT_PROBE) {
    nbdkit_error ("backing=%s needs backing-format=raw|qed (a probed raw "
                  "disk could name any file)", create_backing);
    return -1;
  }
  if (backing_override && backing_override_format == QED_FORMAT_PROBE) {
    nbdkit_error ("backing-override=%s needs backing-override-format=raw|qed "
                  "(a probed raw disk could name any file)", backing_override);
    return -1;
  }
  if (create) {
    struct qed_create_options co = {
      .size = create_size,
      .cluster_size = create_cluster_size,
      .table_size = create_table_size,
      .backing_name = create_backing,
      .backing_raw = create_backing_format == QED_FORMAT_RAW,
      .compat_features = copy_on_read == 1 ? QED_CF_COPY_ON_READ : 0,
    };
    if (create_size == -1) {
      nbdkit_error ("create=%s needs size=<SIZE>",
                    create == CREATE_IF_MISSING ? "if-missing" : "true");
      return -1;
    }
    if (access (filename, F_OK) == 0) {
      if (create == CREATE_IF_MISSING) {
        nbdkit_debug ("%s exists: serving it (create=if-missing)", filename);
        return 0;
      }
      nbdkit_error ("%s: create=true, but the file already exists "
                    "(create=if-missing serves an existing image)", filename);
      return -1;
    }
    if (check_new_backing () == -1)
      return -1;
    if (qed_create (filename, &co) == -1)
      return -1;
    created = true;
    nbdkit_debug ("created %s", filename);
  }
  else if (create_size != -1 || create_cluster_size || create_table_size ||
           create_backing) {
    nbdkit_error ("size, cluster-size, table-size and backing are only "
                  "used with create=true");
    return -1;
  }
  return 0;
}

/* Sanity check now, rather than waiting for the first client: read and
 * validate the image and its backing chain, without writing anything.
 */
static int validate_image (void);

static int
qed_plugin_get_ready (void)
{
  if (validate_image () == 0)
    return 0;
  if (created) {
    /* Half made: a retry must not find it.  (Ours: nothing else knows
     * this file yet.) */
    if (unlink (filename) == 0)
      nbdkit_error ("%s: removed the image create=%s made, since it "
                    "cannot be served", filename,
                    create == CREATE_IF_MISSING ? "if-missing" : "true");
    created = false;
  }
  return -1;
}

static int
validate_image (void)
{
  struct qed_open_options oo = { .readonly = true, .skip_check = true,
                                 .l2_cache_bytes = 65536,
                                 .locking = locking };
  struct qed_chain_options co = {
    .follow = follow_backing, .beneath = follow_beneath,
    .devices = backing_devices, .override = backing_override,
    .override_format = backing_override_format, .l2_cache_bytes = 65536,
    .locking = locking,
  };
  struct qed_image *probe;
  struct qed_chain *c;
  bool none;

  probe = qed_open (filename, &oo);
  if (probe == NULL)
    return -1;
  c = qed_chain_open (probe, &co, &none);
  if (c == NULL && !none) {
    qed_close (probe);
    return -1;
  }
  if (c)
    nbdkit_debug ("backing chain: %s", qed_chain_describe (c));
  if (!qed_qemu_can_open (qed_get_cluster_size (probe),
                          qed_get_header (probe)->table_size))
    nbdkit_debug ("%s: note: QEMU cannot open images of this geometry",
                  filename);
  qed_chain_close (c);
  qed_close (probe);
  file_writable = access (filename, W_OK) == 0;
  return 0;
}

static int
qed_plugin_after_fork (void)
{
  int fd = qed_hold_reader_locks (filename, locking);

  if (fd == -1)
    return -1;
  return glue_after_fork (fd, idle_clean);
}

static void
qed_plugin_cleanup (void)
{
  struct qed_image *img = glue_cleanup ();

  qed_chain_close (chain);
  chain = NULL;
  if (img && qed_close (img) == -1)
    nbdkit_error ("%s: closing the image failed", filename);
}

/* Open the image and its backing chain.  glue_open_lock held. */
static struct qed_image *
open_image (int readonly)
{
  struct qed_open_options oo = { .readonly = readonly,
                                 .l2_cache_bytes = l2_cache,
                                 .locking = locking,
                                 .freelist = freelist,
                                 .compact_limit = compact_limit,
                                 .demote = demote };
  struct qed_chain_options co = {
    .follow = follow_backing, .beneath = follow_beneath,
    .devices = backing_devices, .override = backing_override,
    .override_format = backing_override_format,
    .l2_cache_bytes = l2_cache / 4,
    .locking = locking,
  };
  struct qed_image *img;
  bool none;

  glue_release_startup_locks ();
  qed_clear_last_error ();
  img = qed_open (filename, &oo);
  if (img == NULL) {
    qed_open_failed ("qed", filename);
    return NULL;
  }
  chain = qed_chain_open (img, &co, &none);
  if (chain == NULL && !none) {
    qed_close (img);
    return NULL;
  }
  if (chain) {
    qed_chain_below (chain, &below);
    have_below = true;
    cor = !qed_is_readonly (img) &&
      (copy_on_read == -1
       ? (qed_get_header (img)->compat_features & QED_CF_COPY_ON_READ) != 0
       : copy_on_read == 1);
    if (cor)
      nbdkit_debug ("%s: copy-on-read from the backing chain", filename);
  }
  return img;
}

static void *
qed_plugin_open (int readonly)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&glue_open_lock);
  struct qed_image *img = glue_image ();

  if (!file_writable)
    readonly = 1;
  if (img == NULL) {
    img = open_image (readonly);
    if (img == NULL)
      return NULL;
    glue_set_image (img);
  }
  else if (!readonly && qed_is_readonly (img)) {
    nbdkit_error ("%s: the image was opened read-only by an earlier "
                  "connection", filename);
    return NULL;
  }
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
qed_plugin_get_size (void *handle)
{
  return qed_get_size (glue_image ());
}

static int
qed_plugin_block_size (void *handle,
                       uint32_t *minimum, uint32_t *preferred,
                       uint32_t *maximum)
{
  *minimum = 1;
  *preferred =
    glue_preferred_block_size (qed_get_cluster_size (glue_image ()));
  *maximum = 0xffffffff;
  return 0;
}

static int
qed_plugin_can_write (void *handle)
{
  return !qed_is_readonly (glue_image ());
}

static int
qed_plugin_can_one (void *handle)
{
  return 1;
}

static int
qed_plugin_can_fua (void *handle)
{
  return NBDKIT_FUA_NATIVE;
}

static int
qed_plugin_can_cache (void *handle)
{
  return NBDKIT_CACHE_NATIVE;
}

static const struct qed_below *
get_below (void)
{
  return have_below ? &below : NULL;
}

/* Copy-on-read (as the filter's): whole clusters read from the chain
 * are stored in the image; ranges the chain maps as holes are not read;
 * all-zero clusters become zero clusters.  qed_fill installs only into
 * clusters still unallocated, so a concurrent write always wins. */
#define COR_CHUNK (32u * 1024 * 1024)

static int
cor_fill_chunk (void *opaque, char *wbuf, uint64_t start, uint64_t end)
{
  uint64_t pos = start;

  while (pos < end) {
    struct qed_map m;
    uint64_t len;

    if (qed_chain_map (chain, pos, end - pos, &m) == -1)
      return -1;
    len = MIN (m.length, end - pos);
    if (len == 0) {
      errno = EIO;
      return -1;
    }
    if (m.type == QED_MAP_UNALLOCATED)
      memset (wbuf + (pos - start), 0, len);
    else if (below.read (below.opaque, wbuf + (pos - start), len, pos) == -1)
      return -1;
    pos += len;
  }
  /* A failed fill is logged by the core and leaves the clusters as
   * they were: the data read is still right. */
  qed_fill (glue_image (), wbuf, end - start, start, true, false);
  return 0;
}

/* Read [offset, offset+count) (buf may be NULL: cache), storing the
 * whole clusters around it. */
static int
cor_fetch (void *buf, uint64_t count, uint64_t offset)
{
  if (glue_cor_fetch (glue_image (), buf, count, offset, COR_CHUNK,
                      cor_fill_chunk, NULL) == -1)
    return -1;
  glue_note_write ();
  return 0;
}

static int
cor_read (void *opaque, void *buf, uint64_t count, uint64_t offset)
{
  return cor_fetch (buf, count, offset);
}

static int
cor_prefetch (void *opaque, uint64_t count, uint64_t offset)
{
  return cor_fetch (NULL, count, offset);
}

static const struct qed_below cor_below = {
  .read = cor_read, .prefetch = cor_prefetch,
};

/* Reads (and cache) copy on read; writes copy only the partial
 * clusters they need. */
static const struct qed_below *
get_read_below (void)
{
  return cor ? &cor_below : get_below ();
}

static int
qed_plugin_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
                  uint32_t flags)
{
  return qed_read (glue_image (), get_read_below (), buf, count, offset);
}

static int
qed_plugin_pwrite (void *handle, const void *buf, uint32_t count,
                   uint64_t offset, uint32_t flags)
{
  unsigned f = glue_write_flags (flags, true, zero_detect);

  glue_note_write ();
  return qed_write (glue_image (), get_below (), buf, count, offset, f);
}

static int
qed_plugin_zero (void *handle, uint32_t count, uint64_t offset,
                 uint32_t flags)
{
  unsigned f = glue_zero_flags (flags, true);

  glue_note_write ();
  return qed_zero (glue_image (), get_below (), count, offset, f);
}

static int
qed_plugin_trim (void *handle, uint32_t count, uint64_t offset,
                 uint32_t flags)
{
  glue_note_write ();
  return qed_trim (glue_image (), get_below (), count, offset,
                   glue_trim_flags (flags, true));
}

static int
qed_plugin_flush (void *handle, uint32_t flags)
{
  return qed_flush (glue_image ());
}

static int
qed_plugin_cache (void *handle, uint32_t count, uint64_t offset,
                  uint32_t flags)
{
  return qed_prefetch (glue_image (), get_read_below (), count, offset);
}

/* An unallocated run: ask the backing chain what lies there. */
static int64_t
chain_extents (void *opaque, uint64_t len, uint64_t offset, bool req_one,
               struct nbdkit_extents *extents)
{
  struct qed_map m;

  if (qed_chain_map (chain, offset, len, &m) == -1 ||
      nbdkit_add_extent (extents, offset, m.length,
                         m.type == QED_MAP_DATA ? 0
                         : NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) == -1)
    return -1;
  return m.length;
}

static int
qed_plugin_extents (void *handle, uint32_t count, uint64_t offset,
                    uint32_t flags, struct nbdkit_extents *extents)
{
  return glue_extents (glue_image (), count, offset,
                       flags & NBDKIT_FLAG_REQ_ONE, extents,
                       chain ? chain_extents : NULL, NULL);
}

static void
qed_plugin_dump_plugin (void)
{
  printf ("qed_default_l2_cache=%d\n", 32 * 1024 * 1024);
  printf ("qed_zero_clusters=yes\n");
  printf ("qed_backing_formats=raw,qed\n");
}

static struct nbdkit_plugin plugin = {
  .name              = "qed",
  .longname          = "nbdkit QED plugin",
  .version           = "1.0",
  .description       = "Serve QED (QEMU Enhanced Disk) images",
  .unload            = qed_plugin_unload,
  .config            = qed_plugin_config,
  .config_complete   = qed_plugin_config_complete,
  .config_help       = qed_plugin_config_help,
  .magic_config_key  = "file",
  .dump_plugin       = qed_plugin_dump_plugin,
  .get_ready         = qed_plugin_get_ready,
  .after_fork        = qed_plugin_after_fork,
  .cleanup           = qed_plugin_cleanup,
  .open              = qed_plugin_open,
  .get_size          = qed_plugin_get_size,
  .block_size        = qed_plugin_block_size,
  .can_write         = qed_plugin_can_write,
  .can_flush         = qed_plugin_can_one,
  .can_trim          = qed_plugin_can_one,
  .can_zero          = qed_plugin_can_one,
  .can_fast_zero     = qed_plugin_can_one,
  .can_extents       = qed_plugin_can_one,
  .can_multi_conn    = qed_plugin_can_one,
  .can_fua           = qed_plugin_can_fua,
  .can_cache         = qed_plugin_can_cache,
  .pread             = qed_plugin_pread,
  .pwrite            = qed_plugin_pwrite,
  .zero              = qed_plugin_zero,
  .trim              = qed_plugin_trim,
  .flush             = qed_plugin_flush,
  .cache             = qed_plugin_cache,
  .extents           = qed_plugin_extents,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)
