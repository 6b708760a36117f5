#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""nbdkit-qed crash harness.

Proves that no write acknowledged and flushed (or acknowledged with FUA)
is ever lost, and that a crashed image always reopens clean.

Trials
------
kill      A seeded workload (several connections: synchronous threads and
          one aio thread with up to 6 commands in flight; writes, FUA
          writes, zeroes with and without MAY_TRIM, fast zeroes, trims,
          zero-data writes, flushes and reads; some runs let in-flight
          requests overlap) runs against a client-side model; nbdkit is
          killed with SIGKILL at a random moment, right after the n-th
          flush returned, or after a "finale" that frees clusters low in
          the file and then allocates a new L2 table.  30% of the plugin
          images have a raw backing file.
power     The same workload runs with tests/crashsim.so preloaded, which
          journals every mutation of the image (with its data) and every
          fdatasync/fsync; the run ends with SIGKILL or SIGTERM (so the
          close's writeback and compaction are journalled too).  Crash
          points are chosen in the journal and "power-loss" images
          rebuilt from the initial image + journal: everything before
          the last completed barrier is applied, each later mutation is
          kept or dropped independently (random subsets, all, none,
          whole classes of records, torn 512-byte sector subsets).  For
          runs ended by SIGTERM, replaying the whole journal must give
          the final file byte for byte (checks the shim and the replay).
nested    A power-loss image is repaired under the shim too; crash points
          inside the repair (and the close that follows) are rebuilt the
          same way and must repair to exactly the same guest contents.
scenario  Hand-made sequences (freed clusters below the last L2 table;
          with compact-limit=0, a free-cluster list written at the close,
          and one reused after a first clean run wrote it), ended by
          SIGTERM and by SIGKILL, and journalled for power-loss
          reconstructions biased towards the close.
filter    SIGKILL (and, in the long form, power-loss) trials through the
          QED filter over the file plugin with a raw base.
ordering  Every power-loss and exhaustive journal, checked directly: no
          table write makes an L2 entry point at a data cluster whose
          first write (since it was last a hole) no completed fdatasync
          covers (the data-before-tables rule of the writeback).
--min CAT=N makes a run with fewer than N trials of a category fail
(the time limit never stops a category below its minimum), and a
missing journal shim or a filter that cannot serve is a failure.

Every crashed image is checked the same way:
  0. `qemu-img check` finds no corruption (leaks are allowed);
  1. nbdkit -r: reads satisfy the model and (plugin) the file stays
     byte-identical -- the filter keeps its overlay writable under -r;
  2. writable open (the NEED_CHECK repair runs): reads satisfy the model
     and equal what the read-only open saw; the repair reports no
     corruption (a crash may only leak clusters); nothing outside the
     zones the workload touched reads as non-zero; new writes after the
     repair land without disturbing anything;
  3. after a clean stop NEED_CHECK is clear and `qemu-img check` exits 0,
     or 3 (leaks) with the free-cluster list's bit set (and, for some,
     `qemu-img convert` reads the same zones).
About a third of the trials run with compact-limit=0, so that freed
clusters (at the close, at the idle timer, and in the repair) are listed
rather than compacted, and the next open reuses them.
Reads made during the workload are checked against the model too.

The model works per 512-byte unit.  Each written unit carries a pattern
naming the op and the unit, so a read tells which op's data it shows.
For a crash at time T, op X (which touched unit u) is *durable* if it was
acknowledged with FUA before T, or acknowledged before a flush was issued
that completed before T.  The allowed contents of u are the values of
the ops on u that were not acknowledged before the issue of the latest
durable (non-trim) op on u -- plus the initial contents if no durable op
touched u.  A trim leaves zeroes or the earlier contents.  Times are
CLOCK_MONOTONIC in both the client (time.monotonic_ns) and the journal, so
a flush the client saw complete before the crash point had its
fdatasyncs journalled before it.  (For SIGKILL, T is infinite: every
reply the client received was sent before the kill.)

Usage: crash-harness.py [--kill N] [--power-runs R --power N] [--nested N]
                        [--scenarios N] [--filter-kill N] [--seed S]
                        [--keep DIR] [--idle] [-v]   (see --help)
CRASH_PLUGIN, CRASH_FILTER and CRASH_SHIM override the objects tested.
Ends with "trials N, failures M"; exit status 1 if M > 0.
"""

import argparse
import ctypes
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import nbd

M = 1024 * 1024
UNIT = 512
PAT_MAGIC = 0x50444551          # "QEDP"
ZERO_UNIT = bytes(UNIT)
Z = 'Z'                         # the value "reads as zeroes"
NEG = float('-inf')
POS = float('inf')

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
PLUGIN = os.environ.get('CRASH_PLUGIN') or \
    os.path.join(TOP, 'plugin', 'nbdkit-qed-plugin.so')
FILTER = os.environ.get('CRASH_FILTER') or \
    os.path.join(TOP, 'filter', 'nbdkit-qed-filter.so')
SHIM = os.environ.get('CRASH_SHIM') or \
    os.path.join(TOP, 'tests', 'crashsim.so')


def now():
    return time.monotonic_ns()


def unit_data(opid, first_unit, n):
    return b''.join(struct.pack('<IIQ', PAT_MAGIC, opid, u) * 32
                    for u in range(first_unit, first_unit + n))


def classify(b, u):
    """What a 512-byte unit shows: Z, an op id, or a description."""
    if b == ZERO_UNIT:
        return Z
    head = b[:16]
    if head * 32 == b:
        magic, opid, unit = struct.unpack('<IIQ', head)
        if magic == PAT_MAGIC:
            if unit == u:
                return opid
            return 'data of op %d for unit %d (offset 0x%x)' % (
                opid, unit, unit * UNIT)
    return 'garbage %s...' % b[:24].hex()


# ---------------------------------------------------------------------
# Geometry: the zones the workload touches.

GEOMS = [
    (4096, 2, 24 * M - 1536),
    (4096, 4, 40 * M),
    (16384, 2, 160 * M + 512),
    (65536, 2, 64 * M - 512),
    (65536, 4, 96 * M),
]


class Layout:
    def __init__(self, cs, ts, size):
        self.cs, self.ts, self.size = cs, ts, size
        cover = ts * cs // 8 * cs           # guest bytes per L2 table
        zones = [(0, 2 * M)]
        if cover + 2 * M < size - M:
            zones.append((cover - M, cover + M))
        zones.append((size - M, size))
        # A zone the workload touches rarely, in an L2 table of its own:
        # its table is then allocated late, above most data clusters.
        self.rare = None
        mid = size // 2 // cover * cover
        if mid > 0 and mid + cover <= size - M and all(
                b <= mid or a >= mid + cover for a, b in zones):
            a = mid + cover // 4 // UNIT * UNIT
            self.rare = (a, a + 512 * 1024)
            zones.append(self.rare)
        self.zones = zones
        self.scratch = (2 * M + 256 * 1024, 2 * M + 768 * 1024)
        assert all(self.scratch[1] <= a or self.scratch[0] >= b
                   for a, b in zones[1:])
        self.hot = (0, min(16 * cs, 2 * M))

    def in_zones(self, a, b):
        return any(za <= a and b <= zb for za, zb in self.zones)


# ---------------------------------------------------------------------
# The client-side model.

class Op:
    __slots__ = ('id', 'kind', 'off', 'n', 'fua', 'flags', 't_issue',
                 't_ack', 'ok', 'zero_data', 'data', 'err')

    def __init__(self, id, kind, off=0, n=0, fua=False, flags=0,
                 zero_data=False):
        self.id, self.kind, self.off, self.n = id, kind, off, n
        self.fua, self.flags, self.zero_data = fua, flags, zero_data
        self.t_issue = self.t_ack = None
        self.ok = None
        self.data = None
        self.err = None

    def value(self, u):
        if self.kind == 'write' and not self.zero_data:
            return self.id
        return Z

    def describe(self, t0):
        def t(x):
            return '-' if x is None else '%.3fms' % ((x - t0) / 1e6)
        k = self.kind
        if self.kind == 'zero':
            k += '(%s%s)' % ('no-hole' if self.flags & nbd.CMD_FLAG_NO_HOLE
                             else 'may-trim',
                             ',fast' if self.flags & nbd.CMD_FLAG_FAST_ZERO
                             else '')
        if self.zero_data:
            k += '(zero data)'
        return 'op %d %s%s 0x%x+%d issued %s acked %s %s%s' % (
            self.id, k, ' FUA' if self.fua else '', self.off, self.n,
            t(self.t_issue), t(self.t_ack),
            'ok' if self.ok else 'FAILED', '' if not self.err
            else ' (%s)' % self.err)


class Model:
    def __init__(self, layout, base_units=None):
        self.layout = layout
        self.lock = threading.Lock()
        self.ops = [None]               # id 0: the initial (base) data
        self.flushes = []
        self.reads = []
        self.inflight = []              # (start, end, op)
        self.base_units = base_units or set()
        self.t0 = now()
        self.uops = None
        self.desc = ''


    def init_value(self, u):
        return 0 if u in self.base_units else Z

    def new_op(self, kind, **kw):
        op = Op(len(self.ops), kind, **kw)
        self.ops.append(op)
        if kind == 'flush':
            self.flushes.append(op)
        elif kind == 'read':
            self.reads.append(op)
        return op

    def index(self):
        """Per unit, the ops that touched it (in issue order)."""
        uops = {}
        for op in self.ops[1:]:
            if op.kind in ('write', 'zero', 'trim'):
                for u in range(op.off // UNIT, (op.off + op.n) // UNIT):
                    uops.setdefault(u, []).append(op)
        self.uops = uops

    def durable_pred(self, T):
        """Which ops are durable in a crash at time T (POS: SIGKILL)."""
        D = max((f.t_issue for f in self.flushes
                 if f.ok and f.t_ack is not None and f.t_ack < T),
                default=NEG)

        def pred(op):
            return (op.ok and op.t_ack is not None and op.t_ack < T and
                    (op.t_ack < D or op.fua))
        return pred

    def allowed(self, u, T, sup):
        """Values unit u may show.  T: ops issued at or after T had no
        effect.  sup(op): op's effect is certainly in place."""
        ops = self.uops.get(u, ())
        ymax = NEG
        for op in ops:
            if op.kind != 'trim' and op.t_issue > ymax and sup(op):
                ymax = op.t_issue
        s = set()
        if ymax == NEG:
            s.add(self.init_value(u))
        for op in ops:
            if op.t_issue >= T:
                continue
            if op.t_ack is not None and op.t_ack < ymax:
                continue
            s.add(op.value(u))
        return s

    def expected(self, v, u):
        if v == Z:
            return ZERO_UNIT
        return unit_data(v, u, 1)

    def check(self, start, data, T, sup, label, errors, limit=6,
              allow_mix=False):
        """Compare data read at guest offset start with the model.  With
        allow_mix (a read racing with writes), each byte may come from a
        different allowed value."""
        bad = 0
        for i in range(0, len(data), UNIT):
            u = (start + i) // UNIT
            b = data[i:i + UNIT]
            if b == ZERO_UNIT and u not in self.uops and \
               u not in self.base_units:
                continue
            v = classify(b, u)
            al = self.allowed(u, T, sup)
            if v not in al and allow_mix and len(al) > 1:
                exp = [self.expected(x, u) for x in al]
                if all(any(e[j] == b[j] for e in exp) for j in range(UNIT)):
                    continue
            if v not in al:
                bad += 1
                if bad <= limit:
                    hist = '; '.join(op.describe(self.t0)
                                     for op in self.uops.get(u, ()))
                    errors.append(
                        '%s: guest offset 0x%x shows %s, allowed %s; '
                        'history: %s' % (label, u * UNIT, v,
                                         sorted(map(str, al)),
                                         hist or 'none'))
        if bad > limit:
            errors.append('%s: ... %d bad units in all' % (label, bad))
        return bad

    def check_reads(self, errors):
        """Reads done during the workload saw a possible state."""
        for r in self.reads:
            if not r.ok or r.data is None:
                continue
            ri, ra = r.t_issue, r.t_ack

            def sup(op, ri=ri):
                return op.ok and op.t_ack is not None and op.t_ack < ri
            self.check(r.off, r.data, ra, sup,
                       'live read %d' % r.id, errors, limit=3,
                       allow_mix=True)

    def last_flush_desc(self):
        done = [f for f in self.flushes if f.ok]
        return '%d ops, %d flushes completed, %s' % (
            len(self.ops) - 1, len(done), self.desc)


# ---------------------------------------------------------------------
# The workload.

class Workload:
    def __init__(self, model, uri, rng, opts):
        self.model = model
        self.uri = uri
        self.rng = rng
        self.opts = opts
        self.stop = threading.Event()
        self.killed = False
        self.flush_done = threading.Event()
        self.flush_target = None
        self.threads = []
        self.errors = []
        self.cs = model.layout.cs

    # Choose an op and register it (model.lock held).
    def _range(self, rng, kind):
        L = self.model.layout
        cs = self.cs
        x = rng.random()
        if x < 0.3:
            za, zb = L.hot
        elif L.rare and x < 0.32:
            za, zb = L.rare
        else:
            za, zb = rng.choice([z for z in L.zones if z != L.rare])
        r = rng.random()
        if r < 0.35:
            n = rng.randrange(1, 17) * UNIT
        elif r < 0.65:
            n = cs * rng.randint(1, 4)
        elif r < 0.9:
            n = rng.randrange(1, 2 * cs // UNIT + 1) * UNIT
        else:
            n = rng.randrange(1, (1 * M if kind in ('write', 'read')
                                  else 3 * M) // UNIT) * UNIT
        n = min(n, zb - za)
        if r >= 0.35 and r < 0.65 and rng.random() < 0.8:
            first = (za + cs - 1) // cs
            last = (zb - n) // cs
            if last >= first:
                return rng.randint(first, last) * cs, n
        off = za + rng.randrange(0, (zb - za - n) // UNIT + 1) * UNIT
        return off, n

    def pick(self, rng):
        o = self.opts
        r = rng.random()
        kinds = [('write', 40), ('fua-write', 7), ('zero', 10),
                 ('fua-zero', 3), ('fast-zero', 2), ('trim', 8),
                 ('flush', 8), ('read', 12), ('zero-write', 4)]
        tot = sum(w for _, w in kinds)
        x = r * tot
        for kind, w in kinds:
            if x < w:
                break
            x -= w
        m = self.model
        with m.lock:
            if kind == 'flush':
                op = m.new_op('flush')
                op.t_issue = now()
                return op
            for _ in range(8):
                base = {'fua-write': 'write', 'zero-write': 'write',
                        'fua-zero': 'zero', 'fast-zero': 'zero'}.get(kind,
                                                                     kind)
                off, n = self._range(rng, base)
                end = off + n
                if rng.random() >= o.overlap and any(
                        a < end and off < b for a, b, _ in m.inflight):
                    continue
                flags = 0
                fua = kind.startswith('fua') or (
                    base in ('zero', 'trim') and rng.random() < 0.1)
                if fua:
                    flags |= nbd.CMD_FLAG_FUA
                if base == 'zero':
                    if rng.random() < 0.5:
                        flags |= nbd.CMD_FLAG_NO_HOLE
                    if kind == 'fast-zero':
                        flags |= nbd.CMD_FLAG_FAST_ZERO
                op = m.new_op(base, off=off, n=n, fua=fua, flags=flags,
                              zero_data=(kind == 'zero-write'))
                if base != 'read':
                    m.inflight.append((off, end, op))
                op.t_issue = now()
                return op
        return None

    def complete(self, op, ok, err=None, data=None):
        t = now()
        m = self.model
        with m.lock:
            op.t_ack = t
            op.ok = ok
            op.err = err
            if data is not None:
                op.data = data
            m.inflight = [x for x in m.inflight if x[2] is not op]
            if op.kind == 'flush' and ok and self.flush_target is not None:
                self.flush_target -= 1
                if self.flush_target <= 0:
                    self.flush_done.set()

    def payload(self, op):
        if op.zero_data:
            return bytes(op.n)
        return unit_data(op.id, op.off // UNIT, op.n // UNIT)

    def run_sync(self, tid):
        rng = random.Random(self.rng.random())
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
        except nbd.Error as e:
            if not self.killed:
                self.errors.append('thread %d: connect: %s' % (tid, e))
            return
        while not self.stop.is_set():
            if self.opts.pause and rng.random() < 0.002:
                time.sleep(self.opts.pause)
            op = self.pick(rng)
            if op is None:
                time.sleep(0.0005)
                continue
            data = None
            try:
                if op.kind == 'write':
                    h.pwrite(self.payload(op), op.off, op.flags)
                elif op.kind == 'zero':
                    h.zero(op.n, op.off, op.flags)
                elif op.kind == 'trim':
                    h.trim(op.n, op.off, op.flags)
                elif op.kind == 'flush':
                    h.flush()
                elif op.kind == 'read':
                    data = h.pread(op.n, op.off)
                self.complete(op, True, data=data)
            except nbd.Error as e:
                self.complete(op, False, err=str(e))
                if not h.aio_is_ready() and not h.aio_is_processing():
                    return
        try:
            h.shutdown()
        except nbd.Error:
            pass

    def run_aio(self, tid):
        rng = random.Random(self.rng.random())
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
        except nbd.Error as e:
            if not self.killed:
                self.errors.append('aio thread: connect: %s' % e)
            return
        pending = {}                    # cookie -> (op, buffer)
        dead = False
        while not dead and (not self.stop.is_set() or pending):
            while not self.stop.is_set() and len(pending) < 6:
                op = self.pick(rng)
                if op is None:
                    break
                try:
                    buf = None
                    if op.kind == 'write':
                        buf = nbd.Buffer.from_bytearray(
                            bytearray(self.payload(op)))
                        c = h.aio_pwrite(buf, op.off, flags=op.flags)
                    elif op.kind == 'zero':
                        c = h.aio_zero(op.n, op.off, flags=op.flags)
                    elif op.kind == 'trim':
                        c = h.aio_trim(op.n, op.off, flags=op.flags)
                    elif op.kind == 'flush':
                        c = h.aio_flush()
                    else:
                        buf = nbd.Buffer(op.n)
                        c = h.aio_pread(buf, op.off)
                    pending[c] = (op, buf)
                except nbd.Error as e:
                    self.complete(op, False, err=str(e))
                    dead = True
                    break
            if dead:
                break
            try:
                h.poll(100)
            except nbd.Error:
                dead = True
            for c in list(pending):
                op, buf = pending[c]
                try:
                    if not h.aio_command_completed(c):
                        continue
                    self.complete(op, True, data=buf.to_bytearray()
                                  if op.kind == 'read' else None)
                except nbd.Error as e:
                    self.complete(op, False, err=str(e))
                del pending[c]
            if h.aio_is_dead() or h.aio_is_closed():
                dead = True
        for c, (op, buf) in pending.items():
            self.complete(op, False, err='connection died')
        try:
            h.shutdown()
        except nbd.Error:
            pass

    def finale(self, rng):
        """After the threads stopped: free clusters low in the file, then
        make the rare zone's table the last thing in it (so reclaiming
        the holes means moving a table)."""
        L = self.model.layout
        cs = self.cs
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            seq = []
            for _ in range(rng.randint(1, 4)):
                a = rng.randrange(0, (L.zones[0][1] - 8 * cs) // cs) * cs
                seq.append(('trim', a, cs * rng.randint(1, 8), 0))
            seq.append(('flush', 0, 0, 0))
            z = L.rare or L.zones[-1]
            for _ in range(rng.randint(1, 3)):
                a = z[0] + rng.randrange(0, (z[1] - z[0] - cs) // UNIT) * UNIT
                seq.append(('write', a, rng.randrange(1, 9) * UNIT, 0))
            seq.append(('flush', 0, 0, 0))
            self.sequence(h, seq)
            h.shutdown()
        except nbd.Error as e:
            self.errors.append('finale: %s' % e)

    def sequence(self, h, seq):
        """Run (kind, offset, count, flags) ops one by one."""
        for kind, off, n, flags in seq:
            with self.model.lock:
                op = self.model.new_op(kind, off=off, n=n, flags=flags,
                                       fua=bool(flags & nbd.CMD_FLAG_FUA))
                op.t_issue = now()
            try:
                if kind == 'trim':
                    h.trim(n, off, flags)
                elif kind == 'zero':
                    h.zero(n, off, flags)
                elif kind == 'write':
                    h.pwrite(self.payload(op), off, flags)
                else:
                    h.flush()
                self.complete(op, True)
            except nbd.Error as e:
                self.complete(op, False, err=str(e))
                raise

    def start(self, nthreads):
        for i in range(nthreads):
            t = threading.Thread(target=self.run_sync, args=(i,),
                                 daemon=True)
            self.threads.append(t)
        self.threads.append(threading.Thread(target=self.run_aio,
                                             args=(nthreads,), daemon=True))
        for t in self.threads:
            t.start()

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)
            if t.is_alive():
                self.errors.append('a workload thread hung')


# ---------------------------------------------------------------------
# nbdkit servers.

class StartError(Exception):
    pass


class Server:
    def __init__(self, ctx, name, argv, env=None, readonly=False):
        self.ctx = ctx
        self.sock = os.path.join(ctx.work, name + '.sock')
        self.logname = os.path.join(ctx.work, name + '.log')
        self.argv = argv
        self.env = env
        self.readonly = readonly
        self.p = None

    def uri(self):
        return 'nbd+unix:///?socket=' + self.sock

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        cmd = ['nbdkit', '-f', '--exit-with-parent', '-U', self.sock]
        if self.ctx.verbose:
            cmd.append('-v')
        if self.readonly:
            cmd.append('-r')
        cmd += self.argv
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.log = open(self.logname, 'ab')
        self.log.write(('$ %s\n' % ' '.join(cmd)).encode())
        self.log.flush()
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=self.log,
                                  env=env)
        for _ in range(2000):
            if os.path.exists(self.sock):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(self.sock)
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            if self.p.poll() is not None:
                raise StartError('nbdkit exited with %d: %s' % (
                    self.p.returncode, self.tail()))
            time.sleep(0.005)
        raise StartError('nbdkit did not create its socket')

    def log_errors(self, image):
        """Error messages about the image in this server's log, and
        the notice of a repair that found corruptions (not the one that
        only reclaimed leaked clusters, expected after a crash).  Any
        corruption found in a crashed image is a failure: a crash may
        only leak clusters."""
        try:
            with open(self.logname, 'rb') as f:
                lines = f.read().decode(errors='replace').splitlines()
        except OSError:
            return []
        return [l for l in lines if image in l and
                ('error' in l or re.search(r'repaired [1-9]\d* corruptions',
                                           l))]

    def tail(self, n=6):
        try:
            with open(self.logname, 'rb') as f:
                lines = f.read().decode(errors='replace').splitlines()
            return ' | '.join(lines[-n:])
        except OSError:
            return ''

    def stop(self):
        if self.p is None or self.p.poll() is not None:
            return self.p.returncode if self.p else 0
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise StartError('nbdkit did not exit on SIGTERM')
        self.log.close()
        return self.p.returncode

    def kill9(self):
        if self.p and self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.log.close()


def connect(uri, meta=False):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


# ---------------------------------------------------------------------
# Targets: the plugin on an image, or the filter over a raw base.

class Target:
    """Where the workload's image lives and how to serve it."""

    def __init__(self, ctx, kind, layout, rng, tag):
        self.ctx, self.kind, self.layout = ctx, kind, layout
        self.dir = os.path.join(ctx.work, tag)
        os.makedirs(self.dir, exist_ok=True)
        self.extra = []
        self.base_units = set()
        L = layout
        self.backing = False
        if kind == 'filter' or rng.random() < 0.3:
            # A raw base with data in part of every zone.
            self.backing = True
            self.base = os.path.join(self.dir, 'base.raw')
            with open(self.base, 'wb') as f:
                f.truncate(L.size)
                for za, zb in L.zones:
                    a = za + (zb - za) // 4 // UNIT * UNIT
                    b = za + (zb - za) * 3 // 4 // UNIT * UNIT
                    f.seek(a)
                    f.write(unit_data(0, a // UNIT, (b - a) // UNIT))
                    self.base_units.update(range(a // UNIT, b // UNIT))
        if kind == 'plugin':
            self.image = os.path.join(self.dir, 'disk.qed')
            cmd = ['qemu-img', 'create', '-q', '-f', 'qed', '-o',
                   'cluster_size=%d,table_size=%d' % (L.cs, L.ts)]
            if self.backing:
                cmd += ['-b', self.base, '-F', 'raw']
                self.extra.append('(backing file)')
            run(cmd + [self.image, str(L.size)])
            if rng.random() < 0.25:
                self.extra.append('zero-detect=true')
            if rng.random() < 0.3:
                self.extra.append('l2-cache=64K')
            if ctx.opts.idle and rng.random() < 0.15:
                self.extra.append('idle-clean=1')
            if rng.random() < 0.35:
                self.extra.append('compact-limit=0')
        else:
            self.image = os.path.join(self.dir, 'overlay.qed')
            if ctx.filter_precreate:
                run(['qemu-img', 'create', '-q', '-f', 'qed', '-o',
                     'cluster_size=%d,table_size=%d' % (L.cs, L.ts),
                     self.image, str(L.size)])
            else:
                self.extra.append('qed-cluster-size=%d' % L.cs)
            if rng.random() < 0.25:
                self.extra.append('qed-zero-detect=true')
            if rng.random() < 0.2:
                self.extra.append('qed-copy-on-read=false')
            if rng.random() < 0.35:
                self.extra.append('qed-compact-limit=0')

    def argv(self, image=None):
        image = image or self.image
        extra = [x for x in self.extra if not x.startswith('(')]
        if self.kind == 'plugin':
            return [PLUGIN, image] + extra
        return (['--filter=' + FILTER, 'file', self.base,
                 'qed-overlay=' + image] + extra)

    def server(self, name, image=None, env=None, readonly=False):
        return Server(self.ctx, name, self.argv(image), env=env,
                      readonly=readonly)


def run(cmd, check=True):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check and p.returncode != 0:
        raise RuntimeError('%s: exit %d: %s' % (' '.join(cmd), p.returncode,
                                               p.stdout.decode()[-500:]))
    return p.returncode, p.stdout.decode(errors='replace')


def need_check(path):
    with open(path, 'rb') as f:
        f.seek(16)
        b = f.read(1)
    return bool(b and b[0] & 2)


def list_bit(path):
    """autoclear bit 0x1: the image holds a valid free-cluster list."""
    with open(path, 'rb') as f:
        f.seek(32)
        b = f.read(1)
    return bool(b and b[0] & 1)


def file_digest(path):
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        while True:
            b = f.read(4 * M)
            if not b:
                break
            h.update(b)
    h.update(str(os.path.getsize(path)).encode())
    return h.hexdigest()


def sparse_copy(src, dst):
    subprocess.run(['cp', '--sparse=always', src, dst], check=True)


# ---------------------------------------------------------------------
# Checking a crashed image.

def read_zones(h, layout):
    out = []
    for za, zb in layout.zones:
        out.append(h.pread(zb - za, za))
    return out


def check_outside(h, layout, errors, label):
    """Allocated data outside the zones (and scratch) must read zeros."""
    size = layout.size
    exts = []

    def cb(meta, off, entries, err):
        if meta != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        o = off
        for i in range(0, len(entries), 2):
            exts.append((o, o + entries[i], entries[i + 1]))
            o += entries[i]
        return 0
    off = 0
    while off < size:
        n = len(exts)
        h.block_status(min(size - off, 1 << 30), off, cb)
        if len(exts) == n:
            errors.append('%s: block status made no progress' % label)
            return
        off = exts[-1][1]
    keep = sorted(layout.zones + [layout.scratch])
    for a, b, flags in exts:
        if flags & nbd.STATE_ZERO:
            continue
        b = min(b, size)
        # Subtract the zones.
        segs = [(a, b)]
        for za, zb in keep:
            nxt = []
            for x, y in segs:
                if y <= za or x >= zb:
                    nxt.append((x, y))
                else:
                    if x < za:
                        nxt.append((x, za))
                    if y > zb:
                        nxt.append((zb, y))
            segs = nxt
        for x, y in segs:
            while x < y:
                n = min(y - x, 4 * M)
                d = h.pread(n, x)
                if d.count(0) != n:
                    i = next(i for i, c in enumerate(d) if c)
                    errors.append('%s: data outside the workload zones at '
                                  '0x%x (%s)' % (label, x + i,
                                                 classify(d[i // UNIT * UNIT:
                                                            i // UNIT * UNIT
                                                            + UNIT],
                                                          (x + i) // UNIT)))
                    return
                x += n


def check_model(model, layout, zones_data, T, sup, label, errors):
    for (za, zb), d in zip(layout.zones, zones_data):
        model.check(za, d, T, sup, label, errors)


def post_repair_writes(h, layout, zones_before, errors, label):
    """New allocations after the repair must not disturb old data."""
    sa, sb = layout.scratch
    cs = layout.cs
    writes = []
    opid = 900000
    rng = random.Random(sa)
    for i in range(6):
        off = sa + rng.randrange(0, (sb - sa - cs) // UNIT) * UNIT
        n = rng.randrange(1, 2 * cs // UNIT) * UNIT
        n = min(n, sb - off)
        h.pwrite(unit_data(opid + i, off // UNIT, n // UNIT), off,
                 nbd.CMD_FLAG_FUA if i == 2 else 0)
        writes.append((off, n, opid + i))
    h.flush()
    # Expected scratch contents: the last write wins.
    exp = bytearray(sb - sa)
    for off, n, oid in writes:
        exp[off - sa:off - sa + n] = unit_data(oid, off // UNIT, n // UNIT)
    got = h.pread(sb - sa, sa)
    if got != bytes(exp):
        errors.append('%s: writes after the repair read back wrong' % label)
    after = read_zones(h, layout)
    if after != zones_before:
        for (za, zb), a, b in zip(layout.zones, zones_before, after):
            if a != b:
                i = next(i for i in range(len(a)) if a[i] != b[i])
                errors.append('%s: writes after the repair changed guest '
                              'offset 0x%x' % (label, za + i))
                break


def verify_image(ctx, target, img, model, T, sup, label, ro_check=True,
                 expect=None, post_writes=True, env=None, qemu_compare=False):
    """Returns (errors, zones_data)."""
    errors = []
    L = target.layout
    content_ro = None
    # QEMU must see a consistent image before any repair: leaks (exit 3)
    # are what a crash may leave, corruption (exit 2) is not.
    rc, out = run(['qemu-img', 'check', '-f', 'qed', img], check=False)
    if rc not in (0, 3):
        errors.append('%s: before the repair, qemu-img check exit %d: %s' % (
            label, rc, ' | '.join(out.strip().splitlines()[-4:])))
    if ro_check:
        before = file_digest(img)
        srv = target.server('ro', img, readonly=True)
        try:
            srv.start()
            h = connect(srv.uri(), meta=True)
            content_ro = read_zones(h, L)
            check_model(model, L, content_ro, T, sup, label + ' (-r)',
                        errors)
            check_outside(h, L, errors, label + ' (-r)')
            h.shutdown()
        except (StartError, nbd.Error) as e:
            errors.append('%s: read-only open failed: %s %s' % (
                label, e, srv.tail()))
        finally:
            try:
                srv.stop()
            except StartError as e:
                errors.append('%s: %s' % (label, e))
        for l in srv.log_errors(img)[:5]:
            errors.append('%s (-r): nbdkit said: %s' % (label, l))
        # (The filter keeps its overlay writable under -r: copy-on-read
        # and the repair still write to it.)
        if file_digest(img) != before and target.kind == 'plugin':
            errors.append('%s: the read-only open changed the file' % label)

    srv = target.server('rw', img, env=env)
    content = None
    try:
        srv.start()
        h = connect(srv.uri(), meta=True)
        content = read_zones(h, L)
        check_model(model, L, content, T, sup, label, errors)
        if content_ro is not None and content != content_ro:
            errors.append('%s: the repaired image reads differently from '
                          'the read-only open' % label)
        if expect is not None and content != expect:
            for (za, zb), a, b in zip(L.zones, expect, content):
                if a != b:
                    i = next(i for i in range(len(a)) if a[i] != b[i])
                    errors.append(
                        '%s: after a crash in the repair, guest offset 0x%x '
                        'differs from the uninterrupted repair (%s vs %s)'
                        % (label, za + i,
                           classify(b[i // UNIT * UNIT:][:UNIT],
                                    (za + i) // UNIT),
                           classify(a[i // UNIT * UNIT:][:UNIT],
                                    (za + i) // UNIT)))
                    break
        check_outside(h, L, errors, label)
        if post_writes:
            post_repair_writes(h, L, content, errors, label)
        h.shutdown()
    except (StartError, nbd.Error) as e:
        errors.append('%s: the image does not open / serve: %s %s' % (
            label, e, srv.tail()))
    finally:
        try:
            rc = srv.stop()
            if rc != 0:
                errors.append('%s: nbdkit exited with %s' % (label, rc))
        except StartError as e:
            errors.append('%s: %s' % (label, e))
    for l in srv.log_errors(img)[:5]:
        errors.append('%s: nbdkit said: %s' % (label, l))
    if need_check(img):
        errors.append('%s: NEED_CHECK is still set after a clean stop'
                      % label)
    rc, out = run(['qemu-img', 'check', '-f', 'qed', img], check=False)
    # Leaks are allowed only when the list explains them.
    if rc != 0 and not (rc == 3 and list_bit(img)):
        errors.append('%s: qemu-img check exit %d: %s' % (
            label, rc, ' | '.join(out.strip().splitlines()[-4:])))
    if qemu_compare and rc == 0 and content is not None and \
       target.kind == 'plugin':
        raw = img + '.raw'
        run(['qemu-img', 'convert', '-f', 'qed', '-O', 'raw', img, raw])
        with open(raw, 'rb') as f:
            for (za, zb), d in zip(L.zones, content):
                f.seek(za)
                if f.read(zb - za) != d:
                    errors.append('%s: qemu-img convert reads the zone at '
                                  '0x%x differently' % (label, za))
        os.unlink(raw)
    return errors, content


# ---------------------------------------------------------------------
# The journal and power-loss reconstruction.

R_START, R_WRITE, R_TRUNCATE, R_FALLOCATE, R_BARRIER = range(5)
REC = struct.Struct('<IIQQQQQ')
JMAGIC = 0x314a5343
FL_KEEP_SIZE, FL_PUNCH_HOLE, FL_ZERO_RANGE = 0x1, 0x2, 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long,
                            ctypes.c_long]


class Rec:
    __slots__ = ('type', 'seq', 't', 'off', 'len', 'aux', 'doff')


def read_journal(path):
    with open(path, 'rb') as f:
        buf = f.read()
    recs = []
    p = 0
    while p + REC.size <= len(buf):
        magic, typ, seq, t, off, ln, aux = REC.unpack_from(buf, p)
        if magic != JMAGIC:
            raise RuntimeError('%s: bad record at %d' % (path, p))
        r = Rec()
        r.type, r.seq, r.t, r.off, r.len, r.aux = typ, seq, t, off, ln, aux
        r.doff = p + REC.size
        end = r.doff + (ln if typ == R_WRITE else 0)
        if end > len(buf):
            break                       # cut short by the crash
        if seq != len(recs):
            raise RuntimeError('%s: record %d has seq %d' % (path, len(recs),
                                                             seq))
        recs.append(r)
        p = end
    return buf, recs


def rec_class(r):
    if r.type == R_WRITE:
        if r.len <= 64:
            return 'header-write'
        if r.len == 4096 and r.off % 4096 == 0:
            return 'page-write'
        return 'data-write'
    return {R_TRUNCATE: 'truncate', R_FALLOCATE: 'fallocate'}.get(r.type,
                                                                   'other')


def choose_crash_point(rng, recs, tail_bias=False):
    bars = [i for i, r in enumerate(recs) if r.type == R_BARRIER]
    x = rng.random()
    if tail_bias and x < 0.4:
        # The close (write back, compaction, NEED_CHECK) ends the journal.
        if rng.random() < 0.5:
            return rng.randrange(max(1, len(recs) - 12), len(recs))
        return rng.randrange(max(1, len(recs) * 6 // 10), len(recs))
    if x < 0.1:
        # Early: around the first NEED_CHECK update and allocations.
        return rng.randrange(1, min(len(recs), 24))
    if x < 0.3 and bars:
        return rng.choice(bars)
    if x < 0.45 and bars:
        return max(1, rng.choice(bars) - 1)
    if x < 0.55:
        return len(recs) - 1
    return rng.randrange(1, len(recs))


def make_policy(rng, recs):
    x = rng.random()
    if x < 0.15:
        return ('all',)
    if x < 0.25:
        return ('none',)
    if x < 0.45:
        classes = sorted({rec_class(r) for r in recs if r.type != R_BARRIER
                          and r.type != R_START})
        return ('class', rng.choice(classes or ['data-write']),
                rng.choice(['drop', 'only']))
    return ('random', rng.choice([0.2, 0.5, 0.8]), rng.choice([0, 0.3, 0.6]))


def sector_chunks(off, n):
    chunks = []
    p = off
    while p < off + n:
        e = min(off + n, (p // UNIT + 1) * UNIT)
        chunks.append((p, e))
        p = e
    return chunks


def apply_rec(fd, r, buf, keep_chunks=None):
    if r.type == R_WRITE:
        data = memoryview(buf)[r.doff:r.doff + r.len]
        if keep_chunks is None:
            os.pwrite(fd, data, r.off)
        else:
            for a, b in keep_chunks:
                os.pwrite(fd, data[a - r.off:b - r.off], a)
    elif r.type == R_TRUNCATE:
        os.ftruncate(fd, r.off)
    elif r.type == R_FALLOCATE:
        mode = r.aux
        size = os.fstat(fd).st_size
        if mode & (FL_PUNCH_HOLE | FL_ZERO_RANGE):
            if _libc.fallocate(fd, mode, r.off, r.len) != 0:
                # Write the zeroes instead.
                end = r.off + r.len
                if mode & FL_KEEP_SIZE:
                    end = min(end, size)
                p = r.off
                while p < end:
                    n = min(end - p, 4 * M)
                    os.pwrite(fd, bytes(n), p)
                    p += n
        elif not mode & FL_KEEP_SIZE and r.off + r.len > size:
            os.ftruncate(fd, r.off + r.len)


def reconstruct(initial, out, buf, recs, k, policy, rng):
    """Build the image a power loss right after record k could leave.
    Returns a short description."""
    sparse_copy(initial, out)
    durable = 0
    for i in range(k + 1):
        if recs[i].type == R_BARRIER:
            durable = max(durable, recs[i].aux)
    kept = dropped = torn = 0
    fd = os.open(out, os.O_RDWR)
    try:
        for i in range(1, k + 1):
            r = recs[i]
            if r.type in (R_BARRIER, R_START):
                continue
            if i < durable:
                apply_rec(fd, r, buf)
                continue
            kind = policy[0]
            if kind == 'all':
                keep = True
            elif kind == 'none':
                keep = False
            elif kind == 'class':
                keep = (rec_class(r) == policy[1]) == (policy[2] == 'only')
            elif kind == 'set':
                keep = i in policy[1]
            else:
                keep = rng.random() < policy[1]
            if not keep:
                dropped += 1
                continue
            chunks = None
            if kind == 'random' and r.type == R_WRITE and r.len > UNIT \
               and rng.random() < policy[2]:
                all_chunks = sector_chunks(r.off, r.len)
                y = rng.random()
                if y < 0.4:
                    chunks = [c for c in all_chunks if rng.random() < 0.5]
                elif y < 0.7:
                    chunks = all_chunks[:rng.randrange(len(all_chunks))]
                else:
                    chunks = all_chunks[rng.randrange(1, len(all_chunks)):]
                torn += 1
            apply_rec(fd, r, buf, chunks)
            kept += 1
    finally:
        os.close(fd)
    return ('crash after record %d/%d (durable prefix %d), policy %s: '
            'kept %d (%d torn), dropped %d' % (k, len(recs) - 1, durable,
                                               policy, kept, torn, dropped))


def ordering_errors(initial, buf, recs):
    """The writeback order, checked directly on a journal: no write of a
    table may make an L2 entry point at a data cluster whose contents
    (the first write since the cluster was last a hole) no completed
    fdatasync covers yet.  Returns a list of errors."""
    with open(initial, 'rb') as f:
        img = bytearray(f.read())
    errs = []
    durable = 0             # records [0, durable) are durable
    first = {}              # cluster -> first content record since a hole

    def geometry():
        if len(img) < 64:
            return None
        magic, cs, ts, _hs, _f, _c, _a, l1, size, _bo, _bs = \
            struct.unpack_from('<IIIIQQQQQII', img, 0)
        if magic != 0x00444551 or cs == 0 or ts == 0:
            return None
        tb = cs * ts
        ents = struct.unpack_from('<%dQ' % (tb // 8),
                                  bytes(img[l1:l1 + tb]).ljust(tb, b'\0'))
        return cs, tb, [t for t in ents if t]

    geo = geometry()
    for i, r in enumerate(recs):
        if r.type == R_BARRIER:
            durable = max(durable, r.aux)
            continue
        if r.type == R_START or geo is None:
            continue
        cs, tb, tables = geo
        if r.type == R_WRITE:
            data = buf[r.doff:r.doff + r.len]
            for t in tables:
                lo, hi = max(r.off, t), min(r.off + r.len, t + tb)
                lo = (lo + 7) // 8 * 8
                for e in range(lo, hi - 7, 8):
                    new = struct.unpack_from('<Q', data, e - r.off)[0]
                    old = struct.unpack_from(
                        '<Q', bytes(img[e:e + 8]).ljust(8, b'\0'))[0]
                    if new == old or new <= 1:
                        continue
                    c = new // cs
                    if first.get(c, -1) >= durable:
                        errs.append(
                            'record %d (table write at %d) points an L2 '
                            'entry at cluster 0x%x, written by record %d, '
                            'which no completed fdatasync covers (durable '
                            'prefix %d)' % (i, r.off, new, first[c],
                                            durable))
            end = r.off + r.len
            if end > len(img):
                img.extend(bytes(end - len(img)))
            for c in range(r.off // cs, (end + cs - 1) // cs):
                first.setdefault(c, i)
            img[r.off:end] = data
        elif r.type == R_TRUNCATE:
            if r.off < len(img):
                del img[r.off:]
                for c in [c for c in first if c * cs >= r.off]:
                    del first[c]
            else:
                img.extend(bytes(r.off - len(img)))
        elif r.type == R_FALLOCATE:
            lo, hi = r.off, min(r.off + r.len, len(img))
            if r.aux & (FL_PUNCH_HOLE | FL_ZERO_RANGE) and lo < hi:
                img[lo:hi] = bytes(hi - lo)
            for c in range(r.off // cs, (r.off + r.len + cs - 1) // cs):
                whole = r.off <= c * cs and (c + 1) * cs <= r.off + r.len
                if r.aux & FL_PUNCH_HOLE and whole:
                    first.pop(c, None)      # a hole again
                elif r.aux & FL_ZERO_RANGE:
                    first.setdefault(c, i)
        l1 = struct.unpack_from('<Q', img, 40)[0]
        if r.type == R_WRITE and (r.off < 64 or
                                  (r.off < l1 + tb and r.off + r.len > l1)):
            geo = geometry()
    return errs[:5]


# ---------------------------------------------------------------------
# Trials.

class Ctx:
    def __init__(self, opts):
        self.opts = opts
        self.verbose = opts.verbose
        self.work = tempfile.mkdtemp(prefix='nbdkit-qed-crash.',
                                     dir=opts.tmpdir)
        self.trials = 0
        self.failures = 0
        self.kept = 0
        self.filter_precreate = False
        self.stats = {}

    def result(self, label, errors, artifacts=(), cat=None):
        self.trials += 1
        if cat:
            self.stats[cat] = self.stats.get(cat, 0) + 1
        if errors:
            self.failures += 1
            print('FAIL %s' % label, flush=True)
            for e in errors[:20]:
                print('    ' + e, flush=True)
            if self.opts.keep and self.kept < 5:
                self.kept += 1
                d = os.path.join(self.opts.keep, 'crash-fail-%d-%d' % (
                    self.opts.seed, self.trials))
                os.makedirs(d, exist_ok=True)
                for a in artifacts:
                    if a and os.path.exists(a):
                        sparse_copy(a, os.path.join(d, os.path.basename(a)))
                for f in os.listdir(self.work):
                    if f.endswith('.log'):
                        shutil.copy(os.path.join(self.work, f), d)
                with open(os.path.join(d, 'errors.txt'), 'w') as f:
                    f.write(label + '\n' + '\n'.join(errors) + '\n')
                print('    (kept in %s)' % d, flush=True)
        elif self.opts.verbose:
            print('ok   %s' % label, flush=True)
        for f in os.listdir(self.work):
            if f.endswith('.log'):
                os.unlink(os.path.join(self.work, f))


def pick_layout(rng, kind='plugin'):
    cs, ts, size = rng.choice(GEOMS)
    if kind == 'filter':
        ts = 4                          # the filter creates its overlays
    return Layout(cs, ts, size)


def workload_opts(ctx, rng):
    class O:
        pass
    o = O()
    o.overlap = 0.0 if rng.random() < 0.7 else 0.35
    o.pause = 0
    if ctx.opts.idle and rng.random() < 0.1:
        o.pause = 1.3
    return o


def run_workload(ctx, target, model, rng, server, duration, how):
    """Run until `duration` passes (or the n-th flush returns), then stop
    the server by `how`: kill9 (while the workload runs), kill9-after or
    term (after it stopped, and maybe a finale).  Returns (the time of
    the stop, workload errors)."""
    wl = Workload(model, server.uri(), rng, workload_opts(ctx, rng))
    model.desc = 'overlap %.2f%s' % (wl.opts.overlap,
                                     ', pauses' if wl.opts.pause else '')
    if rng.random() < 0.3:
        wl.flush_target = rng.randint(1, 6)
    wl.start(rng.randint(2, 4))
    if wl.flush_target is not None:
        wl.flush_done.wait(duration * 2)
    else:
        time.sleep(duration)
    if how != 'kill9':
        wl.join()
        if rng.random() < 0.5:
            model.desc += ', finale'
            wl.finale(rng)
    T = now()
    wl.killed = how.startswith('kill9')
    if how == 'kill9':
        server.kill9()
        wl.join()
    elif how == 'term':
        server.stop()
    elif how == 'kill9-after':
        server.kill9()
    return T, wl.errors


def kill_trial(ctx, kind, n):
    rng = random.Random('%d-%s-%d' % (ctx.opts.seed, kind, n))
    L = pick_layout(rng, kind)
    target = Target(ctx, kind, L, rng, '%s%d' % (kind, n))
    model = Model(L, target.base_units)
    label = '%s kill trial %d (cs=%d ts=%d size=%d %s)' % (
        kind, n, L.cs, L.ts, L.size, ' '.join(target.extra))
    errors = []
    srv = target.server('work')
    try:
        srv.start()
    except StartError as e:
        ctx.result(label, ['cannot start nbdkit: %s' % e])
        return
    T, werr = run_workload(ctx, target, model, rng, srv,
                           rng.uniform(0.1, 1.2) if rng.random() < 0.85
                           else rng.uniform(0.01, 0.05),
                           'kill9' if rng.random() < 0.8 else 'kill9-after')
    errors += werr
    model.index()
    model.check_reads(errors)
    label += ': %s' % model.last_flush_desc()
    crashed = os.path.join(target.dir, 'crashed.qed')
    sparse_copy(target.image, crashed)
    verr, _ = verify_image(ctx, target, target.image, model, POS,
                           model.durable_pred(POS), 'after SIGKILL',
                           qemu_compare=(n % 3 == 0))
    errors += verr
    ctx.result(label, errors, [crashed], cat=kind + ' SIGKILL')
    shutil.rmtree(target.dir, ignore_errors=True)


# Hand-made sequences on cs=4K ts=2 (an L2 table covers 4M) for cases a
# short random run rarely builds: clusters freed below a table that was
# allocated last, so that reclaiming them means moving the table; and a
# close with nothing to compact (the tail of the growth chunk is cut,
# then NEED_CHECK cleared).
K = 4096
SCENARIOS = [
    ('hole below the last table',
     [('write', 0, 10 * K, 0), ('flush', 0, 0, 0), ('trim', 2 * K, 2 * K, 0),
      ('flush', 0, 0, 0), ('write', 8 * M, K, 0), ('flush', 0, 0, 0)]),
    ('holes below two new tables',
     [('write', 0, 16 * K, 0), ('flush', 0, 0, 0),
      ('trim', 3 * K, K, 0), ('trim', 9 * K, 3 * K, 0), ('flush', 0, 0, 0),
      ('write', 8 * M, K, 0), ('write', 12 * M + 5 * K, 2 * K, 0),
      ('flush', 0, 0, 0)]),
    ('zeroed clusters then a table',
     [('write', 0, 32 * K, 0), ('write', 4 * M, K, 0), ('flush', 0, 0, 0),
      ('zero', 0, 32 * K, 0), ('flush', 0, 0, 0),
      ('write', 16 * M, 3 * K, nbd.CMD_FLAG_FUA)]),
    ('no frees, clean close',
     [('write', 0, 5 * K, 0), ('flush', 0, 0, 0), ('write', 8 * M, K, 0),
      ('write', 4 * M + K, 3 * K, nbd.CMD_FLAG_FUA)]),
    ('table between freed clusters',
     [('write', 0, 4 * K, 0), ('write', 8 * M, K, 0), ('write', 4 * K, 4 * K, 0),
      ('flush', 0, 0, 0), ('trim', 0, 8 * K, 0), ('flush', 0, 0, 0),
      ('write', 12 * M, K, 0)]),
    # (name, ops, nbdkit parameters, ops of a first run stopped cleanly)
    ('a free-cluster list written at the close',
     [('write', 0, 40 * K, 0), ('flush', 0, 0, 0), ('trim', 8 * K, 24 * K, 0),
      ('flush', 0, 0, 0), ('write', 8 * M, K, 0), ('trim', 36 * K, 4 * K, 0)],
     ['compact-limit=0'], None),
    ('a free-cluster list reused',
     [('write', M, 6 * K, 0), ('flush', 0, 0, 0), ('write', 8 * M, K, 0),
      ('write', 4 * M, 3 * K, nbd.CMD_FLAG_FUA), ('trim', 0, 8 * K, 0),
      ('flush', 0, 0, 0), ('write', 12 * M, 2 * K, 0)],
     ['compact-limit=0'],
     [('write', 0, 64 * K, 0), ('flush', 0, 0, 0), ('trim', 16 * K, 32 * K, 0),
      ('flush', 0, 0, 0)]),
]


def scenario(n):
    """(name, ops, nbdkit parameters, ops of a first clean run)."""
    sc = SCENARIOS[n % len(SCENARIOS)]
    return (sc + ([], None))[:4]


def scenario_first_run(ctx, target, model, rng, pre):
    """Run `pre` and stop cleanly (so that the image has, e.g., a free-
    cluster list before the run under test)."""
    if not pre:
        return
    srv = target.server('first')
    srv.start()
    try:
        wl = Workload(model, srv.uri(), rng, workload_opts(ctx, rng))
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        wl.sequence(h, pre)
        h.shutdown()
    finally:
        srv.stop()


def scenario_layout():
    L = Layout(4096, 2, 24 * M - 1536)
    L.zones = [(0, 2 * M), (4 * M, 5 * M), (8 * M, 9 * M), (12 * M, 13 * M),
               (16 * M, 17 * M)]
    L.rare = None
    return L


def scenario_trial(ctx, n, how):
    name, seq, extra, pre = scenario(n)
    rng = random.Random(n)
    L = scenario_layout()
    target = Target(ctx, 'plugin', L, rng, 'scen%d%s' % (n, how))
    target.extra = list(extra)
    model = Model(L, target.base_units)
    label = 'scenario "%s", then %s' % (name, how)
    srv = target.server('work')
    errors = []
    try:
        scenario_first_run(ctx, target, model, rng, pre)
        srv.start()
        wl = Workload(model, srv.uri(), rng, workload_opts(ctx, rng))
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        wl.sequence(h, seq)
        h.shutdown()
    except (StartError, nbd.Error) as e:
        errors.append('%s %s' % (e, srv.tail()))
    if how == 'term':
        srv.stop()
    else:
        srv.kill9()
    model.index()
    verr, _ = verify_image(ctx, target, target.image, model, POS,
                           model.durable_pred(POS), 'after ' + how)
    ctx.result(label, errors + verr, [target.image], cat='scenario')
    shutil.rmtree(target.dir, ignore_errors=True)


def power_run(ctx, kind, run_no, nrecon, nested_budget, scenario=None):
    """One journalled workload (or scenario), then nrecon
    reconstructions, up to nested_budget of which are repaired under the
    shim too (each giving --nested-per crash-in-repair trials).  Returns
    how many were."""
    rng = random.Random('%d-power-%s-%d' % (ctx.opts.seed, kind, run_no))
    if scenario:
        L = scenario_layout()
    else:
        L = pick_layout(rng, kind)
    target = Target(ctx, kind, L, rng, 'p%s%d' % (kind, run_no))
    model = Model(L, target.base_units)
    if scenario:
        target.extra = list(scenario[2])
        try:
            scenario_first_run(ctx, target, model, rng, scenario[3])
        except (StartError, nbd.Error) as e:
            ctx.result('power run %d' % run_no, ['first run: %s' % e])
            return 0
    initial = os.path.join(target.dir, 'initial.qed')
    journal = os.path.join(target.dir, 'journal')
    env = {'LD_PRELOAD': SHIM, 'CRASHSIM_FILE': target.image,
           'CRASHSIM_JOURNAL': journal}
    if os.path.exists(target.image):
        sparse_copy(target.image, initial)
    else:
        # The filter creates its overlay at start-up: the shim snapshots
        # it when its name appears (before that it cannot be harmed).
        env['CRASHSIM_SNAPSHOT'] = initial
    srv = target.server('work', env=env)
    try:
        srv.start()
    except StartError as e:
        ctx.result('power run %d' % run_no, ['cannot start nbdkit: %s' % e])
        return 0
    if scenario:
        how = 'term'
        werr = []
        wl = Workload(model, srv.uri(), rng, workload_opts(ctx, rng))
        model.desc = 'scenario "%s"' % scenario[0]
        try:
            h = nbd.NBD()
            h.connect_uri(srv.uri())
            wl.sequence(h, scenario[1])
            h.shutdown()
        except nbd.Error as e:
            werr.append('scenario: %s' % e)
        srv.stop()
    else:
        how = rng.choice(['kill9', 'kill9', 'term'])
        T, werr = run_workload(ctx, target, model, rng, srv,
                               rng.uniform(0.2, 0.8) if rng.random() < 0.85
                               else rng.uniform(0.01, 0.05), how)
    model.index()
    errs = list(werr)
    model.check_reads(errs)
    if errs:
        ctx.result('power run %d workload' % run_no, errs)
    if errs or not os.path.exists(journal):
        shutil.rmtree(target.dir, ignore_errors=True)
        return 0
    buf, recs = read_journal(journal)
    if len(recs) < 2:
        ctx.result('power run %d' % run_no, ['nothing was journalled'])
        shutil.rmtree(target.dir, ignore_errors=True)
        return 0
    ctx.result('power run %d: data before tables' % run_no,
               ordering_errors(initial, buf, recs), [initial, journal],
               cat='ordering')
    if how == 'term':
        # The journal is complete: replaying all of it must give the
        # file exactly (checks the shim and the replay).
        replay = os.path.join(target.dir, 'replay.qed')
        reconstruct(initial, replay, buf, recs, len(recs) - 1, ('all',), rng)
        if file_digest(replay) != file_digest(target.image):
            ctx.result('power run %d journal replay' % run_no,
                       ['replaying the whole journal does not give the '
                        'final file'], [initial, journal, target.image])
        os.unlink(replay)
    desc = 'power run %d (cs=%d ts=%d size=%d %s; %s; %d journal records, '\
        '%d barriers; ended by %s)' % (
            run_no, L.cs, L.ts, L.size, ' '.join(target.extra),
            model.last_flush_desc(), len(recs) - 1,
            sum(r.type == R_BARRIER for r in recs), how)
    if ctx.verbose:
        print(desc, flush=True)
    nested_done = 0
    for j in range(nrecon):
        k = choose_crash_point(rng, recs,
                               tail_bias=bool(scenario) or how == 'term')
        policy = make_policy(rng, recs)
        img = os.path.join(target.dir, 'crash%d.qed' % j)
        what = reconstruct(initial, img, buf, recs, k, policy, rng)
        T = recs[k].t
        sup = model.durable_pred(T)
        label = '%s, reconstruction %d: %s' % (desc, j, what)
        nested = nested_done < nested_budget and need_check(img)
        if nested:
            pre = img + '.pre'
            sparse_copy(img, pre)
            j2 = img + '.journal'
            env2 = {'LD_PRELOAD': SHIM, 'CRASHSIM_FILE': img,
                    'CRASHSIM_JOURNAL': j2}
            errors, content = verify_image(ctx, target, img, model, T, sup,
                                           'power-loss image', env=env2,
                                           post_writes=False)
            ctx.result(label, errors, [initial, journal, pre],
                       cat=kind + ' power-loss')
            if not errors and content is not None and os.path.exists(j2):
                nested_trials(ctx, target, model, T, sup, pre, j2, content,
                              rng, label)
                nested_done += 1
            for f in (pre, j2):
                if os.path.exists(f):
                    os.unlink(f)
        else:
            errors, _ = verify_image(ctx, target, img, model, T, sup,
                                     'power-loss image',
                                     ro_check=(j % 2 == 0),
                                     qemu_compare=(j % 4 == 1))
            ctx.result(label, errors, [initial, journal],
                       cat=kind + ' power-loss')
        os.unlink(img)
    shutil.rmtree(target.dir, ignore_errors=True)
    return nested_done


def exhaustive_run(ctx, n):
    """A scenario journalled to its clean close; then, for every barrier,
    the crash just before it with every subset of the unsynced mutations
    kept (if at most --exhaustive of them; else random subsets)."""
    name, seq, extra, pre = scenario(n)
    rng = random.Random('%d-exhaustive-%d' % (ctx.opts.seed, n))
    L = scenario_layout()
    target = Target(ctx, 'plugin', L, random.Random(n), 'x%d' % n)
    target.extra = [x for x in target.extra if x.startswith('(')] + extra
    model = Model(L, target.base_units)
    try:
        scenario_first_run(ctx, target, model, rng, pre)
    except (StartError, nbd.Error) as e:
        ctx.result('exhaustive "%s"' % name, ['first run: %s' % e])
        return
    initial = os.path.join(target.dir, 'initial.qed')
    journal = os.path.join(target.dir, 'journal')
    sparse_copy(target.image, initial)
    srv = target.server('work', env={'LD_PRELOAD': SHIM,
                                     'CRASHSIM_FILE': target.image,
                                     'CRASHSIM_JOURNAL': journal})
    try:
        srv.start()
        wl = Workload(model, srv.uri(), rng, workload_opts(ctx, rng))
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        wl.sequence(h, seq)
        h.shutdown()
        srv.stop()
    except (StartError, nbd.Error) as e:
        ctx.result('exhaustive "%s"' % name, ['%s %s' % (e, srv.tail())])
        return
    model.index()
    buf, recs = read_journal(journal)
    ctx.result('exhaustive "%s": data before tables' % name,
               ordering_errors(initial, buf, recs), [initial, journal],
               cat='ordering')
    for b, r in enumerate(recs):
        if r.type != R_BARRIER or b < 2:
            continue
        k = b - 1
        durable = max([x.aux for x in recs[:k + 1] if x.type == R_BARRIER],
                      default=0)
        tail = [i for i in range(max(1, durable), k + 1)
                if recs[i].type not in (R_BARRIER, R_START)]
        if not tail:
            continue
        full = ctx.opts.exhaustive
        if len(tail) <= full:
            subsets = [frozenset(i for j, i in enumerate(tail) if m >> j & 1)
                       for m in range(1 << len(tail))]
        else:
            subsets = {frozenset(i for i in tail if rng.random() < 0.5)
                       for _ in range(1 << full)}
        T = recs[k].t
        sup = model.durable_pred(T)
        for keep in subsets:
            img = os.path.join(target.dir, 'crash.qed')
            reconstruct(initial, img, buf, recs, k, ('set', keep), rng)
            errors, _ = verify_image(ctx, target, img, model, T, sup,
                                     'power-loss image', ro_check=False)
            ctx.result('exhaustive "%s": crash before barrier %d/%d, '
                       'keeping %s of %s' % (
                           name, b, len(recs) - 1,
                           sorted(keep) or 'none',
                           ['%d:%s' % (i, rec_class(recs[i])) for i in tail]),
                       errors, [initial, journal], cat='exhaustive')
            os.unlink(img)
    shutil.rmtree(target.dir, ignore_errors=True)


def nested_trials(ctx, target, model, T, sup, pre, journal, content, rng,
                  label):
    buf, recs = read_journal(journal)
    if len(recs) < 2:
        return 0
    n = 0
    for i in range(ctx.opts.nested_per):
        k = choose_crash_point(rng, recs)
        policy = make_policy(rng, recs)
        img = pre + '.n%d.qed' % i
        what = reconstruct(pre, img, buf, recs, k, policy, rng)
        errors, _ = verify_image(ctx, target, img, model, T, sup,
                                 'crash in the repair', ro_check=False,
                                 expect=content)
        ctx.result('%s; nested crash in the repair/close: %s' % (label, what),
                   errors, [pre, journal], cat='crash in repair')
        os.unlink(img)
        n += 1
    return n


def filter_usable(ctx):
    """Can the filter serve an overlay?  Sets ctx.filter_precreate."""
    if not os.path.exists(FILTER):
        return 'filter/nbdkit-qed-filter.so is not built'
    L = Layout(*GEOMS[0])
    rng = random.Random(1)
    last = ''
    for pre in (False, True):
        ctx.filter_precreate = pre
        t = Target(ctx, 'filter', L, rng, 'fprobe%d' % pre)
        srv = t.server('probe')
        try:
            srv.start()
            h = connect(srv.uri())
            h.pwrite(b'x' * 4096, 0)
            h.flush()
            h.shutdown()
            srv.stop()
            shutil.rmtree(t.dir, ignore_errors=True)
            return None
        except (StartError, nbd.Error) as e:
            last = '%s %s' % (e, srv.tail(3))
            try:
                srv.stop()
            except StartError:
                pass
        shutil.rmtree(t.dir, ignore_errors=True)
    return 'the filter does not serve an overlay: %s' % last


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--kill', type=int, default=10)
    ap.add_argument('--scenarios', type=int, default=len(SCENARIOS),
                    help='hand-made sequences (each ended by SIGTERM '
                    'and by SIGKILL)')
    ap.add_argument('--scenario-power', type=int, default=3,
                    help='power-loss reconstructions per scenario')
    ap.add_argument('--exhaustive', type=int, default=0, metavar='N',
                    help='for every barrier of every scenario, a crash '
                    'just before it keeping every subset of its unsynced '
                    'mutations if there are at most N (else 2^N random '
                    'subsets); 0 = off')
    ap.add_argument('--power-runs', type=int, default=2)
    ap.add_argument('--power', type=int, default=20,
                    help='power-loss reconstructions in all')
    ap.add_argument('--nested', type=int, default=3,
                    help='crash-in-repair trials in all')
    ap.add_argument('--nested-per', type=int, default=3)
    ap.add_argument('--filter-kill', type=int, default=0)
    ap.add_argument('--filter-power-runs', type=int, default=0)
    ap.add_argument('--filter-power', type=int, default=0)
    ap.add_argument('--seed', type=int, default=None)
    ap.add_argument('--idle', action='store_true',
                    help='also try idle-clean=1 and workload pauses')
    ap.add_argument('--keep', help='keep failing images in this directory')
    ap.add_argument('--tmpdir', default=None)
    ap.add_argument('--time-limit', type=float, default=0,
                    help='stop starting trials after this many seconds')
    ap.add_argument('--min', default='', metavar='CAT=N,...',
                    help='fail unless at least N trials of each category '
                    'ran (categories as in the summary line, with "-" '
                    'for spaces: plugin_SIGKILL=8,plugin_power-loss=10); '
                    'the time limit does not stop a category below its '
                    'minimum')
    ap.add_argument('-v', '--verbose', action='store_true')
    opts = ap.parse_args()
    if opts.seed is None:
        opts.seed = random.randrange(1 << 30)
    print('crash-harness: seed %d' % opts.seed, flush=True)
    ctx = Ctx(opts)
    t_start = time.time()
    # Private copies: the tree may be rebuilt while we run.
    for name in ('PLUGIN', 'FILTER', 'SHIM'):
        path = globals()[name]
        if os.path.exists(path):
            copy = os.path.join(ctx.work, os.path.basename(path))
            shutil.copy(path, copy)
            globals()[name] = copy

    mins = {}
    for want in filter(None, opts.min.split(',')):
        cat, n = want.rsplit('=', 1)
        mins[cat.replace('_', ' ')] = int(n)

    def time_left(cat=None):
        if cat and ctx.stats.get(cat, 0) < mins.get(cat, 0):
            return True
        return not opts.time_limit or time.time() - t_start < opts.time_limit

    # The journal shim is required when power-loss trials are asked for:
    # without it they would quietly not run.
    if (opts.scenario_power or opts.exhaustive or
            (opts.power_runs and opts.power) or opts.filter_power) and \
            not os.path.exists(SHIM):
        print('crash-harness: FAIL: %s is not built' % SHIM, flush=True)
        sys.exit(1)

    try:
        for n in range(opts.scenarios):
            for how in ('term', 'kill9'):
                scenario_trial(ctx, n, how)
            if opts.scenario_power and os.path.exists(SHIM):
                power_run(ctx, 'plugin', 1000 + n, opts.scenario_power, 1,
                          scenario=scenario(n))
            if opts.exhaustive and os.path.exists(SHIM):
                exhaustive_run(ctx, n)
        for n in range(opts.kill):
            if not time_left('plugin SIGKILL'):
                break
            kill_trial(ctx, 'plugin', n)
        if opts.power_runs and opts.power:
            if not os.path.exists(SHIM):
                print('crash-harness: %s is not built' % SHIM)
                ctx.failures += 1
            else:
                per = max(1, opts.power // opts.power_runs)
                # Nested images: each gives --nested-per trials.
                images = -(-opts.nested // opts.nested_per)
                for r in range(opts.power_runs):
                    if not (time_left('plugin power-loss') or
                            time_left('crash in repair')):
                        break
                    want = -(-images // (opts.power_runs - r))
                    images -= power_run(ctx, 'plugin', r, per, want)
        if opts.filter_kill or opts.filter_power:
            why = filter_usable(ctx)
            if why:
                # A filter that is built but cannot serve is a failure.
                print('crash-harness: FAIL: filter trials: %s' % why,
                      flush=True)
                ctx.failures += 1
            else:
                for n in range(opts.filter_kill):
                    if not time_left('filter SIGKILL'):
                        break
                    kill_trial(ctx, 'filter', n)
                if opts.filter_power_runs and opts.filter_power:
                    per = max(1, opts.filter_power // opts.filter_power_runs)
                    for r in range(opts.filter_power_runs):
                        if not time_left('filter power-loss'):
                            break
                        power_run(ctx, 'filter', r, per, 0)
    except Exception:
        traceback.print_exc()
        ctx.failures += 1
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    print('crash-harness: %.0f s, seed %d; %s' % (
        time.time() - t_start, opts.seed,
        ', '.join('%s %d' % kv for kv in sorted(ctx.stats.items()))))
    for cat, n in sorted(mins.items()):
        got = ctx.stats.get(cat, 0)
        if got < n:
            print('crash-harness: FAIL: %d %s trials, fewer than the '
                  'minimum %d' % (got, cat, n), flush=True)
            ctx.failures += 1
    print('trials %d, failures %d' % (ctx.trials, ctx.failures), flush=True)
    sys.exit(1 if ctx.failures else 0)


if __name__ == '__main__':
    main()
