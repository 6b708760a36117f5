#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Interoperability with QEMU over NBD: qemu-nbd serves an image our
# plugin wrote, our plugin serves an image qemu-io wrote, and
# `qemu-img compare` finds the NBD exports identical.  QEMU as an NBD
# client (qemu-img convert with zero detection, write zeroes) writes
# through our plugin, and qemu-nbd then serves the result identically.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires qemu-nbd --version
requires /usr/bin/python3 -c 'import nbd'

K=1024 M=$((1024 * 1024))

# start_qemu_nbd NAME ARGS...: qemu-nbd on $tmp/NAME.sock, killed at exit.
start_qemu_nbd () {
  local name=$1; shift
  rm -f "$tmp/$name.sock" "$tmp/$name.pid"
  qemu-nbd --fork -t --pid-file="$tmp/$name.pid" -k "$tmp/$name.sock" "$@" ||
    fail "qemu-nbd $name did not start"
  cleanup_fn stop_qemu_nbd "$name"
}
stop_qemu_nbd () {
  local pid
  [ -s "$tmp/$1.pid" ] || return 0
  pid=$(cat "$tmp/$1.pid")
  kill "$pid" 2>/dev/null || true
  # qemu-nbd 7.2 on a loaded machine sometimes ignores a SIGTERM that
  # comes soon after --fork returned (test-plugin-locking.sh).
  if ! wait_until 30 _gone "$pid"; then
    echo "qemu-nbd $1 ignored SIGTERM for 30 s: SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null || true
    wait_until 120 _gone "$pid" || fail "server $1 did not exit"
  fi
  rm -f "$tmp/$1.pid"
}

# A raw backing file with data (used by the overlays below).
qemu-img create -q -f raw "$tmp/base.raw" 8M
qemu-io -f raw -c "write -P 0x5b 0 3M" -c "write -P 0x5c 6M 1M" "$tmp/base.raw" >/dev/null

# ---- 1. Written by us, served by qemu-nbd (and by us, read-only).
for b in "" backing; do
  img=$tmp/ours$b.qed
  if [ -n "$b" ]; then
    qemu-img create -q -f qed -b base.raw -F raw "$img" 8M
  else
    qemu-img create -q -f qed -o cluster_size=4k,table_size=2 "$img" 8M
  fi
  start_nbdkit w "$PLUGIN" "$img"
  /usr/bin/python3 - "$(uri w)" <<'EOF' || fail "writing through the plugin"
import nbd, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
rng = random.Random(11)
size = h.get_size()
for i in range(120):
    off = rng.randrange(0, size - 200000); n = rng.randrange(1, 200000)
    r = rng.random()
    if r < 0.6:
        h.pwrite(rng.randbytes(n), off)
    elif r < 0.8:
        h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if r < 0.7 else 0)
    elif r < 0.9:
        h.trim(n, off)
    else:
        h.pwrite(bytes(n), off)
h.flush()
EOF
  nbdcopy "$(uri w)" "$tmp/want.raw"            # what our server said
  stop_nbdkit w
  start_qemu_nbd q -r -f qed "$img"
  start_nbdkit r -r "$PLUGIN" "$img"
  qemu-img compare "nbd+unix:///?socket=$tmp/q.sock" "$(uri r)" ||
    fail "qemu-nbd and our plugin serve $img differently"
  qemu-img compare -F raw "nbd+unix:///?socket=$tmp/q.sock" "$tmp/want.raw" ||
    fail "qemu-nbd serves something other than what we wrote"
  stop_nbdkit r
  stop_qemu_nbd q
  rm -f "$tmp/want.raw"
  echo "ok: written by the plugin${b:+ (with a backing file)}, served by qemu-nbd"
done

# ---- 2. Written by qemu-io, served by us and by qemu-nbd.
img=$tmp/theirs.qed
qemu-img create -q -f qed -b base.raw -F raw "$img" 8M
qemu-io -f qed -c "write -P 0x31 100k 300k" -c "write -z 1M 1M" \
  -c "write -P 0x32 $((2*M+7)) 70000" -c "write -z $((5*M+100)) 3000" \
  -c "write -P 0x33 $((8*M-4096)) 4096" "$img" >/dev/null
start_nbdkit r -r "$PLUGIN" "$img"
start_qemu_nbd q -r -f qed "$img"
qemu-img compare "nbd+unix:///?socket=$tmp/q.sock" "$(uri r)" ||
  fail "a qemu-io image is served differently"
stop_qemu_nbd q
stop_nbdkit r
echo "ok: written by qemu-io, served by both"

# ---- 3. QEMU as the NBD client writing through our plugin: convert
# (with zero detection, so it sends write zeroes) into a fresh image,
# then qemu-nbd serves the result identically to the source.
qemu-img create -q -f raw "$tmp/src.raw" 8M
qemu-io -f raw -c "write -P 0x41 0 1M" -c "write -P 0x42 $((3*M+5)) 100k" \
  -c "write -P 0x43 $((7*M)) 1M" "$tmp/src.raw" >/dev/null
qemu-img create -q -f qed "$tmp/dst.qed" 8M
start_nbdkit d "$PLUGIN" "$tmp/dst.qed"
qemu-img convert -n -f raw -O raw "$tmp/src.raw" "$(uri d)" || fail "convert into the plugin"
qemu-img compare -F raw "$(uri d)" "$tmp/src.raw" || fail "convert result (live)"
stop_nbdkit d
qemu_check "$tmp/dst.qed"
start_qemu_nbd q -r -f qed "$tmp/dst.qed"
qemu-img compare -F raw "nbd+unix:///?socket=$tmp/q.sock" "$tmp/src.raw" ||
  fail "qemu-nbd serves the converted image differently"
stop_qemu_nbd q
# The zero areas stayed sparse (QEMU sent zeroes, not data).
[ $(stat -c %s "$tmp/dst.qed") -lt $((4*M)) ] ||
  fail "converted image is $(stat -c %s "$tmp/dst.qed") bytes: zeros were written as data"
# And the other way: qemu-nbd writable, our plugin reads the same.
qemu-img create -q -f qed "$tmp/q2.qed" 8M
start_qemu_nbd q -f qed "$tmp/q2.qed"
qemu-img convert -n -f raw -O raw "$tmp/src.raw" "nbd+unix:///?socket=$tmp/q.sock"
stop_qemu_nbd q
start_nbdkit r -r "$PLUGIN" "$tmp/q2.qed"
qemu-img compare -F raw "$(uri r)" "$tmp/src.raw" || fail "image written via qemu-nbd"
stop_nbdkit r
echo "ok: QEMU as an NBD client"
echo PASS
