#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Read-ahead stops while the overlay cannot store: the filter's overlay
# on a 4 MiB tmpfs, one sequential reader going through a 32 MiB disk
# with 64K reads (twice) reads at most 1.25x what it read from the
# plugin (counted by nbdkit's stats filter beneath the filter).  What
# was read ahead and could not be stored was thrown away and read again
# by the next miss: the old code read about 4x.  The data is right.
source "$(dirname "$0")/functions.sh"
requires nbdsh --version
[ -f "$FILTER" ] || skip "the filter is not built"
cd "$tmp"
M=$((1024 * 1024))
head -c $((32 * M)) /dev/urandom > base.raw
small_fs "$tmp/small" 4M

# bytes STATSFILE: bytes read from the plugin (as test-filter-readahead).
bytes () {
  awk '/^read:/ { v = $6; u = $7; sub(/,$/, "", u); m = -1;
         if (u == "bytes") m = 1; else if (u == "KiB") m = 1024;
         else if (u == "MiB") m = 1048576; else if (u == "GiB") m = 1073741824;
         printf "%d\n", v * m }' "$1"; }

start_nbdkit full --log=stderr --filter="$FILTER" --filter=stats file base.raw \
  statsfile="$tmp/full.stats" qed-overlay="$tmp/small/ov.qed"
nbdsh -u "$(uri full)" -c "
want = open('base.raw', 'rb').read()
for rep in range(2):
    got = b''.join(h.pread(65536, o) for o in range(0, $((32 * M)), 65536))
    assert got == want, 'data differs'
"
stop_nbdkit full
grep -q "No space left on device" full.log || { grep -i "error\|space\|read-ahead" full.log | tail; fail "the overlay never filled up"; }
client=$((2 * 32 * M))
plugin=$(bytes full.stats)
echo "client read $client bytes, the plugin $plugin bytes" \
  "($(echo "scale=2; $plugin / $client" | bc)x)"
[ "$plugin" -gt 0 ] || fail "no reads counted"
[ $((plugin * 4)) -le $((client * 5)) ] || fail "read-ahead on a full overlay: $plugin > 1.25 x $client"
grep -q "read-ahead stopped: the overlay cannot store" full.log \
  || fail "no 'read-ahead stopped' debug line"
echo PASS
