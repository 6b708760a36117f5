/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the plugin's dir=DIR mode (dir.c): every regular file
 * NAME.qed directly in DIR is an export NAME, opened at its first
 * connection, shared by all connections to it, and closed cleanly
 * (after idle-clean) when the last one ends. */

#ifndef NBDKIT_QED_PLUGIN_DIR_H
#define NBDKIT_QED_PLUGIN_DIR_H

#include <stdbool.h>

#include "export.h"

struct nbdkit_exports;

/* config_complete: open DIR and check default-export=.  -1 logged. */
extern int dir_config_complete (void);
/* after_fork: start the thread that writes back idle exports and
 * closes those without connections. */
extern int dir_after_fork (void);
/* cleanup: stop the thread, close every export (cleanly). */
extern void dir_cleanup (void);
/* .list_exports: the names of the images in DIR. */
extern int dir_list_exports (struct nbdkit_exports *exports);
/* .default_export: default-export=NAME, or "" (refused at open). */
extern const char *dir_default_export (void);
/* .open: the export named name, opened or shared (a reference that
 * dir_put gives back), or NULL with the error logged. */
extern struct plugin_export *dir_get (const char *name, bool readonly);
/* .close: give back the reference. */
extern void dir_put (struct plugin_export *e);
/* A write on e (for its idle write-back). */
extern void dir_note_write (struct plugin_export *e);

#endif /* NBDKIT_QED_PLUGIN_DIR_H */
