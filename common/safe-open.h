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
  bool beneath;                 /* name must resolve beneath dirfd */
  /* When the server runs as root: open with the file-system identity
   * of this user (the owner of the image that names the file). */
  bool as_owner;
  uid_t uid;
  gid_t gid;
  bool devices;                 /* allow block devices */
};

/* Open a backing file: no magic links, under the owner's identity,
 * refusing devices (unless allowed), procfs, sysfs and the like, and
 * anything but regular files and block devices.  Returns a blocking
 * O_RDONLY descriptor and fills *st, or -1 with the error logged. */
extern int qed_open_backing (const struct qed_backing_open *bo,
                             struct stat *st);

/* Open an existing overlay (read-write or read-only) only if it is
 * ours: a symbolic link is followed only if the server's user owns it
 * and its directory is not world-writable, and the file must be a
 * regular file owned by the server's user that no one else can write.
 * -1 with the error logged, or with *missing set (and nothing logged)
 * if nothing exists at path. */
extern int qed_open_overlay_fd (const char *path, bool writable,
                                bool *missing);

/* Open an existing overlay as above only to hold a reader's locks on
 * it: the descriptor, -1 if there is no overlay yet, -2 on error. */
extern int qed_hold_overlay_locks (const char *path,
                                   enum qed_locking locking);

#endif /* NBDKIT_QED_SAFE_OPEN_H */
