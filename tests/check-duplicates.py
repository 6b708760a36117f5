#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Code that the plugin and the filter repeat (tests/test-layers.sh).

What both objects need lives once, in common/ (glue-nbdkit.c and the
core).  This finds runs of MIN (6) or more consecutive lines that
plugin/*.c and filter/*.c share: the same code after whitespace is
normalised and comments are dropped, not counting lines that carry no
logic of their own (braces, "return 0;", "return -1;", "else").  It
needs nothing but Python, so it runs where the `duplicates` tool is
not installed.

Usage: check-duplicates.py TOPDIR.  Prints each run, exits 1 if any.
"""

import glob
import os
import re
import sys

MIN = 6
TRIVIAL = {"{", "}", "};", "else", "return 0;", "return -1;", "break;",
           "} else {", "else {"}


def lines_of(path):
    src = open(path).read()
    src = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"),
                 src, flags=re.S)
    out = []
    for n, line in enumerate(src.split("\n"), 1):
        line = re.sub(r"//.*", "", line)
        line = " ".join(line.split())
        if line and line not in TRIVIAL and not line.startswith("#include"):
            out.append((n, line))
    return out


def runs(a, b):
    """Maximal runs of at least MIN equal lines in a and b."""
    index = {}
    for j, (_, l) in enumerate(b):
        index.setdefault(l, []).append(j)
    found = []
    seen = set()
    for i, (_, l) in enumerate(a):
        for j in index.get(l, ()):
            if (i, j) in seen:
                continue
            k = 0
            while i + k < len(a) and j + k < len(b) and a[i + k][1] == b[j + k][1]:
                seen.add((i + k, j + k))
                k += 1
            if k >= MIN:
                found.append((a[i][0], a[i + k - 1][0], b[j][0], b[j + k - 1][0]))
    return found


top = sys.argv[1] if len(sys.argv) > 1 else "."
os.chdir(top)
bad = 0
for p in sorted(glob.glob("plugin/*.c")):
    for f in sorted(glob.glob("filter/*.c")):
        for a0, a1, b0, b1 in runs(lines_of(p), lines_of(f)):
            print("%s:%d-%d ~ %s:%d-%d" % (p, a0, a1, f, b0, b1))
            bad += 1
sys.exit(1 if bad else 0)
