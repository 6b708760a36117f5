#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# Make a small QED image hostile by its apparent size: extend the file
# (sparse) to SIZE bytes and record every cluster past the image's data
# as free in a CRC-valid free-cluster list at the end of the file.
#   make-sparse-list.py IMG SIZE MODE
# MODE: trusted   (autoclear bit 0x1 set, NEED_CHECK clear)
#       rebuild   (the record, but the bit clear: an older writer's)
#       needcheck (the record and the bit, NEED_CHECK set)
#       bare      (no record, NEED_CHECK clear, the bit clear)
import os, struct, sys, zlib

img, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(img, "r+b") as f:
    h = f.read(64)
    (magic, cs, ts, hs, feat, compat, autoclear, l1, isize,
     boff, bsize) = struct.unpack("<IIIIQQQQQII", h)
    end = os.fstat(f.fileno()).st_size
    end = (end + cs - 1) // cs * cs
    size = size // cs * cs
    list_off = size - cs
    run = struct.pack("<QQ", end, (list_off - end) // cs)
    if mode != "bare":
        f.seek(list_off)
        f.write(run + bytes(cs - len(run)))
        rec = b"QEDFREEL" + struct.pack("<QQQI", list_off, len(run),
                                        (list_off - end) // cs,
                                        zlib.crc32(run))
        rec += bytes(60 - len(rec))
        rec += struct.pack("<I", zlib.crc32(rec))
        f.seek(hs * cs - 64)
        f.write(rec)
    f.truncate(size)
    if mode in ("trusted", "needcheck"):
        autoclear |= 1
    else:
        autoclear &= ~1
    if mode == "needcheck":
        feat |= 2
    else:
        feat &= ~2
    f.seek(16)
    f.write(struct.pack("<QQQ", feat, compat, autoclear))
