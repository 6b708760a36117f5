#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Break down perf samples below one function by its callees.

    perf record -F 1000 --call-graph dwarf,16384 -p PID -o perf.data
    perf script -i perf.data -F ip,sym | bench/stackagg.py FUNCTION [DEPTH]

Prints the share of all samples whose stack contains FUNCTION, then the
share of each call path DEPTH frames below it (the plugin is built
with -O2 and no frame pointers, hence --call-graph dwarf).
"""

import re
import sys
from collections import Counter

root = sys.argv[1]
depth = int(sys.argv[2]) if len(sys.argv) > 2 else 1
total = under = 0
paths = Counter()


def flush(frames):
    global total, under
    if not frames:
        return
    total += 1
    for i, name in enumerate(frames):          # leaf first
        if name == root:
            under += 1
            path = frames[max(0, i - depth):i][::-1]
            paths[' > '.join(path) if path else '(self)'] += 1
            return


frames = []
for line in sys.stdin:
    if not line.strip():
        flush(frames)
        frames = []
        continue
    if line[0] not in ' \t':
        continue
    parts = line.split()
    if len(parts) >= 2:
        frames.append(re.sub(r'\+0x[0-9a-f]+$', '', parts[1]))
flush(frames)

print('samples %d, under %s %d (%.1f%%)'
      % (total, root, under, 100.0 * under / max(total, 1)))
for k, v in paths.most_common(25):
    print('  %5.1f%% of all  %5.1f%% of %s  %s'
          % (100.0 * v / total, 100.0 * v / max(under, 1), root, k))
