/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: was nbdkit started with -r (cmdline.c)?
 *
 * nbdkit 1.32 tells a plugin about -r only in .open; the maintenance
 * done at exit with no connection needs to know it without one.
 */

#ifndef NBDKIT_QED_CMDLINE_H
#define NBDKIT_QED_CMDLINE_H

#include <stdbool.h>

/* Parse nbdkit's command line (/proc/self/cmdline) as nbdkit parsed
 * it.  Returns 0 with *readonly set, or -1 with *why saying why it
 * cannot tell (then assume read-only).  Call before nbdkit forks into
 * the background: a relative plugin path is resolved against the
 * working directory. */
extern int nbdkit_cmdline_readonly (bool *readonly, const char **why);

#endif /* NBDKIT_QED_CMDLINE_H */
