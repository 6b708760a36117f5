#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Filter over a remote NBD server (nbdkit's nbd plugin) that goes away
# (killed) and comes back:
#  - while it is away, clusters already in the overlay still read; a
#    miss fails with EIO and nothing is stored for it;
#  - without the retry filter, once the server is back, a new read on
#    the same connection still fails (the plugin's connection is dead),
#    and a new client connection works again;
#  - with --filter=retry beneath the QED filter (the recommended
#    stack), a miss issued while the server is away waits and succeeds
#    once it is back, with the right data, on the same connection.
. "$(dirname "$0")/functions.sh"
requires nbdsh --version
requires qemu-img --version
cd "$tmp"
M=$((1024*1024))
head -c $((16*M)) /dev/urandom > base.raw
sum=$(md5sum < base.raw)

# stored OVERLAY OFFSET: prints 1 if the overlay holds the cluster.
stored () {
  qemu-img map -U --output=json "$1" | /usr/bin/python3 -c "
import json, sys
o = int(sys.argv[1])
print(int(any(e['start'] <= o < e['start'] + e['length'] and
              e['present'] for e in json.load(sys.stdin))))" "$2"
}

for stack in plain retry; do
  start_nbdkit server -r file base.raw
  if [ $stack = retry ]; then
    start_nbdkit f --filter="$FILTER" --filter=retry nbd \
      socket="$tmp/server.sock" retries=20 retry-delay=1 \
      retry-exponential=no qed-overlay="$tmp/$stack.qed"
  else
    start_nbdkit f --filter="$FILTER" nbd socket="$tmp/server.sock" \
      qed-overlay="$tmp/$stack.qed"
  fi
  # Keep one client connection across the outage (a fifo feeds nbdsh).
  rm -f cmd.fifo; mkfifo cmd.fifo
  nbdsh -u "$(uri f)" -c "
import errno, sys, threading, time, nbd
want = open('base.raw', 'rb').read()
K, M = 1024, 1024 * 1024
def ok(n, o): return h.pread(n, o) == want[o:o+n]
assert ok(4*M, 0)                            # cached from now on
print('READY', flush=True)
sys.stdin = open('cmd.fifo')
assert sys.stdin.readline().strip() == 'DOWN'
assert ok(4*M, 0), 'a cached read failed without the server'
assert ok(64*K, 2*M + 100)
if '$stack' == 'plain':
    try:
        h.pread(64*K, 8*M)
        raise AssertionError('a miss succeeded without the server')
    except nbd.Error as e:
        assert e.errnum == errno.EIO, ('not EIO', e)
    print('MISS-FAILED', flush=True)
    assert sys.stdin.readline().strip() == 'UP'
    try:
        h.pread(64*K, 8*M)
        raise AssertionError('the dead connection came back?')
    except nbd.Error as e:
        assert e.errnum == errno.EIO, ('not EIO', e)
    h2 = nbd.NBD(); h2.connect_uri('$(uri f)')
    assert h2.pread(64*K, 8*M) == want[8*M:8*M+64*K]
    h2.shutdown()
else:
    res = []
    def miss():
        t = time.monotonic()
        res.append(ok(64*K, 8*M))
        res.append(time.monotonic() - t)
    th = threading.Thread(target=miss); th.start()
    print('MISS-WAITING', flush=True)
    assert sys.stdin.readline().strip() == 'UP'
    th.join()
    assert res[0] is True and res[1] > 1, res
    assert ok(16*M, 0), 'reads after the server came back'
print('DONE', flush=True)
" > "nbdsh-$stack.out" 2>&1 &
  nbdsh_pid=$!
  exec 7>cmd.fifo                        # opened once nbdsh reads it
  wait_until 120 grep -q READY "nbdsh-$stack.out" ||
    { cat "nbdsh-$stack.out"; fail "$stack: no READY"; }
  kill9_nbdkit server                    # gone, as a host or network dies
  rm -f server.sock
  echo DOWN >&7
  want=MISS-FAILED; [ $stack = retry ] && want=MISS-WAITING
  wait_until 120 grep -q $want "nbdsh-$stack.out" ||
    { cat "nbdsh-$stack.out"; fail "$stack: no $want"; }
  if [ $stack = plain ]; then
    [ "$(stored "$stack.qed" $((8*M)))" = 0 ] || fail "a failed miss was stored"
  else
    sleep 2                              # the miss keeps retrying
  fi
  start_nbdkit server -r file base.raw
  echo UP >&7
  exec 7>&-
  wait $nbdsh_pid || { cat "nbdsh-$stack.out"; fail "$stack: nbdsh failed"; }
  cat "nbdsh-$stack.out"
  grep -q DONE "nbdsh-$stack.out" || fail "$stack: not done"
  stop_nbdkit f
  stop_nbdkit server
  qemu_check "$stack.qed"
  echo "PASS: $stack"
done
[ "$(md5sum < base.raw)" = "$sum" ] || fail "base.raw was modified"
echo OK
