#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Check HACKING.md against the code (tests/test-layers.sh).

1. The layer order.  HACKING.md's "Layout" block lists the C files so
   that every file calls only files above it.  The calls are read from
   the sources: a call from one file to a function defined (not static)
   in another.  A file must be listed, and call only files listed above
   its own line (files on one line sit side by side: they may not call
   each other).  The seam's functions (declared in common/seam.h) go
   out to the host, wherever it is, and are not counted.
2. Names.  Every `name` in backquotes in HACKING.md that looks like a C
   identifier with an underscore must exist: a function or macro
   defined in a C source, a shell function of the tests, or another
   identifier of the sources (a field, a variable).  And where HACKING
   writes `file.c` `function`, the function must be defined in that
   file.

Usage: check-layers.py TOPDIR.  Prints each problem, exits 1 if any.
"""

import glob
import os
import re
import sys

top = sys.argv[1] if len(sys.argv) > 1 else "."
os.chdir(top)
problems = []


def strip(src):
    """C source without comments, strings and character constants."""
    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|'
                  r"'(?:\\.|[^'\\\n])*'",
                  lambda m: "\n" * m.group(0).count("\n"), src, flags=re.S)


def definitions(path):
    """(name, static) of the functions defined in a C file (GNU style:
    the return type on its own line, the name at column 0)."""
    lines = strip(open(path).read()).split("\n")
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"([A-Za-z_]\w*) \(", line)
        if not m or i == 0:
            continue
        prev = lines[i - 1]
        if not re.match(r"[A-Za-z_]", prev) or prev.rstrip().endswith((";", ",")):
            continue
        # The body follows the parameter list: a "{" at column 0 before
        # any line that ends a declaration.
        for j in range(i, min(i + 12, len(lines))):
            if lines[j].startswith("{"):
                out.append((m.group(1), prev.startswith("static")))
                break
            if lines[j].rstrip().endswith(";"):
                break
    return out


sources = sorted(glob.glob("common/*.c") + glob.glob("plugin/*.c") +
                 glob.glob("filter/*.c"))
defined_in = {}
for f in sources:
    for name, static in definitions(f):
        if not static:
            defined_in.setdefault(name, f)

seam = set(re.findall(r"\b(qed_\w+)\s*\(", strip(open("common/seam.h").read())))

# --- 1. the layer order
hacking = open("HACKING.md").read()
m = re.search(r"## Layout\n(.*?)\n## ", hacking, re.S)
block = [l for l in m.group(1).split("\n") if l.startswith("    ")]
rank = {}
parent = None
for n, line in enumerate(block):
    indent = len(line) - len(line.lstrip())
    words = line.split()
    if not words:
        continue
    if indent == 4:
        parent = words[0] if words[0].endswith("/") else os.path.dirname(words[0])
    for w in words:
        # Names at the head of the line, before the description.
        if not re.fullmatch(r"[\w./-]+\.(c|h)(/\.h)?", w):
            break
        w = w.replace("/.h", "")
        if not w.endswith(".c"):
            continue
        path = w if "/" in w else os.path.join(parent.rstrip("/"), w)
        rank[os.path.normpath(path)] = n

for f in sources:
    if f not in rank:
        problems.append("%s is not in HACKING.md's layout" % f)
for f in rank:
    if not os.path.exists(f):
        problems.append("HACKING.md's layout lists %s, which does not exist" % f)

for f in sources:
    src = strip(open(f).read())
    called = set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", src))
    for name in sorted(called):
        g = defined_in.get(name)
        if g is None or g == f or name in seam:
            continue
        if f in rank and g in rank and rank[g] >= rank[f]:
            problems.append("%s calls %s (%s), which HACKING.md lists %s it"
                            % (f, name, g,
                               "beside" if rank[g] == rank[f] else "below"))

# --- 2. names
idents = set()
funcs = {}
for f in sorted(glob.glob("common/*.[ch]") + glob.glob("plugin/*.c") +
                glob.glob("filter/*.[ch]") + glob.glob("tests/*.[ch]") +
                glob.glob("tests/unit/*.[ch]")):
    src = strip(open(f).read())
    idents |= set(re.findall(r"\b[A-Za-z_]\w*\b", src))
    for name, _ in definitions(f):
        funcs.setdefault(name, set()).add(f)
    for name in re.findall(r"^#\s*define\s+(\w+)", src, re.M):
        funcs.setdefault(name, set()).add(f)
for f in glob.glob("tests/*.sh") + glob.glob("bench/*.sh"):
    for name in re.findall(r"^(\w+) *\(\) *\{?", open(f).read(), re.M):
        funcs.setdefault(name, set()).add(f)
        idents.add(name)

for name in sorted(set(re.findall(r"`([a-z_][a-z0-9_]*_[a-z0-9_]*)(?:\(\))?`",
                                  hacking))):
    if name not in funcs and name not in idents:
        problems.append("HACKING.md names `%s`, which is nowhere in the code"
                        % name)
for fname, name in re.findall(r"`([\w-]+\.c)` `([a-z_]\w*)`", hacking):
    where = {os.path.basename(p) for p in funcs.get(name, ())}
    if fname not in where:
        problems.append("HACKING.md says `%s` `%s`, but %s is defined in %s"
                        % (fname, name, name,
                           ", ".join(sorted(where)) or "no file"))

for p in problems:
    print(p)
sys.exit(1 if problems else 0)
