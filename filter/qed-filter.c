/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the QED filter, a writable QED overlay over any plugin.
 *
 *   nbdkit --filter=qed PLUGIN [plugin args] [qed-overlay=FILE]
 *          [qed-copy-on-read=BOOL] [qed-zero-detect=BOOL]
 *          [qed-cluster-size=SIZE] [qed-backing-name=NAME]
 *          [qed-readahead=SIZE]
 *          [qed-locking=on|off|auto] [qed-compact-limit=SIZE]
 *          [qed-freelist=BOOL]
 *          [qed-origin-id=STRING] [qed-origin-changed=error|keep|discard]
 *          [qed-detach=BOOL]
 *   nbdkit --filter=qed PLUGIN [plugin args] qed-overlay-dir=DIR
 *          [qed-max-exports=N] [qed-shared-cache=FILE] [the keys above]
 *
 * Behaviour notes (why things are the way they are):
 *
 * - The plugin is opened read-only and never sees a write, zero or
 *   trim, so the source (a remote disk, a golden image) cannot be
 *   damaged however the clients behave.  Opening a layer read-only makes
 *   nbdkit 1.32 report zero, trim and FUA as unsupported for it, so
 *   every capability is declared here rather than inherited.
 *
 * - There is one overlay for all connections (one allocator, one L2
 *   cache), so a flush on any connection covers every connection's
 *   writes and multi-conn is safe.  It is opened at the first
 *   connection, because only then is the plugin's size known; an
 *   existing overlay's header is checked earlier, at start-up, so that
 *   a wrong file is refused before nbdkit forks.  It follows that the
 *   plugin must serve the same data to every connection (the export
 *   name is passed down but the overlay is shared).
 *
 * - The overlay's size is the plugin's size rounded up to 512 (QED
 *   sizes are whole sectors); the export keeps the plugin's exact size.
 *   A persistent overlay must match its plugin: the origin guard
 *   (origin.c) records the plugin's size, export, qed-origin-id and a
 *   sample of copied clusters, and checks them at the first connection.
 *
 * - Copy-on-read stores whole clusters, read once from the plugin, so
 *   that the second read of any byte never reaches it (the point of
 *   caching a slow remote source).  A fill is installed only into
 *   clusters still unallocated when it commits, so a write that
 *   completes while the plugin read is in flight is never overwritten
 *   by stale data (the race that loses writes in nbdkit's cow filter).
 *   Ranges the plugin reports as zero (its extents) become zero
 *   clusters without being read, and with zero detection so do
 *   all-zero clusters: a sparse source makes a sparse overlay.
 *
 * - A partial write into a cluster that is not in the overlay copies
 *   the rest of the cluster from the plugin (a zero cluster needs no
 *   copy: new clusters are holes).  Whole-cluster zero and trim are
 *   metadata only: the cluster becomes a zero cluster, hiding the
 *   plugin's data.  Trim does not pass through to the plugin.
 *
 * - Flush and FUA make a persistent overlay durable, and a clean exit
 *   (SIGTERM, or the end of --run) writes back the tables, gives back
 *   space freed by zero and trim, and clears NEED_CHECK, so that
 *   qemu-img check is happy.  After a crash the next open repairs the
 *   overlay (only clusters can leak).  A temporary overlay (no
 *   qed-overlay) is unlinked at once; flush and FUA are no-ops for it,
 *   since nothing of it survives nbdkit anyway.
 *
 * - An existing overlay must be ours (owned by the server's user, not
 *   writable by others, not reached through someone else's symlink),
 *   or a local user could redirect or read the guest's writes; new
 *   overlays are 0600, since copy-on-read fills them with the source's
 *   data (safe-open.c).
 *
 * - qed-backing-name only records a name in the overlay's header (as
 *   a raw backing file, so the data is never probed).  The filter never
 *   opens that file; it is for other readers of the overlay, such as
 *   "nbdkit qed overlay.qed" or qemu-img, who then see the same disk
 *   the filter served.
 *
 * - With qed-copy-on-read=false the overlay holds only what clients
 *   wrote, and NBD_CMD_CACHE is passed to the plugin as a hint.  With
 *   copy-on-read, CACHE copies the range into the overlay.
 *
 * - Filters are tied to the exact nbdkit version they were built
 *   against (1.32.5 here): nbdkit refuses to load this filter into any
 *   other version.
 *
 * - This file is the glue; each concern of a kept cache has a file:
 *   readahead.c (read-ahead and the extents cache), origin.c (the
 *   origin guard and its record), prefetch.c (qed-prefetch, a thread
 *   with its own plugin context), offline.c (serving while the plugin
 *   cannot be opened, reopening it in the background), overlay-set.c
 *   (qed-overlay-dir: the per-export overlays, each connection's in
 *   h->ovl) and shared-cache.c (qed-shared-cache: served here as the
 *   one overlay is, beneath the per-export ones: struct layers).
 *   qed-detach: detach_poll after each change, for the image that
 *   keeps the record (the scan and the mark are origin.c's, per
 *   struct origin: each per-export overlay detaches on its own; with
 *   qed-shared-cache the shared cache does, as the one overlay).
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
#include <sys/stat.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "qed.h"
#include "defaults.h"
#include "glue-nbdkit.h"
#include "safe-open.h"
#include "seam.h"
#include "util.h"
#include "readahead.h"
#include "origin.h"
#include "prefetch.h"
#include "offline.h"
#include "overlay-set.h"
#include "shared-cache.h"

/* The largest single read passed to the plugin. */
#define MAX_BACKEND_READ (32u * 1024 * 1024)

/* Cache requests are copied into the overlay in chunks of this size. */
#define CACHE_CHUNK (32u * 1024 * 1024)

/* Seconds without writes after which a persistent overlay is written
 * back and marked clean (the plugin's idle-clean default). */
#define IDLE_CLEAN QED_DEFAULT_IDLE_CLEAN

/* Parameters. */
static char *overlay;                   /* NULL = temporary */
static bool copy_on_read = true;
static bool zero_detect = true;
static uint32_t readahead = RA_DEFAULT_WINDOW;  /* the window's bound */
static uint32_t cluster_size;           /* 0 = default, new overlays only */
static char *backing_name;
static enum qed_locking locking = QED_LOCKING_AUTO;
static uint64_t compact_limit = QED_DEFAULT_COMPACT_LIMIT;
static bool freelist = true;
static bool detach;
static bool prefetch;


/* The overlay's origin was checked against the plugin (origin.c), or
 * needs no check (temporary, detached).  An overlay opened while the
 * plugin could not be opened is not, until the origin is back: no
 * missing cluster is fetched before (glue_open_lock; atomic reads). */
static bool verified;
/* The export's size and name, from the first connection. */
static int64_t export_size = -1;
/* The origin's absence was logged (a warning, once until it is back). */
static bool away_said;
static char *export_name;
/* The origin record of the one overlay (qed-overlay, or the shared
 * cache): made at get_ready, freed at unload. */
static struct origin *one_origin;

/* A temporary overlay is created in its own private directory, made
 * in tmp_parent when the first connection needs it. */
static char *tmp_parent;
static char *tmp_dir;

/* nbdkit loads a filter stacked twice (--filter=qed --filter=qed) from
 * the same object, so both layers share these globals and one overlay:
 * set up once, or the second layer leaks an idle timer and a locked
 * descriptor (and frees the parameters twice). */
static bool ready_done, fork_done;

/* The overlay itself, opened at the first prepare, is glue_image;
 * with qed-overlay-dir, each connection's is its export's (h->ovl). */

/* The overlays outlive nbdkit (qed-overlay or qed-overlay-dir). */
static bool
persistent (void)
{
  return overlay != NULL || ovl_dir () != NULL;
}

static void
qed_filter_unload (void)
{
  free (overlay);
  free (backing_name);
  sc_unload ();
  free (tmp_parent);
  free (tmp_dir);
  /* Called once per layer when stacked twice (ready_done). */
  overlay = backing_name = tmp_parent = tmp_dir = NULL;
  ra_log_stats ();
  extcache_free ();
  origin_free (one_origin);
  one_origin = NULL;
  origin_unload ();
  ovl_unload ();
}

static int
qed_filter_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                   const char *key, const char *value)
{
  if (strcmp (key, "qed-overlay") == 0) {
    free (overlay);
    if (*value == '\0') {
      nbdkit_error ("qed-overlay: the file name must not be empty");
      return -1;
    }
    /* It may not exist yet: it is created at the first connection. */
    overlay = nbdkit_absolute_path (value);
    return overlay ? 0 : -1;
  }
  else if (strcmp (key, "qed-overlay-dir") == 0)
    return ovl_set_dir (value);
  else if (strcmp (key, "qed-shared-cache") == 0)
    return sc_set (value);
  else if (strcmp (key, "qed-max-exports") == 0)
    return ovl_set_max (key, value);
  else if (strcmp (key, "qed-copy-on-read") == 0)
    return glue_parse_bool (key, value, &copy_on_read);
  else if (strcmp (key, "qed-zero-detect") == 0)
    return glue_parse_bool (key, value, &zero_detect);
  else if (strcmp (key, "qed-cluster-size") == 0)
    return glue_parse_power_of_2 (key, value, QED_MIN_CLUSTER_SIZE,
                                  QED_MAX_CLUSTER_SIZE, &cluster_size);
  else if (strcmp (key, "qed-readahead") == 0) {
    int64_t v = glue_parse_size (key, value);
    if (v == -1)
      return -1;
    if (v > RA_MAX_WINDOW) {
      nbdkit_error ("qed-readahead: at most %uM", RA_MAX_WINDOW >> 20);
      return -1;
    }
    readahead = v;
    ra_set_max_window (v);
    return 0;
  }
  else if (strcmp (key, "qed-backing-name") == 0) {
    free (backing_name);
    if (*value == '\0') {
      nbdkit_error ("qed-backing-name: the name must not be empty");
      return -1;
    }
    backing_name = strdup (value);      /* stored as given */
    if (backing_name == NULL) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
    return 0;
  }
  else if (strcmp (key, "qed-locking") == 0)
    return glue_parse_locking (key, value, &locking);
  else if (strcmp (key, "qed-compact-limit") == 0) {
    int64_t v = glue_parse_size (key, value);
    if (v == -1)
      return -1;
    compact_limit = v;
    return 0;
  }
  else if (strcmp (key, "qed-freelist") == 0)
    return glue_parse_bool (key, value, &freelist);
  else if (strcmp (key, "qed-origin-id") == 0) {
    return origin_set_id (value);
  }
  else if (strcmp (key, "qed-origin-changed") == 0) {
    return origin_set_changed (value);
  }
  else if (strcmp (key, "qed-detach") == 0)
    return glue_parse_bool (key, value, &detach);
  else if (strcmp (key, "qed-prefetch") == 0)
    return glue_parse_bool (key, value, &prefetch);
  else if (strcmp (key, "qed-prefetch-rate") == 0)
    return prefetch_set_rate (key, value);
  else if (strncmp (key, "qed-", 4) == 0) {
    /* No plugin uses our prefix: a typo must not reach the plugin. */
    nbdkit_error ("unknown parameter '%s'", key);
    return -1;
  }
  else
    return next (nxdata, key, value);
}

#define qed_filter_config_help \
  "qed-overlay=<FILE>         The QED overlay (created if missing;\n" \
  "                           default: a temporary file in $TMPDIR).\n" \
  "qed-overlay-dir=<DIR>      An overlay DIR/NAME.qed per export NAME\n" \
  "                           (instead of qed-overlay).\n" \
  "qed-max-exports=<N>        With qed-overlay-dir: at most N exports\n" \
  "                           open at once (default 64).\n" \
  "qed-shared-cache=<FILE>    With qed-overlay-dir: one QED image beneath\n" \
  "                           every overlay keeps what is copied from\n" \
  "                           the plugin (each origin cluster once).\n" \
  "qed-copy-on-read=<BOOL>    Store data read from the plugin in the\n" \
  "                           overlay (default true).\n" \
  "qed-zero-detect=<BOOL>     All-zero clusters become zero clusters\n" \
  "                           (default true).\n" \
  "qed-cluster-size=<SIZE>    Cluster size of a new overlay (default 64K).\n" \
  "qed-readahead=<SIZE>       Largest read-ahead on sequential copy-on-read\n" \
  "                           misses (default 8M; 0 disables).\n" \
  "qed-backing-name=<NAME>    Record NAME (raw) as the overlay's backing\n" \
  "                           file, for other readers of the overlay.\n" \
  "qed-locking=on|off|auto    Lock the overlay as QEMU does (default auto).\n" \
  "qed-compact-limit=<SIZE>   At a clean stop move at most SIZE of data\n" \
  "                           to give back freed space; list the rest\n" \
  "                           (default 64M).\n" \
  "qed-freelist=false         Never write a free-cluster list.\n" \
  "qed-origin-id=<STRING>     The origin's version (an ETag...): an\n" \
  "                           overlay made for another id is refused.\n" \
  "qed-origin-changed=error|keep|discard\n" \
  "                           What to do when the origin changed\n" \
  "                           (default error).\n" \
  "qed-detach=<BOOL>          Once the overlay holds every cluster,\n" \
  "                           remove the origin from its header.\n" \
  "qed-prefetch=<BOOL>        Copy every missing cluster in the background\n" \
  "                           (default false).\n" \
  "qed-prefetch-rate=<SIZE>   At most SIZE bytes per second from the\n" \
  "                           origin (default 0: unlimited)."

static int
qed_filter_config_complete (nbdkit_next_config_complete *next,
                            nbdkit_backend *nxdata)
{
  uint32_t cs = cluster_size ? cluster_size : QED_DEFAULT_CLUSTER_SIZE;

  if (!qed_qemu_can_open (cs, QED_DEFAULT_TABLE_SIZE)) {
    nbdkit_error ("qed-cluster-size: QEMU cannot open overlays with "
                  "clusters of %" PRIu32 " bytes", cs);
    return -1;
  }
  /* The name must leave room for the origin record and the
   * free-cluster list record at the end of the header cluster. */
  if (backing_name &&
      (strlen (backing_name) > QED_MAX_BACKING_NAME ||
       strlen (backing_name) > cs - QED_HEADER_BYTES - 64 -
       ORIGIN_RECORD_BYTES)) {
    nbdkit_error ("qed-backing-name: the name is too long (%zu bytes)",
                  strlen (backing_name));
    return -1;
  }
  if (ovl_dir ()) {
    if (overlay) {
      nbdkit_error ("qed-overlay-dir: cannot be combined with qed-overlay");
      return -1;
    }
  }
  /* The shared cache is served as qed-overlay's one image is. */
  if (sc_config_complete (ovl_dir (), cs, &overlay) == -1)
    return -1;
  return next (nxdata);
}

/* Sanity check now, rather than waiting for the first client: an
 * existing overlay must be a valid QED image (read only, nothing is
 * written), a new one must be creatable.  The size check must wait
 * for the plugin's size, at the first connection.
 */
/* A temporary overlay: check where its directory will be made (only
 * when a client needs it). */
static int
ready_tmp_parent (void)
{
  const char *t = getenv ("TMPDIR");

  tmp_parent = nbdkit_absolute_path (t && *t ? t : "/var/tmp");
  if (tmp_parent == NULL)
    return -1;
  if (access (tmp_parent, W_OK | X_OK) == -1) {
    nbdkit_error ("%s: cannot create a temporary overlay there: %m",
                  tmp_parent);
    return -1;
  }
  return 0;
}

/* qed-backing-name only names the origin for other readers of the
 * overlay: a name that does not exist is just noted. */
static void
note_backing_name (void)
{
  CLEANUP_FREE char *dir = dir_of (overlay);
  CLEANUP_FREE char *path = NULL;

  if (dir && asprintf (&path, "%s/%s", dir, backing_name) >= 0 &&
      access (backing_name[0] == '/' ? backing_name : path, F_OK) == -1)
    nbdkit_debug ("note: qed-backing-name %s does not exist (relative "
                  "names are relative to the overlay's directory %s)",
                  backing_name, dir);
}

/* An existing overlay (fd): it must be a QED image whose backing name
 * is qed-backing-name's, unless it was detached. */
static int
ready_existing_overlay (int fd)
{
  struct qed_open_options oo = { .readonly = true, .skip_check = true,
                                 .l2_cache_bytes = 65536,
                                 .locking = locking,
                                 .use_fd = true, .fd = fd };
  struct qed_image *probe = qed_open (overlay, &oo);
  const char *name;
  uint32_t cs;
  int r = 0;

  if (probe == NULL) {
    nbdkit_error ("qed-overlay: %s exists but cannot be used as a QED "
                  "overlay (see the message above)", overlay);
    return -1;
  }
  name = qed_get_backing_name (probe);
  cs = qed_get_cluster_size (probe);
  if (backing_name && name == NULL && origin_probe_detached (probe))
    /* Detached by qed-detach earlier: it stands alone now. */
    nbdkit_debug ("existing overlay %s was detached from its origin "
                  "(qed-detach): serving it as it is", overlay);
  else if (backing_name && (name == NULL || strcmp (name, backing_name))) {
    /* Silently serving an overlay that claims another base would make
     * the next reader (qemu-img, the plugin) see a different disk. */
    nbdkit_error ("qed-overlay: %s records %s%s%s as its backing file, "
                  "not qed-backing-name=%s (change it with: qemu-img "
                  "rebase -u -f qed -F raw -b NAME %s%s)",
                  overlay, name ? "\"" : "", name ? name : "no name",
                  name ? "\"" : "", backing_name, overlay,
                  qed_get_header (probe)->compat_features & QED_CF_ORIGIN
                  ? ", after removing the origin record, which QEMU "
                  "refuses to rebase over: nbdkit qed OVERLAY demote=true "
                  "--run true" : "");
    r = -1;
  }
  else {
    nbdkit_debug ("existing overlay %s: size %" PRIu64 ", cluster size %"
                  PRIu32 ", backing file %s", overlay,
                  qed_get_size (probe), cs, name ? name : "(none)");
    if (cluster_size && cluster_size != cs)
      nbdkit_debug ("qed-cluster-size=%" PRIu32 " ignored: the existing "
                    "overlay has %" PRIu32 "-byte clusters",
                    cluster_size, cs);
  }
  qed_close (probe);
  return r;
}

/* A missing overlay: check that its directory lets us create it. */
static int
ready_new_overlay (void)
{
  CLEANUP_FREE char *dir = dir_of (overlay);

  if (dir == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  if (access (dir, W_OK | X_OK) == -1) {
    nbdkit_error ("qed-overlay: cannot create %s: %s: %m", overlay, dir);
    return -1;
  }
  return 0;
}

static int
qed_filter_get_ready (int thread_model)
{
  bool missing;
  int fd;

  if (ready_done) {
    nbdkit_debug ("qed filter stacked twice: the layers share one overlay");
    return 0;
  }
  ready_done = true;
  origin_set_parallel (thread_model == NBDKIT_THREAD_MODEL_PARALLEL);
  offline_set_parallel (thread_model == NBDKIT_THREAD_MODEL_PARALLEL);
  if (overlay && (one_origin = origin_new ()) == NULL)
    return -1;
  if (ovl_dir () && ovl_get_ready () == -1)
    return -1;
  if (ovl_dir () && overlay == NULL)
    return 0;
  if (detach && overlay == NULL) {
    nbdkit_error ("qed-detach: needs qed-overlay (a temporary overlay is "
                  "deleted at exit)");
    return -1;
  }
  if (overlay == NULL)
    return ready_tmp_parent ();
  if (backing_name)
    note_backing_name ();
  fd = qed_open_overlay_fd (overlay, true, &missing);
  if (fd >= 0)
    return ready_existing_overlay (fd);
  return missing ? ready_new_overlay () : -1;
}

static int
qed_filter_after_fork (nbdkit_backend *backend)
{
  int fd;

  if (fork_done)
    return 0;
  fork_done = true;
  /* A temporary overlay is never read again: no point cleaning it.
   * Per-export overlays are cleaned when their last connection ends. */
  if (overlay == NULL)
    return 0;
  fd = qed_hold_overlay_locks (overlay, locking);
  if (fd == -2)
    return -1;
  return glue_after_fork (fd, IDLE_CLEAN);
}

static prefetch_fetch_fn prefetch_fetch;

/* qed-prefetch with qed-overlay-dir and no shared cache: a warming
 * thread for each open overlay, started when it opens (once its
 * origin guard passed), stopped before it closes. */
struct dir_warm {
  struct qed_image *img;
  struct prefetch *p;
  struct dir_warm *next;
};
static pthread_mutex_t dir_warm_lock = PTHREAD_MUTEX_INITIALIZER;
static struct dir_warm *dir_warms;

static void
dir_warm_start (struct qed_image *img, struct origin *org)
{
  struct dir_warm *w;

  if (!prefetch || origin_is_detached (org))
    return;
  w = malloc (sizeof *w);
  if (w == NULL) {
    nbdkit_error ("malloc: %m");
    return;
  }
  w->img = img;
  w->p = prefetch_new (img, prefetch_fetch, org, true);
  if (w->p == NULL) {
    free (w);
    return;
  }
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&dir_warm_lock);
  w->next = dir_warms;
  dir_warms = w;
}

static void
dir_warm_stop (struct qed_image *img)
{
  struct dir_warm **pp, *w = NULL;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&dir_warm_lock);
    for (pp = &dir_warms; *pp; pp = &(*pp)->next)
      if ((*pp)->img == img) {
        w = *pp;
        *pp = w->next;
        break;
      }
  }
  if (w) {
    prefetch_free (w->p);
    free (w);
  }
}

/* Close a per-export overlay (its last connection ended). */
static void
close_dir_overlay (struct qed_image *img, const char *path,
                   struct origin *org)
{
  dir_warm_stop (img);          /* it uses the overlay */
  if (qed_close (img) == -1)
    nbdkit_error ("qed-overlay-dir: closing %s failed", path);
  origin_free (org);
}

static void
qed_filter_cleanup (nbdkit_backend *backend)
{
  struct qed_image *img;

  prefetch_stop ();             /* it uses the overlay and the plugin */
  offline_stop ();
  ovl_close_all (close_dir_overlay);
  prefetch_unload ();
  img = glue_cleanup ();
  free (export_name);
  export_name = NULL;

  if (img) {
    if (overlay == NULL)
      qed_discard (img);
    else if (qed_close (img) == -1)
      nbdkit_error ("qed-overlay: closing %s failed", overlay);
  }
  if (tmp_dir) {
    /* Only left if no client ever connected. */
    rmdir (tmp_dir);
    free (tmp_dir);
    tmp_dir = NULL;
  }
}

/* With qed-overlay-dir the export names are the overlays' (the plugin
 * is always opened with its default export). */
static int
qed_filter_list_exports (nbdkit_next_list_exports *next,
                         nbdkit_backend *nxdata, int readonly, int is_tls,
                         struct nbdkit_exports *exports)
{
  if (ovl_dir ())
    return ovl_list (exports, sc_path ());
  return next (nxdata, readonly, exports);
}

static const char *
qed_filter_default_export (nbdkit_next_default_export *next,
                           nbdkit_backend *nxdata, int readonly, int is_tls)
{
  if (ovl_dir ())
    return "";                  /* default.qed */
  return next (nxdata, readonly);
}

/* Per connection. */
struct qed_handle {
  char *exportname;             /* the plugin export of this connection */
  struct ovl *ovl;              /* qed-overlay-dir: its export's overlay */
  bool offline;                 /* the plugin could not be opened */
  nbdkit_backend *backend;      /* the plugin, to open it again */
  nbdkit_context *context;      /* this connection, for set_next */
  /* The plugin's context, opened by hand in .open, until .prepare
   * prepares it and associates it with the connection. */
  nbdkit_next *unprepared;
  unsigned reads_in_progress;   /* atomic */
  /* Reads to go before the connection counts as reading one at a time
   * again, after it was seen with several in progress (atomic). */
  unsigned pipelined_for;
};

/* How long a connection seen with several reads in progress is taken
 * as one that keeps reads in flight (its queue drains now and then). */
#define PIPELINED_READS 256

/* The overlay a connection reads and writes. */
static struct qed_image *
handle_image (void *handle)
{
  struct qed_handle *h = handle;

  return h->ovl ? ovl_image (h->ovl) : glue_image ();
}

/* The origin record of the image a connection's fills go to: the
 * shared cache's, the one overlay's, or none (a temporary overlay, or
 * a per-export overlay without the shared cache). */
static struct origin *
handle_origin (void *handle)
{
  struct qed_handle *h = handle;

  if (sc_path () || h->ovl == NULL)
    return one_origin;
  return ovl_origin (h->ovl);
}

static offline_back_fn origin_back;

/* Serve this connection without the plugin, which could not be
 * opened (or, as nbdkit 1.42's curl plugin does, opened but then could
 * not tell its size), and open the plugin again in the background. */
static void
go_offline (struct qed_handle *h)
{
  /* Said once until the origin is back; each connection in debug. */
  if (!__atomic_exchange_n (&away_said, true, __ATOMIC_RELAXED))
    qed_warning ("the plugin cannot be opened: serving the overlay %s "
                 "without its origin until it is back", overlay);
  else
    nbdkit_debug ("the plugin cannot be opened: serving the overlay %s "
                  "without its origin until it is back", overlay);
  h->offline = true;
  offline_start (h->backend, h->exportname, origin_back);
}

static void *
qed_filter_open (nbdkit_next_open *next, nbdkit_context *context,
                 int readonly, const char *exportname, int is_tls)
{
  struct qed_handle *h;
  nbdkit_backend *backend = nbdkit_context_get_backend (context);

  h = calloc (1, sizeof *h);
  if (h == NULL || (h->exportname = strdup (exportname)) == NULL) {
    nbdkit_error ("calloc: %m");
    free (h);
    return NULL;
  }
  h->backend = backend;
  h->context = context;
  if (ovl_dir ()) {
    /* Every overlay sits over the plugin's default export; the name
     * chooses the overlay.  No offline serving: a connection needs
     * the origin. */
    if (!ovl_check_name (exportname) || next (context, 1, "") == -1)
      goto err;
  }
  else if (overlay == NULL) {
    /* Always open the plugin read-only: it never receives a write. */
    if (next (context, 1, exportname) == -1)
      goto err;
  }
  else {
    /* A persistent overlay is served without its origin (held
     * clusters read, missing ones fail) while the plugin cannot be
     * opened, or opened but not prepared (nbdkit 1.42 asks the size
     * while preparing: the curl plugin's HEAD request), and the plugin
     * is opened again in the background (offline.c).  So it is opened
     * by hand here, prepared in .prepare and only then associated. */
    h->unprepared = nbdkit_next_context_open (backend, 1, exportname, 0);
    if (h->unprepared == NULL)
      go_offline (h);
  }
  if (prefetch &&
      prefetch_note_backend (backend, ovl_dir () ? "" : exportname) == -1)
    goto err;
  return h;

 err:
  if (h->unprepared)
    nbdkit_next_context_close (h->unprepared);
  free (h->exportname);
  free (h);
  return NULL;
}

static void
qed_filter_close (void *handle)
{
  struct qed_handle *h = handle;

  if (h->ovl)
    ovl_release (h->ovl, close_dir_overlay);
  if (h->unprepared)
    nbdkit_next_context_close (h->unprepared);
  free (h->exportname);
  free (h);
}

/* The temporary overlay's private directory, made at first need, so
 * that a start that fails (or serves no client) leaves nothing. */
static int
make_tmp_dir (void)
{
  CLEANUP_FREE char *tmpl = NULL;

  if (tmp_dir)
    return 0;
  if (asprintf (&tmpl, "%s/nbdkit-qed-XXXXXX", tmp_parent) == -1) {
    nbdkit_error ("asprintf: %m");
    return -1;
  }
  if (mkdtemp (tmpl) == NULL) {
    nbdkit_error ("%s: cannot create a temporary directory: %m", tmpl);
    return -1;
  }
  tmp_dir = tmpl;
  tmpl = NULL;
  nbdkit_debug ("temporary overlay in %s", tmp_dir);
  return 0;
}

/* A new overlay at path, mode 0600 whatever the umask: copy-on-read
 * fills it with the source's data, which may be private. */
static int
create_overlay (const char *path, int64_t size)
{
  /* A per-export overlay over the shared cache names it (QED). */
  bool over_shared = sc_backing () && !sc_is (path);
  const char *bname = over_shared ? sc_backing () : backing_name;
  struct qed_create_options co = {
    .size = size,
    .cluster_size = cluster_size,
    .backing_name = bname,
    .backing_raw = !over_shared,
    .private_file = true,
  };
  uint32_t cs = cluster_size ? cluster_size : QED_DEFAULT_CLUSTER_SIZE;
  uint64_t max = qed_max_image_size (cs, QED_DEFAULT_TABLE_SIZE);

  if (ROUND_UP ((uint64_t) size, 512) > max) {
    nbdkit_error ("the plugin's disk (%" PRIi64 " bytes) is larger than a "
                  "QED overlay with %" PRIu32 "-byte clusters can address "
                  "(%" PRIu64 " bytes): use a larger qed-cluster-size",
                  size, cs, max);
    return -1;
  }
  if (qed_create (path, &co) == -1)
    return -1;
  nbdkit_debug ("created overlay %s: size %" PRIu64 ", cluster size %"
                PRIu32 "%s%s", path, ROUND_UP ((uint64_t) size, 512), cs,
                bname ? ", backing file " : "", bname ? bname : "");
  return 0;
}

/* Create (if needed) and open the overlay at ppath (NULL: a temporary
 * one) for a plugin of this size.  An existing one must be ours
 * (qed_open_overlay_fd).  glue_open_lock held, or the overlay is one
 * of qed-overlay-dir's, OPENING in the set.
 */
static struct qed_image *
open_overlay_at (const char *ppath, int64_t size)
{
  struct qed_open_options oo = { .readonly = false, .locking = locking,
                                 .use_fd = true, .freelist = freelist,
                                 .compact_limit = compact_limit };
  CLEANUP_FREE char *tmp_file = NULL;
  struct qed_image *i = NULL;
  const char *path = ppath;
  bool missing = true, made = false;

  if (ppath == NULL) {
    if (make_tmp_dir () == -1)
      return NULL;
    if (asprintf (&tmp_file, "%s/overlay.qed", tmp_dir) == -1) {
      nbdkit_error ("asprintf: %m");
      return NULL;
    }
    path = tmp_file;
  }
  oo.fd = ppath ? qed_open_overlay_fd (path, true, &missing) : -1;
  if (oo.fd == -1 && missing && create_overlay (path, size) == 0) {
    made = true;
    oo.fd = qed_open_overlay_fd (path, true, &missing);
  }
  /* The start-up locks are the one overlay's (glue_open_lock held);
   * a per-export overlay has none. */
  if (ppath == NULL || ppath == overlay)
    glue_release_startup_locks ();
  qed_clear_last_error ();
  if (oo.fd >= 0)
    i = qed_open (path, &oo);
  if (i == NULL)
    qed_open_failed (ovl_dir () ? "qed-overlay-dir" : "qed-overlay", path);
  if (i == NULL && made && ppath)
    unlink (path);              /* the next connection starts afresh */
  if (ppath == NULL) {
    /* Nothing of a temporary overlay outlives nbdkit (after a failure,
     * the next connection starts again). */
    unlink (path);
    rmdir (tmp_dir);
    free (tmp_dir);
    tmp_dir = NULL;
  }
  return i;
}

static struct qed_image *
open_overlay (int64_t size)
{
  return open_overlay_at (overlay, size);
}

/* What open_dir_overlay needs of the connection that opens it. */
struct dir_open {
  nbdkit_next *next;            /* the plugin's default export */
  int64_t size;                 /* its size */
};

/* qed-overlay-dir without qed-shared-cache: the origin guard of a
 * per-export overlay, as qed-overlay's (the recorded export is always
 * the plugin's default one).  Sets *org; returns the overlay to serve
 * (perhaps a new one after qed-origin-changed=discard), or NULL
 * (logged, i closed). */
static struct qed_image *
guard_dir_overlay (struct qed_image *i, const char *path,
                   const struct dir_open *d, struct origin **org)
{
  int r;

  *org = origin_new ();
  if (*org == NULL) {
    qed_close (i);
    return NULL;
  }
  r = origin_open (*org, i, d->next, d->size, "");
  if (r == 1) {
    /* qed-origin-changed=discard: this export's overlay is set aside
     * as NAME.qed.stale and a new one started. */
    if (origin_discard (i, path) == -1)
      goto fail;
    i = open_overlay_at (path, d->size);
    if (i == NULL)
      goto fail;
    r = origin_open (*org, i, d->next, d->size, "");
  }
  if (r == 2) {
    /* Detached (qed-detach): it holds every cluster, nothing falls
     * through to the plugin.  (Finish a header write that a crash may
     * have missed.) */
    r = 0;
    if (qed_get_backing_name (i) && qed_detach_backing (i, 0) == -1)
      r = -1;
  }
  if (r == 0)
    return i;
  qed_close (i);
 fail:
  origin_free (*org);
  *org = NULL;
  return NULL;
}

/* qed-overlay-dir: open (or create) an export's overlay over the
 * plugin's default export (*opaque, a struct dir_open). */
static struct qed_image *
open_dir_overlay (const char *path, void *opaque, struct origin **org)
{
  const struct dir_open *d = opaque;
  int64_t size = d->size;
  uint64_t want = ROUND_UP ((uint64_t) size, 512);
  struct qed_image *i;
  const char *want_name = sc_backing () ? sc_backing () : backing_name;
  const char *name;

  *org = NULL;
  if (sc_is (path)) {
    nbdkit_error ("qed-overlay-dir: %s is qed-shared-cache, not an "
                  "export's overlay", path);
    return NULL;
  }
  i = open_overlay_at (path, size);
  /* The shared cache keeps the record of what is copied from the
   * plugin; without it each overlay keeps its own. */
  if (i && sc_path () == NULL)
    i = guard_dir_overlay (i, path, d, org);
  if (i == NULL)
    return NULL;
  name = qed_get_backing_name (i);
  if (qed_get_size (i) != want) {
    nbdkit_error ("qed-overlay-dir: %s is an overlay of a %" PRIu64 "-byte "
                  "disk, but the plugin's disk is %" PRIi64 " bytes "
                  "(%" PRIu64 " rounded up to 512)", path,
                  qed_get_size (i), size, want);
    qed_close (i);
    origin_free (*org);
    *org = NULL;
    return NULL;
  }
  if (want_name && !origin_is_detached (*org) &&
      (name == NULL || strcmp (name, want_name) != 0)) {
    nbdkit_error ("qed-overlay-dir: %s records %s%s%s as its backing file, "
                  "not %s=%s", path, name ? "\"" : "",
                  name ? name : "no name", name ? "\"" : "",
                  sc_backing () ? "qed-shared-cache" : "qed-backing-name",
                  want_name);
    qed_close (i);
    origin_free (*org);
    *org = NULL;
    return NULL;
  }
  /* Without the shared cache, qed-prefetch warms each overlay. */
  if (sc_path () == NULL)
    dir_warm_start (i, *org);
  return i;
}

/* qed-detach: after a change to img (whose origin record is org),
 * detach it if it now holds every cluster. */
static void
detach_poll (struct qed_image *img, struct origin *org)
{
  if (detach && img && org && origin_poll_detach (org, img))
    qed_notice ("qed-detach: %s holds every cluster of the disk: the "
                "origin is removed from its header; it is a standalone "
                "QED image now", qed_get_filename (img));
}

/* The origin guard passed (or was not needed): fills may start. */
static void
set_verified (struct qed_image *img)
{
  __atomic_store_n (&verified, true, __ATOMIC_RELEASE);
  if (prefetch && !origin_is_detached (one_origin))
    prefetch_start (img, prefetch_fetch, overlay != NULL);
}

/* Run the origin guard on the open overlay with this context (the
 * overlay was opened while the origin was away).  glue_open_lock
 * held.  0 if the origin may be used. */
static int
verify_late (struct qed_image *img, nbdkit_next *next, int64_t size,
             const char *exportname)
{
  int r = origin_open (one_origin, img, next, size, exportname);

  if (r == 2)
    r = 0;                      /* detached (origin_is_detached) */
  else if (r == 1) {
    nbdkit_error ("qed-overlay: %s: qed-origin-changed=discard cannot set "
                  "aside an overlay that is being served: restart nbdkit",
                  overlay);
    return -1;
  }
  if (r == 0)
    set_verified (img);
  return r;
}

/* offline.c: the plugin can be opened again. */
static int
origin_back (nbdkit_next *ctx, int64_t size)
{
  struct qed_image *img;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&glue_open_lock);
  img = glue_image ();
  if (img == NULL)
    return -1;
  if (size != export_size) {
    nbdkit_error ("qed-overlay: %s: the origin is back but its size is now "
                  "%" PRIi64 " bytes, not %" PRIi64 ": missing clusters stay "
                  "unreadable (restart nbdkit)", overlay, size, export_size);
    return -1;
  }
  if (!__atomic_load_n (&verified, __ATOMIC_ACQUIRE) &&
      verify_late (img, ctx, size, export_name) == -1) {
    nbdkit_error ("qed-overlay: %s: the origin is back but changed (see "
                  "above): missing clusters stay unreadable", overlay);
    return -1;
  }
  __atomic_store_n (&away_said, false, __ATOMIC_RELAXED);
  qed_notice ("qed-overlay: %s: the origin is back: missing clusters are "
                "fetched again", overlay);
  return 0;
}

/* The first connection opens the overlay, while the plugin cannot be
 * opened: only an existing one, whose origin record gives the size.
 * glue_open_lock held. */
static int
prepare_offline (struct qed_handle *h)
{
  struct qed_open_options oo = { .readonly = false, .locking = locking,
                                 .use_fd = true, .freelist = freelist,
                                 .compact_limit = compact_limit };
  struct qed_image *i;
  bool missing;
  int64_t size;
  int r;

  oo.fd = qed_open_overlay_fd (overlay, true, &missing);
  if (oo.fd == -1) {
    if (missing)
      nbdkit_error ("qed-overlay: %s does not exist yet and the plugin "
                    "cannot be opened: nothing to serve", overlay);
    return -1;
  }
  glue_release_startup_locks ();
  qed_clear_last_error ();
  i = qed_open (overlay, &oo);
  if (i == NULL) {
    qed_open_failed ("qed-overlay", overlay);
    return -1;
  }
  r = origin_offline_open (one_origin, i, h->exportname, &size);
  if (r == -1) {
    qed_close (i);
    return -1;
  }
  export_size = size;
  export_name = strdup (h->exportname);
  if (export_name == NULL) {
    nbdkit_error ("strdup: %m");
    qed_close (i);
    return -1;
  }
  glue_set_image (i);
  if (r == 2)                   /* detached: origin_is_detached */
    __atomic_store_n (&verified, true, __ATOMIC_RELEASE);
  return 0;
}

static int prepare_image (nbdkit_next *next, const char *exportname,
                          int64_t size);

static int
qed_filter_prepare (nbdkit_next *next, void *handle, int readonly)
{
  struct qed_handle *h = handle;
  int64_t size;

  if (ovl_dir ()) {
    struct dir_open d = { .next = next };

    if (h->ovl)
      return 0;
    size = d.size = next->get_size (next);
    if (size == -1)
      return -1;
    /* qed-shared-cache: the shared image first (the per-export
     * overlays' backing file), opened as qed-overlay's one. */
    if (overlay && prepare_image (next, "", size) == -1)
      return -1;
    h->ovl = ovl_acquire (h->exportname, open_dir_overlay, &d);
    return h->ovl ? 0 : -1;
  }
  if (h->unprepared) {
    nbdkit_next *n = h->unprepared;

    /* nbdkit 1.42 asks the plugin's size while preparing it, but does
     * not fail for it: the size is asked here too. */
    h->unprepared = NULL;
    if (n->prepare (n) == -1) {
      nbdkit_next_context_close (n);
      go_offline (h);
    }
    else if (n->get_size (n) == -1) {
      n->finalize (n);
      nbdkit_next_context_close (n);
      go_offline (h);
    }
    else {
      nbdkit_context_set_next (h->context, n);
      next = n;
    }
  }
  if (!h->offline) {
    /* Also required before the first next->pread on this connection. */
    size = next->get_size (next);
    if (size == -1)
      return -1;
    return prepare_image (next, h->exportname, size);
  }

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&glue_open_lock);
  if (glue_image () == NULL)
    return prepare_offline (h);
  if (export_name && strcmp (export_name, h->exportname) != 0) {
    nbdkit_error ("qed-overlay: %s is served for the plugin's export "
                  "\"%s\", not \"%s\"", overlay, export_name,
                  h->exportname);
    return -1;
  }
  return 0;
}

/* Open the one overlay (qed-overlay, a temporary one, or the shared
 * cache) at the first connection, or check that this connection's
 * plugin export fits it.  exportname is the plugin's export. */
static int
prepare_image (nbdkit_next *next, const char *exportname, int64_t size)
{
  struct qed_image *img;
  uint64_t want = ROUND_UP ((uint64_t) size, 512);

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&glue_open_lock);
  img = glue_image ();
  if (img == NULL) {
    struct qed_image *i = open_overlay (size);
    int r = 0;

    if (i == NULL)
      return -1;
    if (overlay)
      r = origin_open (one_origin, i, next, size, exportname);
    if (r == 2) {
      /* Detached: a standalone image.  (Finish a header write that a
       * crash may have missed.) */
      r = 0;
      if (qed_get_backing_name (i) && qed_detach_backing (i, 0) == -1)
        r = -1;
    }
    if (r == 1) {
      /* qed-origin-changed=discard: set aside, start afresh. */
      if (origin_discard (i, overlay) == -1)
        return -1;
      i = open_overlay (size);
      if (i == NULL)
        return -1;
      r = origin_open (one_origin, i, next, size, exportname);
    }
    if (r != 0) {
      qed_close (i);
      return -1;
    }
    if (qed_get_size (i) != want) {
      nbdkit_error ("qed-overlay: %s is an overlay of a %" PRIu64 "-byte "
                    "disk, but the plugin's disk is %" PRIi64 " bytes "
                    "(%" PRIu64 " rounded up to 512): is this the right "
                    "overlay for this plugin?", qed_get_filename (i),
                    qed_get_size (i), size, want);
      qed_close (i);
      return -1;
    }
    export_size = size;
    export_name = strdup (exportname);
    if (export_name == NULL) {
      nbdkit_error ("strdup: %m");
      qed_close (i);
      return -1;
    }
    glue_set_image (i);
    detach_poll (i, one_origin);
    set_verified (i);
  }
  else if (qed_get_size (img) != want) {
    nbdkit_error ("qed-filter: this connection's plugin disk is %" PRIi64
                  " bytes, but the overlay %s is %" PRIu64 " bytes: the "
                  "plugin must serve the same disk to every connection",
                  size, overlay ? overlay : "(temporary)", qed_get_size (img));
    return -1;
  }
  else if (!__atomic_load_n (&verified, __ATOMIC_ACQUIRE)) {
    /* Opened while the origin was away: check it now, before this
     * connection fetches anything from it. */
    if (verify_late (img, next, size, exportname) == -1)
      return -1;
  }
  else if (overlay && origin_check_export (one_origin, overlay,
                                          exportname) == -1)
    return -1;
  return 0;
}

static int64_t
qed_filter_get_size (nbdkit_next *next, void *handle)
{
  if (next == NULL)             /* the origin is away */
    return export_size;
  return next->get_size (next);
}

static int
qed_filter_is_rotational (nbdkit_next *next, void *handle)
{
  return next ? next->is_rotational (next) : 0;
}

static const char *
qed_filter_export_description (nbdkit_next *next, void *handle)
{
  return next ? next->export_description (next) : NULL;
}

static int
qed_filter_block_size (nbdkit_next *next, void *handle,
                       uint32_t *minimum, uint32_t *preferred,
                       uint32_t *maximum)
{
  struct qed_image *img = handle_image (handle);
  uint32_t cs = img ? qed_get_cluster_size (img)
    : cluster_size ? cluster_size : QED_DEFAULT_CLUSTER_SIZE;

  *minimum = 1;
  *preferred = glue_preferred_block_size (cs);
  *maximum = 0xffffffff;
  return 0;
}

static int
qed_filter_can_one (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
qed_filter_can_zero (nbdkit_next *next, void *handle)
{
  return NBDKIT_ZERO_NATIVE;
}

static int
qed_filter_can_fua (nbdkit_next *next, void *handle)
{
  return NBDKIT_FUA_NATIVE;
}

static int
qed_filter_can_cache (nbdkit_next *next, void *handle)
{
  /* Asked now only so that a later next->cache is allowed. */
  if (next && next->can_cache (next) == -1)
    return -1;
  return NBDKIT_CACHE_NATIVE;
}

/* The plugin as the layer beneath the overlay: reads past its end are
 * zeros (the overlay may be up to 511 bytes larger).
 */
static int
backend_read (void *opaque, void *buf, uint64_t count, uint64_t offset)
{
  nbdkit_next *next = opaque;
  int64_t size = next->get_size (next);
  char *p = buf;
  int err = 0;

  if (size == -1) {
    errno = EIO;
    return -1;
  }
  while (count > 0) {
    uint64_t n;

    if (offset >= (uint64_t) size) {
      memset (p, 0, count);
      break;
    }
    n = MIN (count, (uint64_t) size - offset);
    n = MIN (n, (uint64_t) MAX_BACKEND_READ);
    if (next->pread (next, p, n, offset, 0, &err) == -1) {
      /* Whatever the plugin's reason (a dead connection reports
       * EINVAL, ENOTCONN...), for the client the data is unreadable:
       * EIO, not an error that blames its request. */
      nbdkit_debug ("plugin read of %" PRIu64 " bytes at %" PRIu64
                    " failed: %s", n, offset, strerror (err));
      errno = EIO;
      return -1;
    }
    p += n;
    offset += n;
    count -= n;
  }
  return 0;
}

/* Copy the whole clusters [start, end) from the plugin into wbuf and
 * into the overlay (end is cluster aligned or the overlay's size).
 * Ranges the plugin's extents call zero are not read: they become zero
 * clusters.  Everything is read before anything is stored, so a failed
 * fetch stores nothing.  Returns -1 only if the plugin could not be
 * read; a failed fill is logged by the core and leaves the clusters
 * unallocated.
 */
static int
fetch_clusters_counted (nbdkit_next *next, struct qed_image *img,
                        struct origin *org, char *wbuf, uint64_t start,
                        uint64_t end, uint64_t *nread, uint64_t *nholes)
{
  uint64_t cs = qed_get_cluster_size (img);
  uint64_t n = (end - start + cs - 1) / cs, i, j;
  int64_t size = next->get_size (next);
  CLEANUP_FREE bool *zero = NULL;
  bool stored = true;

  if (size == -1) {
    errno = EIO;
    return -1;
  }
  zero = malloc (n * sizeof *zero);
  if (zero == NULL) {
    nbdkit_error ("malloc: %m");
    return -1;
  }
  extcache_zero_clusters (next, start, MIN (end, (uint64_t) size), cs, n,
                          zero);

  /* Runs of clusters: read the data runs, then fill each run. */
  for (i = 0; i < n; i = j) {
    uint64_t s = start + i * cs, t;

    for (j = i + 1; j < n && zero[j] == zero[i]; ++j)
      ;
    t = MIN (start + j * cs, end);
    if (zero[i]) {
      memset (wbuf + (s - start), 0, t - s);
      if (nholes)
        *nholes += t - s;
    }
    else if (backend_read (next, wbuf + (s - start), t - s, s) == -1)
      return -1;
    else if (nread)
      *nread += t - s;
  }
  /* The origin guard samples some before they are stored. */
  if (org && origin_note_fill (org, img, wbuf, start, end, size) == -1) {
    errno = EIO;
    return -1;
  }
  for (i = 0; i < n; i = j) {
    uint64_t s = start + i * cs, t;

    for (j = i + 1; j < n && zero[j] == zero[i]; ++j)
      ;
    t = MIN (start + j * cs, end);
    if (glue_fill (img, zero[i] ? NULL : wbuf + (s - start), t - s, s,
                   zero_detect, zero[i]) == -1)
      stored = false;
  }
  ra_note_stored (stored);
  glue_note_write ();
  detach_poll (img, org);
  return 0;
}

/* The plugin context and the overlay of a fetch. */
struct fetch_ctx {
  nbdkit_next *next;
  struct qed_image *img;
  struct origin *org;           /* img's origin record (or NULL) */
};

static int
fetch_clusters (const struct fetch_ctx *f, char *wbuf,
                uint64_t start, uint64_t end)
{
  return fetch_clusters_counted (f->next, f->img, f->org, wbuf, start, end,
                                 NULL, NULL);
}

/* qed-prefetch's fetch: the same, through its own context. */
static int
prefetch_fetch (nbdkit_next *next, struct qed_image *img, void *opaque,
                char *buf, uint64_t start, uint64_t end,
                uint64_t *nread, uint64_t *nholes)
{
  /* opaque: a per-export overlay's origin record, or NULL for the one
   * image's (one_origin). */
  return fetch_clusters_counted (next, img, opaque ? opaque : one_origin,
                                 buf, start, end, nread, nholes);
}

static int
fetch_into (void *opaque, char *wbuf, uint64_t start, uint64_t end)
{
  struct fetch_ctx *f = opaque;

  return fetch_clusters (f, wbuf, start, end);
}

/* Copy-on-read: read [offset, offset+count) (an unallocated run) from
 * the plugin, widened to whole clusters which are stored in the
 * overlay (glue_cor_fetch).  buf may be NULL (cache).  A read is
 * fetched in one go, so that a failure stores nothing of it; cache
 * requests can be up to 4G: they go in chunks.
 */
static int
cor_fetch (struct fetch_ctx *f, void *buf, uint64_t count, uint64_t offset)
{
  return glue_cor_fetch (f->img, buf, count, offset,
                         buf ? UINT64_MAX : CACHE_CHUNK, fetch_into, f);
}

/* Fetch [start, fetch_end), the clusters of the read [offset,
 * offset+count) and a read-ahead after them, in one go.  A failure
 * stores nothing and is not the client's: returns -1 and the caller
 * fetches only what the client asked for.
 */
static int
fetch_ahead (const struct fetch_ctx *f, void *buf,
             uint64_t count, uint64_t offset,
             uint64_t start, uint64_t fetch_end)
{
  CLEANUP_FREE char *bounce = malloc (fetch_end - start);

  if (bounce == NULL ||
      fetch_clusters (f, bounce, start, fetch_end) == -1) {
    nbdkit_debug ("read-ahead of [%" PRIu64 ", %" PRIu64 ") failed: "
                  "reading only the request", start, fetch_end);
    return -1;
  }
  memcpy (buf, bounce + (offset - start), count);
  return 0;
}

/* What a copy-on-read miss needs to know of its request. */
struct cor_request {
  struct fetch_ctx f;           /* the plugin, the image that fills */
  /* The connection had other reads in progress when this one came,
   * or lately: the client keeps several in flight itself, which hide
   * the plugin's latency already, and a read-ahead would make them
   * wait for it in turn (measured with nbdcopy). */
  bool pipelined;
};

static int
cor_read (void *opaque, void *buf, uint64_t count, uint64_t offset)
{
  struct cor_request *req = opaque;
  struct qed_image *img = req->f.img;
  uint64_t cs = qed_get_cluster_size (img);
  uint64_t isize = qed_get_size (img);
  uint64_t start = ROUND_DOWN (offset, cs);
  uint64_t end = MIN (ROUND_UP (offset + count, cs), isize);
  uint64_t limit = end, fetch_end;
  struct qed_map m;
  int r;

  /* How far the unallocated run goes on (a read-ahead stops there). */
  if (readahead >= cs && end < isize &&
      qed_map (img, end, MIN ((uint64_t) readahead, isize - end), &m) == 0 &&
      m.type == QED_MAP_UNALLOCATED)
    limit = end + m.length;

  fetch_end = ra_plan (start, end, req->pipelined ? end : limit, cs);
  if (fetch_end == 0) {
    /* Another request is fetching some of these clusters: wait, then
     * read again (what it stored is now local). */
    struct qed_below below = { .read = cor_read, .opaque = req };
    ra_wait_in_flight (start, end);
    return qed_read (img, &below, buf, count, offset);
  }
  if (fetch_end > end &&
      fetch_ahead (&req->f, buf, count, offset, start, fetch_end) == 0) {
    ra_done (start, fetch_end, true);
    return 0;
  }
  r = cor_fetch (&req->f, buf, count, offset);
  ra_done (start, fetch_end, fetch_end == end && r == 0);
  return r;
}

static int
cor_prefetch (void *opaque, uint64_t count, uint64_t offset)
{
  struct fetch_ctx *f = opaque;

  return cor_fetch (f, NULL, count, offset);
}


/* The plugin context a request reaches the origin through: the
 * connection's own, or for a connection that could not open the
 * plugin, the shared one once the origin is back (serialised when the
 * plugin is not parallel: *locked), or NULL while it is away. */
static nbdkit_next *
origin_get (nbdkit_next *next, bool *locked)
{
  nbdkit_next *o;

  *locked = false;
  if (next)
    return next;
  o = offline_origin ();
  if (o) {
    offline_lock_origin ();
    *locked = true;
  }
  return o;
}

static void
origin_put (bool locked)
{
  if (locked)
    offline_unlock_origin ();
}

/* The layer beneath while the origin is away: nothing to read. */
static int
away_read (void *opaque, void *buf, uint64_t count, uint64_t offset)
{
  nbdkit_debug ("the origin is away: %" PRIu64 " bytes at %" PRIu64
                " are not in the overlay", count, offset);
  errno = EIO;
  return -1;
}

static const struct qed_below away_below = { .read = away_read };

/* The layers beneath a request's overlay.  Without qed-shared-cache it
 * is the plugin (copy-on-read into the overlay itself when cor).  With
 * it, a per-export overlay never copies what it reads: the layer
 * beneath it is the shared cache (glue_image), and the shared cache's
 * is the plugin, with copy-on-read into the shared cache (cor, as
 * qed-copy-on-read says, for writes too), so that every origin
 * cluster is fetched once, whichever export reads it; the core's fill
 * rule (a fill lands only in clusters still unallocated) and the
 * read-ahead's claims keep concurrent fills from several exports
 * apart, as they do for the connections of one overlay. */
struct layers {
  struct qed_image *img;        /* the connection's overlay */
  struct cor_request req;       /* a miss of the image that fetches */
  struct qed_below fetch;       /* the plugin, beneath that image */
  const struct qed_below *fb;   /* &fetch, away_below or NULL */
  struct sc_below sc;           /* {fb}: beneath the shared cache */
  struct qed_below shared;      /* the shared cache, beneath img */
  const struct qed_below *b;    /* what is beneath img */
};

static void
layers_init (struct layers *l, void *handle, nbdkit_next *o, bool cor)
{
  bool shared = sc_backing () != NULL;

  l->img = handle_image (handle);
  if (shared)
    cor = copy_on_read;
  l->req = (struct cor_request) {
    .f = { .next = o, .img = shared ? glue_image () : l->img,
           .org = handle_origin (handle) },
  };
  l->fetch = (struct qed_below) {
    .read = cor ? cor_read : backend_read,
    .opaque = cor ? (void *) &l->req : (void *) o,
  };
  /* A detached overlay holds every cluster: nothing falls through. */
  l->fb = origin_is_detached (l->req.f.org) ? NULL
    : o ? &l->fetch : &away_below;
  l->sc = (struct sc_below) { .below = l->fb };
  l->shared = (struct qed_below) { .read = sc_read, .opaque = &l->sc };
  l->b = shared ? &l->shared : l->fb;
}

static int
qed_filter_pread (nbdkit_next *next, void *handle,
                  void *buf, uint32_t count, uint64_t offset,
                  uint32_t flags, int *err)
{
  struct qed_handle *h = handle;
  bool locked;
  nbdkit_next *o = origin_get (next, &locked);
  struct layers l;
  int r = 0;

  layers_init (&l, handle, o, copy_on_read);
  prefetch_guest_begin ();

  if (__atomic_add_fetch (&h->reads_in_progress, 1, __ATOMIC_RELAXED) > 1)
    __atomic_store_n (&h->pipelined_for, PIPELINED_READS, __ATOMIC_RELAXED);
  else if (__atomic_load_n (&h->pipelined_for, __ATOMIC_RELAXED) > 0)
    __atomic_sub_fetch (&h->pipelined_for, 1, __ATOMIC_RELAXED);
  l.req.pipelined = __atomic_load_n (&h->pipelined_for,
                                     __ATOMIC_RELAXED) > 0;
  if (qed_read (l.img, l.b, buf, count, offset) == -1)
    r = glue_fail (err);
  __atomic_sub_fetch (&h->reads_in_progress, 1, __ATOMIC_RELAXED);
  origin_put (locked);
  prefetch_guest_end ();
  return r;
}

static int
qed_filter_pwrite (nbdkit_next *next, void *handle,
                   const void *buf, uint32_t count, uint64_t offset,
                   uint32_t flags, int *err)
{
  bool locked;
  nbdkit_next *o = origin_get (next, &locked);
  struct layers l;
  /* FUA on a temporary overlay would only cost time. */
  unsigned f = glue_write_flags (flags, persistent (), zero_detect);
  int r = 0;

  layers_init (&l, handle, o, false);
  prefetch_guest_begin ();
  glue_note_write ();
  if (qed_write (l.img, l.b, buf, count, offset, f) == -1)
    r = glue_fail (err);
  origin_put (locked);
  prefetch_guest_end ();
  detach_poll (l.req.f.img, l.req.f.org);
  return r;
}

static int
qed_filter_zero (nbdkit_next *next, void *handle,
                 uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  bool locked;
  nbdkit_next *o = origin_get (next, &locked);
  struct layers l;
  unsigned f = glue_zero_flags (flags, persistent ());
  int r = 0;

  layers_init (&l, handle, o, false);
  glue_note_write ();
  if (qed_zero (l.img, l.b, count, offset, f) == -1) {
    r = glue_fail (err);
    /* ENOTSUP is only allowed as the answer to a fast zero. */
    if (!(flags & NBDKIT_FLAG_FAST_ZERO) &&
        (*err == ENOTSUP || *err == EOPNOTSUPP))
      *err = EIO;
  }
  origin_put (locked);
  return r;
}

static int
qed_filter_trim (nbdkit_next *next, void *handle,
                 uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  bool locked;
  nbdkit_next *o = origin_get (next, &locked);
  struct layers l;
  int r = 0;

  layers_init (&l, handle, o, false);
  glue_note_write ();
  if (qed_trim (l.img, l.b, count, offset,
                glue_trim_flags (flags, persistent ())) == -1)
    r = glue_fail (err);
  origin_put (locked);
  return r;
}

static int
qed_filter_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  if (!persistent ())
    return 0;
  if (qed_flush (handle_image (handle)) == -1)
    return glue_fail (err);
  return 0;
}

static int
qed_filter_cache (nbdkit_next *next, void *handle,
                  uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  /* With qed-shared-cache, the range is copied into the shared cache
   * (the export's own overlay keeps only writes). */
  struct fetch_ctx f = {
    .next = next, .img = sc_path () ? glue_image () : handle_image (handle),
    .org = handle_origin (handle),
  };
  struct qed_below below = { .prefetch = cor_prefetch, .opaque = &f };

  /* A hint: nothing to do without an origin (or with a connection
   * that has none of its own). */
  if (origin_is_detached (f.org) || next == NULL)
    return 0;
  if (!copy_on_read) {
    /* The overlay holds only writes: pass the hint on, if the plugin
     * takes it (clusters in the overlay don't need it, but telling
     * them apart is not worth a hint). */
    if (next->can_cache (next) <= NBDKIT_CACHE_NONE)
      return 0;
    return next->cache (next, count, offset, 0, err);
  }
  if (qed_prefetch (f.img, &below, count, offset) == -1)
    return glue_fail (err);
  return 0;
}

/* Ask the plugin for its extents of [offset, offset+len), an unallocated
 * run of the overlay, and add them.  -1 with errno on error. */
static int
plugin_extents (nbdkit_next *next, uint64_t len, uint64_t offset,
                bool req_one, struct nbdkit_extents *extents)
{
  struct nbdkit_extents *exts;
  uint64_t end = offset + len, pos = offset;
  int r = 0, err = 0;

  if (req_one) {
    exts = nbdkit_extents_new (offset, end);
    if (exts == NULL)
      return -1;
    if (next->extents (next, len, offset, NBDKIT_FLAG_REQ_ONE, exts,
                       &err) == -1) {
      nbdkit_extents_free (exts);
      errno = err;
      return -1;
    }
  }
  else {
    exts = nbdkit_extents_full (next, len, offset, 0, &err);
    if (exts == NULL) {
      errno = err;
      return -1;
    }
  }
  for (size_t i = 0; i < nbdkit_extents_count (exts) && pos < end; ++i) {
    struct nbdkit_extent e = nbdkit_get_extent (exts, i);
    uint64_t t = MIN (e.offset + e.length, end);
    if (t <= pos)
      continue;
    if (nbdkit_add_extent (extents, pos, t - pos, e.type) == -1) {
      r = -1;
      break;
    }
    pos = t;
  }
  err = errno;
  nbdkit_extents_free (exts);
  errno = err;
  /* Whatever the plugin left out is data, as far as we know (with
   * REQ_ONE, only the first extent matters). */
  if (r == 0 && pos < end && (!req_one || pos == offset) &&
      nbdkit_add_extent (extents, pos, end - pos, 0) == -1)
    r = -1;
  return r;
}

struct extents_ctx {
  nbdkit_next *next;
  int can_extents;              /* -1 until asked */
};

/* An unallocated run of the overlay: the plugin's extents, or data if
 * the plugin has none. */
static int64_t
below_extents (void *opaque, uint64_t len, uint64_t offset, bool req_one,
               struct nbdkit_extents *extents)
{
  struct extents_ctx *x = opaque;

  if (x->can_extents == -1)
    x->can_extents = x->next->can_extents (x->next);
  if (x->can_extents == 1
      ? plugin_extents (x->next, len, offset, req_one, extents) == -1
      : nbdkit_add_extent (extents, offset, len, 0) == -1)
    return -1;
  return len;
}

static int
qed_filter_extents (nbdkit_next *next, void *handle,
                    uint32_t count, uint64_t offset, uint32_t flags,
                    struct nbdkit_extents *extents, int *err)
{
  bool req_one = flags & NBDKIT_FLAG_REQ_ONE;
  bool locked;
  nbdkit_next *o = origin_get (next, &locked);
  struct extents_ctx x = { .next = o, .can_extents = o ? -1 : 0 };
  /* With qed-shared-cache, an unallocated run of a per-export overlay
   * is what the shared cache says of it (and the plugin beneath). */
  struct sc_below sc = {
    .unallocated = origin_is_detached (handle_origin (handle)) ? NULL
    : below_extents, .opaque = &x,
  };
  int r = 0;

  /* (Away, unallocated runs are reported as data.) */
  if (glue_extents (handle_image (handle), count, offset, req_one, extents,
                    sc_path () ? sc_extents : sc.unallocated,
                    sc_path () ? (void *) &sc : (void *) &x) == -1)
    r = glue_fail (err);
  origin_put (locked);
  return r;
}

static struct nbdkit_filter filter = {
  .name              = "qed",
  .longname          = "nbdkit QED overlay filter",
  .unload            = qed_filter_unload,
  .config            = qed_filter_config,
  .config_complete   = qed_filter_config_complete,
  .config_help       = qed_filter_config_help,
  .get_ready         = qed_filter_get_ready,
  .after_fork        = qed_filter_after_fork,
  .cleanup           = qed_filter_cleanup,
  .list_exports      = qed_filter_list_exports,
  .default_export    = qed_filter_default_export,
  .open              = qed_filter_open,
  .close             = qed_filter_close,
  .prepare           = qed_filter_prepare,
  .get_size          = qed_filter_get_size,
  .is_rotational     = qed_filter_is_rotational,
  .export_description = qed_filter_export_description,
  .block_size        = qed_filter_block_size,
  .can_write         = qed_filter_can_one,
  .can_flush         = qed_filter_can_one,
  .can_trim          = qed_filter_can_one,
  .can_zero          = qed_filter_can_zero,
  .can_fast_zero     = qed_filter_can_one,
  .can_extents       = qed_filter_can_one,
  .can_multi_conn    = qed_filter_can_one,
  .can_fua           = qed_filter_can_fua,
  .can_cache         = qed_filter_can_cache,
  .pread             = qed_filter_pread,
  .pwrite            = qed_filter_pwrite,
  .zero              = qed_filter_zero,
  .trim              = qed_filter_trim,
  .flush             = qed_filter_flush,
  .cache             = qed_filter_cache,
  .extents           = qed_filter_extents,
};

NBDKIT_REGISTER_FILTER (filter)
