/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: one image the plugin serves, with its backing chain
 * (export.c): the image of file=, or one export of dir=.  Both are
 * opened and closed by the same functions, with the same rules. */

#ifndef NBDKIT_QED_PLUGIN_EXPORT_H
#define NBDKIT_QED_PLUGIN_EXPORT_H

#include <stdbool.h>

#include "qed.h"

struct plugin_export {
  char *filename;               /* absolute: messages, relative backing names */
  /* dir=: the file, opened beneath DIR for export_open (taken over),
   * or -1: export_open opens filename. */
  int fd;
  bool writable;                /* the file may be opened for writing */

  /* Set by export_open, cleared by export_close. */
  struct qed_image *img;
  struct qed_chain *chain;      /* NULL: no backing file */
  struct qed_below below;       /* reads through the chain */
  bool cor;                     /* copy-on-read from the chain */
};

/* Open e->filename (or e->fd) and its backing chain with the plugin's
 * options; budget (may be NULL) is the L2 cache shared with other
 * exports.  Returns -1 (logged) on error. */
extern int export_open (struct plugin_export *e, bool readonly,
                        struct qed_cache_budget *budget);
/* Close the chain and the image: write back, compact, clear
 * NEED_CHECK.  Returns -1 (logged) if the image's close failed. */
extern int export_close (struct plugin_export *e);
/* The checks at start-up: read and validate the image and its chain,
 * writing nothing. */
extern int export_validate (struct plugin_export *e);

/* What the image needs done at a clean stop even if nothing was
 * written: a repair (NEED_CHECK), demote=true, or the compaction of a
 * free-cluster list.  NULL if nothing, else what (for messages).
 * Reads only the header (the file must be open: img). */
extern const char *export_pending_work (const struct qed_image *img);

#endif /* NBDKIT_QED_PLUGIN_EXPORT_H */
