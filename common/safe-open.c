/* nbdkit-qed: opening files that someone else may have named or planted.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Backing files.  An image names its backing file, and whoever wrote
 * the image chose that name.  A root server would otherwise open any
 * file on the host for it, so (as libvirt does for QEMU) the backing
 * file is opened with the file-system identity of the image's owner:
 * fsuid and fsgid, and the owner's supplementary groups from the group
 * database (none if the uid has no passwd entry).  All three are
 * per-thread credentials in Linux; glibc's setgroups() would change
 * every thread, so the raw system calls are used, and they are put
 * back before returning, on every path.  Other threads' opens never
 * see the switch.
 *
 * Whatever the identity, a backing file must be a regular file or (if
 * allowed) a block device, and not on a pseudo file system (procfs,
 * sysfs and friends), and magic links (/proc/self/fd/N) are not
 * followed.  In "beneath" mode the name must resolve beneath the top
 * image's directory (openat2 RESOLVE_BENEATH; on older kernels the
 * opened file's path is checked instead).
 *
 * Overlays.  The filter writes guest data into its overlay, so an
 * existing overlay must be ours: a symlink planted by someone else must
 * not redirect the writes (or the reads) to another file, and a file
 * that someone else can write would let them change what the guest
 * reads.
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

#if defined __has_include
#if __has_include (<linux/openat2.h>)
#include <linux/openat2.h>
#endif
#endif

#include "qed-internal.h"
#include "safe-open.h"
#include "seam.h"
#include "util.h"

#ifndef RESOLVE_BENEATH
struct open_how { uint64_t flags, mode, resolve; };
#define RESOLVE_NO_MAGICLINKS 0x02
#define RESOLVE_BENEATH       0x08
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif

/* ---- The owner's identity, for this thread only. ---- */

struct saved_id {
  bool switched;
  uid_t fsuid;
  gid_t fsgid;
  int ngroups;
  gid_t *groups;
};

/* The owner's supplementary groups (malloc'd; *n = 0 if unknown). */
static gid_t *
owner_groups (uid_t uid, gid_t gid, int *n)
{
  struct passwd pw, *res = NULL;
  char buf[4096];
  gid_t *groups = NULL;
  int want = 32;

  *n = 0;
  if (getpwuid_r (uid, &pw, buf, sizeof buf, &res) != 0 || res == NULL)
    return NULL;
  for (int tries = 0; tries < 4; ++tries) {
    gid_t *g = realloc (groups, want * sizeof *g);
    int got = want;
    if (g == NULL)
      break;
    groups = g;
    if (getgrouplist (pw.pw_name, gid, groups, &got) >= 0) {
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

/* Take on uid/gid as this thread's file-system identity (only when
 * running as root: otherwise we already are less than root). */
static int
become_owner (uid_t uid, gid_t gid, struct saved_id *s)
{
  CLEANUP_FREE gid_t *groups = NULL;
  int n, e;

  *s = (struct saved_id) { .switched = false };
  if (geteuid () != 0 || uid == 0)
    return 0;
  groups = owner_groups (uid, gid, &n);
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

/* ---- Where the name leads. ---- */

/* Sets *check_after when the kernel could not enforce "beneath". */
static int
open_no_magic (const struct qed_backing_open *bo, bool *check_after)
{
  struct open_how how = {
    .flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY,
    .resolve = RESOLVE_NO_MAGICLINKS | (bo->beneath ? RESOLVE_BENEATH : 0),
  };
  static bool no_openat2;
  int fd;

  *check_after = false;
  if (!__atomic_load_n (&no_openat2, __ATOMIC_RELAXED)) {
    fd = syscall (SYS_openat2, bo->dirfd, bo->name, &how, sizeof how);
    if (fd >= 0 || errno != ENOSYS)
      return fd;
    __atomic_store_n (&no_openat2, true, __ATOMIC_RELAXED);
  }
  *check_after = bo->beneath;
  if (bo->beneath && bo->name[0] == '/') {
    errno = EXDEV;
    return -1;
  }
  return openat (bo->dirfd, bo->name, how.flags);
}

/* The file's path as the kernel sees it (for the fallback check). */
static char *
fd_path (int fd)
{
  char link[64], *buf = malloc (PATH_MAX);
  ssize_t n;

  if (buf == NULL)
    return NULL;
  snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
  n = readlink (link, buf, PATH_MAX - 1);
  if (n <= 0) {
    free (buf);
    return NULL;
  }
  buf[n] = '\0';
  return buf;
}

/* Without openat2, check afterwards that the file lies beneath dirfd. */
static bool
lies_beneath (int fd, int dirfd)
{
  CLEANUP_FREE char *file = fd_path (fd);
  CLEANUP_FREE char *dir = fd_path (dirfd);
  size_t len;

  if (file == NULL || dir == NULL)
    return false;
  len = strlen (dir);
  if (len == 1)                 /* "/" */
    return true;
  return strncmp (file, dir, len) == 0 && file[len] == '/';
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

/* Refuse what is not a disk (fd open, st filled). */
static int
check_backing_file (const struct qed_backing_open *bo, int fd,
                    const struct stat *st, bool check_beneath)
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
  if (check_beneath && !lies_beneath (fd, bo->dirfd)) {
    qed_error ("backing file %s is not beneath the top image's directory "
               "(follow-backing=beneath)", bo->path);
    errno = EXDEV;
    return -1;
  }
  return 0;
}

int
qed_open_backing (const struct qed_backing_open *bo, struct stat *st)
{
  struct saved_id id = { .switched = false };
  bool check_beneath;
  int fd, e;

  if (bo->as_owner && become_owner (bo->uid, bo->gid, &id) == -1)
    return -1;
  fd = open_no_magic (bo, &check_beneath);
  e = errno;
  if (bo->as_owner)
    restore_id (&id);
  if (fd == -1) {
    if (e == EXDEV)
      qed_error ("backing file %s is not beneath the top image's directory "
                 "(follow-backing=beneath)", bo->path);
    else if (e == ELOOP)
      qed_error ("cannot open backing file %s: a magic link (/proc/.../fd) "
                 "or a symbolic link loop: %s", bo->path, strerror (e));
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
  if (check_backing_file (bo, fd, st, check_beneath) == -1)
    goto err;
  fcntl (fd, F_SETFL, fcntl (fd, F_GETFL) & ~O_NONBLOCK);
  return fd;

 err:
  e = errno;
  close (fd);
  errno = e;
  return -1;
}

/* ---- Overlays. ---- */

/* May we follow the symlink at path (lst: its lstat)? */
static bool
symlink_is_ours (const char *path, const struct stat *lst)
{
  CLEANUP_FREE char *dir = strdup (path);
  char *slash;
  struct stat dst;

  if (lst->st_uid != geteuid ()) {
    qed_error ("qed-overlay: %s is a symbolic link owned by another user "
               "(uid %u): refused", path, (unsigned) lst->st_uid);
    return false;
  }
  if (dir == NULL)
    return false;
  slash = strrchr (dir, '/');
  if (slash == NULL)
    strcpy (dir, ".");
  else
    slash[slash == dir] = '\0';
  if (stat (dir, &dst) == -1 || (dst.st_mode & S_IWOTH)) {
    qed_error ("qed-overlay: %s is a symbolic link in a world-writable "
               "directory: refused (name the file itself)", path);
    return false;
  }
  return true;
}

int
qed_open_overlay_fd (const char *path, bool writable, bool *missing)
{
  struct stat lst, st;
  int fd, e;

  *missing = false;
  if (lstat (path, &lst) == -1) {
    if (errno == ENOENT)
      *missing = true;
    else
      qed_error ("qed-overlay: %s: %m", path);
    return -1;
  }
  if (S_ISLNK (lst.st_mode) && !symlink_is_ours (path, &lst)) {
    errno = EPERM;
    return -1;
  }
  /* If it was a file, it must still be one (not a symlink now). */
  fd = open (path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY |
             (S_ISLNK (lst.st_mode) ? 0 : O_NOFOLLOW));
  if (fd == -1) {
    qed_error ("qed-overlay: %s: %m", path);
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
