#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# test-faults-fullfs.sh with the free-cluster list (the default): a list
# that cannot be written on a full file system never fails the open.
FULLFS_FREELIST= exec bash "$(dirname "$0")/test-faults-fullfs.sh"
