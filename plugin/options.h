/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: the plugin's parameters, in one struct (set by .config
 * and .config_complete in qed-plugin.c, read-only afterwards). */

#ifndef NBDKIT_QED_PLUGIN_OPTIONS_H
#define NBDKIT_QED_PLUGIN_OPTIONS_H

#include <stdbool.h>
#include <stdint.h>

#include "qed.h"

/* create=true (CREATE_ALWAYS) or create=if-missing. */
enum plugin_create { CREATE_NO = 0, CREATE_ALWAYS, CREATE_IF_MISSING };

struct plugin_options {
  char *filename;               /* file=, absolute (NULL with dir=) */
  char *dir;                    /* dir=, absolute (NULL with file=) */
  char *default_export;         /* default-export= (dir= only) */

  /* create=... and the geometry of the new image. */
  enum plugin_create create;
  int64_t create_size;          /* -1: not given */
  uint32_t create_cluster_size, create_table_size;  /* 0: default */
  char *create_backing;
  int create_backing_format;

  /* Every image served (the one of file=, each export of dir=). */
  bool zero_detect;
  int64_t l2_cache;             /* 0: default (with dir=: the process's) */
  bool follow_backing;
  bool follow_beneath;          /* follow-backing=beneath */
  bool backing_devices;
  char *backing_override;
  int backing_override_format;
  unsigned idle_clean;          /* seconds, 0 = never */
  enum qed_locking locking;
  uint64_t compact_limit;
  bool freelist;
  bool demote;
  int copy_on_read;             /* -1: the image's compat bit */
};

extern struct plugin_options opts;

#endif /* NBDKIT_QED_PLUGIN_OPTIONS_H */
