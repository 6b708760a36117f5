/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed filter: qed-shared-cache, one QED image beneath every
 * per-export overlay. */

#ifndef NBDKIT_QED_SHARED_CACHE_H
#define NBDKIT_QED_SHARED_CACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "qed.h"
#include "glue-nbdkit.h"

extern int sc_set (const char *value);
extern const char *sc_path (void);
extern const char *sc_backing (void);
extern bool sc_is (const char *path);
extern int sc_config_complete (const char *dir, uint32_t cluster_size,
                               char **overlay);
extern void sc_unload (void);

/* What lies beneath the shared cache, for one request. */
struct sc_below {
  const struct qed_below *below;        /* for reads (may be NULL) */
  glue_unallocated_fn *unallocated;     /* for extents (may be NULL) */
  void *opaque;                         /* unallocated's */
};

extern int sc_read (void *opaque, void *buf, uint64_t count,
                    uint64_t offset);
extern int64_t sc_extents (void *opaque, uint64_t len, uint64_t offset,
                           bool req_one, struct nbdkit_extents *extents);

#endif /* NBDKIT_QED_SHARED_CACHE_H */
