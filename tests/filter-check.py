# SPDX-License-Identifier: BSD-3-Clause
# Used by the filter tests: random reads, writes and zeroes through the
# filter (URI_FILTER), checked against the plain backend (URI_PLAIN,
# served without the filter) with the writes applied on top.
#   /usr/bin/python3 tests/filter-check.py URI_PLAIN URI_FILTER SEED [OPS]
import random
import sys

import nbd

plain_uri, filter_uri, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
ops = int(sys.argv[4]) if len(sys.argv) > 4 else 200
p = nbd.NBD()
p.connect_uri(plain_uri)
f = nbd.NBD()
f.connect_uri(filter_uri)
size = f.get_size()
assert size == p.get_size(), (size, p.get_size())
r = random.Random(seed)
writes = []                     # (offset, bytes), in order


def expect(off, n):
    b = bytearray(p.pread(n, off))
    for (wo, wd) in writes:
        s, e = max(off, wo), min(off + n, wo + len(wd))
        if s < e:
            b[s - off:e - off] = wd[s - wo:e - wo]
    return bytes(b)


def check(off, n):
    got = f.pread(n, off)
    if got != expect(off, n):
        raise Exception("mismatch reading %d bytes at %d" % (n, off))


# Spots near the start, the end and at random places.
spots = [0, size - 1, size // 2] + [r.randrange(size) for _ in range(8)]
for i in range(ops):
    off = r.choice(spots) if r.random() < 0.5 else r.randrange(size)
    off = min(off, size - 1)
    n = min(r.choice([1, 512, 4096, 65536, 300000]), size - off)
    op = r.randrange(5)
    if op == 0:
        data = r.randbytes(n)
        f.pwrite(data, off)
        writes.append((off, data))
    elif op == 1:
        f.zero(n, off, r.choice([0, nbd.CMD_FLAG_NO_HOLE]))
        writes.append((off, bytes(n)))
    else:
        check(off, n)
for (wo, wd) in writes:
    check(wo, len(wd))
f.flush()
# Reads through a second connection see the same (multi-conn).
g = nbd.NBD()
g.connect_uri(filter_uri)
for (wo, wd) in writes[-10:]:
    assert g.pread(len(wd), wo) == expect(wo, len(wd))
print("filter-check: %d ops, %d writes OK" % (ops, len(writes)))
