/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: small helpers (our own equivalents of nbdkit's
 * common/include headers, which are not installed).
 */

#ifndef NBDKIT_QED_UTIL_H
#define NBDKIT_QED_UTIL_H

#include <assert.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <pthread.h>
#include <endian.h>

#define MIN(a, b) ({ __typeof__ (a) _mina = (a); \
                     __typeof__ (b) _minb = (b);        \
                     _mina < _minb ? _mina : _minb; })
#define MAX(a, b) ({ __typeof__ (a) _maxa = (a); \
                     __typeof__ (b) _maxb = (b);        \
                     _maxa > _maxb ? _maxa : _maxb; })

/* These work for any power-of-two alignment. */
#define ROUND_UP(i, n)   (((i) + (n) - 1) & ~((__typeof__ (i)) (n) - 1))
#define ROUND_DOWN(i, n) ((i) & ~((__typeof__ (i)) (n) - 1))
#define IS_ALIGNED(i, n) (((i) & ((n) - 1)) == 0)

/* Little-endian fields of on-disk records (unaligned, any host). */
static inline uint32_t
get_le32 (const unsigned char *p)
{
  uint32_t v;
  memcpy (&v, p, 4);
  return le32toh (v);
}

static inline uint64_t
get_le64 (const unsigned char *p)
{
  uint64_t v;
  memcpy (&v, p, 8);
  return le64toh (v);
}

static inline void
put_le32 (unsigned char *p, uint32_t v)
{
  v = htole32 (v);
  memcpy (p, &v, 4);
}

static inline void
put_le64 (unsigned char *p, uint64_t v)
{
  v = htole64 (v);
  memcpy (p, &v, 8);
}

static inline bool
is_power_of_2 (uint64_t v)
{
  return v != 0 && (v & (v - 1)) == 0;
}

static inline unsigned
log_2 (uint64_t v)              /* v must be a power of two */
{
  return __builtin_ctzll (v);
}

/* Fast zero test: check a short prefix, then compare the buffer with
 * itself shifted by that prefix.
 */
static inline bool
is_zero (const void *buf, size_t len)
{
  const unsigned char *p = buf;
  size_t i, limit = len < 16 ? len : 16;

  for (i = 0; i < limit; ++i)
    if (p[i])
      return false;
  if (len > 16)
    return memcmp (p, p + 16, len - 16) == 0;
  return true;
}

static inline void
cleanup_free (void *ptr)
{
  free (*(void **) ptr);
}
#define CLEANUP_FREE __attribute__ ((cleanup (cleanup_free)))

/* The words nbdkit_parse_bool takes: 1 (true), 0 (false), -1 (neither).
 * Ours, so that the caller's error can name the parameter (nbdkit's
 * says only "could not decipher boolean"). */
static inline int
parse_bool_word (const char *value)
{
  static const char *const yes[] = { "1", "true", "t", "yes", "y", "on" };
  static const char *const no[] = { "0", "false", "f", "no", "n", "off" };

  for (size_t i = 0; i < sizeof yes / sizeof yes[0]; ++i) {
    if (strcasecmp (value, yes[i]) == 0)
      return 1;
    if (strcasecmp (value, no[i]) == 0)
      return 0;
  }
  return -1;
}

/* The directory part of path ("." if it has none), malloced (NULL
 * with errno set if out of memory). */
static inline char *
dir_of (const char *path)
{
  const char *slash = strrchr (path, '/');

  if (slash == NULL)
    return strdup (".");
  if (slash == path)
    return strdup ("/");
  return strndup (path, slash - path);
}

static inline void
cleanup_unlock (pthread_mutex_t **ptr)
{
  pthread_mutex_unlock (*ptr);
}

/* Lock m.  The core's image locks are error-checking mutexes, so a
 * thread that takes one it already holds aborts here rather than
 * deadlocking: every acquisition asserts "not held by this thread". */
static inline void
qed_lock_acquire (pthread_mutex_t *m)
{
  int r = pthread_mutex_lock (m);

  assert (r == 0);
  (void) r;
}

/* True if some thread holds m (for asserts that the caller does: a
 * lock held by another thread passes too, so this catches a missing
 * lock, not a lock held by the wrong thread). */
static inline bool
qed_lock_is_held (pthread_mutex_t *m)
{
  if (pthread_mutex_trylock (m) != 0)
    return true;
  pthread_mutex_unlock (m);
  return false;
}
#define QED_CONCAT_(a, b) a##b
#define QED_CONCAT(a, b) QED_CONCAT_ (a, b)
#define ACQUIRE_LOCK_FOR_CURRENT_SCOPE(mutex)                           \
  pthread_mutex_t *QED_CONCAT (_lock_, __LINE__)                        \
    __attribute__ ((cleanup (cleanup_unlock), unused)) = (mutex);       \
  qed_lock_acquire (QED_CONCAT (_lock_, __LINE__))

#endif /* NBDKIT_QED_UTIL_H */
