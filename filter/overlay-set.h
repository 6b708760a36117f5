/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed filter: qed-overlay-dir, an overlay per export name. */

#ifndef NBDKIT_QED_OVERLAY_SET_H
#define NBDKIT_QED_OVERLAY_SET_H

#include <stdbool.h>

#include "qed.h"

#define OVL_DEFAULT_MAX_EXPORTS 64u

struct ovl;
struct origin;

/* Open (creating if needed) the overlay at path: NULL, logged.  It may
 * give the overlay's origin record (*origin, owned by the set until
 * ovl_close_fn). */
typedef struct qed_image *ovl_open_fn (const char *path, void *opaque,
                                       struct origin **origin);
/* Close it cleanly (flush, free-cluster list, NEED_CHECK clear), then
 * free its origin record (may be NULL). */
typedef void ovl_close_fn (struct qed_image *img, const char *path,
                           struct origin *origin);

extern int ovl_set_dir (const char *value);
extern int ovl_set_max (const char *key, const char *value);
extern const char *ovl_dir (void);
extern void ovl_unload (void);
extern int ovl_get_ready (void);
extern bool ovl_check_name (const char *exportname);
extern struct ovl *ovl_acquire (const char *exportname, ovl_open_fn *open,
                                void *opaque);
extern struct qed_image *ovl_image (const struct ovl *o);
extern const char *ovl_path (const struct ovl *o);
extern struct origin *ovl_origin (const struct ovl *o);
extern void ovl_release (struct ovl *o, ovl_close_fn *close);
extern void ovl_close_all (ovl_close_fn *close);

struct nbdkit_exports;
extern int ovl_list (struct nbdkit_exports *exports, const char *except);

#endif /* NBDKIT_QED_OVERLAY_SET_H */
