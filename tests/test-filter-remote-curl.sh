#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter over a real remote backend: nbdkit's curl plugin against nginx
# on 127.0.0.1 (Range requests), with a persistent overlay.
#  1. the first nbdkit reads the whole disk (nbdcopy) and random ranges:
#     data equal to the source, every HTTP read a Range request;
#  2. a second nbdkit with the same overlay makes the same reads and
#     gets 0 bytes from the HTTP server (its access log) and 0 reads
#     from the plugin (the stats filter);
#  3. sequential 64K reads at queue depth 1 on a new overlay cost a few
#     large Range requests (read-ahead), not one per cluster;
#  4. what is cached shows in qemu-img map of the overlay and in
#     nbdinfo --map of the overlay served alone, while the filter runs.
. "$(dirname "$0")/functions.sh"
requires nbdsh --version
requires nbdcopy --version
requires qemu-img --version
nbdkit curl --version >/dev/null 2>&1 ||
  fail "nbdkit's curl plugin is missing (Debian's nbdkit package has it)"
cd "$tmp"
M=$((1024*1024))
mkdir www
{ head -c $((16*M)) /dev/urandom; head -c $((8*M)) /dev/zero
  head -c $((8*M)) /dev/urandom; head -c $((8*M)) /dev/zero; } > www/disk.img
size=$((40*M))
start_nginx "$tmp/www"
url=$NGINX_URL/disk.img

# plugin_reads STATS: reads counted by the stats filter (no line: none).
plugin_reads () { awk '/^read:/ { n = $2 } END { print n + 0 }' "$1"; }
serve () {          # serve NAME OVERLAY: the filter over stats over curl
  start_nbdkit "$1" --filter="$FILTER" --filter=stats curl "$url" \
    statsfile="$tmp/$1.stats" qed-overlay="$tmp/$2"
}
random_reads () {   # random_reads NAME: 300 random reads, checked
  nbdsh -u "$(uri "$1")" -c "
import random
r = random.Random(3)
want = open('www/disk.img', 'rb').read()
for _ in range(300):
    n = r.choice([512, 4096, 65536, 200000])
    o = r.randrange(0, len(want) - n)
    assert h.pread(n, o) == want[o:o+n], (n, o)
"
}

# 1. First run.
serve c1 cache.qed
nbdcopy "$(uri c1)" copy1.raw
cmp copy1.raw www/disk.img || fail "first run: data differs"
random_reads c1
stop_nbdkit c1
first=$(http_body_bytes)
echo "first run: $first bytes over HTTP in" \
     "$(grep -c '^GET' nginx/access.log) GET requests"
[ "$first" -ge $size ] || fail "first run read only $first bytes over HTTP?"
grep -q '^GET 206 .*"bytes=' nginx/access.log || fail "no Range requests"
grep '^GET' nginx/access.log | grep -vq '^GET 206 ' &&
  fail "a GET that was not a Range request"
qemu_check cache.qed

# 2. Second run, same overlay: nothing from the server but the origin
# guard's sample (at most 64 clusters of 64K, read once at open).
serve c2 cache.qed
nbdcopy "$(uri c2)" copy2.raw
cmp copy2.raw www/disk.img || fail "second run: data differs"
random_reads c2
# 4. (while c2 runs) what is cached: the whole disk, data where the
# source has data, zero clusters where it has zeros.
qemu-img map -U --output=json cache.qed > map.json
start_nbdkit ov -r "$PLUGIN" cache.qed locking=off
nbdinfo --map --json "$(uri ov)" > nbdmap.json
stop_nbdkit ov
stop_nbdkit c2
second=$(http_body_bytes)
echo "second run: $((second - first)) bytes over HTTP," \
     "$(plugin_reads c2.stats) plugin reads"
[ "$((second - first))" -le $((64 * 65536 + 4096)) ] ||
  fail "the second run read $((second - first)) bytes over HTTP"
[ "$(plugin_reads c2.stats)" -le 64 ] || fail "the second run read from the plugin"
/usr/bin/python3 - map.json nbdmap.json <<'PY'
import json, sys
M = 1 << 20
want = [(0, 16*M, 'data'), (16*M, 24*M, 'zero'), (24*M, 32*M, 'data'),
        (32*M, 40*M, 'zero')]
def runs(items):
    out = []
    for s, n, kind in items:
        if out and out[-1][2] == kind and out[-1][1] == s:
            out[-1] = (out[-1][0], s + n, kind)
        else:
            out.append((s, s + n, kind))
    return out
q = runs((e['start'], e['length'], 'data' if e['data'] else
          'zero' if e['present'] else 'absent') for e in json.load(open(sys.argv[1])))
n = runs((e['offset'], e['length'], 'data' if e['type'] == 0 else 'zero')
         for e in json.load(open(sys.argv[2])))
assert q == want, ('qemu-img map', q)
assert n == want, ('nbdinfo --map', n)
PY
qemu_check cache.qed

# 3. Read-ahead: 64K sequential reads at queue depth 1, new overlay.
before=$(grep -c '^GET' nginx/access.log)
serve c3 seq.qed
nbdsh -u "$(uri c3)" -c "
want = open('www/disk.img', 'rb').read()
for o in range(0, len(want), 65536):
    assert h.pread(65536, o) == want[o:o+65536], o
"
stop_nbdkit c3
gets=$(( $(grep -c '^GET' nginx/access.log) - before ))
echo "sequential 64K reads: $gets GET requests for $((size / 65536)) clusters"
[ "$gets" -le 30 ] || fail "read-ahead: $gets requests"
qemu_check seq.qed

[ "$(md5sum < www/disk.img)" = "$(md5sum < copy1.raw)" ] ||
  fail "the source was modified"
echo OK
