/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the plugin's dir=DIR mode.  See dir.h.
 *
 * Names.  An export NAME is [A-Za-z0-9._-], 1-200 bytes, not starting
 * with '.'; its image is DIR/NAME.qed, opened with openat2
 * (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) on a descriptor of DIR
 * taken at start-up: a symlink may point within DIR, never out of it
 * (on kernels without openat2, no symlink is followed), and is
 * followed only under the symlink rule of every image path (judged by
 * who planted it: reopen_link, safe-open.c).  The file
 * must be a regular file.  Any error concerns that export only.  An
 * export is its file: a symlink within DIR names its target's export
 * (found by device and inode), since two opens of one file would
 * conflict on its locks.  Only regular files are listed.
 *
 * Life of an export.  The first connection opens the image and its
 * chain with export_open, exactly as file= does (and with the same
 * options: every plugin key applies to every export); later ones
 * share it (one image, one lock, one cache).  When the last
 * connection ends, the export stays open for idle-clean seconds (0:
 * it is closed at once) and is then closed as file= is at exit:
 * written back, compacted or listed, NEED_CHECK cleared, its locks
 * released, so that QEMU may open it.  While open and written to, it
 * is written back and marked clean after idle-clean seconds without
 * writes, as file= does.  One thread (the reaper) does both.
 *
 * States, under dir_lock: OPENING (one connection opens it, without
 * the lock, so that a long repair of one export never holds up the
 * others; the rest wait on dir_cond), OPEN, CLOSING (closed without
 * the lock; a new connection waits, then opens it again: two opens of
 * one file would conflict on its locks).  An export leaves the list
 * when its open fails or its close ends, and is freed then, or by the
 * last connection that waited on it.  Only an OPEN export with no
 * connection (conns == 0) is closed.
 *
 * Memory.  l2-cache= is the budget of the whole process: every
 * export's image and backing chain draw their L2 pages from one
 * struct qed_cache_budget (table.c).
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <dirent.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#if __has_include (<linux/openat2.h>)
#include <linux/openat2.h>
#else
struct open_how { uint64_t flags, mode, resolve; };
#endif
#ifndef RESOLVE_BENEATH
#define RESOLVE_NO_MAGICLINKS 0x02
#define RESOLVE_BENEATH       0x08
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qed.h"
#include "defaults.h"
#include "util.h"
#include "dir.h"
#include "export.h"
#include "options.h"
#include "safe-open.h"

#define MAX_NAME 200
#define SUFFIX ".qed"

enum state { OPENING, OPEN, CLOSING };

struct file_id {
  dev_t dev;
  ino_t ino;
};

struct dir_export {
  struct plugin_export e;       /* first: dir_put's argument */
  char name[MAX_NAME + 1];      /* the first name it was opened by */
  struct file_id id;            /* its file */
  enum state state;
  bool gone;                    /* out of the list: the open failed, or
                                   it was closed (freed by the last
                                   waiter) */
  unsigned conns;               /* connections holding it */
  unsigned waiters;             /* connections waiting on its state */
  time_t last_close;            /* when conns last fell to 0 */
  time_t last_write;            /* atomic; 0: clean since the last idle */
  struct dir_export *next;
};

static int dir_fd = -1;
static struct qed_cache_budget budget;

static pthread_mutex_t dir_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t dir_cond = PTHREAD_COND_INITIALIZER;
static struct dir_export *exports_open;  /* every state */

static pthread_t reaper;
static bool reaper_running, stopping;

static bool
valid_name (const char *name, size_t len)
{
  if (len < 1 || len > MAX_NAME || name[0] == '.')
    return false;
  for (size_t i = 0; i < len; ++i) {
    char c = name[i];
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
          (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
      return false;
  }
  return true;
}

int
dir_config_complete (void)
{
  struct stat st;

  dir_fd = open (opts.dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd == -1 || fstat (dir_fd, &st) == -1) {
    nbdkit_error ("dir=%s: %m", opts.dir);
    return -1;
  }
  if (opts.default_export &&
      !valid_name (opts.default_export, strlen (opts.default_export))) {
    nbdkit_error ("default-export=%s: an export name is 1 to %d of "
                  "A-Z a-z 0-9 . _ - and does not start with '.'",
                  opts.default_export, MAX_NAME);
    return -1;
  }
  budget.max_bytes = opts.l2_cache ? (uint64_t) opts.l2_cache
    : QED_DEFAULT_L2_CACHE;
  return 0;
}

/* Open DIR/NAME.qed beneath DIR: the descriptor, or -1 with errno
 * (EXDEV: a symlink leads out of DIR; ELOOP: a symlink, no openat2). */
static int
open_beneath (const char *file, int flags)
{
  static bool no_openat2;
  struct open_how how = {
    /* openat2 refuses O_PATH with other flags. */
    .flags = flags | O_CLOEXEC | (flags & O_PATH ? 0 : O_NONBLOCK | O_NOCTTY),
    .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
  };
  int fd;

  if (!__atomic_load_n (&no_openat2, __ATOMIC_RELAXED)) {
    fd = syscall (SYS_openat2, dir_fd, file, &how, sizeof how);
    if (fd >= 0 || errno != ENOSYS)
      return fd;
    __atomic_store_n (&no_openat2, true, __ATOMIC_RELAXED);
  }
  return openat (dir_fd, file, how.flags | O_NOFOLLOW);
}

/* NAME.qed in DIR is a symlink (within DIR: open_beneath proved it):
 * follow it only under the rule for every image path, judged by who
 * planted each link (safe-open.c), so that one user's link never
 * reaches another user's image in DIR.  The walk must land on the
 * file that *fd is; *fd is replaced by its descriptor.  -1, logged. */
static int
reopen_link (struct dir_export *de, const char *file, int flags, int *fd)
{
  CLEANUP_FREE char *path = NULL;
  struct stat a, b;
  int fd2;

  if (asprintf (&path, "%s/%s", opts.dir, file) == -1) {
    path = NULL;
    nbdkit_error ("asprintf: %m");
    return -1;
  }
  fd2 = qed_open_image_fd (path, flags | O_NONBLOCK | O_CLOEXEC, NULL);
  if (fd2 == -1) {
    nbdkit_error ("export '%s': refused", de->name);
    return -1;
  }
  if (fstat (fd2, &a) == -1 || fstat (*fd, &b) == -1 ||
      a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
    nbdkit_error ("export '%s': %s changed while it was opened: refused",
                  de->name, path);
    close (fd2);
    return -1;
  }
  close (*fd);
  *fd = fd2;
  return 0;
}

/* Open the file of export name for e (writable if it can be): a
 * regular file, beneath DIR.  -1 with the error logged. */
static int
open_file (struct dir_export *de, bool readonly)
{
  char file[MAX_NAME + sizeof SUFFIX];
  struct stat st;
  int fd = -1;

  snprintf (file, sizeof file, "%s" SUFFIX, de->name);
  de->e.writable = false;
  if (!readonly) {
    fd = open_beneath (file, O_RDWR);
    de->e.writable = fd >= 0;
  }
  if (fd == -1 && (readonly || errno == EACCES || errno == EROFS ||
                   errno == EPERM || errno == ETXTBSY))
    fd = open_beneath (file, O_RDONLY);
  if (fd == -1) {
    if (errno == ENOENT)
      nbdkit_error ("export '%s': no such export (no %s in %s)",
                    de->name, file, opts.dir);
    else if (errno == EXDEV)
      nbdkit_error ("export '%s': %s/%s is a symlink that leads out of "
                    "%s: refused", de->name, opts.dir, file, opts.dir);
    else if (errno == EISDIR)
      nbdkit_error ("export '%s': %s/%s is not a regular file", de->name,
                    opts.dir, file);
    else if (errno == ELOOP)
      nbdkit_error ("export '%s': %s/%s is a symlink: refused",
                    de->name, opts.dir, file);
    else
      nbdkit_error ("export '%s': %s/%s: %m", de->name, opts.dir, file);
    return -1;
  }
  if (fstatat (dir_fd, file, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
      S_ISLNK (st.st_mode) &&
      reopen_link (de, file, de->e.writable ? O_RDWR : O_RDONLY, &fd) == -1) {
    close (fd);
    return -1;
  }
  if (fstat (fd, &st) == -1 || !S_ISREG (st.st_mode)) {
    nbdkit_error ("export '%s': %s/%s is not a regular file", de->name,
                  opts.dir, file);
    close (fd);
    return -1;
  }
  de->id.dev = st.st_dev;
  de->id.ino = st.st_ino;
  fcntl (fd, F_SETFL, fcntl (fd, F_GETFL) & ~O_NONBLOCK);
  if (asprintf (&de->e.filename, "%s/%s", opts.dir, file) == -1) {
    de->e.filename = NULL;
    nbdkit_error ("asprintf: %m");
    close (fd);
    return -1;
  }
  de->e.fd = fd;
  return 0;
}

static void
export_free (struct dir_export *de)
{
  if (de->e.fd >= 0)
    close (de->e.fd);
  free (de->e.filename);
  free (de);
}

/* Remove de from the list.  dir_lock held. */
static void
unlink_export (struct dir_export *de)
{
  struct dir_export **pp = &exports_open;

  while (*pp != de)
    pp = &(*pp)->next;
  *pp = de->next;
}

/* Open de's image (its file is open; state OPENING, in the list),
 * without dir_lock. */
static int
open_image (struct dir_export *de, bool readonly)
{
  if (!de->e.writable)
    readonly = true;
  if (export_open (&de->e, readonly, &budget) == -1) {
    nbdkit_error ("export '%s': cannot be opened (the other exports are "
                  "not affected)", de->name);
    return -1;
  }
  nbdkit_debug ("export '%s': opened %s%s", de->name, de->e.filename,
                readonly ? " read-only" : "");
  return 0;
}

/* The export named name, or (id not NULL) whose file is id.
 * dir_lock held. */
static struct dir_export *
find (const char *name, const struct file_id *id)
{
  for (struct dir_export *de = exports_open; de; de = de->next)
    if (strcmp (de->name, name) == 0 ||
        (id && de->id.dev == id->dev && de->id.ino == id->ino))
      return de;
  return NULL;
}

/* de: wait until it is OPEN or gone.  dir_lock held. */
static void
wait_for (struct dir_export *de)
{
  de->waiters++;
  while (de->state != OPEN && !de->gone)
    pthread_cond_wait (&dir_cond, &dir_lock);
  if (--de->waiters == 0 && de->gone)
    export_free (de);           /* out of the list already */
}

struct plugin_export *
dir_get (const char *name, bool readonly)
{
  struct dir_export *de, *nde;
  int r;

  if (name[0] == '\0') {
    nbdkit_error ("the default export (an empty name) is refused with "
                  "dir= (name an export, or give default-export=NAME)");
    return NULL;
  }
  if (!valid_name (name, strlen (name))) {
    nbdkit_error ("export '%.*s': refused: an export name is 1 to %d of "
                  "A-Z a-z 0-9 . _ - and does not start with '.'",
                  MAX_NAME + 1, name, MAX_NAME);
    return NULL;
  }
  nde = calloc (1, sizeof *nde);
  if (nde == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  strcpy (nde->name, name);
  nde->e.fd = -1;

  /* Share the export if it is open under this name, or its file under
   * another (a symlink within DIR): one file is one image, with one
   * lock.  Else open the file, and look again. */
  pthread_mutex_lock (&dir_lock);
  for (;;) {
    de = find (name, nde->e.fd >= 0 ? &nde->id : NULL);
    if (de && de->state == OPEN)
      break;
    if (de) {
      wait_for (de);
      continue;
    }
    if (nde->e.fd >= 0)
      break;
    pthread_mutex_unlock (&dir_lock);
    r = open_file (nde, readonly);
    pthread_mutex_lock (&dir_lock);
    if (r == -1) {
      pthread_mutex_unlock (&dir_lock);
      export_free (nde);
      return NULL;
    }
  }
  if (de) {
    r = 0;
    if (!readonly && qed_is_readonly (de->e.img)) {
      nbdkit_error ("export '%s': the image was opened read-only by an "
                    "earlier connection", name);
      r = -1;
    }
    else
      de->conns++;
    pthread_mutex_unlock (&dir_lock);
    export_free (nde);
    return r == 0 ? &de->e : NULL;
  }

  de = nde;
  de->state = OPENING;
  de->conns = 1;
  de->next = exports_open;
  exports_open = de;
  pthread_mutex_unlock (&dir_lock);

  r = open_image (de, readonly);

  pthread_mutex_lock (&dir_lock);
  if (r == 0)
    de->state = OPEN;
  else {
    /* Waiters try again, each with its own open (and message). */
    unlink_export (de);
    de->gone = true;
    de->conns = 0;
    if (de->waiters == 0)
      export_free (de);
    de = NULL;
  }
  pthread_cond_broadcast (&dir_cond);
  pthread_mutex_unlock (&dir_lock);
  return de ? &de->e : NULL;
}

/* Close de (CLOSING, no connections) without dir_lock, then free it. */
static void
close_export (struct dir_export *de)
{
  nbdkit_debug ("export '%s': last connection gone: closing %s",
                de->name, de->e.filename);
  export_close (&de->e);
  pthread_mutex_lock (&dir_lock);
  unlink_export (de);
  de->gone = true;
  if (de->waiters == 0)
    export_free (de);           /* else the last waiter frees it */
  pthread_cond_broadcast (&dir_cond);
  pthread_mutex_unlock (&dir_lock);
}

void
dir_put (struct plugin_export *e)
{
  struct dir_export *de = (struct dir_export *) e;
  bool close_now;

  pthread_mutex_lock (&dir_lock);
  de->last_close = time (NULL);
  close_now = --de->conns == 0 && opts.idle_clean == 0;
  if (close_now)
    de->state = CLOSING;
  pthread_mutex_unlock (&dir_lock);
  if (close_now)
    close_export (de);
}

void
dir_note_write (struct plugin_export *e)
{
  struct dir_export *de = (struct dir_export *) e;

  __atomic_store_n (&de->last_write, time (NULL), __ATOMIC_RELAXED);
}

/* One pass of the reaper: the first export that is due, either to be
 * closed (returned in *to_close, state CLOSING) or written back
 * (returned in *to_idle, with a connection reference).  dir_lock
 * held. */
static void
due (time_t now, struct dir_export **to_close, struct dir_export **to_idle)
{
  time_t wait = opts.idle_clean;

  *to_close = *to_idle = NULL;
  for (struct dir_export *de = exports_open; de; de = de->next) {
    time_t lw = __atomic_load_n (&de->last_write, __ATOMIC_RELAXED);
    if (de->state != OPEN)
      continue;
    if (de->conns == 0 && now - de->last_close >= wait) {
      de->state = CLOSING;
      *to_close = de;
      return;
    }
    if (lw != 0 && now - lw >= wait) {
      __atomic_store_n (&de->last_write, 0, __ATOMIC_RELAXED);
      de->conns++;
      *to_idle = de;
      return;
    }
  }
}

static void *
reaper_main (void *arg)
{
  pthread_mutex_lock (&dir_lock);
  while (!stopping) {
    struct timespec ts;
    struct dir_export *to_close, *to_idle;

    due (time (NULL), &to_close, &to_idle);
    if (to_close == NULL && to_idle == NULL) {
      clock_gettime (CLOCK_REALTIME, &ts);
      ts.tv_sec += 1;
      pthread_cond_timedwait (&dir_cond, &dir_lock, &ts);
      continue;
    }
    pthread_mutex_unlock (&dir_lock);
    if (to_close)
      close_export (to_close);
    else {
      if (qed_idle (to_idle->e.img) == -1)
        nbdkit_debug ("export '%s': idle writeback failed: %m",
                      to_idle->name);
      dir_put (&to_idle->e);
    }
    pthread_mutex_lock (&dir_lock);
  }
  pthread_mutex_unlock (&dir_lock);
  return NULL;
}

int
dir_after_fork (void)
{
  int err;

  if (opts.idle_clean == 0)
    return 0;                   /* closed at the last connection */
  err = pthread_create (&reaper, NULL, reaper_main, NULL);
  if (err) {
    errno = err;
    nbdkit_error ("pthread_create: %m");
    return -1;
  }
  reaper_running = true;
  return 0;
}

void
dir_cleanup (void)
{
  struct dir_export *de;

  pthread_mutex_lock (&dir_lock);
  stopping = true;
  pthread_cond_broadcast (&dir_cond);
  pthread_mutex_unlock (&dir_lock);
  if (reaper_running)
    pthread_join (reaper, NULL);
  reaper_running = false;

  /* No connection and no reaper is left: every export in the list is
   * OPEN (failed opens and finished closes leave the list). */
  while ((de = exports_open) != NULL) {
    exports_open = de->next;
    if (de->state == OPEN)
      export_close (&de->e);
    export_free (de);
  }
  if (dir_fd >= 0)
    close (dir_fd);
  dir_fd = -1;
}

int
dir_list_exports (struct nbdkit_exports *exports)
{
  int fd = dup (dir_fd);
  DIR *d;
  struct dirent *ent;
  int r = 0;

  if (fd == -1 || (d = fdopendir (fd)) == NULL) {
    nbdkit_error ("dir=%s: %m", opts.dir);
    if (fd >= 0)
      close (fd);
    return -1;
  }
  rewinddir (d);
  while (r == 0 && (errno = 0, ent = readdir (d)) != NULL) {
    size_t len = strlen (ent->d_name);
    struct stat st;
    int f;

    if (len <= strlen (SUFFIX) ||
        strcmp (ent->d_name + len - strlen (SUFFIX), SUFFIX) != 0 ||
        !valid_name (ent->d_name, len - strlen (SUFFIX)))
      continue;
    /* The regular files (a symlink within DIR may be opened by its
     * name, but is the export of its target: not listed twice). */
    f = open_beneath (ent->d_name, O_PATH | O_NOFOLLOW);
    if (f == -1)
      continue;
    if (fstat (f, &st) == 0 && S_ISREG (st.st_mode)) {
      char name[MAX_NAME + 1];
      snprintf (name, sizeof name, "%.*s",
                (int) (len - strlen (SUFFIX)), ent->d_name);
      r = nbdkit_add_export (exports, name, NULL);
    }
    close (f);
  }
  if (r == 0 && errno != 0) {
    nbdkit_error ("dir=%s: readdir: %m", opts.dir);
    r = -1;
  }
  closedir (d);
  return r;
}

const char *
dir_default_export (void)
{
  return opts.default_export ? opts.default_export : "";
}
