#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: concurrency stress.  Many connections (one thread each) read
# (which fills the overlay from the backend) and write/zero/trim the
# SAME clusters at once, with a small delay beneath the filter so that
# copy-on-read fills are still in flight when writes to their clusters
# complete.  Writers are serialised per 4K block, reads run freely; a
# read that no write overlapped must match the model, and afterwards
# every acknowledged write must read back (also after a restart), the
# backend must be unchanged and the overlay must pass qemu-img check.
. "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires /usr/bin/python3 -c 'import nbd'
cd "$tmp"

M=$((1024*1024))
head -c $((6*M)) /dev/urandom > base.raw
truncate -s $((8*M)) base.raw           # a hole at 6M-8M
cp base.raw model.raw
sum=$(md5sum < base.raw)

cat > stress.py <<'EOF'
import random, sys, threading, time
import nbd

uri, seed, nthreads, seconds = sys.argv[1], int(sys.argv[2]), \
    int(sys.argv[3]), float(sys.argv[4])
model = bytearray(open('model.raw', 'rb').read())
size = len(model)
B = 4096
M = 1024 * 1024
nblocks = size // B
lock = threading.Lock()
locked = [False] * nblocks      # a write or zero is in flight
version = [0] * nblocks         # bumped when a write starts and ends
stats = {'read': 0, 'checked': 0, 'write': 0, 'zero': 0, 'trim': 0}
errors = []

def blocks(off, n):
    return range(off // B, (off + n - 1) // B + 1)

def worker(tid):
    r = random.Random(seed * 100 + tid)
    h = nbd.NBD()
    h.connect_uri(uri)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end and not errors:
            # A hot window that moves over the disk, so that there are
            # always unallocated clusters to race on.
            phase = int((time.monotonic() - end + seconds) * 4)
            lo = (phase * 512 * 1024) % (size - M)
            off = lo + r.randrange(M)
            n = min(r.choice([1, 700, 4096, 8192, 65536, 100000]),
                    size - off)
            op = r.choice(['read', 'read', 'read', 'write', 'write',
                           'zero', 'trim'])
            bl = blocks(off, n)
            if op == 'read':
                with lock:
                    ok = not any(locked[b] for b in bl)
                    v = [version[b] for b in bl]
                data = h.pread(n, off)
                stats['read'] += 1
                with lock:
                    if ok and v == [version[b] for b in bl]:
                        stats['checked'] += 1
                        if data != model[off:off+n]:
                            errors.append('read mismatch at %d+%d' % (off, n))
                continue
            if op == 'trim':
                # Only whole clusters: they become zero clusters.
                off = off // 65536 * 65536
                n = 65536 * r.randrange(1, 3)
                if off + n > size:
                    continue
                bl = blocks(off, n)
            with lock:
                if any(locked[b] for b in bl):
                    continue
                for b in bl:
                    locked[b] = True
                    version[b] += 1
            if op == 'write':
                buf = r.randbytes(n)
                h.pwrite(buf, off, r.choice([0, 0, 0, nbd.CMD_FLAG_FUA]))
            elif op == 'zero':
                buf = bytes(n)
                h.zero(n, off, r.choice([0, nbd.CMD_FLAG_NO_HOLE]))
            else:
                buf = bytes(n)
                h.trim(n, off)
            stats[op] += 1
            with lock:
                model[off:off+n] = buf
                for b in bl:
                    locked[b] = False
                    version[b] += 1
            if r.random() < 0.02:
                h.flush()
    except Exception as e:
        errors.append('thread %d: %r' % (tid, e))

threads = [threading.Thread(target=worker, args=(t,))
           for t in range(nthreads)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(stats)
if errors:
    print('\n'.join(errors[:10]))
    sys.exit(1)
# Everything acknowledged reads back, through a new connection.
h = nbd.NBD()
h.connect_uri(uri)
for off in range(0, size, M):
    if h.pread(M, off) != model[off:off+M]:
        print('final mismatch in the 1M at %d' % off)
        sys.exit(1)
h.flush()
open('model.raw', 'wb').write(model)
assert stats['checked'] > 100 and stats['write'] > 100, stats
EOF

# 1: 64K clusters, a delay beneath so fills race with writes.
start_nbdkit s1 --filter="$FILTER" --filter=delay file base.raw rdelay=2ms \
  qed-overlay=ov.qed
/usr/bin/python3 stress.py "$(uri s1)" 1 12 8 || fail "stress run 1 failed"
stop_nbdkit s1
qemu_check ov.qed
[ "$(need_check ov.qed)" = 0 ] || fail "NEED_CHECK set after a clean stop"

# 2: reopen the same overlay, more stress, no delay.
start_nbdkit s2 --filter="$FILTER" file base.raw qed-overlay=ov.qed
nbdcopy "$(uri s2)" out.raw
cmp out.raw model.raw || fail "data lost across the restart"
/usr/bin/python3 stress.py "$(uri s2)" 2 12 6 || fail "stress run 2 failed"
stop_nbdkit s2
qemu_check ov.qed

# 3: small clusters (more metadata traffic), temporary overlay.
cp base.raw model.raw
start_nbdkit s3 --filter="$FILTER" --filter=delay file base.raw rdelay=1ms \
  qed-cluster-size=4K
/usr/bin/python3 stress.py "$(uri s3)" 3 12 6 || fail "stress run 3 failed"
stop_nbdkit s3

[ "$(md5sum < base.raw)" = "$sum" ] || fail "base.raw was modified"
echo OK
