/* nbdkit-qed: opening files that someone else may have named or planted.
 *
 * SPDX-License-Identifier: BSD-3-Clause
 */

#ifndef NBDKIT_QED_SAFE_OPEN_H
#define NBDKIT_QED_SAFE_OPEN_H

#include <stdbool.h>
#include <sys/types.h>
#include <sys/stat.h>

#include "qed.h"

/* How to open one backing file (read-only). */
struct qed_backing_open {
  const char *path;             /* for messages */
  int dirfd;                    /* name is relative to this (or AT_FDCWD) */
  const char *name;
  /* The file must lie beneath the directory beneath_dirfd. */
  bool beneath;
  int beneath_dirfd;
  /* When the server runs as root: walk and open with the file-system
   * identity of user uid (its groups from the user database). */
  bool as_owner;
  uid_t uid;
  bool devices;                 /* allow block devices */
};

/* Open a backing file: every symbolic link on its path judged by its
 * owner (safe-open.c), no magic links, under the owner's identity,
 * refusing devices (unless allowed), procfs, sysfs and the like, and
 * anything but regular files and block devices.  Returns a blocking
 * O_RDONLY descriptor and fills *st (and *parent, if not NULL, with an
 * O_PATH descriptor of the real directory holding the file), or -1
 * with the error logged. */
extern int qed_open_backing (struct qed_backing_open *bo, struct stat *st,
                             int *parent);

/* Open an image the user named (flags: O_RDONLY or O_RDWR, and
 * O_NONBLOCK), as the server, every symbolic link on its path judged
 * by its owner; *parent as above (if not NULL).  -1, logged. */
extern int qed_open_image_fd (const char *filename, int flags, int *parent);

/* The real directory that is to hold a new file at path (an O_PATH
 * descriptor, every link on the way judged) and the name to create in
 * it (*last, malloc'd).  -1, logged. */
extern int qed_open_parent (const char *path, const char *what, char **last);

/* Open an existing overlay (read-write or read-only) only if it is
 * ours: every symbolic link on its path judged by its owner, a link as
 * its last component followed only if the server's user owns it and
 * its directory is not world-writable, and the file must be a regular
 * file owned by the server's user that no one else can write.  -1 with
 * the error logged, or with *missing set (and nothing logged) if
 * nothing exists at path. */
extern int qed_open_overlay_fd (const char *path, bool writable,
                                bool *missing);

/* Open an existing overlay as above only to hold a reader's locks on
 * it: the descriptor, -1 if there is no overlay yet, -2 on error. */
extern int qed_hold_overlay_locks (const char *path,
                                   enum qed_locking locking);

#endif /* NBDKIT_QED_SAFE_OPEN_H */
