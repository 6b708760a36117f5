#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# Helpers for the free-cluster list tests: read the list record, the
# header's flag words, and edit an image as an older writer would.
#   freelist-tool.py flags IMG            -> "features compat autoclear"
#   freelist-tool.py runs IMG             -> "offset clusters" per run
#   freelist-tool.py link IMG GUEST FILEOFF
#        point the L2 entry of guest offset GUEST at FILEOFF (the L2 table
#        must exist)
#   freelist-tool.py zero-clusters IMG    -> number of L2 entries == 1
import struct, sys, zlib

def header(f):
    f.seek(0)
    h = f.read(64)
    (magic, cs, ts, hs, feat, compat, autoclear, l1, size,
     boff, bsize) = struct.unpack("<IIIIQQQQQII", h)
    return dict(cs=cs, ts=ts, hs=hs, feat=feat, compat=compat,
                autoclear=autoclear, l1=l1, size=size)

def record(f, h):
    f.seek(h["hs"] * h["cs"] - 64)
    raw = f.read(64)
    if raw[:8] != b"QEDFREEL":
        sys.exit("no list record")
    if zlib.crc32(raw[:60]) != struct.unpack("<I", raw[60:64])[0]:
        sys.exit("bad record checksum")
    off, nbytes, total, crc = struct.unpack("<QQQI", raw[8:36])
    f.seek(off)
    lst = f.read(nbytes)
    if zlib.crc32(lst) != crc:
        sys.exit("bad list checksum")
    runs = [struct.unpack("<QQ", lst[i:i+16]) for i in range(0, nbytes, 16)]
    assert sum(n for _, n in runs) == total
    return off, runs

def l2_entries(f, h):
    ents = h["ts"] * h["cs"] // 8
    f.seek(h["l1"])
    l1 = struct.unpack("<%dQ" % ents, f.read(ents * 8))
    for t in l1:
        if t:
            f.seek(t)
            yield t, struct.unpack("<%dQ" % ents, f.read(ents * 8))

cmd, img = sys.argv[1], sys.argv[2]
with open(img, "r+b") as f:
    h = header(f)
    if cmd == "flags":
        print(h["feat"], h["compat"], h["autoclear"])
    elif cmd == "runs":
        off, runs = record(f, h)
        for s, n in runs:
            print(s, n)
    elif cmd == "list-offset":
        print(record(f, h)[0])
    elif cmd == "link":
        guest, fileoff = int(sys.argv[3]), int(sys.argv[4])
        ents = h["ts"] * h["cs"] // 8
        c = guest // h["cs"]
        f.seek(h["l1"] + 8 * (c // ents))
        t = struct.unpack("<Q", f.read(8))[0]
        assert t, "no L2 table there"
        f.seek(t + 8 * (c % ents))
        f.write(struct.pack("<Q", fileoff))
    elif cmd == "zero-clusters":
        print(sum(e.count(1) for _, e in l2_entries(f, h)))
    else:
        sys.exit("unknown command " + cmd)
