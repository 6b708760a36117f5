#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Odds and ends: -r on a read-only file; --dump-plugin; bad parameters
# fail with clear errors; multi-conn (a flush on one connection covers
# another's writes); many concurrent writes to neighbouring 4K pieces of
# the same clusters (one connection with many requests in flight, and
# several connections at once), with and without a backing file, must
# all read back (the per-cluster reservation), and QEMU reads the result.
source "$(dirname "$0")/functions.sh"
# run_nbdkit ARGS... --run CMD: a captive nbdkit on a socket in $tmp
# (nbdkit leaves the socket file behind, so remove it first).
requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'

K=1024 M=$((1024 * 1024))

# ---- 1. -r on a read-only file.
qemu-img create -q -f qed "$tmp/ro.qed" 4M
qemu-io -f qed -c "write -P 0x42 0 100k" "$tmp/ro.qed" >/dev/null
chmod 444 "$tmp/ro.qed"
sum=$(md5sum < "$tmp/ro.qed")
start_nbdkit ro -r "$PLUGIN" "$tmp/ro.qed"
/usr/bin/python3 - "$(uri ro)" <<'EOF' || fail "-r serving"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.is_read_only()
assert h.pread(100 * 1024, 0) == b"\x42" * (100 * 1024)
try:
    h.pwrite(b"x", 0)
    raise SystemExit("write to a read-only export succeeded")
except nbd.Error:
    pass
EOF
stop_nbdkit ro
[ "$(md5sum < "$tmp/ro.qed")" = "$sum" ] || fail "-r modified the file"
# Without -r, a file we cannot write is served read-only.  Root can
# write anything: run that server as nobody (CI runs as root).
as_user=()
if [ "$(id -u)" = 0 ]; then
  as_user=(runuser -u nobody --)
  chmod 755 "$tmp"
  "${as_user[@]}" test -r "$PLUGIN" -a -r "$tmp/ro.qed" ||
    fail "nobody cannot read $PLUGIN or $tmp/ro.qed (check permissions)"
fi
out=$("${as_user[@]}" nbdkit -U - "$PLUGIN" "$tmp/ro.qed" \
        --run 'nbdinfo --is read-only "$uri" && echo read-only') ||
  fail "serving a 0444 file without -r failed"
[ "$out" = read-only ] || fail "0444 served writable"
[ "$(md5sum < "$tmp/ro.qed")" = "$sum" ] || fail "the 0444 file was modified"
echo "ok: read-only"

# ---- 2. --dump-plugin and --help.
nbdkit "$PLUGIN" --dump-plugin > "$tmp/dump"
for l in name=qed thread_model=parallel has_extents=1 has_can_multi_conn=1 \
         qed_zero_clusters=yes qed_backing_formats=raw,qed \
         qed_default_l2_cache=33554432; do
  grep -qx "$l" "$tmp/dump" || { cat "$tmp/dump"; fail "--dump-plugin: no $l"; }
done
nbdkit "$PLUGIN" --help | grep -q 'zero-detect=' || fail "--help lacks our parameters"
echo "ok: --dump-plugin"

# ---- 3. Bad parameters: non-zero exit and a message saying what is wrong.
bad () {
  local pat=$1; shift
  if run_nbdkit "$PLUGIN" "$@" --run 'exit 0' >"$tmp/err" 2>&1; then
    fail "accepted: $*"
  fi
  grep -Eq "$pat" "$tmp/err" || { cat "$tmp/err"; fail "no '$pat' for: $*"; }
}
img=$tmp/ro.qed
bad "unknown parameter 'bogus'" "$img" bogus=1
bad "l2-cache.*'abc'|abc" "$img" l2-cache=abc
bad "l2-cache" "$img" l2-cache=1K
bad "size.*'12Q'|12Q" "$tmp/n.qed" create=true size=12Q
bad "cluster-size" "$tmp/n.qed" create=true size=1M cluster-size=1000
bad "follow-backing: expected true or false" "$img" follow-backing=maybe
bad "unknown format 'vmdk'" "$img" backing-override-format=vmdk
bad "supply the file" 
bad "nonexistent.qed.*No such file" "$tmp/nonexistent.qed"
qemu-img create -q -f raw "$tmp/plain.raw" 1M
bad "not a QED image" "$tmp/plain.raw"
qemu-img create -q -f qcow2 "$tmp/q.qcow2" 1M
bad "not a QED image" "$tmp/q.qcow2"
echo "ok: bad parameters"

# ---- 4. Concurrency.
cat > "$tmp/conc.py" <<'EOF'
import nbd, random, sys, threading
uri, size, cs, seed, backing, out = sys.argv[1:7]
size, cs, seed = int(size), int(cs), int(seed)
K = 1024
rng = random.Random(seed)
model = bytearray(size)
if backing:
    b = open(backing, "rb").read()[:size]
    model[:len(b)] = b

def connect():
    h = nbd.NBD(); h.connect_uri(uri); return h

# 4K pieces of the first 32 clusters, every 5th left alone (its cluster
# must still show the backing data there), plus some unaligned pieces
# straddling cluster boundaries; shuffled.
pieces = [(off, 4 * K) for off in range(0, 32 * cs, 4 * K)
          if (off // (4 * K)) % 5 != 4]
pieces += [(c * cs - 1000, 3000) for c in range(1, 32, 3)]
rng.shuffle(pieces)
writes = []
for i, (off, n) in enumerate(pieces):
    data = bytes([i % 250 + 1]) * n
    writes.append((off, data))
# Unaligned pieces overlap aligned ones: the model applies them in the
# order of completion, so keep overlapping writes in separate phases.
phase1 = [w for w in writes if w[0] % (4 * K) == 0]
phase2 = [w for w in writes if w[0] % (4 * K) != 0]

# (a) One connection, up to 64 requests in flight.
h = connect()
assert h.can_multi_conn()
def aio_all(h, ws):
    bufs = []
    for off, data in ws:
        while h.aio_in_flight() >= 64:
            h.poll(-1)
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        bufs.append(buf)
        h.aio_pwrite(buf, off, completion=lambda err: 0)
    while h.aio_in_flight() > 0:
        h.poll(-1)
half = len(phase1) // 2
aio_all(h, phase1[:half])
for off, data in phase1[:half]:
    model[off:off+len(data)] = data

# (b) Four connections at once, each with requests in flight, the rest
# of the pieces interleaved between them.
hs = [connect() for _ in range(4)]
errors = []
def worker(j):
    try:
        aio_all(hs[j], phase1[half:][j::4])
    except Exception as e:
        errors.append(e)
ts = [threading.Thread(target=worker, args=(j,)) for j in range(4)]
for t in ts: t.start()
for t in ts: t.join()
assert not errors, errors
for off, data in phase1[half:]:
    model[off:off+len(data)] = data
aio_all(hs[1], phase2)
for off, data in phase2:
    model[off:off+len(data)] = data

# Multi-conn: writes on connections 0 and 2, flush on 3, read on 1.
h.pwrite(b"\xaa" * 5000, size - 9000)
hs[2].pwrite(b"\xbb" * 3000, size - 3000)
model[size-9000:size-4000] = b"\xaa" * 5000
model[size-3000:] = b"\xbb" * 3000
hs[3].flush()
for p in range(0, size, 1 << 20):
    got = hs[1].pread(min(1 << 20, size - p), p)
    if got != model[p:p+len(got)]:
        i = next(i for i in range(len(got)) if got[i] != model[p+i])
        sys.exit("mismatch at %d: got %#x want %#x" % (p + i, got[i], model[p+i]))
open(out, "wb").write(model)
EOF

for v in plain back; do
  for cs in 65536 16384; do
    name=$v$cs
    img=$tmp/$name.qed b=() back=""
    size=$((32 * cs + 1*M))
    if [ $v = back ]; then
      back=$tmp/$name.raw
      qemu-img create -q -f raw "$back" $size
      qemu-io -f raw -c "write -P 7 0 $size" "$back" >/dev/null
      b=(-b "$name.raw" -F raw)
    fi
    qemu-img create -q -f qed "${b[@]}" -o cluster_size=$cs,table_size=2 "$img" $size
    start_nbdkit $name "$PLUGIN" "$img"
    /usr/bin/python3 "$tmp/conc.py" "$(uri $name)" $size $cs 7 "$back" "$tmp/$name.model" ||
      fail "$name: concurrent writes lost"
    stop_nbdkit $name
    qemu_check "$img"
    qemu-img compare -q -F raw "$img" "$tmp/$name.model" || fail "$name: QEMU reads differently"
    echo "ok: concurrency $name"
  done
done
echo PASS
