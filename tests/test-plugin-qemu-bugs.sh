#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Regressions for QEMU's two data-corrupting QED bugs
# (docs/qemu-differences.md), which the plugin must not copy:
# (a) a partial write into a zero cluster must not copy backing data
#     into the rest of the cluster;
# (b) a long allocating run (4K clusters, table-size 16) must not link
#     one cluster too many (QEMU's cluster count divides by cs-1), so
#     the cluster after a 20M write still shows the backing data.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'

K=1024 M=$((1024 * 1024))

# qemu_read_pattern IMAGE BYTE OFFSET LENGTH: QEMU reads BYTE there.
qemu_read_pattern () {
  local out
  out=$(qemu-io -r -f qed -c "read -P $2 $3 $4" "$1") || fail "qemu-io: $out"
  case "$out" in *"verification failed"*|*failed*)
    fail "QEMU reads something other than $2 at $3+$4: $out";; esac
}

# ---- (a) COW from a zero cluster.  Backing: 1M of 0x07.
qemu-img create -q -f raw "$tmp/b7.raw" 1M
qemu-io -f raw -c "write -P 7 0 1M" "$tmp/b7.raw" >/dev/null
qemu-img create -q -f qed -b b7.raw -F raw "$tmp/a.qed" 1M
# A zero cluster made by QEMU itself at 256K.
qemu-io -f qed -c "write -z 256k 64k" "$tmp/a.qed" >/dev/null
start_nbdkit a "$PLUGIN" "$tmp/a.qed"
/usr/bin/python3 - "$(uri a)" <<'EOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
seven = b"\x07"
# Zero 64K at 0 (MAY_TRIM), at 64K (NO_HOLE), then write 4K into each.
h.zero(65536, 0)
h.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE)
for base in (0, 65536, 262144):
    assert h.pread(65536, base) == bytes(65536), "zeroed cluster %d" % base
    h.pwrite(b"\x01" * 4096, base)
    got = h.pread(65536, base)
    assert got[:4096] == b"\x01" * 4096
    assert got[4096:] == bytes(61440), \
        "cluster %d: backing data copied into a zero cluster" % base
# An untouched cluster still shows the backing file.
assert h.pread(65536, 131072) == seven * 65536
h.flush()
EOF
stop_nbdkit a
# QEMU reads what we wrote.
for base in 0 64k 256k; do
  qemu_read_pattern "$tmp/a.qed" 1 $base 4k
  qemu_read_pattern "$tmp/a.qed" 0 $(( $(numfmt --from=iec ${base^^}) + 4*K )) 60k
done
qemu_read_pattern "$tmp/a.qed" 7 128k 128k
qemu_check "$tmp/a.qed"
echo "ok: (a) zero cluster COW"

# ---- (b) Long allocating run: 4K clusters, table-size 16, backing 0x07.
qemu-img create -q -f raw "$tmp/b7b.raw" 24M
qemu-io -f raw -c "write -P 7 0 24M" "$tmp/b7b.raw" >/dev/null
qemu-img create -q -f qed -b b7b.raw -F raw -o cluster_size=4k,table_size=16 \
  "$tmp/b.qed" 24M
start_nbdkit b "$PLUGIN" "$tmp/b.qed"
/usr/bin/python3 - "$(uri b)" <<'EOF'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
M = 1 << 20
# An allocated neighbour one cluster further on must keep its data.
h.pwrite(b"\x09" * 4096, 20 * M + 4096)
h.pwrite(b"\x01" * (20 * M), 0)        # one 20M request
assert h.pread(4096, 20 * M) == b"\x07" * 4096, "cluster after the run"
assert h.pread(4096, 20 * M + 4096) == b"\x09" * 4096, "neighbour lost"
assert h.pread(4096, 20 * M + 8192) == b"\x07" * 4096
assert h.pread(20 * M, 0) == b"\x01" * (20 * M)
EOF
stop_nbdkit b
qemu_read_pattern "$tmp/b.qed" 7 20M 4k
qemu_read_pattern "$tmp/b.qed" 9 $((20*M + 4*K)) 4k
qemu_read_pattern "$tmp/b.qed" 1 0 20M
qemu_check_phantom "$tmp/b.qed"
[ "$(need_check "$tmp/b.qed")" = 0 ] || fail "NEED_CHECK set"
echo "ok: (b) no extra cluster after a long run"
echo PASS
