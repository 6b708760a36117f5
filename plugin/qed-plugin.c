/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the QED plugin.
 *
 *   nbdkit qed [file=]IMAGE [create=true size=SIZE ...] [zero-detect=BOOL]
 *              [l2-cache=SIZE] [follow-backing=true|false|beneath]
 *              [backing-devices=BOOL] [backing-override=PATH
 *              backing-override-format=raw|qed] [locking=on|off|auto]
 *              [compact-limit=SIZE] [freelist=BOOL] [demote=BOOL]
 *              [copy-on-read=BOOL]
 *   nbdkit qed dir=DIR [default-export=NAME] [the same keys]
 *
 * file=: one image is shared by all connections (one L2 cache, one
 * allocator), so a flush on any connection covers every connection's
 * writes and multi-conn is safe.  The image is opened at the first
 * connection, read-only if that connection is (nbdkit -r), and closed
 * at exit, which writes back the tables, reclaims freed space and
 * clears NEED_CHECK.  The start-up checks (get_ready) only read the
 * file.  If no connection opened it writable, the exit still does the
 * work the image or the keys ask for (a repair, demote=true, the
 * compaction of a free-cluster list), unless nbdkit was started with
 * -r (cmdline.c).
 *
 * dir=: every DIR/NAME.qed is an export NAME, each opened and closed
 * as file='s image is (export.c), at its first and after its last
 * connection (dir.c).
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
#include "defaults.h"
#include "options.h"
#include "export.h"
#include "dir.h"
#include "cmdline.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

struct plugin_options opts = {
  .create_size = -1,
  .create_backing_format = QED_FORMAT_PROBE,
  .follow_backing = true,
  .backing_override_format = QED_FORMAT_PROBE,
  .idle_clean = QED_DEFAULT_IDLE_CLEAN,
  .locking = QED_LOCKING_AUTO,
  .compact_limit = QED_DEFAULT_COMPACT_LIMIT,
  .freelist = true,
  .copy_on_read = -1,
};

/* We created the image at start-up: removed again if start-up fails, so
 * that a retry of the same command line is not refused. */
static bool created;

/* Was nbdkit started with -r (cmdline_ro_known: could we tell)? */
static bool cmdline_ro, cmdline_ro_known;
static const char *cmdline_ro_why;

/* file=: the image, opened by the first connection (its image is also
 * glue_image, for the idle timer). */
static struct plugin_export single = { .fd = -1 };

static void
qed_plugin_unload (void)
{
  free (opts.filename);
  free (opts.dir);
  free (opts.default_export);
  free (opts.create_backing);
  free (opts.backing_override);
  free (single.filename);
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
    opts.compact_limit = v;
    return 0;
  }
  if (glue_parse_bool (key, value, &b) == -1)
    return -1;
  if (strcmp (key, "freelist") == 0)
    opts.freelist = b;
  else if (strcmp (key, "demote") == 0)
    opts.demote = b;
  else
    opts.copy_on_read = b;
  return 0;
}

/* The keys of create=. */
static int
config_create (const char *key, const char *value)
{
  if (strcmp (key, "create") == 0) {
    bool b;
    if (strcmp (value, "if-missing") == 0) {
      opts.create = CREATE_IF_MISSING;
      return 0;
    }
    if (glue_parse_bool (key, value, &b) == -1)
      return -1;
    opts.create = b ? CREATE_ALWAYS : CREATE_NO;
    return 0;
  }
  else if (strcmp (key, "size") == 0) {
    opts.create_size = glue_parse_size (key, value);
    return opts.create_size == -1 ? -1 : 0;
  }
  else if (strcmp (key, "cluster-size") == 0)
    return glue_parse_power_of_2 (key, value, QED_MIN_CLUSTER_SIZE,
                                  QED_MAX_CLUSTER_SIZE,
                                  &opts.create_cluster_size);
  else if (strcmp (key, "table-size") == 0) {
    uint32_t v;
    if (nbdkit_parse_uint32_t (key, value, &v) == -1)
      return -1;
    if (v < 1 || v > 16 || !is_power_of_2 (v)) {
      nbdkit_error ("table-size: must be 1, 2, 4, 8 or 16");
      return -1;
    }
    opts.create_table_size = v;
    return 0;
  }
  else if (strcmp (key, "backing") == 0) {
    free (opts.create_backing);
    opts.create_backing = strdup (value);    /* stored as given */
    return opts.create_backing ? 0 : -1;
  }
  else
    return parse_format (key, value, &opts.create_backing_format);
}

static int
config_string (char **p, const char *value)
{
  free (*p);
  *p = strdup (value);
  if (*p == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  return 0;
}

static int
qed_plugin_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0) {
    free (opts.filename);
    /* The image may not exist yet (create=true). */
    opts.filename = nbdkit_absolute_path (value);
    return opts.filename ? 0 : -1;
  }
  else if (strcmp (key, "dir") == 0) {
    free (opts.dir);
    opts.dir = nbdkit_realpath (value);
    return opts.dir ? 0 : -1;
  }
  else if (strcmp (key, "default-export") == 0)
    return config_string (&opts.default_export, value);
  else if (strcmp (key, "create") == 0 || strcmp (key, "size") == 0 ||
           strcmp (key, "cluster-size") == 0 ||
           strcmp (key, "table-size") == 0 || strcmp (key, "backing") == 0 ||
           strcmp (key, "backing-format") == 0)
    return config_create (key, value);
  else if (strcmp (key, "zero-detect") == 0)
    return glue_parse_bool (key, value, &opts.zero_detect);
  else if (strcmp (key, "l2-cache") == 0) {
    opts.l2_cache = glue_parse_size (key, value);
    if (opts.l2_cache == -1)
      return -1;
    if (opts.l2_cache < 65536 || opts.l2_cache > (INT64_C (1) << 40)) {
      nbdkit_error ("l2-cache: must be between 64K and 1T");
      return -1;
    }
    return 0;
  }
  else if (strcmp (key, "follow-backing") == 0) {
    opts.follow_beneath = strcmp (value, "beneath") == 0;
    if (opts.follow_beneath) {
      opts.follow_backing = true;
      return 0;
    }
    return glue_parse_bool (key, value, &opts.follow_backing);
  }
  else if (strcmp (key, "backing-devices") == 0)
    return glue_parse_bool (key, value, &opts.backing_devices);
  else if (strcmp (key, "backing-override") == 0) {
    free (opts.backing_override);
    opts.backing_override = nbdkit_realpath (value);
    return opts.backing_override ? 0 : -1;
  }
  else if (strcmp (key, "backing-override-format") == 0)
    return parse_format (key, value, &opts.backing_override_format);
  else if (strcmp (key, "idle-clean") == 0)
    return nbdkit_parse_unsigned (key, value, &opts.idle_clean);
  else if (strcmp (key, "locking") == 0)
    return glue_parse_locking (key, value, &opts.locking);
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
  "[file=]<IMAGE>            The QED image to serve (or dir=).\n" \
  "dir=<DIR>                 Serve every DIR/NAME.qed as export NAME.\n" \
  "default-export=<NAME>     With dir=: what the empty name means.\n" \
  "create=true size=<SIZE>   Create IMAGE first (it must not exist).\n" \
  "create=if-missing size=<SIZE>  Create IMAGE unless it exists.\n" \
  "cluster-size=<SIZE>       Cluster size of a new image (default 64K).\n" \
  "table-size=<N>            Table size of a new image (default 4).\n" \
  "backing=<PATH>            Backing file of a new image.\n" \
  "backing-format=raw|qed    Its format (required with backing).\n" \
  "zero-detect=<BOOL>        Store zero clusters for all-zero writes.\n" \
  "l2-cache=<SIZE>           Memory for cached L2 tables (default 32M;\n" \
  "                          with dir=, for all exports together).\n" \
  "follow-backing=true|false|beneath  Open the backing files images\n" \
  "                          name (default true); beneath: only names\n" \
  "                          beneath the image's directory.\n" \
  "backing-devices=<BOOL>    Allow block devices as backing files.\n" \
  "backing-override=<PATH>   Use PATH as the backing file instead.\n" \
  "backing-override-format=raw|qed  Its format (required with it).\n" \
  "idle-clean=<SECONDS>      Clear NEED_CHECK after this long without\n" \
  "                          writes (default 5, 0 = only at exit); with\n" \
  "                          dir=, close an export this long after its\n" \
  "                          last connection (0 = at once).\n" \
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
  const char *slash = strrchr (opts.filename, '/');
  struct stat st;

  if (opts.create_backing == NULL)
    return 0;
  /* A relative name is relative to the image's directory. */
  if (opts.create_backing[0] == '/')
    path = strdup (opts.create_backing);
  else if (asprintf (&path, "%.*s/%s", (int) (slash - opts.filename),
                     opts.filename, opts.create_backing) == -1)
    path = NULL;
  if (path == NULL) {
    nbdkit_error ("malloc: %m");
    return -1;
  }
  if (stat (path, &st) == -1) {
    nbdkit_error ("backing=%s: %s: %m (nothing was created)",
                  opts.create_backing, path);
    return -1;
  }
  if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode)) {
    nbdkit_error ("backing=%s: %s is not a regular file or a block device "
                  "(nothing was created)", opts.create_backing, path);
    return -1;
  }
  return 0;
}

/* create=: make the image now. */
static int
create_image (void)
{
  struct qed_create_options co = {
    .size = opts.create_size,
    .cluster_size = opts.create_cluster_size,
    .table_size = opts.create_table_size,
    .backing_name = opts.create_backing,
    .backing_raw = opts.create_backing_format == QED_FORMAT_RAW,
    .compat_features = opts.copy_on_read == 1 ? QED_CF_COPY_ON_READ : 0,
  };

  if (opts.create_size == -1) {
    nbdkit_error ("create=%s needs size=<SIZE>",
                  opts.create == CREATE_IF_MISSING ? "if-missing" : "true");
    return -1;
  }
  if (access (opts.filename, F_OK) == 0) {
    if (opts.create == CREATE_IF_MISSING) {
      nbdkit_debug ("%s exists: serving it (create=if-missing)",
                    opts.filename);
      return 0;
    }
    nbdkit_error ("%s: create=true, but the file already exists "
                  "(create=if-missing serves an existing image)",
                  opts.filename);
    return -1;
  }
  if (check_new_backing () == -1 || qed_create (opts.filename, &co) == -1)
    return -1;
  created = true;
  nbdkit_debug ("created %s", opts.filename);
  return 0;
}

static int
qed_plugin_config_complete (void)
{
  if (opts.filename && opts.dir) {
    nbdkit_error ("file= and dir= cannot be used together");
    return -1;
  }
  if (opts.filename == NULL && opts.dir == NULL) {
    nbdkit_error ("you must supply the file=<IMAGE> (or dir=<DIR>) "
                  "parameter after the plugin name on the command line");
    return -1;
  }
  if (opts.dir && opts.create) {
    nbdkit_error ("create= cannot be used with dir= (create the images "
                  "with qemu-img, or one at a time with file=)");
    return -1;
  }
  if (opts.default_export && !opts.dir) {
    nbdkit_error ("default-export= is only used with dir=");
    return -1;
  }
  /* A raw disk that is probed could be taken for a QED image whose
   * header (written by a guest) names any file. */
  if (opts.create && opts.create_backing &&
      opts.create_backing_format == QED_FORMAT_PROBE) {
    nbdkit_error ("backing=%s needs backing-format=raw|qed (a probed raw "
                  "disk could name any file)", opts.create_backing);
    return -1;
  }
  if (opts.backing_override &&
      opts.backing_override_format == QED_FORMAT_PROBE) {
    nbdkit_error ("backing-override=%s needs backing-override-format="
                  "raw|qed (a probed raw disk could name any file)",
                  opts.backing_override);
    return -1;
  }
  if (!opts.create && (opts.create_size != -1 || opts.create_cluster_size ||
                       opts.create_table_size || opts.create_backing)) {
    nbdkit_error ("size, cluster-size, table-size and backing are only "
                  "used with create=true");
    return -1;
  }
  /* Now, before nbdkit forks into the background and leaves the
   * working directory (a relative plugin path). */
  cmdline_ro_known =
    nbdkit_cmdline_readonly (&cmdline_ro, &cmdline_ro_why) == 0;
  if (cmdline_ro_known)
    nbdkit_debug ("nbdkit command line: %s", cmdline_ro ? "-r" : "no -r");
  else
    nbdkit_debug ("nbdkit command line: cannot tell -r: %s",
                  cmdline_ro_why);
  if (opts.dir)
    return dir_config_complete ();
  single.filename = strdup (opts.filename);
  if (single.filename == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  return opts.create ? create_image () : 0;
}

/* Sanity check now, rather than waiting for the first client: read and
 * validate the image and its backing chain, without writing anything.
 */
static int
qed_plugin_get_ready (void)
{
  if (opts.dir || export_validate (&single) == 0)
    return 0;
  if (created) {
    /* Half made: a retry must not find it.  (Ours: nothing else knows
     * this file yet.) */
    if (unlink (opts.filename) == 0)
      nbdkit_error ("%s: removed the image create=%s made, since it "
                    "cannot be served", opts.filename,
                    opts.create == CREATE_IF_MISSING ? "if-missing" : "true");
    created = false;
  }
  return -1;
}

static int
qed_plugin_after_fork (void)
{
  int fd;

  if (opts.dir)
    return dir_after_fork ();
  fd = qed_hold_reader_locks (opts.filename, opts.locking);
  if (fd == -1)
    return -1;
  return glue_after_fork (fd, opts.idle_clean);
}

/* At exit, when no connection opened the image writable: the work the
 * image or the keys ask for is still done (file= only). */
static void
maintenance_at_exit (void)
{
  struct qed_open_options oo = { .readonly = true, .skip_check = true,
                                 .l2_cache_bytes = 65536,
                                 .locking = opts.locking };
  struct qed_image *probe = qed_open (opts.filename, &oo);
  const char *work;

  if (probe == NULL)
    return;
  work = export_pending_work (probe);
  qed_close (probe);
  if (work == NULL)
    return;
  /* Nothing fails (the image is as it was, and the next writable
   * open does the work): warnings, not errors (LOGGING). */
  if (cmdline_ro_known && cmdline_ro) {
    qed_warning ("%s: %s not done: nbdkit -r (read-only), nothing "
                 "written", opts.filename, work);
    return;
  }
  if (!cmdline_ro_known) {
    qed_warning ("%s: %s not done: cannot tell whether nbdkit runs "
                 "with -r (%s), nothing written", opts.filename, work,
                 cmdline_ro_why);
    return;
  }
  if (access (opts.filename, W_OK) == -1) {
    qed_warning ("%s: %s not done: the file is not writable (%m), "
                 "nothing written", opts.filename, work);
    return;
  }
  nbdkit_debug ("%s: no connection wrote to the image: doing %s at exit",
                opts.filename, work);
  if (export_open (&single, false, NULL) == 0)
    export_close (&single);
}

static void
qed_plugin_cleanup (void)
{
  struct qed_image *img;
  bool wrote;

  if (opts.dir) {
    dir_cleanup ();
    return;
  }
  img = glue_cleanup ();
  wrote = img && !qed_is_readonly (img);
  export_close (&single);
  if (!wrote)
    maintenance_at_exit ();
}

/* file=: open the image at the first connection. */
static void *
open_single (int readonly)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&glue_open_lock);
  struct qed_image *img = glue_image ();

  if (!single.writable)
    readonly = 1;
  if (img == NULL) {
    glue_release_startup_locks ();
    if (export_open (&single, readonly, NULL) == -1)
      return NULL;
    glue_set_image (single.img);
  }
  else if (!readonly && qed_is_readonly (img)) {
    nbdkit_error ("%s: the image was opened read-only by an earlier "
                  "connection", opts.filename);
    return NULL;
  }
  return &single;
}

static void *
qed_plugin_open (int readonly)
{
  if (opts.dir)
    return dir_get (nbdkit_export_name (), readonly);
  return open_single (readonly);
}

static void
qed_plugin_close (void *handle)
{
  if (opts.dir)
    dir_put (handle);
}

static int
qed_plugin_list_exports (int readonly, int is_tls,
                         struct nbdkit_exports *exports)
{
  if (opts.dir)
    return dir_list_exports (exports);
  return nbdkit_use_default_export (exports);
}

static const char *
qed_plugin_default_export (int readonly, int is_tls)
{
  return opts.dir ? dir_default_export () : "";
}

/* A write on e (for the idle write-back). */
static void
note_write (struct plugin_export *e)
{
  if (opts.dir)
    dir_note_write (e);
  else
    glue_note_write ();
}

static int64_t
qed_plugin_get_size (void *handle)
{
  struct plugin_export *e = handle;

  return qed_get_size (e->img);
}

static int
qed_plugin_block_size (void *handle,
                       uint32_t *minimum, uint32_t *preferred,
                       uint32_t *maximum)
{
  struct plugin_export *e = handle;

  *minimum = 1;
  *preferred = MAX (4096u, MIN (qed_get_cluster_size (e->img), 2u << 20));
  *maximum = 0xffffffff;
  return 0;
}

static int
qed_plugin_can_write (void *handle)
{
  struct plugin_export *e = handle;

  return !qed_is_readonly (e->img);
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
get_below (struct plugin_export *e)
{
  return e->chain ? &e->below : NULL;
}

/* Copy-on-read (as the filter's): whole clusters read from the chain
 * are stored in the image; ranges the chain maps as holes are not read;
 * all-zero clusters become zero clusters.  qed_fill installs only into
 * clusters still unallocated, so a concurrent write always wins. */
#define COR_CHUNK (32u * 1024 * 1024)

static int
cor_fill_chunk (struct plugin_export *e, char *wbuf, uint64_t start,
                uint64_t end)
{
  uint64_t pos = start;

  while (pos < end) {
    struct qed_map m;
    uint64_t len;

    if (qed_chain_map (e->chain, pos, end - pos, &m) == -1)
      return -1;
    len = MIN (m.length, end - pos);
    if (len == 0) {
      errno = EIO;
      return -1;
    }
    if (m.type == QED_MAP_UNALLOCATED)
      memset (wbuf + (pos - start), 0, len);
    else if (e->below.read (e->below.opaque, wbuf + (pos - start), len,
                            pos) == -1)
      return -1;
    pos += len;
  }
  /* A failed fill leaves the clusters as they were (the data read is
   * still right): said once, as a warning (glue_fill). */
  glue_fill (e->img, wbuf, end - start, start, true, false);
  return 0;
}

/* Read [offset, offset+count) (buf may be NULL: cache), storing the
 * whole clusters around it. */
static int
cor_fetch (struct plugin_export *e, void *buf, uint64_t count,
           uint64_t offset)
{
  uint64_t cs = qed_get_cluster_size (e->img);
  uint64_t start = ROUND_DOWN (offset, cs);
  uint64_t end = MIN (ROUND_UP (offset + count, cs), qed_get_size (e->img));
  uint64_t chunk = MAX ((uint64_t) COR_CHUNK, cs);
  CLEANUP_FREE char *wbuf = malloc (MIN (chunk, end - start));

  if (wbuf == NULL) {
    nbdkit_error ("malloc: %m");
    return -1;
  }
  for (uint64_t s = start; s < end; s += chunk) {
    uint64_t t = MIN (s + chunk, end);
    uint64_t from = MAX (s, offset), to = MIN (t, offset + count);
    if (cor_fill_chunk (e, wbuf, s, t) == -1)
      return -1;
    if (buf && from < to)
      memcpy ((char *) buf + (from - offset), wbuf + (from - s), to - from);
  }
  note_write (e);
  return 0;
}

static int
cor_read (void *opaque, void *buf, uint64_t count, uint64_t offset)
{
  return cor_fetch (opaque, buf, count, offset);
}

static int
cor_prefetch (void *opaque, uint64_t count, uint64_t offset)
{
  return cor_fetch (opaque, NULL, count, offset);
}

/* Reads (and cache) copy on read; writes copy only the partial
 * clusters they need.  *b is storage for the copy-on-read layer. */
static const struct qed_below *
get_read_below (struct plugin_export *e, struct qed_below *b)
{
  if (!e->cor)
    return get_below (e);
  *b = (struct qed_below) { .read = cor_read, .prefetch = cor_prefetch,
                            .opaque = e };
  return b;
}

static int
qed_plugin_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
                  uint32_t flags)
{
  struct plugin_export *e = handle;
  struct qed_below b;

  return qed_read (e->img, get_read_below (e, &b), buf, count, offset);
}

static int
qed_plugin_pwrite (void *handle, const void *buf, uint32_t count,
                   uint64_t offset, uint32_t flags)
{
  struct plugin_export *e = handle;
  unsigned f = (flags & NBDKIT_FLAG_FUA ? QED_WRITE_FUA : 0) |
    (opts.zero_detect ? QED_WRITE_DETECT_ZERO : 0);

  note_write (e);
  return qed_write (e->img, get_below (e), buf, count, offset, f);
}

static int
qed_plugin_zero (void *handle, uint32_t count, uint64_t offset,
                 uint32_t flags)
{
  struct plugin_export *e = handle;
  unsigned f = (flags & NBDKIT_FLAG_FUA ? QED_WRITE_FUA : 0) |
    (flags & NBDKIT_FLAG_MAY_TRIM ? QED_ZERO_MAY_UNMAP : 0) |
    (flags & NBDKIT_FLAG_FAST_ZERO ? QED_ZERO_FAST : 0);

  note_write (e);
  return qed_zero (e->img, get_below (e), count, offset, f);
}

static int
qed_plugin_trim (void *handle, uint32_t count, uint64_t offset,
                 uint32_t flags)
{
  struct plugin_export *e = handle;

  note_write (e);
  return qed_trim (e->img, get_below (e), count, offset,
                   flags & NBDKIT_FLAG_FUA ? QED_WRITE_FUA : 0);
}

static int
qed_plugin_flush (void *handle, uint32_t flags)
{
  struct plugin_export *e = handle;

  return qed_flush (e->img);
}

static int
qed_plugin_cache (void *handle, uint32_t count, uint64_t offset,
                  uint32_t flags)
{
  struct plugin_export *e = handle;
  struct qed_below b;

  return qed_prefetch (e->img, get_read_below (e, &b), count, offset);
}

/* An unallocated run: ask the backing chain what lies there. */
static int64_t
chain_extents (void *opaque, uint64_t len, uint64_t offset, bool req_one,
               struct nbdkit_extents *extents)
{
  struct plugin_export *e = opaque;
  struct qed_map m;

  if (qed_chain_map (e->chain, offset, len, &m) == -1 ||
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
  struct plugin_export *e = handle;

  return glue_extents (e->img, count, offset, flags & NBDKIT_FLAG_REQ_ONE,
                       extents, e->chain ? chain_extents : NULL, e);
}

static void
qed_plugin_dump_plugin (void)
{
  printf ("qed_default_l2_cache=%u\n", QED_DEFAULT_L2_CACHE);
  printf ("qed_zero_clusters=yes\n");
  printf ("qed_backing_formats=raw,qed\n");
  printf ("qed_dir=yes\n");
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
  .list_exports      = qed_plugin_list_exports,
  .default_export    = qed_plugin_default_export,
  .open              = qed_plugin_open,
  .close             = qed_plugin_close,
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
