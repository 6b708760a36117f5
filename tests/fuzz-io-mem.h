/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: in-memory image files for the fuzz target.
 *
 * tests/fuzz-io-mem.c implements the core's I/O seam (seam.h) over
 * files held in memory, in place of common/io-file.c.  A descriptor
 * from mem_file_open is one of these files; any other descriptor (a
 * raw backing file opened by path) goes to the kernel as usual.
 */

#ifndef NBDKIT_QED_FUZZ_IO_MEM_H
#define NBDKIT_QED_FUZZ_IO_MEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct mem_file;

/* A file with these contents (a new file, or an old one replaced). */
extern struct mem_file *mem_file_new (void);
extern void mem_file_free (struct mem_file *f);
extern void mem_file_set (struct mem_file *f, const void *data, size_t size);
/* A descriptor for the file, which qed_open takes over (use_fd).  On a
 * read-only descriptor every change fails with EBADF, like a file
 * opened O_RDONLY. */
extern int mem_file_open (struct mem_file *f, bool readonly);
extern bool mem_file_equals (const struct mem_file *f, const void *data,
                             size_t size);
/* The file's size, and the bytes its blocks hold (what du would say). */
extern uint64_t mem_file_size (const struct mem_file *f);
extern uint64_t mem_file_allocated (const struct mem_file *f);

#endif /* NBDKIT_QED_FUZZ_IO_MEM_H */
