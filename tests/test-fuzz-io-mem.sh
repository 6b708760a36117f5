#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The fuzz target's in-memory file (tests/fuzz-io-mem.c, the core's I/O
# seam without the kernel) must behave as a file: the same random
# operations (300 sequences of 60) on it and on a file on a tmpfs
# (holes in the same 4 KiB pages) give the same results, sizes,
# contents, allocated blocks and SEEK_DATA/SEEK_HOLE answers.  Built
# with ASan and UBSan.
source "$(dirname "$0")/functions.sh"
requires cc --version
small_fs "$tmp/fs" 64m
build_helper fuzz-io-mem-test
"$TOP/tests/fuzz-io-mem-test" "$tmp/fs" 300 || fail "the in-memory file differs"
