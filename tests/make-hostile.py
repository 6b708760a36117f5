#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Generate a catalogue of corrupt and hostile QED images.

Usage: make-hostile.py OUTDIR [--corpus CORPUSDIR] [--max-corpus BYTES]

Every image is derived from a valid image written by qemu-img/qemu-io
(header fields out of range, truncations, bad table entries, backing
loops, huge geometries) by patching raw bytes with struct.pack.
OUTDIR/manifest.tsv lists one image per line:

    NAME <tab> EXPECT_RO <tab> EXPECT_RW <tab> DESCRIPTION [<tab> EXPECT_FILTER]

where EXPECT is one of
    refuse:PHRASE    nbdkit refuses to start; PHRASE is in its log
    connect:PHRASE   nbdkit starts, the first connection fails; PHRASE
                     is in its log
    serve0           served; every read succeeds
    serveE           served; some reads fail with EIO, others succeed
    serve            served; reads may or may not fail with EIO
EXPECT_FILTER is for the image as the filter's overlay over a memory
disk of its size; it defaults to EXPECT_RW (the test script expects
"connect:is an overlay of a" when the sizes cannot match).  Every
image must be served or refused with a peak RSS under 64 MiB, and a
writable open must not grow the file (by allocated blocks).
With --corpus, the first --max-corpus bytes (default 128K, the
fuzzer's -max_len) of every image are also copied into CORPUSDIR as a
seed corpus for tests/fuzz-open.
"""

import os
import shutil
import struct
import subprocess
import sys

HDR = struct.Struct("<IIIIQQQQQII")
FIELDS = ("magic", "cluster_size", "table_size", "header_size", "features",
          "compat_features", "autoclear_features", "l1_table_offset",
          "image_size", "backing_filename_offset", "backing_filename_size")
OFF = {"magic": 0, "cluster_size": 4, "table_size": 8, "header_size": 12,
       "features": 16, "compat_features": 24, "autoclear_features": 32,
       "l1_table_offset": 40, "image_size": 48,
       "backing_filename_offset": 56, "backing_filename_size": 60}
FMT = {k: ("<I" if k in ("magic", "cluster_size", "table_size", "header_size",
                         "backing_filename_offset", "backing_filename_size")
           else "<Q") for k in FIELDS}
NEED_CHECK = 2
K = 1024
M = 1024 * K
G = 1024 * M

out = None
manifest = []


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def header(path):
    with open(path, "rb") as f:
        return dict(zip(FIELDS, HDR.unpack(f.read(64))))


def patch(path, off, fmt, *vals):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, *vals))


def patch_bytes(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def set_field(path, name, value):
    patch(path, OFF[name], FMT[name], value)


def read64(path, off):
    with open(path, "rb") as f:
        f.seek(off)
        b = f.read(8)
    return struct.unpack("<Q", b.ljust(8, b"\0"))[0]


def l1_entries(path):
    h = header(path)
    n = h["table_size"] * h["cluster_size"] // 8
    with open(path, "rb") as f:
        f.seek(h["l1_table_offset"])
        data = f.read(n * 8)
    return list(struct.unpack("<%dQ" % n, data))


def l2_entry_off(path, guest):
    """File offset of the L2 entry for a guest offset (table must exist)."""
    h = header(path)
    cs, ts = h["cluster_size"], h["table_size"]
    entries = ts * cs // 8
    c = guest // cs
    t = l1_entries(path)[c // entries]
    assert t, "no table for guest offset %d" % guest
    return t + (c % entries) * 8


def new(name, base):
    p = os.path.join(out, name + ".qed")
    shutil.copyfile(base, p)
    return p


def add(name, ro, rw, desc, filt=None):
    assert "\t" not in desc
    manifest.append((name, ro, rw or ro, desc) + ((filt,) if filt else ()))


def make_qemu_base(name, cs, ts, size, writes, hs=None):
    """A valid image: qemu-img create (or a hand-made header with
    header_size hs), then qemu-io writes."""
    p = os.path.join(out, name)
    if hs is None:
        run("qemu-img", "create", "-q", "-f", "qed", "-o",
            "cluster_size=%d,table_size=%d" % (cs, ts), p, str(size))
    else:
        with open(p, "wb") as f:
            f.write(HDR.pack(0x00444551, cs, ts, hs, 0, 0, 0, hs * cs, size,
                             0, 0))
            f.truncate((hs + ts) * cs)
    cmd = ["qemu-io", "-f", "qed"]
    for w in writes:
        cmd += ["-c", w]
    cmd.append(p)
    run(*cmd)
    return p


def main():
    global out
    args = sys.argv[1:]
    corpus = None
    max_corpus = 128 * K
    if "--corpus" in args:
        i = args.index("--corpus")
        corpus = args[i + 1]
        del args[i:i + 2]
    if "--max-corpus" in args:
        i = args.index("--max-corpus")
        max_corpus = int(args[i + 1])
        del args[i:i + 2]
    if len(args) != 1:
        sys.exit(__doc__)
    out = args[0]
    os.makedirs(out, exist_ok=True)

    # 4K clusters, 2-cluster tables: an L2 table covers 4M, so 12M has
    # three tables.  Data on both sides of the 4M boundary, a zero
    # cluster, data in the last cluster.
    base = make_qemu_base("base4k.img", 4096, 2, 12 * M, [
        "write -q -P 0x11 0 8k", "write -q -P 0x22 4092k 8k",
        "write -q -z 64k 4k", "write -q -P 0x33 8M 4k",
        "write -q -P 0x44 12284k 4k"])
    base64 = make_qemu_base("base64k.img", 65536, 4, 64 * M, [
        "write -q -P 0x55 0 128k", "write -q -P 0x66 63M 64k"])
    basehs = make_qemu_base("basehs4.img", 4096, 2, 8 * M, [
        "write -q -P 0x77 0 4k", "write -q -P 0x78 1M 4k"], hs=4)
    h = header(base)
    cs, l1 = h["cluster_size"], h["l1_table_offset"]
    fsize = os.path.getsize(base)
    tables = [t for t in l1_entries(base) if t]
    assert len(tables) == 3, tables

    add("base4k", "serve0", "serve0", "valid 4K/2 image written by qemu-io")
    shutil.copyfile(base, os.path.join(out, "base4k.qed"))
    add("base64k", "serve0", "serve0", "valid 64K/4 image written by qemu-io")
    shutil.copyfile(base64, os.path.join(out, "base64k.qed"))
    add("basehs4", "serve0", "serve0", "valid image with header_size 4")
    shutil.copyfile(basehs, os.path.join(out, "basehs4.qed"))

    # ---- Header fields ----
    def field(name, fld, value, ro, desc, b=base, rw=None):
        p = new(name, b)
        set_field(p, fld, value)
        add(name, ro, rw, desc)
        return p

    field("magic-bad", "magic", 0x00464551, "refuse:not a QED image",
          "magic QEF\\0")
    field("magic-zero", "magic", 0, "refuse:not a QED image", "magic 0")
    p = new("header-zero", base)
    patch_bytes(p, 0, b"\0" * 64)
    add("header-zero", "refuse:not a QED image", None, "64 zero bytes")
    field("feat-unknown", "features", 0x8,
          "refuse:unsupported QED features 0x8", "features bit 3")
    field("feat-high", "features", 1 << 63,
          "refuse:unsupported QED features 0x8000000000000000",
          "features bit 63")
    field("feat-all", "features", (1 << 64) - 1,
          "refuse:unsupported QED features 0xfffffffffffffff8",
          "every features bit")
    field("feat-unknown-64k", "features", 0x10,
          "refuse:unsupported QED features 0x10", "64K image, bit 4",
          b=base64)
    for n, v in (("npow2", 4097), ("2k", 2048), ("128m", 128 * M), ("0", 0),
                 ("max", 0xffffffff), ("3x4k", 12288)):
        field("cs-" + n, "cluster_size", v, "refuse:invalid cluster_size",
              "cluster_size %d" % v)
    field("cs-8k", "cluster_size", 8192, "refuse:invalid l1_table_offset",
          "cluster_size 8K: the L1 at 4K is misaligned")
    for v in (0, 3, 32, 0xffffffff, 1 << 31):
        field("ts-%d" % v, "table_size", v, "refuse:invalid table_size",
              "table_size %d" % v)
    field("ts-16", "table_size", 16, "refuse:invalid l1_table_offset",
          "table_size 16: the L1 runs past EOF")
    field("hs-0", "header_size", 0, "refuse:invalid header_size 0",
          "header_size 0")
    field("hs-huge", "header_size", 0xffffffff,
          "refuse:invalid header_size 4294967295", "header_size 2^32-1")
    field("hs-2", "header_size", 2, "refuse:invalid l1_table_offset",
          "header_size 2: the L1 inside the header")
    field("hs-1m", "header_size", 1 << 20, "refuse:invalid header_size",
          "header_size 2^20 clusters (4G: too large)")
    field("l1-misaligned", "l1_table_offset", l1 + 8,
          "refuse:invalid l1_table_offset", "l1_table_offset + 8")
    field("l1-zero", "l1_table_offset", 0, "refuse:invalid l1_table_offset",
          "l1_table_offset 0 (the header)")
    field("l1-past-eof", "l1_table_offset", 1 << 40,
          "refuse:invalid l1_table_offset", "l1_table_offset 1T")
    field("l1-straddle", "l1_table_offset", fsize // cs * cs - cs,
          "refuse:invalid l1_table_offset", "the L1 straddles EOF")
    field("l1-overflow", "l1_table_offset", (1 << 64) - cs,
          "refuse:invalid l1_table_offset", "l1_table_offset 2^64-4K")
    field("size-odd", "image_size", 12 * M + 1,
          "refuse:not a multiple of 512", "image_size 12M+1")
    field("size-huge", "image_size", 1 << 63,
          "refuse:larger than the tables can address", "image_size 2^63")
    field("size-overflow", "image_size", (1 << 64) - 512,
          "refuse:larger than the tables can address", "image_size 2^64-512")
    field("size-above-max", "image_size", 4 * G + 512,
          "refuse:larger than the tables can address",
          "image_size max+512 (4K/2 addresses 4G)")
    field("size-max", "image_size", 4 * G, "serve0", "image_size = max (4G)")
    field("size-zero", "image_size", 0, "serve0", "image_size 0")
    field("size-small", "image_size", 512, "serve0",
          "image_size 512 (tables map far more)")
    field("autoclear", "autoclear_features", 0xff00, "serve0",
          "unknown autoclear bits")
    field("compat", "compat_features", 0xff00, "serve0", "unknown compat bits")
    field("noprobe-alone", "features", 0x4, "serve0",
          "BACKING_FORMAT_NO_PROBE without BACKING_FILE")

    # ---- Backing file names ----
    def backing(name, off, size, ro, desc, data=None, feat=1):
        p = new(name, base)
        set_field(p, "features", feat)
        set_field(p, "backing_filename_offset", off)
        set_field(p, "backing_filename_size", size)
        if data is not None:
            patch_bytes(p, off, data)
        # The filter ignores the backing file name: a name that is valid
        # but leads nowhere does not stop it.
        filt = None
        if ro.startswith("refuse:") and data and b"\0" not in data:
            filt = "serve0"
        add(name, ro, None, desc, filt)

    backing("bk-outside", 4000, 200, "refuse:backing file name location",
            "name runs past the header cluster")
    backing("bk-offset-huge", 0xffffff00, 0x200,
            "refuse:backing file name location", "name offset 2^32-256")
    backing("bk-in-header", 0, 10, "refuse:backing file name location",
            "name overlaps the 64-byte header")
    backing("bk-too-long", 64, 4096, "refuse:backing file name is too long",
            "name size 4096")
    backing("bk-size-max", 64, 0xffffffff,
            "refuse:backing file name is too long", "name size 2^32-1")
    backing("bk-nul", 64, 3, "refuse:contains a NUL byte", "name a\\0b",
            b"a\0b")
    backing("bk-empty-name", 64, 3, "refuse:contains a NUL byte",
            "name of three NULs", b"\0\0\0")
    backing("bk-missing", 64, 18, "refuse:cannot open backing file",
            "backing file does not exist", b"does-not-exist.raw")
    backing("bk-self", 64, 11, "refuse:loops", "A -> A",
            b"bk-self.qed")
    backing("bk-loop-a", 64, 13, "refuse:loops", "A -> B -> A",
            b"bk-loop-b.qed")
    backing("bk-loop-b", 64, 13, "refuse:loops", "B -> A -> B",
            b"bk-loop-a.qed")
    backing("bk-loop-3", 64, 13, "refuse:loops", "C -> A -> B -> A",
            b"bk-loop-a.qed")
    with open(os.path.join(out, "fake.qcow2"), "wb") as f:
        f.write(b"QFI\xfb" + b"\0" * 4092)
    backing("bk-qcow2", 64, 10, "refuse:qcow2", "backing file is qcow2",
            b"fake.qcow2")
    backing("bk-hostile", 64, 16, "refuse:unsupported QED features",
            "backing file is a hostile QED image", b"feat-unknown.qed")
    backing("bk-dir", 64, 1, "refuse:not a regular file or a block device",
            "backing file is a directory", b".")
    backing("bk-dir-raw", 64, 1, "refuse:not a regular file or a block "
            "device", "backing file is a directory (raw)", b".", feat=5)
    backing("bk-dev-null", 64, 9, "refuse:not a regular file or a block "
            "device", "backing file /dev/null (raw)", b"/dev/null", feat=5)
    backing("bk-dev-tty", 64, 8, "refuse:backing file /dev/tty",
            "backing file /dev/tty (would block; ENXIO without a tty)",
            b"/dev/tty")
    fifo = os.path.join(out, "fifo")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    backing("bk-fifo", 64, 4, "refuse:not a regular file or a block device",
            "backing file is a FIFO (open would block)", b"fifo")
    backing("bk-fifo-raw", 64, 4, "refuse:not a regular file or a block "
            "device", "backing file is a FIFO (raw)", b"fifo", feat=5)
    backing("bk-probe-raw", 64, 10, "serve0",
            "backing file is itself (raw: NO_PROBE)", b"base4k.qed", feat=5)

    # ---- Truncated files ----
    for n in (0, 10, 63):
        p = os.path.join(out, "trunc-%d.qed" % n)
        with open(base, "rb") as f:
            data = f.read(n)
        with open(p, "wb") as f:
            f.write(data)
        add("trunc-%d" % n, "refuse:too short", None, "file of %d bytes" % n)
    p = new("trunc-64", base)
    os.truncate(p, 64)
    add("trunc-64", "refuse:invalid l1_table_offset", None,
        "header only (64 bytes)")
    p = new("trunc-mid-l1", base)
    os.truncate(p, l1 + cs // 2)
    add("trunc-mid-l1", "refuse:invalid l1_table_offset", None,
        "cut in the middle of the L1")
    p = new("trunc-mid-l2", base)
    os.truncate(p, tables[1] + cs + 100)
    add("trunc-mid-l2", "serveE", None,
        "cut inside the second L2 table (and its data)")
    p = new("trunc-data", base)
    os.truncate(p, tables[2] + 2 * cs)
    add("trunc-data", "serveE", None,
        "cut after the last table: its data clusters are past EOF")
    p = new("trunc-partial", base)
    os.truncate(p, fsize - 100)
    add("trunc-partial", "serveE", None,
        "the last data cluster is partial (ignored as QEMU does)")
    p = new("extra-tail", base)
    with open(p, "ab") as f:
        f.write(b"\xee" * 1000)
    add("extra-tail", "serve0", None, "1000 garbage bytes after the last "
        "cluster")

    # ---- L1 entries ----
    def l1e(name, idx, value, ro, desc, b=base, rw=None):
        p = new(name, b)
        hh = header(p)
        patch(p, hh["l1_table_offset"] + 8 * idx, "<Q", value)
        add(name, ro, rw, desc)
        return p

    l1e("l1e-eof", 0, 1 << 40, "serveE", "L1[0] = 1T (past EOF)")
    l1e("l1e-eof-near", 0, fsize // cs * cs, "serveE", "L1[0] = EOF")
    l1e("l1e-straddle", 1, fsize // cs * cs - cs, "serveE",
        "L1[1]: the table straddles EOF")
    l1e("l1e-misaligned", 1, tables[1] + 8, "serveE", "L1[1] + 8")
    l1e("l1e-lowbits", 0, tables[0] | 1, "serveE", "L1[0] | 1")
    l1e("l1e-one", 0, 1, "serveE", "L1[0] = 1 (a zero marker is L2 only)")
    l1e("l1e-header", 0, 0, "serve0", "L1[0] = 0 (unallocated)")
    l1e("l1e-header-hs4", 0, 4096, "serveE",
        "header_size 4: L1[0] into the header", b=basehs)
    l1e("l1e-into-l1", 0, l1, "serveE", "L1[0] = the L1 itself")
    l1e("l1e-overlap-l1", 0, l1 + cs, "serveE",
        "L1[0]: a table overlapping the L1's second cluster")
    l1e("l1e-overlap-hdr-hs4", 0, 3 * 4096, "serveE",
        "header_size 4: a table overlapping the header's last cluster",
        b=basehs)
    l1e("l1e-dup", 1, tables[0], "serve0",
        "L1[1] = L1[0]: two regions share a table")
    l1e("l1e-max", 2, (1 << 64) - cs, "serveE", "L1[2] = 2^64-4K")
    l1e("l1e-beyond-size", 1000, 1 << 40, "serve0",
        "an L1 entry beyond the image size points past EOF")
    p = new("l1-all-ff", base)
    patch_bytes(p, l1, b"\xff" * (2 * cs))
    add("l1-all-ff", "serve", None, "the whole L1 is 0xff (every read fails)")

    # ---- L2 entries ----
    def l2e(name, guest, value, ro, desc, b=base, rw=None):
        p = new(name, b)
        patch(p, l2_entry_off(p, guest), "<Q", value)
        add(name, ro, rw, desc)
        return p

    l2e("l2e-eof", 0, 1 << 40, "serveE", "L2 entry past EOF")
    l2e("l2e-eof-near", 4 * M, fsize // cs * cs, "serveE", "L2 entry = EOF")
    l2e("l2e-max", 8 * M, (1 << 64) - cs, "serveE", "L2 entry 2^64-4K")
    l2e("l2e-misaligned", 4096, read64(base, l2_entry_off(base, 4096)) + 512,
        "serveE", "L2 entry + 512")
    l2e("l2e-lowbits", 4092 * K, read64(base, l2_entry_off(base, 4092 * K))
        | 3, "serveE", "L2 entry | 3")
    l2e("l2e-two", 12 * K, 2, "serveE", "L2 entry = 2 (reserved bits)")
    l2e("l2e-header-hs4", 0, 8192, "serveE",
        "header_size 4: an L2 entry into the header", b=basehs)
    l2e("l2e-into-l1", 0, l1, "serveE", "L2 entry into the L1")
    l2e("l2e-into-l1-end", 0, l1 + cs, "serveE",
        "L2 entry into the L1's last cluster")
    l2e("l2e-own-table", 4 * K, tables[0], "serve0",
        "L2 entry = its own table (duplicate)")
    l2e("l2e-dup", 4 * K, read64(base, l2_entry_off(base, 0)), "serve0",
        "two L2 entries share a cluster")
    l2e("l2e-other-table", 8 * M, tables[1], "serve0",
        "L2 entry = another L2 table")
    p = new("l2-all-ff", base)
    patch_bytes(p, tables[1], b"\xff" * (2 * cs))
    add("l2-all-ff", "serveE", None, "the second L2 table is all 0xff")
    p = new("l2-random", base)
    import random
    rng = random.Random(42)
    patch_bytes(p, tables[2], bytes(rng.randrange(256) for _ in range(2 * cs)))
    add("l2-random", "serveE", None, "the third L2 table is random bytes")
    p = new("l2-beyond-size", base)
    # Entries of the last table beyond image_size (12M ends the table).
    set_field(p, "image_size", 12 * M - 4 * K)
    patch(p, tables[2] + 1023 * 8, "<Q", 1 << 40)
    add("l2-beyond-size", "serve0", None,
        "a bad L2 entry beyond image_size is never used")

    # ---- The L1 after the data (valid; the old copy is leaked) ----
    p = new("l1-at-end", base)
    with open(p, "r+b") as f:
        f.seek(l1)
        l1data = f.read(2 * cs)
        f.seek(fsize)
        f.write(l1data)
    set_field(p, "l1_table_offset", fsize)
    add("l1-at-end", "serve0", None, "the L1 moved to the end of the file")

    # ---- NEED_CHECK set: a read-only open checks and refuses, a
    # writable open repairs. ----
    def nc(name, src, ro, rw, desc):
        p = new(name, os.path.join(out, src + ".qed"))
        set_field(p, "features", header(p)["features"] | NEED_CHECK)
        add(name, ro, rw, desc)

    nc("nc-clean", "base4k", "serve0", "serve0", "NEED_CHECK, nothing wrong")
    nc("nc-l2e-eof", "l2e-eof", "connect:corruptions found", "serve0",
       "NEED_CHECK + L2 entry past EOF")
    nc("nc-l2e-dup", "l2e-dup", "connect:corruptions found", "serve0",
       "NEED_CHECK + duplicate (repair copies)")
    nc("nc-l2e-own-table", "l2e-own-table", "connect:corruptions found",
       "serve0", "NEED_CHECK + entry = own table")
    nc("nc-l1e-eof", "l1e-eof", "connect:corruptions found", "serve0",
       "NEED_CHECK + L1 entry past EOF")
    nc("nc-l1e-dup", "l1e-dup", "connect:corruptions found", "serve0",
       "NEED_CHECK + two L1 entries share a table")
    nc("nc-l1-all-ff", "l1-all-ff", "connect:corruptions found", "serve0",
       "NEED_CHECK + L1 all 0xff")
    nc("nc-l2-random", "l2-random", "connect:corruptions found", "serve0",
       "NEED_CHECK + random L2 table")
    nc("nc-trunc-data", "trunc-data", "connect:corruptions found", "serve0",
       "NEED_CHECK + truncated data")
    nc("nc-l1-at-end", "l1-at-end", "serve0", "serve0",
       "NEED_CHECK + L1 at the end, leaked clusters below it")
    p = new("nc-leaks", base)
    with open(p, "ab") as f:
        f.write(b"\xcc" * (5 * cs))
    set_field(p, "features", NEED_CHECK)
    add("nc-leaks", "serve0", "serve0", "NEED_CHECK + 5 leaked clusters at "
        "the end")

    # ---- Big geometries: arithmetic near 2^64 ----
    def geom(name, cs_, ts_, size, ro, desc, hs=1, extra=0):
        p = os.path.join(out, name + ".qed")
        with open(p, "wb") as f:
            f.write(HDR.pack(0x00444551, cs_, ts_, hs, 0, 0, 0, hs * cs_,
                             size, 0, 0))
            f.truncate((hs + ts_) * cs_ + extra)
        add(name, ro, None, desc)
        return p

    geom("geom-2m16-2^63", 2 * M, 16, (1 << 63) - 512, "serve0",
         "2M/16 (QEMU overflows), image_size 2^63-512")
    geom("geom-2m16-2^64", 2 * M, 16, (1 << 64) - 512,
         "refuse:larger than the tables can address",
         "2M/16, image_size 2^64-512")
    geom("geom-64m1", 64 * M, 1, 1 << 40, "serve0",
         "64M clusters, table_size 1, 1T")
    geom("geom-4k1", 4096, 1, 1 * G, "serve0",
         "4K/1 (QEMU cannot open), the maximum 1G")
    p = geom("geom-4m4-big", 4 * M, 4, (1 << 62), "serve0",
             "4M/4 (QEMU overflows to 0), image_size 2^62")
    p = geom("geom-2m16-l1e", 2 * M, 16, (1 << 63) - 512, "serveE",
             "2M/16 with L1 entries near 2^64", extra=0)
    ents = 16 * 2 * M // 8
    # Entries at the start (guest 0) and in the middle and at the end.
    for idx in (0, 1 << 20, (1 << 20) - 1):
        if idx < ents:
            patch(p, 2 * M + 8 * idx, "<Q", (1 << 64) - 2 * M)

    # ---- L1 entries beyond what image_size reaches (64M/16: a 1 GiB L1
    # of which a 1 GiB disk reaches one entry; the file is sparse, a few
    # KiB on disk).  They must never be loaded, checked or repaired:
    # bounded memory, no file growth. ----
    far = 0x7ff               # guest offset 0xffe0000000000000
    p = geom("geom-64m16-far", 64 * M, 16, 1 * G, "serve0",
             "64M/16, 1G, a nonzero L1 entry the size cannot reach")
    patch(p, 64 * M + 8 * far, "<Q", 64 * M)
    p = geom("geom-64m16-far-nc", 64 * M, 16, 1 * G, "serve0",
             "64M/16, 1G, NEED_CHECK, L1[0] and a far entry share a table",
             extra=16 * 64 * M)
    t = (1 + 16) * 64 * M
    patch(p, 64 * M, "<Q", t)
    patch(p, 64 * M + 8 * far, "<Q", t)
    patch(p, t, "<Q", 0)            # the table's first entry: unallocated
    set_field(p, "features", NEED_CHECK)
    p = geom("geom-64m16-far-data", 64 * M, 16, 1 * G, "serve0",
             "64M/16, 1G, a far entry whose table points at L1[0]'s data",
             extra=(16 + 1) * 64 * M)
    patch(p, 64 * M, "<Q", t)
    patch(p, 64 * M + 8 * far, "<Q", t)
    patch(p, t, "<Q", t + 16 * 64 * M)   # guest cluster 0: a data cluster
    patch_bytes(p, t + 16 * 64 * M, b"far" * 100)
    set_field(p, "features", NEED_CHECK)

    # ---- Images with a valid header but an L2 table at EOF - 4K ----
    p = new("l1e-last-cluster", base)
    patch(p, l1, "<Q", fsize // cs * cs - cs)
    add("l1e-last-cluster", "serveE", None,
        "L1[0] = the last cluster (the table needs two)")

    with open(os.path.join(out, "manifest.tsv"), "w") as f:
        for m in manifest:
            f.write("\t".join(m) + "\n")
    for tmp in ("base4k.img", "base64k.img", "basehs4.img"):
        os.unlink(os.path.join(out, tmp))

    if corpus:
        os.makedirs(corpus, exist_ok=True)
        n = 0
        for m in manifest:
            src = os.path.join(out, m[0] + ".qed")
            if not os.path.isfile(src):
                continue
            with open(src, "rb") as f:
                head = f.read(max_corpus)
            with open(os.path.join(corpus, m[0] + ".qed"), "wb") as f:
                f.write(head)
            n += 1
        print("%d corpus files in %s" % (n, corpus))
    print("%d images in %s" % (len(manifest), out))


if __name__ == "__main__":
    main()
