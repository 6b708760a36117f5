#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Copy-on-read in the plugin, and the copy-on-read hint (compat bit 0x1):
# 1. copy-on-read=true: what is read from the backing file is stored in
#    whole clusters; backing zeros (written zeros and holes) become zero
#    clusters that cost no space; the image then reads right without
#    its backing file (QEMU with backing: null).
# 2. The hint: create=true copy-on-read=true sets the bit; a later open
#    without the key follows it; QEMU keeps it when it writes;
#    copy-on-read=false overrides it; without bit or key, reads copy
#    nothing.
# 3. Writes racing copy-on-read reads of the same clusters always win.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires /usr/bin/python3 -c 'import nbd'
TOOL="/usr/bin/python3 $TOP/tests/freelist-tool.py"
M=$((1024 * 1024)) K=1024

compat () { set -- $($TOOL flags "$1"); echo $(( $2 & 1 )); }
# kinds IMG: "start length kind" with kind data (in IMG), zero (a zero
# cluster in IMG) or backing (falls through).
kinds () {
  qemu-img map -U --output=json "$1" | /usr/bin/python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    k = "backing" if e["depth"] > 0 else "data" if e["data"] else \
        "zero" if e["present"] else "unallocated"
    if out and out[-1][2] == k:
        out[-1][1] += e["length"]
    else:
        out.append([e["start"], e["length"], k])
for s, n, k in out:
    print(s, n, k)'; }
no_backing () {
  echo "json:{\"driver\":\"qed\",\"file\":{\"driver\":\"file\",\"filename\":\"$1\"},\"backing\":null}"; }

# A backing file: data in 0..2M, written zeros in 2..4M, a hole in
# 4..6M, data in 6..7M, a hole to 8M.
truncate -s 8M "$tmp/b.raw"
qemu-io -f raw -c "write -P 0x61 0 2M" -c "write -P 0 2M 2M" \
  -c "write -P 0x62 6M 1M" "$tmp/b.raw" >/dev/null

# ---- 1. copy-on-read=true.
start_nbdkit c "$PLUGIN" "$tmp/c.qed" create=true size=8M backing=b.raw \
  backing-format=raw copy-on-read=true idle-clean=0
[ "$(compat "$tmp/c.qed")" = 1 ] || fail "create: hint not set"
/usr/bin/python3 - "$(uri c)" "$tmp/b.raw" <<'EOF' || fail "reads"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
b = open(sys.argv[2], "rb").read()
# Unaligned reads: whole clusters are copied around them.
for off, n in ((100, 1000), (65536 - 10, 20), (3 << 20, 5000),
               (5 << 20, 1 << 20), ((6 << 20) + 7, 300000), (0, 8 << 20)):
    assert h.pread(n, off) == b[off:off+n], (off, n)
EOF
stop_nbdkit c
kinds "$tmp/c.qed" > "$tmp/kinds"
cat > "$tmp/want" <<EOF
0 $((2 * M)) data
$((2 * M)) $((4 * M)) zero
$((6 * M)) $M data
$((7 * M)) $M zero
EOF
cmp -s "$tmp/kinds" "$tmp/want" || { diff "$tmp/want" "$tmp/kinds"; fail "copy-on-read map"; }
b=$(allocated "$tmp/c.qed")
[ $b -le $((3 * M + 600 * K)) ] || fail "backing zeros cost space: $b bytes allocated"
qemu_check "$tmp/c.qed"
qemu-img compare "$(no_backing "$tmp/c.qed")" "$tmp/b.raw" >/dev/null ||
  fail "the image does not read right without its backing file"
echo "ok: copy-on-read"

# ---- 2. The hint.
# QEMU keeps it when it writes.
qemu-io -f qed -c "write -P 0x63 7M 64k" "$tmp/c.qed" >/dev/null
[ "$(compat "$tmp/c.qed")" = 1 ] || fail "QEMU dropped the hint"
qemu_check "$tmp/c.qed"
# Honoured on open (no key): a new image with the hint, opened again.
start_nbdkit h "$PLUGIN" "$tmp/h.qed" create=true size=8M backing=b.raw \
  backing-format=raw copy-on-read=true idle-clean=0
stop_nbdkit h
start_nbdkit h "$PLUGIN" "$tmp/h.qed" idle-clean=0
/usr/bin/python3 -c '
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pread(65536, 0)' "$(uri h)"
stop_nbdkit h
kinds "$tmp/h.qed" > "$tmp/kinds"
[ "$(sed -n 1p "$tmp/kinds")" = "0 65536 data" ] || fail "hint not honoured"
# copy-on-read=false overrides it.
start_nbdkit h "$PLUGIN" "$tmp/h.qed" copy-on-read=false idle-clean=0
/usr/bin/python3 -c '
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pread(65536, 6 << 20)' "$(uri h)"
stop_nbdkit h
[ "$(kinds "$tmp/h.qed" | grep -v backing)" = "0 65536 data" ] ||
  fail "copy-on-read=false copied: $(kinds "$tmp/h.qed")"
[ "$(compat "$tmp/h.qed")" = 1 ] || fail "copy-on-read=false dropped the hint"
# Without the hint and without the key, nothing is copied.
qemu-img create -q -f qed -b b.raw -F raw "$tmp/n.qed" 8M
start_nbdkit n "$PLUGIN" "$tmp/n.qed" idle-clean=0
/usr/bin/python3 -c '
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pread(8 << 20, 0)' "$(uri n)"
stop_nbdkit n
[ "$(kinds "$tmp/n.qed")" = "0 $((8 * M)) backing" ] || fail "copied without hint or key"
[ "$(compat "$tmp/n.qed")" = 0 ] || fail "a hint appeared"
# -r: reads, copies nothing, changes nothing.
sum=$(md5sum < "$tmp/n.qed")
start_nbdkit r -r "$PLUGIN" "$tmp/n.qed" copy-on-read=true
/usr/bin/python3 -c '
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pread(8 << 20, 0)' "$(uri r)"
stop_nbdkit r
[ "$(md5sum < "$tmp/n.qed")" = "$sum" ] || fail "-r copy-on-read changed the file"
echo "ok: the hint"

# ---- 3. Writes racing copy-on-read reads of the same clusters.
qemu-img create -q -f qed -b b.raw -F raw "$tmp/w.qed" 8M
start_nbdkit w "$PLUGIN" "$tmp/w.qed" copy-on-read=true idle-clean=0
/usr/bin/python3 - "$(uri w)" <<'EOF' || fail "race"
import nbd, sys, threading
uri = sys.argv[1]
K = 1024
def reader():
    h = nbd.NBD(); h.connect_uri(uri)
    for _ in range(3):
        for off in range(0, 8 << 20, 64 * K):
            h.pread(64 * K, off)
def writer(results):
    h = nbd.NBD(); h.connect_uri(uri)
    for i, off in enumerate(range(0, 8 << 20, 64 * K)):
        h.pwrite(bytes([i % 250 + 1]) * 1000, off + 5000)
        results.append((off + 5000, bytes([i % 250 + 1]) * 1000))
res = []
ts = [threading.Thread(target=reader), threading.Thread(target=reader),
      threading.Thread(target=writer, args=(res,))]
for t in ts: t.start()
for t in ts: t.join()
h = nbd.NBD(); h.connect_uri(uri)
h.flush()
for off, d in res:
    assert h.pread(len(d), off) == d, "write lost at %d" % off
EOF
stop_nbdkit w
qemu_check "$tmp/w.qed"
echo "ok: writes win over copy-on-read fills"
