#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Property test: random operations with random injected faults.

Usage: fault-property.py --plugin SO --shim SO [--trials N] [--seed S]
                         [--first N] [--tmpdir DIR] [--keep DIR]

Each trial serves a fresh image (random geometry, sometimes on a small
tmpfs that fills up) through the plugin with tests/faultsim.so
preloaded, and runs random writes, zeroes, trims, flushes and reads
from one client while random faults are armed and disarmed: EIO, ENOSPC
(or EOPNOTSUPP for hole punching) on pread, pwrite, fdatasync, ftruncate
and fallocate, once, a few times or for good.  Requests may fail; the
server must not.  In some trials with idle-clean=1, the idle writeback
runs first: if it clears NEED_CHECK, `qemu-img check -U` must find the
served image clean.  Then a clean stop (SIGTERM), and:
  1. nbdkit exited 0 (it may report a failed close: exit 0 still);
  2. `qemu-img check` finds no corruption, and leaks only if NEED_CHECK
     is set;
  3. a writable reopen without faults, with space, and a clean stop:
     `qemu-img check` exits 0 and NEED_CHECK is clear;
  4. every byte the client wrote (or zeroed) successfully, and did not
     touch later with a failed request, reads back (after the reopen).
Prints the seed first, one line per failing trial, and a summary
"fault-property: N trials, F failures, T s (seed S, trials A-B)";
exits 1 on failure.  Trial n of seed S draws its operations and faults
from its own generator, so `--seed S --first n --trials 1` (make
fault-test SEED=S FIRST=n TRIALS=1) replays it (only the timing may
differ); --keep DIR keeps a failing trial's files (image, nbdkit log,
fault log).
"""

import argparse
import errno
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import nbd

# Of the trials with idle-clean=1, the share that waits for the idle
# writeback and checks the image while served.
IDLE_CHECK = 0.3

KINDS = ["pread", "pwrite", "fdatasync", "ftruncate", "fallocate"]


def need_check(path):
    with open(path, "rb") as f:
        f.seek(16)
        return bool(struct.unpack("<Q", f.read(8))[0] & 2)


def qemu_check(path, *opts):
    p = subprocess.run(["qemu-img", "check"] + list(opts) + [path],
                       capture_output=True,
                       text=True)
    return p.returncode, p.stdout + p.stderr


class Server:
    def __init__(self, plugin, image, sock, log, env=None, extra=()):
        self.sock = sock
        # freelist=false: clean means no leaks at all, as QEMU sees it.
        cmd = ["nbdkit", "-f", "-v", "-U", sock, plugin, image,
               "freelist=false"] + list(extra)
        e = dict(os.environ)
        e.update(env or {})
        self.logf = open(log, "ab")
        if os.path.exists(sock):
            os.unlink(sock)
        self.p = subprocess.Popen(cmd, env=e, stdout=self.logf,
                                  stderr=self.logf)
        # A loaded machine starts slowly: the bound only stops a server
        # that never listens.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.exists(sock) or self.p.poll() is not None:
                break
            time.sleep(0.02)
        if not os.path.exists(sock):
            raise RuntimeError("nbdkit did not start")

    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            rc = self.p.wait(300)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = "hang"
        self.logf.close()
        return rc


def connect(uri):
    # The socket file appears just before nbdkit listens on it.
    deadline = time.monotonic() + 60
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            return h
        except nbd.Error as e:
            if e.errnum != errno.ECONNREFUSED or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def arm(fdir, rng):
    kind = rng.choice(KINDS)
    if kind == "fallocate" and rng.random() < 0.4:
        spec = "EOPNOTSUPP 0 -1 punch"
    else:
        err = rng.choice(["EIO", "EIO", "ENOSPC"])
        skip = rng.choice([0, 0, 1, 2, 5])
        count = rng.choice([1, 1, 2, 3, -1])
        spec = "%s %d %d" % (err, skip, count)
    with open(os.path.join(fdir, kind + ".new"), "w") as f:
        f.write(spec + "\n")
    os.rename(os.path.join(fdir, kind + ".new"), os.path.join(fdir, kind))
    return "%s=%s" % (kind, spec)


def disarm(fdir):
    for k in KINDS:
        try:
            os.unlink(os.path.join(fdir, k))
        except FileNotFoundError:
            pass


def trial(opts, n, rng, work):
    tdir = os.path.join(work, "t%d" % n)
    os.makedirs(tdir)
    small = None
    if rng.random() < 0.3:
        small = os.path.join(tdir, "small")
        os.makedirs(small)
        size_mb = rng.choice([2, 3, 4, 6])
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dM" % size_mb,
                        "tmpfs", small], check=True)
    idir = small or tdir
    image = os.path.join(idir, "disk.qed")
    fdir = os.path.join(tdir, "faults")
    os.makedirs(fdir)
    cs = rng.choice([4096, 65536])
    ts = rng.choice([1, 2, 4]) if cs == 4096 else 4
    if ts == 1:
        ts = 2                      # QEMU cannot open table_size 1
    size = rng.choice([4, 8, 16]) << 20
    subprocess.run(["qemu-img", "create", "-q", "-f", "qed", "-o",
                    "cluster_size=%d,table_size=%d" % (cs, ts), image,
                    str(size)], check=True)
    desc = ["cs=%d ts=%d size=%dM%s" % (cs, ts, size >> 20,
                                        " tmpfs" if small else "")]
    env = {"LD_PRELOAD": opts.shim, "FAULTSIM_FILE": image,
           "FAULTSIM_DIR": fdir}
    log = os.path.join(tdir, "nbdkit.log")
    errors = []
    model = {}                      # 512-byte sector -> byte value or None
    idle = rng.random() < 0.3
    srv = Server(opts.plugin, image, os.path.join(tdir, "s.sock"), log, env,
                 ["idle-clean=1"] if idle else [])
    try:
        h = connect(srv.uri())
        nops = rng.randrange(20, 80)
        for i in range(nops):
            if rng.random() < 0.12:
                desc.append(arm(fdir, rng))
            elif rng.random() < 0.08:
                disarm(fdir)
                desc.append("disarm")
            op = rng.choice(["write", "write", "write", "zero", "trim",
                             "flush", "read"])
            off = rng.randrange(0, size // 512) * 512
            ln = min(rng.choice([512, 4096, cs, 3 * cs, 1 << 20]),
                     size - off)
            secs = range(off // 512, (off + ln) // 512)
            val = rng.randrange(1, 256)
            try:
                if op == "write":
                    h.pwrite(bytes([val]) * ln, off)
                    for s in secs:
                        model[s] = val
                elif op == "zero":
                    h.zero(ln, off)
                    for s in secs:
                        model[s] = 0
                elif op == "trim":
                    h.trim(ln, off)
                    for s in secs:
                        model[s] = None     # zeros or the old data
                elif op == "flush":
                    h.flush()
                else:
                    h.pread(ln, off)
            except nbd.Error:
                if op in ("write", "zero", "trim"):
                    for s in secs:
                        model[s] = None
            if small and rng.random() < 0.05:
                # Fill the file system, or make room again.
                filler = os.path.join(small, "filler")
                if os.path.exists(filler):
                    os.unlink(filler)
                    desc.append("room")
                else:
                    subprocess.run(["dd", "if=/dev/zero", "of=" + filler,
                                    "bs=64k"], stderr=subprocess.DEVNULL)
                    desc.append("full")
        try:
            h.shutdown()
        except nbd.Error:
            pass
    except nbd.Error as e:
        errors.append("client: %s" % e)
    disarm(fdir)
    if small and os.path.exists(os.path.join(small, "filler")):
        os.unlink(os.path.join(small, "filler"))
    # 1a. Sometimes let the idle timer run first: while served, a clear
    # NEED_CHECK on disk means a clean image (faults now off, so the
    # writeback can clear it; nothing writes once it has).
    if idle and rng.random() < IDLE_CHECK:
        for _ in range(25):
            time.sleep(0.1)
            if not need_check(image):
                qrc, qout = qemu_check(image, "-U")
                if qrc != 0:
                    errors.append("idle: NEED_CHECK clear, qemu-img check "
                                  "exit %d: %s" % (qrc, qout.strip()))
                break
    rc = srv.stop()
    if rc not in (0, 1):
        errors.append("nbdkit exited with %s" % rc)

    # 2. After the faulty run: no corruption, leaks only with NEED_CHECK.
    qrc, qout = qemu_check(image)
    if qrc == 3 and not need_check(image):
        errors.append("leaked clusters with NEED_CHECK clear")
    elif qrc not in (0, 3):
        errors.append("qemu-img check exit %d: %s" % (qrc, qout.strip()))

    # 3. and 4. A writable reopen with space and no faults (a copy on
    # the big file system, if the trial ran on a small one).
    if not errors and small:
        copy = os.path.join(tdir, "disk.qed")
        subprocess.run(["cp", "--sparse=always", image, copy], check=True)
        image = copy
    if not errors:
        srv = Server(opts.plugin, image, os.path.join(tdir, "s.sock"), log)
        try:
            h = connect(srv.uri())
            data = h.pread(size, 0) if size <= (16 << 20) else b""
            h.shutdown()
            bad = [s for s, v in model.items()
                   if v is not None and
                   data[s * 512:(s + 1) * 512] != bytes([v]) * 512]
            if bad:
                errors.append("%d sectors lost, first at offset %d" %
                              (len(bad), min(bad) * 512))
        except nbd.Error as e:
            errors.append("reopen: %s" % e)
        rc = srv.stop()
        if rc != 0:
            errors.append("reopened nbdkit exited with %s" % rc)
        qrc, qout = qemu_check(image)
        if qrc != 0:
            errors.append("after a clean reopen: qemu-img check exit %d" %
                          qrc)
        if need_check(image):
            errors.append("after a clean reopen: NEED_CHECK set")
    if errors and opts.keep:
        os.makedirs(opts.keep, exist_ok=True)
        keep = os.path.join(opts.keep, "fault-trial-%d-%d" % (opts.seed, n))
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(tdir, keep, ignore=shutil.ignore_patterns("*.sock"))
    if small:
        subprocess.run(["umount", "-l", small])
    shutil.rmtree(tdir, ignore_errors=True)
    return errors, " ".join(desc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plugin", required=True)
    ap.add_argument("--shim", required=True)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--keep", default=None)
    ap.add_argument("--first", type=int, default=0,
                    help="start at this trial (to replay one)")
    opts = ap.parse_args()
    if opts.seed is None:
        opts.seed = random.randrange(1 << 30)
    for f in (opts.plugin, opts.shim):
        if not os.path.exists(f):
            print("fault-property: FAIL: %s is missing" % f)
            sys.exit(1)
    print("fault-property: seed %d, %d trials from %d" %
          (opts.seed, opts.trials, opts.first),
          flush=True)
    work = tempfile.mkdtemp(prefix="qed-faults.", dir=opts.tmpdir)
    failures = 0
    t0 = time.time()
    try:
        for n in range(opts.first, opts.first + opts.trials):
            rng = random.Random("%d-%d" % (opts.seed, n))
            errors, desc = trial(opts, n, rng, work)
            if errors:
                failures += 1
                print("FAIL trial %d (%s): %s" % (n, desc, "; ".join(errors)),
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("fault-property: %d trials, %d failures, %.0f s (seed %d, "
          "trials %d-%d)" % (opts.trials, failures, time.time() - t0,
                             opts.seed, opts.first,
                             opts.first + opts.trials - 1), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
