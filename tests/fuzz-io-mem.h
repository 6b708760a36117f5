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

/* Fault injection, on memory descriptors only.  After `after` more
 * calls of the kinds in `ops`, the next one fails with `err` (and, if
 * sticky, every one after it), changing nothing; mem_fault_clear ends
 * it.  mem_fault_hits: the calls failed since mem_fault_set. */
enum {
  MEM_OP_READ = 1, MEM_OP_WRITE = 2, MEM_OP_SYNC = 4, MEM_OP_TRUNCATE = 8,
  MEM_OP_FALLOCATE = 16,
};
extern void mem_fault_set (unsigned ops, uint64_t after, int err,
                           bool sticky);
extern void mem_fault_clear (void);
extern uint64_t mem_fault_hits (void);

#endif /* NBDKIT_QED_FUZZ_IO_MEM_H */
