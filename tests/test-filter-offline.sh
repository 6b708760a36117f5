#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: serving while the origin is away.  The origin is an nbdkit
# server the test stops and starts (the filter reaches it through the
# nbd plugin, which fails to open while it is down).  A complete
# overlay is served with the origin stopped, to new connections and
# after a restart of the filter; an incomplete one serves what it
# holds, fails the rest with EIO (storing nothing), takes whole-cluster
# writes, and fetches again once the origin is back (one log line),
# after the origin guard: a changed origin that comes back is not used.
# qed-prefetch pauses while the origin is away and resumes after.  The
# curl plugin over a stopped local HTTP server, too.
# test-timeout: 300
. "$(dirname "$0")/functions.sh"
requires nbdsh --version
requires qemu-img --version
cd "$tmp"

M=$((1024*1024))
head -c $((8*M)) /dev/urandom > base.raw

origin_up () {
  rm -f o.sock
  start_nbdkit o file base.raw
  ln -sf o.sock origin.sock
}
origin_down () { stop_nbdkit o; rm -f o.sock; }
serve () {
  local n=$1 ov=$2
  start_nbdkit "$n" --log=stderr --filter="$FILTER" nbd socket="$tmp/o.sock" \
    qed-overlay="$ov" qed-backing-name=base.raw
}

# 1. A complete overlay, the origin stopped: new connections are served.
origin_up
serve f ov.qed
nbdcopy "$(uri f)" warm.raw
cmp warm.raw base.raw
origin_down
for i in 1 2; do
  rm -f out.raw
  nbdcopy "$(uri f)" out.raw || fail "new connection $i refused with the origin away"
  cmp out.raw base.raw || fail "connection $i: different data"
done
grep -q "the plugin cannot be opened: serving the overlay" f.log
stop_nbdkit f
# ... and after a restart with the origin still away.
serve g ov.qed
rm -f out.raw
nbdcopy "$(uri g)" out.raw || fail "restart with the origin away: refused"
cmp out.raw base.raw
stop_nbdkit g
qemu_check ov.qed

# 2. An incomplete overlay: what it holds, EIO for the rest, never
# stored; writes of whole clusters; recovery when the origin is back.
origin_up
serve h part.qed
nbdsh -u "$(uri h)" -c "h.pread(4*$M, 0)"
stop_nbdkit h
origin_down
serve i part.qed
nbdsh -u "$(uri i)" -c "
b = open('base.raw', 'rb').read()
assert h.pread($M, $M) == b[$M:2*$M]
for off in (4*$M, 6*$M + 12345):
    try:
        h.pread(4096, off)
        assert False, 'a missing cluster was served'
    except nbd.Error as e:
        assert e.errno == 'EIO', e
h.pwrite(b'w' * 65536, 7*$M)
assert h.pread(65536, 7*$M) == b'w' * 65536
h.flush()
"
# Nothing was stored for the failed reads.
qemu-img map -U --output=json part.qed | /usr/bin/python3 -c "
import json, sys
for e in json.load(sys.stdin):
    if e['start'] <= 4*$M < e['start'] + e['length']:
        assert e['depth'] == 1 and e['data'], ('stored while away', e)
"
origin_up
wait_log i "the origin is back: missing clusters are fetched again"
nbdsh -u "$(uri i)" -c "
b = open('base.raw', 'rb').read()
assert h.pread(4096, 4*$M) == b[4*$M:4*$M+4096]
assert h.pread(65536, 6*$M) == b[6*$M:6*$M+65536]
assert h.pread(65536, 7*$M) == b'w' * 65536
"
stop_nbdkit i
qemu_check part.qed

# 3. The origin comes back changed: the guard runs first, and the
# missing clusters stay unreadable.
serve j part2.qed
nbdsh -u "$(uri j)" -c "h.pread(4*$M, 0)"
stop_nbdkit j
origin_down
serve k part2.qed
# One connection stays open across the origin's return (as a VM's).
cat > reader.py <<'EOF'
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert len(h.pread(4096, 0)) == 4096
print("connected", flush=True)
for line in sys.stdin:
    try:
        h.pread(4096, int(line))
        print("ok", flush=True)
    except nbd.Error as e:
        print(e.errno, flush=True)
EOF
coproc READER { /usr/bin/python3 reader.py "$(uri k)"; }
read -r line <&"${READER[0]}"
[ "$line" = connected ] || fail "reader: $line"
cp base.raw orig.raw
printf 'CHANGED' | dd of=base.raw bs=1 seek=10 conv=notrunc status=none
origin_up
wait_log k "the origin is back but changed"
grep -q "guest offset 0 changed" k.log
# The held clusters still read; the missing ones stay unreadable.
echo 0 >&"${READER[1]}"; read -r line <&"${READER[0]}"
[ "$line" = ok ] || fail "a held cluster: $line"
echo $((6*M)) >&"${READER[1]}"; read -r line <&"${READER[0]}"
[ "$line" = EIO ] || fail "a changed origin was used: $line"
eval "exec ${READER[1]}>&-"
wait "$READER_PID" || true
# A new connection (it opens the changed plugin) is refused by the guard.
if nbdinfo --size "$(uri k)" >/dev/null 2>&1; then
  fail "a new connection to the changed origin was served"
fi
stop_nbdkit k
origin_down

# 4. qed-prefetch over an origin that goes away mid-way: it pauses,
# retries, resumes when the origin is back, and what it copied is the
# origin's data (nothing marked copied that was not).
cp orig.raw base.raw
rm -f o.sock
start_nbdkit o --filter=log --filter=delay file base.raw logfile=o.reads \
  rdelay=500ms
start_nbdkit p --log=stderr --filter="$FILTER" nbd socket="$tmp/o.sock" \
  qed-overlay=pf.qed qed-backing-name=base.raw qed-prefetch=true
nbdinfo --size "$(uri p)" >/dev/null
# The first 2M chunk is in: three to go when the origin stops.
until grep -q '\.\.\.Read .*return=0' o.reads 2>/dev/null; do sleep 0.1; done
origin_down
wait_log p "qed-prefetch: the origin failed at .*: paused, retrying"
origin_up
wait_log p "qed-prefetch: the origin is back: resuming"
wait_log p "qed-prefetch: done"
stop_nbdkit p
qemu_check pf.qed
qemu-img compare -f qed -F raw pf.qed base.raw ||
  fail "the prefetch across an origin outage stored other data"
origin_down

# 5. The same over the curl plugin against a local HTTP server that is
# stopped: a complete overlay serves new connections.
if nbdkit curl --version >/dev/null 2>&1; then
  mkdir www
  cp orig.raw www/disk.img
  start_nginx "$tmp/www"
  start_nbdkit q --log=stderr --filter="$FILTER" curl "$NGINX_URL/disk.img" \
    qed-overlay=web.qed qed-backing-name=disk.img
  nbdcopy "$(uri q)" web1.raw
  cmp web1.raw orig.raw
  kill "$NGINX_PID"; wait "$NGINX_PID" || true
  rm -f web2.raw
  nbdcopy "$(uri q)" web2.raw ||
    { tail -n 30 "$tmp/q.log"; fail "curl: refused with the server stopped"; }
  cmp web2.raw orig.raw || fail "curl: different data with the server stopped"
  grep -q "the plugin cannot be opened: serving the overlay" q.log
  echo "curl: served with the HTTP server stopped"
  stop_nbdkit q
fi
echo OK
