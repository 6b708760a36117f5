/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the seams between the format core and its host.
 *
 * The core never calls nbdkit directly.  Each host (the plugin, the
 * filter, the unit tests) defines the message functions: the plugin and
 * filter forward them to nbdkit_error and nbdkit_debug.  Both objects
 * are built with -fvisibility=hidden, so each binds to its own copy.
 *
 * Nor does the core call the kernel on an image's descriptor directly:
 * every transfer, sync, resize, hole and stat of an open image goes
 * through the qed_io_* functions below.  common/io-file.c implements
 * them over the file; the fuzz target links an in-memory file instead
 * (tests/fuzz-io-mem.c), so that no input costs a system call.
 */

#ifndef NBDKIT_QED_SEAM_H
#define NBDKIT_QED_SEAM_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/stat.h>
#include <sys/uio.h>

/* An error the user should see.  Must preserve errno. */
extern void qed_error (const char *fs, ...)
  __attribute__ ((__format__ (__printf__, 1, 2)));

/* A message shown only when debugging (nbdkit -v).  Must preserve errno. */
extern void qed_debug (const char *fs, ...)
  __attribute__ ((__format__ (__printf__, 1, 2)));

/* Events an operator should see once, without the word "error"
 * (nbdkit has no level between error and debug): a routine one
 * (qed_notice: a repair after an unclean stop) or one that weakens a
 * guarantee by configuration or environment (qed_warning: locking
 * off).  The nbdkit seam logs them where nbdkit logs its errors, as
 * "nbdkit: qed: notice: ..." / "... warning: ..." on stderr, or at
 * syslog's LOG_NOTICE / LOG_WARNING.  Hosts that define only qed_error
 * and qed_debug get defaults that use qed_debug (notice.c).  Must
 * preserve errno. */
extern void qed_notice (const char *fs, ...)
  __attribute__ ((__format__ (__printf__, 1, 2)));
extern void qed_warning (const char *fs, ...)
  __attribute__ ((__format__ (__printf__, 1, 2)));

/* Soft errors: while on in a thread (qed_soft_errors (1) ... (0)),
 * qed_error there only records the message (qed_last_error) and logs
 * it under -D qed.verbose=1.  For work no request fails with (a
 * copy-on-read fill), whose caller says what happened once.  Only in
 * the nbdkit seam. */
extern void qed_soft_errors (int on);

/* One line per decision the core makes (allocation, copy from the
 * backing file, copy-on-read fill or skip, L2 cache miss, writeback),
 * logged only when the host asks for it (-D qed.verbose=1). */
extern int qed_verbose_enabled (void);
#define qed_verbose(fs, ...) \
  do { if (qed_verbose_enabled ()) qed_debug (fs, ##__VA_ARGS__); } while (0)

/* Only in the nbdkit seam (seam-nbdkit.c), for the plugin and the
 * filter: the calling thread's last qed_error message ("" after
 * qed_clear_last_error), and one log line when the first connection
 * cannot open the image: "WHAT: FILE: cannot open the image: CAUSE"
 * (nbdkit 1.32 sends the client no message). */
extern const char *qed_last_error (void);
extern void qed_clear_last_error (void);
extern void qed_open_failed (const char *what, const char *filename);

/* The image file (io-file.c).  Each behaves as the system call it is
 * named after, errno included: pread, pwrite, pwritev, fdatasync,
 * ftruncate, fallocate (mode: FALLOC_FL_*), lseek (whence: SEEK_END,
 * SEEK_DATA or SEEK_HOLE), fstat and close.  qed_io_advise is
 * posix_fadvise (POSIX_FADV_WILLNEED): a hint, it cannot fail. */
extern ssize_t qed_io_pread (int fd, void *buf, size_t count, uint64_t off);
extern ssize_t qed_io_pwrite (int fd, const void *buf, size_t count,
                              uint64_t off);
extern ssize_t qed_io_pwritev (int fd, const struct iovec *iov, int iovcnt,
                               uint64_t off);
extern int qed_io_datasync (int fd);
extern int qed_io_truncate (int fd, uint64_t size);
extern int qed_io_fallocate (int fd, int mode, uint64_t off, uint64_t len);
extern off_t qed_io_seek (int fd, off_t off, int whence);
extern void qed_io_advise (int fd, uint64_t off, uint64_t len);
extern int qed_io_fstat (int fd, struct stat *st);
extern int qed_io_close (int fd);

#endif /* NBDKIT_QED_SEAM_H */
