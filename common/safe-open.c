/* nbdkit-qed: opening files that someone else may have named or planted.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Every path we open (the plugin's image, each backing layer, the
 * filter's overlay, and the directory of a new image) is walked here
 * component by component, with O_PATH|O_NOFOLLOW descriptors and our
 * own reading of symbolic links, so that each link can be judged by
 * who planted it (the kernel's fs.protected_symlinks judges only links
 * in sticky world-writable directories, and openat2's RESOLVE_* flags
 * only refuse links wholesale):
 *
 *  - a symbolic link is followed only if it is owned by the server's
 *    user (euid) or by the owner of what it finally points to, and in
 *    a world-writable directory only if the server's user owns it;
 *  - links on procfs are magic (/proc/self/fd/N) and never followed,
 *    except /proc/self and /proc/thread-self;
 *  - at most 40 links a walk.
 *
 * The walk ends with the real directory that holds the file (after
 * every link), so that names relative to the file resolve there and
 * new files are made there (openat), not wherever the path string
 * leads later.  With "beneath" (follow-backing=beneath) the directory
 * the walk ends in must lie beneath a given one (climbing from it by
 * "..", device and inode compared).
 *
 * Backing files.  An image names its backing file, and whoever wrote
 * the image chose that name.  A root server would otherwise open any
 * file on the host for it, so (as libvirt does for QEMU) the backing
 * file is opened, and its path walked, with the file-system identity
 * of a user (backing.c chooses whom: the identity only drops down a
 * chain): fsuid, fsgid and supplementary groups from the user database
 * (never the file's group).  All three are per-thread credentials in
 * Linux; glibc's setgroups() would change every thread, so the raw
 * system calls are used, and they are put back before returning, on
 * every path.  Other threads' opens never see the switch.
 *
 * Whatever the identity, a backing file must be a regular file or (if
 * allowed) a block device, and not on a pseudo file system (procfs,
 * sysfs and friends).
 *
 * Overlays.  The filter writes guest data into its overlay, so an
 * existing overlay must be ours: a symlink planted by someone else must
 * not redirect the writes (or the reads) to another file, and a file
 * that someone else can write would let them change what the guest
 * reads.  A link as the overlay's last component must be the server's
 * own, and not in a world-writable directory.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pwd.h>
#include <grp.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/syscall.h>
#include <linux/magic.h>

#include "qed-internal.h"
#include "safe-open.h"
#include "seam.h"
#include "util.h"

/* The kernel's overflowgid: the group of a uid we know nothing of. */
#define OVERFLOW_GID ((gid_t) 65534)

/* ---- The owner's identity, for this thread only. ---- */

struct saved_id {
  bool switched;
  uid_t fsuid;
  gid_t fsgid;
  int ngroups;
  gid_t *groups;
};

/* The user's primary group and supplementary groups from the user
 * database (malloc'd, *n of them).  A uid with no passwd entry gets
 * the overflow group and no others.  Never the file's group: in a
 * setgid directory that is the directory's, which the owner may not
 * be in. */
static gid_t *
owner_groups (uid_t uid, gid_t *gid, int *n)
{
  struct passwd pw, *res = NULL;
  char buf[4096];
  gid_t *groups = NULL;
  int want = 32;

  *n = 0;
  *gid = OVERFLOW_GID;
  if (getpwuid_r (uid, &pw, buf, sizeof buf, &res) != 0 || res == NULL)
    return NULL;
  *gid = pw.pw_gid;
  for (int tries = 0; tries < 4; ++tries) {
    gid_t *g = realloc (groups, want * sizeof *g);
    int got = want;
    if (g == NULL)
      break;
    groups = g;
    if (getgrouplist (pw.pw_name, pw.pw_gid, groups, &got) >= 0) {
      *n = got;
      return groups;
    }
    want = got > want ? got : want * 4;
  }
  free (groups);
  return NULL;
}

static void
restore_id (struct saved_id *s)
{
  if (!s->switched)
    return;
  syscall (SYS_setfsuid, s->fsuid);
  syscall (SYS_setfsgid, s->fsgid);
  if (syscall (SYS_setgroups, (size_t) s->ngroups, s->groups) == -1)
    qed_error ("cannot restore the supplementary groups: %m");
  free (s->groups);
  s->groups = NULL;
  s->switched = false;
}

/* Take on the identity of user uid as this thread's file-system one (only when
 * running as root: otherwise we already are less than root). */
static int
become_owner (uid_t uid, struct saved_id *s)
{
  CLEANUP_FREE gid_t *groups = NULL;
  gid_t gid;
  int n, e;

  *s = (struct saved_id) { .switched = false };
  if (geteuid () != 0 || uid == 0)
    return 0;
  groups = owner_groups (uid, &gid, &n);
  s->ngroups = getgroups (0, NULL);
  if (s->ngroups == -1 ||
      (s->groups = malloc ((s->ngroups + 1) * sizeof (gid_t))) == NULL ||
      (s->ngroups = getgroups (s->ngroups, s->groups)) == -1) {
    qed_error ("getgroups: %m");
    free (s->groups);
    return -1;
  }
  /* An invalid id (-1) changes nothing and returns the current one. */
  s->fsuid = syscall (SYS_setfsuid, (uid_t) -1);
  s->fsgid = syscall (SYS_setfsgid, (gid_t) -1);
  s->switched = true;
  if (syscall (SYS_setgroups, (size_t) n, groups) == -1)
    goto err;
  syscall (SYS_setfsgid, gid);
  syscall (SYS_setfsuid, uid);
  /* setfs[ug]id report the old value even on failure: ask again. */
  if ((uid_t) syscall (SYS_setfsuid, uid) != uid ||
      (gid_t) syscall (SYS_setfsgid, gid) != gid) {
    errno = EPERM;
    goto err;
  }
  return 0;

 err:
  e = errno;
  restore_id (s);
  qed_error ("cannot take on the identity %u:%u of the image's owner: %m",
             (unsigned) uid, (unsigned) gid);
  errno = e;
  return -1;
}

/* ---- Walking a path: symlinks judged by who planted them. ---- */

/* At most this many symbolic links in one walk (as the kernel's 40). */
#define MAX_LINKS 40

struct walker {
  const char *what;             /* for messages: "backing file", ... */
  const char *path;             /* the path as named, for messages */
  unsigned links;               /* symbolic links followed */
  bool reported;                /* the error was logged */
};

static int resolve (struct walker *wk, int dirfd, const char *name,
                    int *parent, char **last);

static bool
world_writable_dir (int dirfd)
{
  struct stat st;

  return fstat (dirfd, &st) == 0 && (st.st_mode & S_IWOTH);
}

/* Links in procfs are magic (/proc/self/fd/N names no path), except
 * the two that only name a process's own directory. */
static bool
magic_link (int dirfd, const char *name)
{
  struct statfs sfs;

  if (fstatfs (dirfd, &sfs) == -1 ||
      (unsigned long) sfs.f_type != PROC_SUPER_MAGIC)
    return false;
  return strcmp (name, "self") != 0 && strcmp (name, "thread-self") != 0;
}

/* Follow the symbolic link `name` in dirfd (lst: its lstat) if its
 * owner may send us where it points: the server's user, or the owner
 * of its target unless dirfd is world-writable.  Like resolve(). */
static int
follow_link (struct walker *wk, int dirfd, const char *name,
             const struct stat *lst, int *parent, char **last)
{
  char target[PATH_MAX];
  struct stat tst;
  bool exists, ww;
  ssize_t n;
  int e;

  wk->reported = true;
  if (++wk->links > MAX_LINKS) {
    qed_error ("%s %s: too many levels of symbolic links", wk->what,
               wk->path);
    errno = ELOOP;
    return -1;
  }
  if (magic_link (dirfd, name)) {
    qed_error ("%s %s: %s is a magic link (/proc/.../fd): refused",
               wk->what, wk->path, name);
    errno = ELOOP;
    return -1;
  }
  n = readlinkat (dirfd, name, target, sizeof target);
  if (n == -1 || n == sizeof target) {
    if (n != -1)
      errno = ENAMETOOLONG;
    e = errno;
    qed_error ("%s %s: reading the symbolic link %s: %m", wk->what,
               wk->path, name);
    errno = e;
    return -1;
  }
  target[n] = '\0';
  wk->reported = false;
  if (resolve (wk, dirfd, target, parent, last) == -1)
    return -1;
  exists = fstatat (*parent, *last, &tst, AT_SYMLINK_NOFOLLOW) == 0;
  ww = world_writable_dir (dirfd);
  if (lst->st_uid == geteuid () ||
      (exists && !ww && lst->st_uid == tst.st_uid))
    return 0;
  if (ww)
    qed_error ("%s %s: %s is a symbolic link owned by uid %u in a "
               "world-writable directory: refused (only links of the "
               "server's user, uid %u, are followed there)", wk->what,
               wk->path, name, (unsigned) lst->st_uid,
               (unsigned) geteuid ());
  else if (exists)
    qed_error ("%s %s: %s is a symbolic link owned by uid %u to a file of "
               "uid %u: refused (a link is followed only if the server's "
               "user or the owner of its target owns it)", wk->what,
               wk->path, name, (unsigned) lst->st_uid,
               (unsigned) tst.st_uid);
  else
    qed_error ("%s %s: %s is a symbolic link owned by uid %u to nothing: "
               "refused", wk->what, wk->path, name, (unsigned) lst->st_uid);
  wk->reported = true;
  close (*parent);
  free (*last);
  *parent = -1;
  *last = NULL;
  errno = EPERM;
  return -1;
}

/* Move *cur into its entry `comp`, a directory or a link to one. */
static int
step (struct walker *wk, int *cur, const char *comp)
{
  struct stat lst;
  int next;

  if (comp[0] == '\0' || strcmp (comp, ".") == 0)
    return 0;
  if (strcmp (comp, "..") == 0) {
    next = openat (*cur, "..", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (next == -1)
      return -1;
  }
  else {
    if (fstatat (*cur, comp, &lst, AT_SYMLINK_NOFOLLOW) == -1)
      return -1;
    if (S_ISLNK (lst.st_mode)) {
      char *last;
      int r;

      if (follow_link (wk, *cur, comp, &lst, &next, &last) == -1)
        return -1;
      close (*cur);
      *cur = next;
      r = step (wk, cur, last);
      free (last);
      return r;
    }
    next = openat (*cur, comp, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (next == -1)
      return -1;
  }
  close (*cur);
  *cur = next;
  return 0;
}

/* Walk every component of name but the last, from dirfd: *parent is
 * an O_PATH descriptor of the real directory it leads to, *last the
 * last component (malloc'd; "." if there is none). */
static int
walk_parent (struct walker *wk, int dirfd, const char *name, int *parent,
             char **last)
{
  CLEANUP_FREE char *copy = strdup (name);
  char *p, *slash;
  int cur, e;

  *parent = -1;
  *last = NULL;
  if (copy == NULL)
    return -1;
  if (name[0] == '\0') {
    errno = ENOENT;
    return -1;
  }
  if (name[0] == '/')
    cur = open ("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
  else
    cur = dirfd == AT_FDCWD ? open (".", O_PATH | O_DIRECTORY | O_CLOEXEC)
      : fcntl (dirfd, F_DUPFD_CLOEXEC, 0);
  if (cur == -1)
    return -1;
  /* Trailing slashes name the directory itself. */
  for (size_t len = strlen (copy); len > 1 && copy[len - 1] == '/'; )
    copy[--len] = '\0';
  p = copy;
  while ((slash = strchr (p, '/')) != NULL) {
    *slash = '\0';
    if (step (wk, &cur, p) == -1)
      goto err;
    p = slash + 1;
  }
  if (p[0] == '\0')
    p = (char *) ".";
  /* "." and "..": step into them, leaving "." to open. */
  if (strcmp (p, "..") == 0) {
    if (step (wk, &cur, p) == -1)
      goto err;
    p = (char *) ".";
  }
  *last = strdup (p);
  if (*last == NULL)
    goto err;
  *parent = cur;
  return 0;

 err:
  e = errno;
  close (cur);
  errno = e;
  return -1;
}

/* Walk name from dirfd, following a symbolic link at the end too:
 * *parent and *last as in walk_parent, *last never a link (at the time
 * of the walk), and perhaps missing. */
static int
resolve (struct walker *wk, int dirfd, const char *name, int *parent,
         char **last)
{
  struct stat lst;
  int p, e;
  char *l;

  if (walk_parent (wk, dirfd, name, &p, &l) == -1)
    return -1;
  if (fstatat (p, l, &lst, AT_SYMLINK_NOFOLLOW) == 0 &&
      S_ISLNK (lst.st_mode)) {
    int r = follow_link (wk, p, l, &lst, parent, last);
    e = errno;
    close (p);
    free (l);
    errno = e;
    return r;
  }
  *parent = p;
  *last = l;
  return 0;
}

/* File systems whose files are views of the kernel, not disks. */
static bool
pseudo_fs (int fd, const char **what)
{
  struct statfs sfs;

  if (fstatfs (fd, &sfs) == -1)
    return false;
  switch ((unsigned long) sfs.f_type) {
  case PROC_SUPER_MAGIC: *what = "procfs"; return true;
  case SYSFS_MAGIC: *what = "sysfs"; return true;
  case DEBUGFS_MAGIC: *what = "debugfs"; return true;
  case TRACEFS_MAGIC: *what = "tracefs"; return true;
  case SECURITYFS_MAGIC: *what = "securityfs"; return true;
  case CGROUP_SUPER_MAGIC: case CGROUP2_SUPER_MAGIC:
    *what = "cgroupfs"; return true;
  case EFIVARFS_MAGIC: *what = "efivarfs"; return true;
  case BPF_FS_MAGIC: *what = "bpffs"; return true;
  default: return false;
  }
}

/* Open name from dirfd with flags (a regular file, or a block device
 * that the caller checks), every component walked under the symbolic
 * link rule; *parent (if not NULL) gets the real directory holding it.
 * -1 with errno, logged if wk->reported. */
static int
walk_open (struct walker *wk, int dirfd, const char *name, int flags,
           int *parent_out)
{
  int parent, fd, e;
  char *last;

  if (resolve (wk, dirfd, name, &parent, &last) == -1)
    return -1;
  fd = openat (parent, last, flags | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
  e = errno;
  free (last);
  if (fd >= 0 && parent_out)
    *parent_out = parent;
  else
    close (parent);
  errno = e;
  return fd;
}

/* Does the directory dir lie beneath (or is it) the directory root? */
static bool
lies_beneath (int dir, int root)
{
  struct stat rst, st, pst;
  int cur, up;
  bool r = false;

  if (fstat (root, &rst) == -1 ||
      (cur = fcntl (dir, F_DUPFD_CLOEXEC, 0)) == -1)
    return false;
  for (unsigned i = 0; i < 4096; ++i) {
    if (fstat (cur, &st) == -1)
      break;
    if (st.st_dev == rst.st_dev && st.st_ino == rst.st_ino) {
      r = true;
      break;
    }
    up = openat (cur, "..", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (up == -1)
      break;
    close (cur);
    cur = up;
    if (fstat (cur, &pst) == -1 ||
        (pst.st_dev == st.st_dev && pst.st_ino == st.st_ino))
      break;                    /* the root of the file system tree */
  }
  close (cur);
  return r;
}

/* Refuse what is not a disk (fd open, st filled). */
static int
check_backing_file (const struct qed_backing_open *bo, int fd,
                    const struct stat *st)
{
  const char *what;

  if (S_ISBLK (st->st_mode) && !bo->devices) {
    qed_error ("backing file %s is a block device: refused unless "
               "backing-devices=true", bo->path);
    errno = EPERM;
    return -1;
  }
  if (!S_ISREG (st->st_mode) && !S_ISBLK (st->st_mode)) {
    qed_error ("backing file %s is not a regular file or a block device",
               bo->path);
    errno = EINVAL;
    return -1;
  }
  if (pseudo_fs (fd, &what)) {
    qed_error ("backing file %s is on %s: refused", bo->path, what);
    errno = EPERM;
    return -1;
  }
  return 0;
}

int
qed_open_backing (struct qed_backing_open *bo, struct stat *st,
                  int *parent)
{
  struct saved_id id = { .switched = false };
  struct walker wk = { .what = "backing file", .path = bo->path };
  int fd, e, dir = -1;

  if (bo->as_owner && become_owner (bo->uid, &id) == -1)
    return -1;
  fd = walk_open (&wk, bo->dirfd, bo->name, O_RDONLY | O_NONBLOCK, &dir);
  e = errno;
  if (bo->as_owner)
    restore_id (&id);
  if (fd == -1) {
    if (wk.reported)
      ;
    else if (bo->as_owner && bo->uid != 0 && geteuid () == 0)
      qed_error ("cannot open backing file %s as the image's owner "
                 "(uid %u): %s", bo->path, (unsigned) bo->uid, strerror (e));
    else
      qed_error ("cannot open backing file %s: %s", bo->path, strerror (e));
    errno = e;
    return -1;
  }
  if (fstat (fd, st) == -1) {
    qed_error ("backing file %s: fstat: %m", bo->path);
    goto err;
  }
  if (bo->beneath && !lies_beneath (dir, bo->beneath_dirfd)) {
    qed_error ("backing file %s is not beneath the top image's directory "
               "(follow-backing=beneath)", bo->path);
    errno = EXDEV;
    goto err;
  }
  if (check_backing_file (bo, fd, st) == -1)
    goto err;
  fcntl (fd, F_SETFL, fcntl (fd, F_GETFL) & ~O_NONBLOCK);
  if (parent)
    *parent = dir;
  else
    close (dir);
  return fd;

 err:
  e = errno;
  close (fd);
  close (dir);
  errno = e;
  return -1;
}

int
qed_open_image_fd (const char *filename, int flags, int *parent)
{
  struct walker wk = { .what = "image", .path = filename };
  int fd = walk_open (&wk, AT_FDCWD, filename, flags, parent);

  if (fd == -1 && !wk.reported) {
    int e = errno;
    qed_error ("%s: %m", filename);
    errno = e;
  }
  return fd;
}

int
qed_open_parent (const char *path, const char *what, char **last)
{
  struct walker wk = { .what = what, .path = path };
  int parent;

  if (walk_parent (&wk, AT_FDCWD, path, &parent, last) == -1) {
    int e = errno;
    if (!wk.reported)
      qed_error ("%s %s: %m", what, path);
    errno = e;
    return -1;
  }
  if (strcmp (*last, ".") == 0) {
    qed_error ("%s %s: names a directory", what, path);
    close (parent);
    free (*last);
    *last = NULL;
    errno = EISDIR;
    return -1;
  }
  return parent;
}

/* ---- Overlays. ---- */

/* May we follow the symlink `name` in dirfd, the last component of
 * the overlay's path (lst: its lstat)?  Stricter than the rule for
 * other links: the server's own, and not in a world-writable
 * directory. */
static bool
symlink_is_ours (const char *path, int dirfd, const struct stat *lst)
{
  if (lst->st_uid != geteuid ()) {
    qed_error ("qed-overlay: %s is a symbolic link owned by another user "
               "(uid %u): refused", path, (unsigned) lst->st_uid);
    return false;
  }
  if (world_writable_dir (dirfd)) {
    qed_error ("qed-overlay: %s is a symbolic link in a world-writable "
               "directory: refused (name the file itself)", path);
    return false;
  }
  return true;
}

int
qed_open_overlay_fd (const char *path, bool writable, bool *missing)
{
  struct walker wk = { .what = "qed-overlay:", .path = path };
  struct stat lst, st;
  int fd = -1, dir, e;
  CLEANUP_FREE char *last = NULL;

  *missing = false;
  if (walk_parent (&wk, AT_FDCWD, path, &dir, &last) == -1) {
    e = errno;
    if (e == ENOENT && !wk.reported)
      *missing = true;          /* the caller says it cannot create it */
    else if (!wk.reported)
      qed_error ("qed-overlay: %s: %m", path);
    errno = e;
    return -1;
  }
  if (fstatat (dir, last, &lst, AT_SYMLINK_NOFOLLOW) == -1) {
    e = errno;
    if (e == ENOENT)
      *missing = true;
    else
      qed_error ("qed-overlay: %s: %m", path);
    close (dir);
    errno = e;
    return -1;
  }
  if (S_ISLNK (lst.st_mode) && !symlink_is_ours (path, dir, &lst)) {
    close (dir);
    errno = EPERM;
    return -1;
  }
  fd = walk_open (&wk, dir, last,
                  (writable ? O_RDWR : O_RDONLY) | O_NONBLOCK, NULL);
  e = errno;
  close (dir);
  if (fd == -1) {
    if (!wk.reported)
      qed_error ("qed-overlay: %s: %s", path, strerror (e));
    errno = e;
    return -1;
  }
  if (fstat (fd, &st) == -1) {
    qed_error ("qed-overlay: %s: fstat: %m", path);
    goto err;
  }
  if (!S_ISREG (st.st_mode)) {
    qed_error ("qed-overlay: %s is not a regular file", path);
    errno = EINVAL;
    goto err;
  }
  if (st.st_uid != geteuid ()) {
    qed_error ("qed-overlay: %s is owned by another user (uid %u), not by "
               "the server's user (uid %u): refused", path,
               (unsigned) st.st_uid, (unsigned) geteuid ());
    errno = EPERM;
    goto err;
  }
  if (st.st_mode & (S_IWGRP | S_IWOTH)) {
    qed_error ("qed-overlay: %s can be written by other users (mode %04o): "
               "refused (chmod go-w %s)", path,
               (unsigned) (st.st_mode & 07777), path);
    errno = EPERM;
    goto err;
  }
  fcntl (fd, F_SETFL, fcntl (fd, F_GETFL) & ~O_NONBLOCK);
  return fd;

 err:
  e = errno;
  close (fd);
  errno = e;
  return -1;
}

int
qed_hold_overlay_locks (const char *path, enum qed_locking locking)
{
  bool missing;
  int fd = qed_open_overlay_fd (path, false, &missing);

  if (fd == -1)
    return missing ? -1 : -2;
  if (qed_lock_file (fd, path, QED_LOCK_READER, locking) == -1) {
    close (fd);
    return -2;
  }
  return fd;
}
