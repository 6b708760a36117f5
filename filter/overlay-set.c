/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed filter: qed-overlay-dir=DIR, the set of open per-export
 * overlays.
 *
 * Each export name a client asks for is an overlay DIR/NAME.qed (the
 * empty name is default.qed), over the same origin: the plugin's
 * default export.  Names are [A-Za-z0-9._-], 1-200 bytes, not
 * starting with '.', so a name can never leave DIR or name a hidden
 * file.
 *
 * Life cycle (as the plugin's dir=): an overlay is OPENING while its
 * first connection opens or creates it (outside the lock: opening may
 * check and repair), OPEN while connections use it (one image, one
 * allocator, one lock, shared by all of them), and CLOSING while the
 * last connection closes it cleanly (flush, free-cluster list,
 * NEED_CHECK clear), so that QEMU can open it at once afterwards.  A
 * connection that finds its overlay OPENING or CLOSING waits for the
 * state to settle (set_lock + set_cond), so an overlay is never open
 * twice.  At most max_exports overlays are in the set (every state):
 * a client asking for one more is refused.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <sys/stat.h>
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "qed.h"
#include "glue-nbdkit.h"
#include "util.h"
#include "overlay-set.h"

#define MAX_NAME 200
#define SUFFIX ".qed"
#define DEFAULT_NAME "default"

enum ovl_state { OVL_OPENING, OVL_OPEN, OVL_CLOSING };

struct ovl {
  char *name;                   /* NAME of DIR/NAME.qed */
  char *path;
  enum ovl_state state;
  unsigned refs;                /* connections using it */
  struct qed_image *img;        /* OPEN and CLOSING */
  struct origin *origin;        /* its origin record, or NULL (opaque) */
  struct ovl *next;
};

static char *dir;
static unsigned max_exports = OVL_DEFAULT_MAX_EXPORTS;

static pthread_mutex_t set_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t set_cond = PTHREAD_COND_INITIALIZER;
static struct ovl *set;         /* every state */
static unsigned set_count;

int
ovl_set_dir (const char *value)
{
  free (dir);
  if (*value == '\0') {
    nbdkit_error ("qed-overlay-dir: the directory name must not be empty");
    return -1;
  }
  dir = nbdkit_absolute_path (value);
  return dir ? 0 : -1;
}

int
ovl_set_max (const char *key, const char *value)
{
  unsigned v;

  if (nbdkit_parse_unsigned (key, value, &v) == -1)
    return -1;
  if (v < 1 || v > 4096) {
    nbdkit_error ("%s: must be between 1 and 4096", key);
    return -1;
  }
  max_exports = v;
  return 0;
}

const char *
ovl_dir (void)
{
  return dir;
}

void
ovl_unload (void)
{
  free (dir);
  dir = NULL;
}

/* The directory must exist and be usable now, before nbdkit forks. */
int
ovl_get_ready (void)
{
  struct stat st;

  if (stat (dir, &st) == -1) {
    nbdkit_error ("qed-overlay-dir: %s: %m", dir);
    return -1;
  }
  if (!S_ISDIR (st.st_mode)) {
    nbdkit_error ("qed-overlay-dir: %s is not a directory", dir);
    return -1;
  }
  if (access (dir, W_OK | X_OK) == -1) {
    nbdkit_error ("qed-overlay-dir: cannot create overlays in %s: %m", dir);
    return -1;
  }
  return 0;
}

static const char *
file_name (const char *exportname)
{
  return *exportname ? exportname : DEFAULT_NAME;
}

/* Is the export name one an overlay can have?  Logged if not. */
bool
ovl_check_name (const char *exportname)
{
  const char *name = file_name (exportname);
  size_t len = strlen (name);

  if (len > MAX_NAME || name[0] == '.')
    goto bad;
  for (size_t i = 0; i < len; ++i) {
    char c = name[i];
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
          (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
      goto bad;
  }
  return true;
 bad:
  nbdkit_error ("qed-overlay-dir: export name \"%.*s%s\" refused: names "
                "are [A-Za-z0-9._-], 1-%d bytes, not starting with '.'",
                64, exportname, len > 64 ? "..." : "", MAX_NAME);
  return false;
}

static struct ovl *
find (const char *name)
{
  for (struct ovl *o = set; o; o = o->next)
    if (strcmp (o->name, name) == 0)
      return o;
  return NULL;
}

static void
unlink_entry (struct ovl *o)
{
  for (struct ovl **p = &set; *p; p = &(*p)->next)
    if (*p == o) {
      *p = o->next;
      set_count--;
      return;
    }
}

static void
free_entry (struct ovl *o)
{
  free (o->name);
  free (o->path);
  free (o);
}

/* The overlay of this export for one more connection, opened by open
 * if it is not open yet.  NULL, logged. */
struct ovl *
ovl_acquire (const char *exportname, ovl_open_fn *open, void *opaque)
{
  const char *name = file_name (exportname);
  struct qed_image *img;
  struct origin *origin = NULL;
  struct ovl *o;

  if (!ovl_check_name (exportname))
    return NULL;
  pthread_mutex_lock (&set_lock);
  for (;;) {
    o = find (name);
    if (o == NULL || o->state == OVL_OPEN)
      break;
    pthread_cond_wait (&set_cond, &set_lock);
  }
  if (o) {
    o->refs++;
    pthread_mutex_unlock (&set_lock);
    return o;
  }
  if (set_count >= max_exports) {
    pthread_mutex_unlock (&set_lock);
    nbdkit_error ("qed-overlay-dir: export \"%s\" refused: %u exports are "
                  "open already (qed-max-exports=%u)", exportname,
                  max_exports, max_exports);
    return NULL;
  }
  o = calloc (1, sizeof *o);
  if (o == NULL || (o->name = strdup (name)) == NULL ||
      asprintf (&o->path, "%s/%s" SUFFIX, dir, name) == -1) {
    pthread_mutex_unlock (&set_lock);
    nbdkit_error ("calloc: %m");
    if (o)
      free (o->name);
    free (o);
    return NULL;
  }
  o->state = OVL_OPENING;
  o->refs = 1;
  o->next = set;
  set = o;
  set_count++;
  pthread_mutex_unlock (&set_lock);

  img = open (o->path, opaque, &origin);

  pthread_mutex_lock (&set_lock);
  if (img == NULL)
    unlink_entry (o);
  else {
    o->img = img;
    o->origin = origin;
    o->state = OVL_OPEN;
  }
  pthread_cond_broadcast (&set_cond);
  pthread_mutex_unlock (&set_lock);
  if (img == NULL) {
    free_entry (o);
    return NULL;
  }
  nbdkit_debug ("qed-overlay-dir: export \"%s\": %s opened", exportname,
                o->path);
  return o;
}

struct qed_image *
ovl_image (const struct ovl *o)
{
  return o->img;
}

const char *
ovl_path (const struct ovl *o)
{
  return o->path;
}

struct origin *
ovl_origin (const struct ovl *o)
{
  return o->origin;
}

/* A connection is done with its overlay: the last one closes it. */
void
ovl_release (struct ovl *o, ovl_close_fn *close)
{
  pthread_mutex_lock (&set_lock);
  if (--o->refs > 0) {
    pthread_mutex_unlock (&set_lock);
    return;
  }
  o->state = OVL_CLOSING;
  pthread_mutex_unlock (&set_lock);

  close (o->img, o->path, o->origin);
  nbdkit_debug ("qed-overlay-dir: %s closed (no connection left)", o->path);

  pthread_mutex_lock (&set_lock);
  unlink_entry (o);
  pthread_cond_broadcast (&set_cond);
  pthread_mutex_unlock (&set_lock);
  free_entry (o);
}

/* At exit: close whatever connections left open. */
void
ovl_close_all (ovl_close_fn *close)
{
  struct ovl *o;

  pthread_mutex_lock (&set_lock);
  while ((o = set) != NULL) {
    set = o->next;
    set_count--;
    if (o->img)
      close (o->img, o->path, o->origin);
    free_entry (o);
  }
  pthread_mutex_unlock (&set_lock);
}

/* nbdinfo --list: the overlays that exist in DIR (regular files
 * NAME.qed with a name a client may ask for), but except (a path: the
 * shared cache, when it is in DIR). */
int
ovl_list (struct nbdkit_exports *exports, const char *except)
{
  DIR *d = opendir (dir);
  struct dirent *ent;
  size_t sl = strlen (SUFFIX);
  int r = 0;

  if (d == NULL) {
    nbdkit_error ("qed-overlay-dir: %s: %m", dir);
    return -1;
  }
  while (r == 0 && (ent = readdir (d)) != NULL) {
    size_t len = strlen (ent->d_name);
    struct stat st;
    CLEANUP_FREE char *name = NULL;

    if (len <= sl || len - sl > MAX_NAME || ent->d_name[0] == '.' ||
        strcmp (ent->d_name + len - sl, SUFFIX) != 0 ||
        fstatat (dirfd (d), ent->d_name, &st, AT_SYMLINK_NOFOLLOW) == -1 ||
        !S_ISREG (st.st_mode))
      continue;
    if (except && strncmp (except, dir, strlen (dir)) == 0 &&
        except[strlen (dir)] == '/' &&
        strcmp (except + strlen (dir) + 1, ent->d_name) == 0)
      continue;
    name = strndup (ent->d_name, len - sl);
    if (name == NULL) {
      nbdkit_error ("strndup: %m");
      r = -1;
    }
    else if (strspn (name, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                     "0123456789._-") == len - sl)
      r = nbdkit_add_export (exports, name, NULL);
  }
  closedir (d);
  return r;
}
