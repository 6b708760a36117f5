/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: parameter defaults that the plugin and the filter share.
 *
 * One place, so that "as the plugin's" in the filter stays true, and
 * the manual's defaults have one source to be checked against.
 */

#ifndef NBDKIT_QED_DEFAULTS_H
#define NBDKIT_QED_DEFAULTS_H

/* compact-limit, qed-compact-limit: at a clean stop, move at most this
 * much data to give back freed clusters (the rest is listed). */
#define QED_DEFAULT_COMPACT_LIMIT  (UINT64_C (64) * 1024 * 1024)

/* l2-cache: memory for cached L2 table pages per image (the plugin's
 * dir= mode: for the whole process).  The filter's overlay uses it
 * too. */
#define QED_DEFAULT_L2_CACHE       (32u * 1024 * 1024)

/* idle-clean (the filter: fixed): seconds without writes after which
 * the image is written back and NEED_CHECK cleared. */
#define QED_DEFAULT_IDLE_CLEAN     5u

#endif /* NBDKIT_QED_DEFAULTS_H */
