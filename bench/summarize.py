#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Summarise bench/run.sh measurements: medians, ratios, CPU s/GiB, targets.

usage: summarize.py RESULTS.tsv CLK_TCK

Each TSV line: workload, role, rep, value, cpu_ticks, bytes, extra.
"""

import sys
from collections import defaultdict
from statistics import median

path, tick = sys.argv[1], float(sys.argv[2])
runs = defaultdict(list)                # (workload, role) -> [(v, cpu, b, x)]
for line in open(path):
    f = line.rstrip('\n').split('\t')
    if len(f) < 7:
        continue
    w, role, _rep, v, cpu, nbytes, extra = f[:7]
    runs[(w, role)].append((float(v), int(cpu), int(nbytes), extra))


def med(w, role, field=0):
    r = runs.get((w, role))
    if not r:
        return None
    if field == 3:
        vals = [float(x[3]) for x in r if x[3] != '']
        return median(vals) if vals else None
    return median(x[field] for x in r)


def cpu_per_gib(w, role):
    r = runs.get((w, role))
    if not r:
        return None
    vals = [c / tick / (b / 2**30) for _v, c, b, _x in r if b > 0]
    return median(vals) if vals else None


def fmt(v, unit):
    if v is None:
        return '-'
    if unit == 'ms' or unit == 'MiB':
        return '%.1f' % v
    return '%.0f' % v


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fr(x):
    return '-' if x is None else '%.2f' % x


def fc(x):
    return '-' if x is None else '%.2f' % x


# workload, label, unit, role in the ours / qemu / raw columns
ROWS = [
    ('seqread', '1  seq read 1M qd4', 'MiB/s', 'ours', 'qemu', 'raw'),
    ('randread1', '2a rand read 4K qd1', 'IOPS', 'ours', 'qemu', 'raw'),
    ('randread16', '2b rand read 4K qd16', 'IOPS', 'ours', 'qemu', 'raw'),
    ('seqwrite', '3  seq alloc write 1M qd4', 'MiB/s', 'ours', 'qemu', 'raw'),
    ('randwrite', '4a rand write 4K qd16, allocated', 'IOPS', 'ours', 'qemu', 'raw'),
    ('allocwrite', '4b rand alloc write 4K qd16', 'IOPS', 'ours', 'qemu', 'raw'),
    ('backing', '5  seq read via backing 1M qd4', 'MiB/s', 'ours', 'qemu', 'raw'),
    ('filter1', '6  filter 1st read (*)', 'MiB/s', 'qed', 'cache', 'file'),
    ('filter2', '6  filter 2nd read (*)', 'MiB/s', 'qed', 'cache', 'file'),
    ('zero-on', '7  zero write 1M, detect on', 'MiB/s', 'ours', 'qemu', 'raw'),
    ('zero-off', '7  zero write 1M, detect off', 'MiB/s', 'ours', 'qemu', 'raw'),
    ('1t-randread', '8  1T rand read 4K qd1', 'IOPS', 'ours', 'qemu', 'raw'),
    ('1t-randread16', '8  1T rand read 4K qd16', 'IOPS', 'ours', 'qemu', 'raw'),
    ('1t-open', '8  1T open (lower=better)', 'ms', 'ours', 'qemu', 'raw'),
    ('1t-rss', '8  1T RSS peak (lower=better)', 'MiB', 'ours', 'qemu', 'raw'),
]

hdr = ('workload', 'unit', 'ours', 'qemu-nbd', 'raw file', 'ours/qemu',
       'ours/raw', 'CPU s/GiB ours', 'qemu', 'raw')
lines = []
for w, label, unit, ro, rq, rr in ROWS:
    o, q, r = med(w, ro), med(w, rq), med(w, rr)
    if o is None and q is None and r is None:
        continue
    co, cq, cr = cpu_per_gib(w, ro), cpu_per_gib(w, rq), cpu_per_gib(w, rr)
    lines.append((label, unit, fmt(o, unit), fmt(q, unit), fmt(r, unit),
                  fr(ratio(o, q)), fr(ratio(o, r)), fc(co), fc(cq), fc(cr)))

widths = [max(len(str(x[i])) for x in [hdr] + lines) for i in range(len(hdr))]


def show(row):
    cells = []
    for i, c in enumerate(row):
        cells.append(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]))
    print(' | '.join(cells))


show(hdr)
print('-+-'.join('-' * n for n in widths))
for l in lines:
    show(l)
print('(medians of the repetitions; CPU = utime+stime of the server process'
      ' per GiB moved)')
if any(w.startswith('filter') for w, _ in runs):
    print('(*) workload 6: ours = --filter=qed (copy-on-read), qemu-nbd column'
          ' = nbdkit cache filter (cache-on-read), raw column = file plugin'
          ' with no filter')

# ---------------------------------------------------------------- details
if any(w.startswith('filter') for w, _ in runs):
    print()
    print('6: full reads with nbdcopy --no-extents (MiB/s, median; CPU s/GiB)')
    print('   %-26s %10s %10s %10s %10s' % ('', 'qed', 'cow', 'cache', 'file'))
    for w, label in (('filter1', 'first (populating) read'),
                     ('filter2', 'second read')):
        print('   %-26s %10s %10s %10s %10s' % (
            label, *(fmt(med(w, x), 'MiB/s') for x in ('qed', 'cow', 'cache', 'file'))))
        print('   %-26s %10s %10s %10s %10s' % (
            '  CPU s/GiB', *(fc(cpu_per_gib(w, x)) for x in ('qed', 'cow', 'cache', 'file'))))
    du = med('filterdu', 'qed', 3)
    if du is not None:
        print('   qed overlay after the reads: %.1f MiB (du)' % (du / 1024))

if ('zerodu', 'raw') in runs:
    print()
    print('7: file growth after the zero-filled writes (du, KiB, median)')
    for role, label in (('ours-zd', 'ours zero-detect=true'),
                        ('ours', 'ours zero-detect=false'),
                        ('qemu-dz', 'qemu-nbd --detect-zeroes=on'),
                        ('qemu', 'qemu-nbd (detect-zeroes off)'),
                        ('raw', 'raw file')):
        v = med('zerodu', role, 3)
        if v is not None:
            print('   %-30s %12.0f' % (label, v))

if ('1t-open', 'ours') in runs:
    print()
    print('8: 1 TiB image, 512 L2 tables (medians)')
    print('   %-44s %10s %10s %10s' % ('', 'ours', 'qemu-nbd', 'raw file'))
    print('   %-44s %10s %10s %10s' % (
        'launch to first nbdinfo --size answer, ms',
        *(fmt(med('1t-open', x), 'ms') for x in ('ours', 'qemu', 'raw'))))
    print('   %-44s %10s %10s %10s' % (
        'a second nbdinfo --size (baseline), ms',
        *(fmt(med('1t-open', x, 3), 'ms') for x in ('ours', 'qemu', 'raw'))))
    d = [None if med('1t-open', x) is None or med('1t-open', x, 3) is None
         else med('1t-open', x) - med('1t-open', x, 3) for x in ('ours', 'qemu', 'raw')]
    print('   %-44s %10s %10s %10s' % (
        'difference (launch + image open), ms', *(fmt(x, 'ms') for x in d)))
    print('   %-44s %10s %10s %10s' % (
        'VmHWM after the random reads, MiB',
        *(fmt(med('1t-rss', x), 'MiB') for x in ('ours', 'qemu', 'raw'))))
    print('   %-44s %10s %10s %10s' % (
        'VmRSS after the random reads, MiB',
        *(fmt(med('1t-rss', x, 3), 'MiB') for x in ('ours', 'qemu', 'raw'))))

if any(w.startswith('remote-') for w, _ in runs):
    print()
    print('9: remote disk = file plugin under the delay filter (rdelay per'
          ' read); medians')
    print('   %-34s %10s %10s %10s %10s %10s' % (
        '', 'qed', 'qed ra=0', 'cache+ra', 'no filter', 'qed/peer'))
    for d in ('1', '5'):
        for w, label, unit, peer in (
                ('remote-seq1-', 'seq 64K qd1, 1st pass, MiB/s', 'MiB/s', 'cache'),
                ('remote-seq2-', 'seq 64K qd1, 2nd pass, MiB/s', 'MiB/s', 'cache'),
                ('remote-rand-', 'rand 4K qd1, 1st pass, IOPS', 'IOPS', 'qedra0'),
                ('remote-copy-', 'nbdcopy 1st pass, MiB/s', 'MiB/s', 'direct')):
            w += d
            if not any(k[0] == w for k in runs):
                continue
            print('   %-34s %10s %10s %10s %10s %10s' % (
                '%s ms: %s' % (d, label),
                *(fmt(med(w, x), unit) for x in ('qed', 'qedra0', 'cache', 'direct')),
                fr(ratio(med(w, 'qed'), med(w, peer)))))
    print('   (qed/peer: against cache+ra for the sequential passes, against'
          ' qed ra=0 (no read-ahead) for random reads, against no filter for'
          ' nbdcopy)')

# ---------------------------------------------------------------- targets
print()
print('Targets (from the issue).  "cpu" is the same ratio measured as CPU')
print('efficiency (the other server\'s CPU s/GiB over ours), which is much')
print('less disturbed by other load on the machine than throughput:')


def target(name, value, goal, ok):
    """value: the text to show, or None when not measured."""
    if value is None or value == '-':
        print('   %-54s %-16s %s' % (name, 'not measured', ''))
        return
    print('   %-54s %-16s %s' % (name, value, ('MET' if ok else 'MISSED') +
                                  '  (goal ' + goal + ')'))


for w, label, goal in (('seqread', 'seq read of allocated data', 0.9),
                       ('randread1', '4K random read qd1', 0.9),
                       ('randread16', '4K random read qd16', 0.9),
                       ('seqwrite', 'seq allocating write', 0.9),
                       ('randwrite', '4K random write into allocated', 0.95),
                       ('allocwrite', '4K random allocating write', 0.5)):
    x = ratio(med(w, 'ours'), med(w, 'raw'))
    e = ratio(cpu_per_gib(w, 'raw'), cpu_per_gib(w, 'ours'))
    target(label + ': ours/raw', None if x is None else
           '%.2f (cpu %.2f)' % (x, e or 0), '>= %.2f' % goal,
           x is not None and x >= goal)

x = ratio(med('filter1', 'qed'), med('filter1', 'cache'))
e = ratio(cpu_per_gib('filter1', 'cache'), cpu_per_gib('filter1', 'qed'))
target('filter first read: qed/cache filter', None if x is None else
       '%.2f (cpu %.2f)' % (x, e or 0), '>= 1.50', x is not None and x >= 1.5)
x = ratio(med('zero-on', 'ours'), med('zero-on', 'qemu'))
g = med('zerodu', 'ours-zd', 3)
target('zero detection: ours/qemu-nbd --detect-zeroes=on', fr(x), '>= 1.00',
       x is not None and x >= 1.0)
target('zero detection: file growth, KiB', fmt(g, 'KiB'), '0',
       g is not None and g <= 0)
for w, label, *_ in ROWS:
    if w in ('1t-open', '1t-rss'):
        continue
    ro, rq = ('qed', 'cache') if w.startswith('filter') else ('ours', 'qemu')
    co, cq = cpu_per_gib(w, ro), cpu_per_gib(w, rq)
    if co is None or cq is None:
        continue
    target('CPU s/GiB ours <= %s: %s' % ('cache filter' if ro == 'qed' else 'qemu',
                                          label.split(' ', 1)[1].strip()),
           '%.2f vs %.2f' % (co, cq), '<=', co <= cq * 1.0)
o = med('1t-open', 'ours')
target('1T open, ms', fmt(o, 'ms'), '< 50', o is not None and o < 50)
o = med('1t-rss', 'ours')
target('1T RSS peak, MiB', fmt(o, 'MiB'), '<= 64', o is not None and o <= 64)
for w, qd in (('1t-randread', 1), ('1t-randread16', 16)):
    x = ratio(med(w, 'ours'), med(w, 'qemu'))
    target('1T random reads qd%d: ours/qemu-nbd' % qd, fr(x), '>= 10',
           x is not None and x >= 10)
for d in ('1', '5'):
    for w, peer, label, goal in (
            ('remote-seq1-', 'cache', 'seq 1st pass: qed/cache+readahead', 4.0),
            ('remote-seq2-', 'cache', 'seq 2nd pass: qed/cache+readahead', 1.0),
            ('remote-rand-', 'qedra0', 'rand 4K 1st pass: qed/qed-readahead=0', 0.9),
            ('remote-copy-', 'direct', 'nbdcopy: qed/no filter', 0.8)):
        x = ratio(med(w + d, 'qed'), med(w + d, peer))
        target('remote %s ms, %s' % (d, label), fr(x), '>= %.2f' % goal,
               x is not None and x >= goal)
