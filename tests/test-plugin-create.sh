#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# create=true makes the same file as `qemu-img create -f qed` (header
# bytes, file size, qemu-img info), with the defaults and with
# cluster-size, table-size, backing and backing-format (raw sets
# NO_PROBE; the name goes at offset 64).  It refuses an existing file
# and geometries QEMU cannot open, with clear errors, creating nothing.
# Created images pass qemu-img check, also after being written.
source "$(dirname "$0")/functions.sh"
# run_nbdkit ARGS... --run CMD: a captive nbdkit on a socket in $tmp
# (nbdkit leaves the socket file behind, so remove it first).
requires qemu-img --version
requires /usr/bin/python3 -c 'import nbd'

K=1024 M=$((1024 * 1024))
cd "$tmp"                      # relative backing names resolve here too

# info_fields FILE: the qemu-img info fields that describe the image.
info_fields () {
  qemu-img info --output=json "$1" | /usr/bin/python3 -c '
import json, sys
j = json.load(sys.stdin)
print([j.get(k) for k in ("virtual-size", "cluster-size", "format",
      "backing-filename", "backing-filename-format", "dirty-flag")])'
}

# same_as_qemu NAME NBDKIT-PARAMS -- QEMU-IMG-CREATE-ARGS: create both
# ways and compare.
same_as_qemu () {
  local name=$1 p=() q=(); shift
  while [ "$1" != -- ]; do p+=("$1"); shift; done; shift
  q=("$@")
  rm -f "$name.qed" "$name-ref.qed"
  run_nbdkit "$PLUGIN" "$tmp/$name.qed" create=true "${p[@]}" --run 'exit 0' ||
    fail "$name: create failed"
  # (the last qemu-img argument is the size, after the file name)
  qemu-img create -q -f qed "${q[@]:0:${#q[@]}-1}" "$name-ref.qed" "${q[-1]}"
  cmp -n 64 "$name.qed" "$name-ref.qed" || {
    od -Ax -tx1 -N 64 "$name.qed"; od -Ax -tx1 -N 64 "$name-ref.qed"
    fail "$name: header differs from qemu-img's"; }
  [ $(stat -c %s "$name.qed") = $(stat -c %s "$name-ref.qed") ] ||
    fail "$name: size $(stat -c %s "$name.qed") != $(stat -c %s "$name-ref.qed")"
  # The whole file, in fact (backing name, zeroed L1).
  cmp "$name.qed" "$name-ref.qed" || fail "$name: file differs from qemu-img's"
  [ "$(info_fields "$name.qed")" = "$(info_fields "$name-ref.qed")" ] ||
    fail "$name: qemu-img info differs"
  qemu_check "$name.qed"
  echo "ok: $name ($(stat -c %s "$name.qed") bytes)"
}

qemu-img create -q -f raw base.raw 3M
qemu-img create -q -f qed base.qed 3M

same_as_qemu defaults size=100M -- 100M
[ $(stat -c %s defaults.qed) = 327680 ] || fail "default file size is not 327680"
same_as_qemu rounded size=1000 -- 1000              # rounded up to 1024
same_as_qemu zero size=0 -- 0
same_as_qemu small cluster-size=4K table-size=2 size=20M \
  -- -o cluster_size=4k,table_size=2 20M
same_as_qemu big cluster-size=1M table-size=16 size=1G \
  -- -o cluster_size=1M,table_size=16 1G
same_as_qemu braw size=3M backing=base.raw backing-format=raw \
  -- -b base.raw -F raw 3M
same_as_qemu bqed size=3M backing=base.qed backing-format=qed \
  -- -b base.qed -F qed 3M
# NO_PROBE (0x4) with a raw backing file, not with a QED one; name at 64.
[ "$(od -An -tu1 -j16 -N1 braw.qed | tr -d ' ')" = 5 ] || fail "braw: features != 5"
[ "$(od -An -tu1 -j16 -N1 bqed.qed | tr -d ' ')" = 1 ] || fail "bqed: features != 1"
[ "$(dd if=braw.qed bs=1 skip=64 count=8 status=none)" = base.raw ] ||
  fail "backing name not at offset 64"

# A created image is served at once; writes through it pass the check.
rm -f w.qed
start_nbdkit w "$PLUGIN" "$tmp/w.qed" create=true size=10M cluster-size=4K \
  table-size=2 backing=base.raw backing-format=raw
/usr/bin/python3 - "$(uri w)" <<'EOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
assert h.get_size() == 10 << 20
h.pwrite(b"\x5a" * (5 << 20), 1000)
h.flush()
assert h.pread(5 << 20, 1000) == b"\x5a" * (5 << 20)
EOF
stop_nbdkit w
qemu_check w.qed
out=$(qemu-io -r -f qed -c "read -P 0x5a 1000 5M" w.qed) || fail "QEMU reads: $out"

# expect_refusal PATTERN FILE PARAMS...: nbdkit fails with PATTERN.
expect_refusal () {
  local pat=$1 f=$2; shift 2
  if run_nbdkit "$PLUGIN" "$tmp/$f" "$@" --run 'exit 0' >err 2>&1; then
    fail "accepted: $f $*"
  fi
  cat err
  grep -Eqi "$pat" err || fail "no '$pat' in the error for: $*"
}
# An existing file (even an empty one) is never overwritten.
sum=$(md5sum < defaults.qed)
expect_refusal 'exists' defaults.qed create=true size=1M
[ "$(md5sum < defaults.qed)" = "$sum" ] || fail "existing image modified"
: > empty.qed
expect_refusal 'exists' empty.qed create=true size=1M
[ ! -s empty.qed ] || fail "existing empty file written"
# Geometries QEMU 7.2 cannot open.
expect_refusal 'table.size.*1|QEMU' ts1.qed create=true size=1M table-size=1
expect_refusal 'QEMU' cs4m.qed create=true size=1G cluster-size=4M table-size=4
expect_refusal 'QEMU' cs64m.qed create=true size=1G cluster-size=64M table-size=2
[ ! -e ts1.qed ] && [ ! -e cs4m.qed ] && [ ! -e cs64m.qed ] ||
  fail "a refused image was created"
# ...while the largest ones QEMU can open are accepted (and it opens them).
same_as_qemu cs4m2 cluster-size=4M table-size=2 size=1G \
  -- -o cluster_size=4M,table_size=2 1G
# The preferred block size is the cluster (up to 32M), as the filter's.
run_nbdkit -r "$PLUGIN" "$tmp/cs4m2.qed" --run 'nbdinfo --no-content "$uri"' \
  > cs4m2.info || fail "cs4m2: nbdinfo"
[ "$(info_field cs4m2.info block_size_preferred)" = 4194304 ] ||
  { cat cs4m2.info; fail "cs4m2: preferred block size"; }
# Bad create parameters.
expect_refusal 'size' nosize.qed create=true
expect_refusal 'cluster.size' cs.qed create=true size=1M cluster-size=1000
expect_refusal 'table.size' ts.qed create=true size=1M table-size=3
expect_refusal 'larger|maximum|too large' huge.qed create=true size=1P \
  cluster-size=4K table-size=2
expect_refusal 'only.*create' nocreate.qed size=1M
[ ! -e nosize.qed ] && [ ! -e huge.qed ] || fail "a refused image was created"
echo PASS
