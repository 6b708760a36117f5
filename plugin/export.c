/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: one image the plugin serves, with its backing chain.
 * See export.h. */

#include <stdio.h>
#include <stdlib.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qed.h"
#include "seam.h"
#include "export.h"
#include "options.h"

/* The chain's layers get a quarter of the image's cache (their L2
 * pages are only read). */
static struct qed_chain_options
chain_options (uint64_t l2_cache_bytes, struct qed_cache_budget *budget)
{
  struct qed_chain_options co = {
    .follow = opts.follow_backing, .beneath = opts.follow_beneath,
    .devices = opts.backing_devices, .override = opts.backing_override,
    .override_format = opts.backing_override_format,
    .l2_cache_bytes = l2_cache_bytes, .cache_budget = budget,
    .locking = opts.locking,
  };
  return co;
}

int
export_validate (struct plugin_export *e)
{
  struct qed_open_options oo = { .readonly = true, .skip_check = true,
                                 .l2_cache_bytes = 65536,
                                 .locking = opts.locking };
  struct qed_chain_options co = chain_options (65536, NULL);
  struct qed_image *probe;
  struct qed_chain *c;
  bool none;

  probe = qed_open (e->filename, &oo);
  if (probe == NULL)
    return -1;
  c = qed_chain_open (probe, &co, &none);
  if (c == NULL && !none) {
    qed_close (probe);
    return -1;
  }
  if (c)
    nbdkit_debug ("backing chain: %s", qed_chain_describe (c));
  if (!qed_qemu_can_open (qed_get_cluster_size (probe),
                          qed_get_header (probe)->table_size))
    nbdkit_debug ("%s: note: QEMU cannot open images of this geometry",
                  e->filename);
  qed_chain_close (c);
  qed_close (probe);
  e->writable = access (e->filename, W_OK) == 0;
  return 0;
}

int
export_open (struct plugin_export *e, bool readonly,
             struct qed_cache_budget *budget)
{
  struct qed_open_options oo = { .readonly = readonly,
                                 .l2_cache_bytes = opts.l2_cache,
                                 .cache_budget = budget,
                                 .locking = opts.locking,
                                 .freelist = opts.freelist,
                                 .compact_limit = opts.compact_limit,
                                 .demote = opts.demote,
                                 .use_fd = e->fd >= 0, .fd = e->fd };
  struct qed_chain_options co = chain_options (opts.l2_cache / 4, budget);
  bool none;

  e->fd = -1;                   /* taken over by qed_open */
  qed_clear_last_error ();
  e->img = qed_open (e->filename, &oo);
  if (e->img == NULL) {
    qed_open_failed ("qed", e->filename);
    return -1;
  }
  e->chain = qed_chain_open (e->img, &co, &none);
  if (e->chain == NULL && !none) {
    qed_close (e->img);
    e->img = NULL;
    return -1;
  }
  e->cor = false;
  if (e->chain) {
    qed_chain_below (e->chain, &e->below);
    e->cor = !qed_is_readonly (e->img) &&
      (opts.copy_on_read == -1
       ? (qed_get_header (e->img)->compat_features & QED_CF_COPY_ON_READ) != 0
       : opts.copy_on_read == 1);
    if (e->cor)
      nbdkit_debug ("%s: copy-on-read from the backing chain", e->filename);
  }
  return 0;
}

int
export_close (struct plugin_export *e)
{
  int r = 0;

  qed_chain_close (e->chain);
  e->chain = NULL;
  if (e->img && qed_close (e->img) == -1) {
    nbdkit_error ("%s: closing the image failed", e->filename);
    r = -1;
  }
  e->img = NULL;
  return r;
}

const char *
export_pending_work (const struct qed_image *img)
{
  const struct qed_header *h = qed_get_header (img);

  if (h->features & QED_F_NEED_CHECK)
    return "the repair of an image with NEED_CHECK set";
  if (opts.demote)
    return "demote=true";
  /* A list left by compact-limit: the stop moves up to compact-limit
   * more (all of it with freelist=false). */
  if ((h->autoclear_features & QED_AF_FREELIST) &&
      (!opts.freelist || opts.compact_limit >= qed_get_cluster_size (img)))
    return "the compaction of the free-cluster list";
  return NULL;
}
