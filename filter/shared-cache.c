/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed filter: qed-shared-cache=FILE, with qed-overlay-dir.
 *
 * FILE is a QED image beneath all the per-export overlays that keeps
 * what the filter copies from the plugin, so that every origin
 * cluster is fetched once however many exports read it; the
 * per-export overlays keep only what their clients wrote (and the
 * clusters a partial write completed, and zero clusters).
 *
 * FILE is served exactly as qed-overlay's one image is (qed-filter.c
 * sets qed-overlay to it): opened once, writable, by this process at
 * the first connection, locked as QEMU locks a writable image, with
 * the origin guard, qed-prefetch and the idle timer, and its fills
 * are copy-on-read's (the core's rule: a fill lands only in clusters
 * still unallocated; the read-ahead's claims keep two exports from
 * fetching the same clusters at once).  On disk it is a real QEMU
 * chain: each NAME.qed names FILE as its QED backing file (a relative
 * name when FILE is in qed-overlay-dir, else its absolute path), and
 * FILE names qed-backing-name (raw) when given.
 *
 * This file holds the names and the layer: a read or extents request
 * of a per-export overlay that falls through it is asked of FILE
 * (glue_image), with the plugin beneath FILE.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>

#include <nbdkit-filter.h>

#include "qed.h"
#include "glue-nbdkit.h"
#include "util.h"
#include "shared-cache.h"

static char *path;              /* absolute */
static char *backing;           /* what the per-export overlays record */

int
sc_set (const char *value)
{
  free (path);
  if (*value == '\0') {
    nbdkit_error ("qed-shared-cache: the file name must not be empty");
    return -1;
  }
  path = nbdkit_absolute_path (value);
  return path ? 0 : -1;
}

const char *
sc_path (void)
{
  return path;
}

/* NULL without a shared cache. */
const char *
sc_backing (void)
{
  return backing;
}

bool
sc_is (const char *p)
{
  return path && strcmp (p, path) == 0;
}

/* dir: qed-overlay-dir (absolute), or NULL.  *overlay becomes FILE.
 * cluster_size: of new overlays (the backing name must fit in their
 * header cluster with the free-cluster list record). */
int
sc_config_complete (const char *dir, uint32_t cluster_size, char **overlay)
{
  CLEANUP_FREE char *d = NULL;

  if (path == NULL)
    return 0;
  if (dir == NULL) {
    nbdkit_error ("qed-shared-cache: needs qed-overlay-dir");
    return -1;
  }
  d = dir_of (path);
  if (d == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  backing = strdup (strcmp (d, dir) == 0 ? strrchr (path, '/') + 1 : path);
  free (*overlay);
  *overlay = strdup (path);
  if (backing == NULL || *overlay == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  if (strlen (backing) > QED_MAX_BACKING_NAME ||
      strlen (backing) > cluster_size - QED_HEADER_BYTES - 64) {
    nbdkit_error ("qed-shared-cache: the name is too long (%zu bytes)",
                  strlen (backing));
    return -1;
  }
  return 0;
}

void
sc_unload (void)
{
  free (path);
  free (backing);
  path = backing = NULL;
}

/* The layer beneath a per-export overlay: the shared cache. */
int
sc_read (void *opaque, void *buf, uint64_t count, uint64_t offset)
{
  const struct sc_below *b = opaque;

  return qed_read (glue_image (), b->below, buf, count, offset);
}

int64_t
sc_extents (void *opaque, uint64_t len, uint64_t offset, bool req_one,
            struct nbdkit_extents *extents)
{
  const struct sc_below *b = opaque;

  if (glue_extents (glue_image (), len, offset, req_one, extents,
                    b->unallocated, b->opaque) == -1)
    return -1;
  return len;
}
