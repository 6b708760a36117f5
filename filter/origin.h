/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the filter's origin guard and its record in the
 * overlay's header clusters (origin.c).
 */

#ifndef NBDKIT_QED_ORIGIN_H
#define NBDKIT_QED_ORIGIN_H

#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "qed.h"

/* Bytes the record takes at the end of the header clusters (before
 * the free-cluster list record). */
#define ORIGIN_RECORD_BYTES (2 * 1536u)
/* The longest qed-origin-id plus export name the record holds. */
#define ORIGIN_NAMES_MAX 444u
#define ORIGIN_ID_MAX 200u

enum origin_changed { ORIGIN_ERROR = 0, ORIGIN_KEEP, ORIGIN_DISCARD };

/* The origin record of one image (opaque), owned by whoever owns the
 * image: qed-overlay's one overlay, the shared cache, or a per-export
 * overlay of qed-overlay-dir.  Free it after the image is closed. */
struct origin;
extern struct origin *origin_new (void);   /* NULL: logged */
extern void origin_free (struct origin *o);

/* Parameters (qed-origin-id, qed-origin-changed, and the thread model
 * of the plugin, for parallel verification). */
extern int origin_set_id (const char *id);
extern int origin_set_changed (const char *value);
extern void origin_set_parallel (bool parallel);
extern void origin_unload (void);

/* At the overlay's open (glue_open_lock held, before it is
 * published): read the record (or make one), check that the origin is
 * the one the overlay was made for, by its id, size and sample.
 * Returns 0 to serve, 1 if the overlay must be discarded
 * (qed-origin-changed=discard: origin_discard), 2 if it was detached
 * (it stands alone: never read the plugin), -1 to refuse (error
 * logged).  size is the plugin's, exportname the connection's. */
extern int origin_open (struct origin *o, struct qed_image *img,
                        nbdkit_next *next,
                        int64_t size, const char *exportname);

/* The plugin cannot be opened (the origin is away): the overlay img is
 * served without it, unverified until origin_open runs with the
 * origin back.  Checks the export against the record and gives the
 * origin's size.  0 served, 2 if detached, -1 refused (logged). */
extern int origin_offline_open (struct origin *o, struct qed_image *img,
                                const char *exportname, int64_t *size);

/* Is this connection's export the one the overlay was made for?  -1
 * (error logged) if not. */
extern int origin_check_export (struct origin *o, const char *path,
                                const char *exportname);

/* Clusters [start, end) of the origin (size bytes) are about to be
 * filled into the overlay from buf: take some into the sample (the
 * record is written and synced before the fill, so a fill that reaches
 * the disk is always covered).  -1 if the record cannot be written
 * (then nothing must be filled). */
extern int origin_note_fill (struct origin *o, struct qed_image *img,
                             const char *buf,
                             uint64_t start, uint64_t end, int64_t size);

/* qed-origin-changed=discard: close img, rename path to path.stale
 * (0600, in the same directory, never through a symbolic link).  The
 * caller then opens a new overlay at path.  -1 (error logged) if it
 * cannot: img is closed anyway. */
extern int origin_discard (struct qed_image *img, const char *path);

/* qed-detach: the overlay holds every cluster.  Mark the record
 * detached (synced), the commit point: from then on the overlay stands
 * alone, and origin_open returns 2 for it.  The caller then removes the
 * backing file from the header.  -1 if it cannot. */
extern int origin_detach (struct origin *o, struct qed_image *img);
/* At start-up: was this overlay detached?  (Read only.) */
extern bool origin_probe_detached (struct qed_image *img);
/* Does the image stand alone (detached now, or found detached by
 * origin_open or origin_offline_open)?  false for o == NULL. */
extern bool origin_is_detached (const struct origin *o);
/* qed-detach, after a change to img: if img now holds every cluster,
 * detach it (origin_detach, then the backing file is removed from its
 * header).  true if it was detached by this call. */
extern bool origin_poll_detach (struct origin *o, struct qed_image *img);

#endif /* NBDKIT_QED_ORIGIN_H */
