#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter: qed-overlay-dir with qed-shared-cache over nbdkit's curl
# plugin against an nginx of the test's own, with the stats filter
# counting what reaches the plugin.
#  1. four exports reading the same 64 MiB at the same time fetch it
#     from the origin once (HTTP body bytes and plugin reads <= 1.05x);
#  2. each export's writes are visible only to it, kept in its own
#     NAME.qed (which holds only what was written: the reads went into
#     the shared cache), and persist across a restart;
#  3. on disk a QEMU chain: qemu-img info --backing-chain shows
#     NAME.qed -> shared.qed (relative) -> the origin (raw,
#     qed-backing-name), qemu-img compare equals what was served, and
#     qemu-img check is clean on every file;
#  4. SIGKILL while four exports fill the shared cache at once, then a
#     restart: every file checks clean apart from leaks of an image
#     with NEED_CHECK set, every export reads as before, and after a
#     clean stop every file checks clean.
#  5. qed-prefetch fills the shared cache (and only it).
. "$(dirname "$0")/functions.sh"
requires nbdsh --version
requires nbdcopy --version
requires qemu-img --version
nbdkit curl --version >/dev/null 2>&1 ||
  fail "nbdkit's curl plugin is missing (Debian's nbdkit package has it)"
cd "$tmp"
M=$((1024*1024))
size=$((64*M))
mkdir www ov
{ head -c $((40*M)) /dev/urandom; head -c $((8*M)) /dev/zero
  head -c $((16*M)) /dev/urandom; } > www/disk.img
start_nginx "$tmp/www"
url=$NGINX_URL/disk.img
exports="a b c d"

plugin_reads () { awk '/^read:/ { n = $2 } END { print n + 0 }' "$1"; }
plugin_bytes () {
  awk '/^read:/ { for (i = 1; i <= NF; i++) if ($i == "MiB,") v = $(i-1) }
       END { print v + 0 }' "$1"; }
# serve NAME [rdelay=T]: the filter over stats (over delay) over curl
serve () {
  local n=$1; shift
  start_nbdkit "$n" --log=stderr --filter="$FILTER" --filter=stats \
    ${1:+--filter=delay} curl "$url" statsfile="$tmp/$n.stats" \
    qed-overlay-dir="$tmp/ov" qed-shared-cache="$tmp/ov/shared.qed" \
    qed-backing-name="$tmp/www/disk.img" "$@"
}
u () { echo "nbd+unix:///$2?socket=$tmp/$1.sock"; }

# 1. Four exports read everything at once.
serve s
pids=()
for e in $exports; do
  nbdcopy "$(u s $e)" "$e.first" & pids+=($!)
done
wait "${pids[@]}"        # (a plain wait would wait for nginx too)
for e in $exports; do cmp "$e.first" www/disk.img || fail "$e read wrong data"; done
# 2. Writes: each export its own name at 1M+1000 and at 60M.
for e in $exports; do
  nbdsh -u "$(u s $e)" -c "
h.pwrite(b'$e' * 70000, $M + 1000)
h.pwrite(b'$e' * 4096, 60 * $M)
h.flush()
open('$e.served', 'wb').write(h.pread(h.get_size(), 0))
"
done
for e in $exports; do
  nbdsh -u "$(u s $e)" -c "assert h.pread(70000, $M + 1000) == b'$e' * 70000"
done
nbdinfo --list "$(u s '')" > list.txt
grep -q '^export="shared"' list.txt && fail "the shared cache is listed as an export"
stop_nbdkit s
body=$(http_body_bytes)
echo "origin: $body HTTP body bytes for 4 x $size read"
[ "$body" -le $((size * 105 / 100)) ] || fail "origin read $body bytes (> 1.05 x $size)"
mib=$(plugin_bytes s.stats)
echo "plugin reads: $(plugin_reads s.stats) requests, $mib MiB"
/usr/bin/python3 -c "import sys; sys.exit(not $mib <= 64 * 1.05)" ||
  fail "the plugin read $mib MiB (> 1.05 x 64)"

# 3. A QEMU chain equal to what was served, clean.
qemu_check ov/shared.qed
for e in $exports; do
  qemu_check ov/$e.qed
  qemu-img info --backing-chain ov/$e.qed > $e.chain
  grep -q "^backing file: shared.qed (actual path: .*ov/shared.qed)" $e.chain ||
    { cat $e.chain; fail "$e.qed does not name shared.qed"; }
  grep -q "^backing file: $tmp/www/disk.img$" $e.chain ||
    { cat $e.chain; fail "shared.qed does not name the origin"; }
  grep -q "^backing file format: raw" $e.chain || fail "the origin is not raw"
  qemu-img compare -f qed ov/$e.qed $e.served || fail "ov/$e.qed differs"
  # Only writes (and the clusters they copied) in the export's overlay.
  a=$(allocated ov/$e.qed)
  [ "$a" -le $((2*M)) ] || fail "ov/$e.qed holds $a bytes: more than its writes"
done
qemu-img compare -f qed -F raw ov/shared.qed www/disk.img ||
  fail "the shared cache differs from the origin"

# Persistent across a restart; nothing fetched again but the guard's
# samples.
: > nginx/access.log
serve s2
for e in $exports; do
  nbdcopy "$(u s2 $e)" "$e.again"
  cmp "$e.again" "$e.served" || fail "export $e changed across a restart"
done
stop_nbdkit s2
# (The origin guard reads its samples again at the shared cache's open:
# at most 64 clusters.)
[ "$(http_body_bytes)" -le $((64 * 65536 + 1024)) ] ||
  fail "a restart fetched $(http_body_bytes) bytes again"

# 4. SIGKILL during concurrent fills into a new shared cache (slowed by
#    the delay filter so that the kill lands while they run: we wait
#    for the shared cache to hold some, not for a time).
rm -f ov/*.qed
: > nginx/access.log
serve k rdelay=20ms
for e in $exports; do
  nbdsh -u "$(u k $e)" -c "
h.pwrite(b'$e' * 70000, $M + 1000)
h.flush()"
done
pids=()
for e in $exports; do
  nbdcopy "$(u k $e)" /dev/null 2>/dev/null & pids+=($!)
done
wait_until 120 sh -c "[ \$(stat -c %b ov/shared.qed) -gt 16384 ]" ||
  fail "the shared cache did not fill"
kill9_nbdkit k
echo "killed with $(allocated ov/shared.qed) bytes in the shared cache"
for p in "${pids[@]}"; do wait "$p" || true; done
for f in ov/*.qed; do
  rc=0; qemu-img check "$f" > check.txt 2>&1 || rc=$?
  echo "after SIGKILL: $f: check rc $rc, NEED_CHECK $(need_check "$f")"
  case $rc in
    0) ;;
    3) [ "$(need_check "$f")" = 1 ] ||
         { cat check.txt; fail "$f leaks without NEED_CHECK"; } ;;
    *) cat check.txt; fail "$f: qemu-img check rc $rc after SIGKILL" ;;
  esac
done
serve r
for e in $exports; do
  nbdsh -u "$(u r $e)" -c "
want = bytearray(open('www/disk.img', 'rb').read())
want[$M + 1000:$M + 71000] = b'$e' * 70000
assert h.pread(h.get_size(), 0) == want
"
done
stop_nbdkit r
for f in ov/*.qed; do
  qemu_check "$f"
  [ "$(need_check "$f")" = 0 ] || fail "$f still has NEED_CHECK"
done

# qed-prefetch fills the shared cache (the first connection starts it).
rm -f ov/*.qed
: > nginx/access.log
serve p qed-prefetch=true
nbdinfo --size "$(u p a)" >/dev/null
wait_log p "qed-prefetch: done"
stop_nbdkit p
qemu_check ov/shared.qed
qemu-img compare -f qed -F raw ov/shared.qed www/disk.img ||
  fail "the prefetch did not fill the shared cache"
[ "$(allocated ov/a.qed)" -le $((M)) ] || fail "the prefetch filled a.qed"
[ "$(http_body_bytes)" -le $((size * 105 / 100)) ] ||
  fail "the prefetch read $(http_body_bytes) bytes"

# Bad combinations.
expect_fail "no dir" "qed-shared-cache: needs qed-overlay-dir" \
  --filter="$FILTER" null 1M qed-shared-cache=x.qed
# (qed-prefetch without the shared cache warms each overlay:
# test-filter-overlay-dir-prefetch.sh.)
# The shared cache is not an export.
start_nbdkit x --log=stderr --filter="$FILTER" file www/disk.img \
  qed-overlay-dir=ov qed-shared-cache=ov/shared.qed
if nbdsh -u "$(u x shared)" -c 'h.pread(1, 0)' 2>/dev/null; then
  fail "the shared cache was served as an export"
fi
grep -q "is qed-shared-cache, not an export's overlay" x.log ||
  fail "no clear error for the shared cache as an export"
stop_nbdkit x
echo PASS
