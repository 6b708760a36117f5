/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the unit tests' shared harness (harness.c): the seam,
 * the CHECK macros, a private temporary directory, a seeded random
 * source, file helpers and a layer beneath with a known pattern.
 * Each tests/unit/unit-*.c tests one core file and lists its cases in
 * a struct unit_test array that harness.c's main runs.
 */

#ifndef NBDKIT_QED_UNIT_HARNESS_H

#define NBDKIT_QED_UNIT_HARNESS_H

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <stdarg.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <unistd.h>
#include <endian.h>
#include <sys/stat.h>
#include <pthread.h>

#include "qed.h"
#include "qed-internal.h"         /* qed_crc32, for hostile lists */
#include "seam.h"
#include "safe-open.h"

struct unit_test {
  const char *name;
  void (*fn) (void);
};

/* Each file's cases, ended by { NULL, NULL }. */
extern const struct unit_test unit_tests_header[];
extern const struct unit_test unit_tests_image[];
extern const struct unit_test unit_tests_map[];
extern const struct unit_test unit_tests_table[];
extern const struct unit_test unit_tests_write[];
extern const struct unit_test unit_tests_freelist[];
extern const struct unit_test unit_tests_check[];
extern const struct unit_test unit_tests_backing[];
extern const struct unit_test unit_tests_safe_open[];
extern const struct unit_test unit_tests_model[];

/* The seam's record of core errors (harness.c). */
extern char last_error[];
extern unsigned long nr_errors;
extern bool show_debug;
/* Counted by the CHECK macros. */
extern unsigned long checks, failures;
/* The private directory (P (name) is a path in it). */
extern char tmpdir[];
extern bool have_qemu_img;
extern uint64_t rng_state;

#define CHECK(cond)                                                     \
  do {                                                                  \
    checks++;                                                           \
    if (!(cond)) {                                                      \
      failures++;                                                       \
      fprintf (stderr, "%s:%d: FAIL: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                   \
  } while (0)

#define CHECKF(cond, ...)                                               \
  do {                                                                  \
    checks++;                                                           \
    if (!(cond)) {                                                      \
      failures++;                                                       \
      fprintf (stderr, "%s:%d: FAIL: %s: ", __FILE__, __LINE__, #cond); \
      fprintf (stderr, __VA_ARGS__);                                    \
      fprintf (stderr, "\n");                                           \
    }                                                                   \
  } while (0)

#define REQUIRE(cond)                                                   \
  do {                                                                  \
    checks++;                                                           \
    if (!(cond)) {                                                      \
      failures++;                                                       \
      fprintf (stderr, "%s:%d: FAIL (fatal for this test): %s (%m)\n",   \
               __FILE__, __LINE__, #cond);                              \
      return;                                                           \
    }                                                                   \
  } while (0)

#define CHECK_ERR(cond, err, substr)                                    \
  do {                                                                  \
    int _e;                                                             \
    clear_error ();                                                     \
    errno = 0;                                                          \
    bool _c = (cond);                                                   \
    _e = errno;                                                         \
    CHECKF (_c, "expected failure");                                    \
    CHECKF (_e == (err), "errno %d (%s), expected %d (%s)",             \
            _e, strerror (_e), (err), strerror (err));                  \
    CHECKF (strstr (last_error, (substr)) != NULL,                      \
            "message \"%s\" lacks \"%s\"", last_error, (substr));       \
  } while (0)

#define CHECK_QEMU(path)                                                \
  do {                                                                  \
    int _q = qemu_check (path);                                         \
    CHECKF (_q == -1 || _q == 0, "qemu-img check %s exited %d", (path), _q); \
  } while (0)

#define CHECK_CLEAN(path) check_clean ((path), __LINE__)

/* A layer beneath: a deterministic pattern, zeros past `end`. */

struct pat_below {
  uint64_t end;
  uint64_t seed;
  uint64_t reads;
};

/* harness.c */
extern void clear_error (void);
extern const char *P (const char *name);
extern uint64_t rnd (void);
extern uint64_t rnd_below (uint64_t n);
extern void rnd_fill (void *buf, size_t len);
extern uint64_t file_size (const char *path);
extern int read_at (const char *path, void *buf, size_t len, uint64_t off);
extern int write_at (const char *path, const void *buf, size_t len,
                     uint64_t off);
extern uint64_t rd64 (const char *path, uint64_t off);
extern void wr64 (const char *path, uint64_t off, uint64_t v);
extern uint64_t features_of (const char *path);
extern bool need_check_set (const char *path);
extern int copy_file (const char *from, const char *to);
extern int qemu_check (const char *path);
extern struct qed_image *open_rw (const char *path);
extern struct qed_image *open_ro (const char *path);
extern int create_img (const char *path, uint64_t size, uint32_t cs,
                       uint32_t ts);
extern int make_image (const char *path, uint32_t cs, uint32_t ts,
                       uint32_t hs, uint64_t size);
extern void check_clean (const char *path, int line);
extern unsigned char pat_byte (const struct pat_below *pb, uint64_t pos);
extern int pat_read (void *opaque, void *buf, uint64_t count, uint64_t offset);
extern int pat_prefetch (void *opaque, uint64_t count, uint64_t offset);

#endif /* NBDKIT_QED_UNIT_HARNESS_H */
