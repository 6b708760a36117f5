#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# dir=DIR: every DIR/NAME.qed is an export NAME.
#  - nbdinfo --list shows the images (with their sizes), nothing else;
#  - each export's data is its own (writes through one never show in
#    another), and two connections to one export share one image;
#  - refused, each with a clear error and without affecting the
#    others: bad names, a missing file, a symlink out of DIR, a
#    subdirectory, a corrupt image, an image QEMU holds writable, the
#    default export (unless default-export=NAME);
#  - after its last connection an export is closed cleanly (NEED_CHECK
#    clear), so that QEMU can open it (qemu-img check exits 0, qemu-io
#    writes), and the next connection sees QEMU's write;
#  - an open export is marked clean after idle-clean without writes;
#  - default-export=NAME; under -r no file changes (cmp);
#  - file= with dir=, and create= with dir=, are refused.
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires qemu-nbd --version
requires nbdinfo --version
requires /usr/bin/python3 -c 'import nbd'
M=$((1024 * 1024))

D=$tmp/disks
mkdir -p "$D" "$tmp/outside"
qemu-img create -q -f qed "$D/alpha.qed" 16M
qemu-img create -q -f qed "$D/beta.qed" 32M
qemu-img create -q -f qed "$D/gamma_1.0-x.qed" 8M
qemu-img create -q -f qed "$D/corrupt.qed" 8M
# An L1 entry that points past the end of the file: the image opens,
# the first read through it fails.
/usr/bin/python3 - "$D/corrupt.qed" <<'EOF'
import struct, sys
f = open(sys.argv[1], "r+b")
l1 = struct.unpack("<Q", f.read(48)[40:48])[0]
f.seek(l1); f.write(struct.pack("<Q", 1 << 40))
EOF
qemu-img create -q -f qed "$D/held.qed" 8M
qemu-img create -q -f qed "$tmp/outside/secret.qed" 8M
ln -s "$tmp/outside/secret.qed" "$D/escape.qed"
ln -s alpha.qed "$D/alias.qed"          # within DIR: allowed
# Within DIR, but planted by another user (nobody) at root's image:
# the symlink rule of every image path refuses it.
ln -s alpha.qed "$D/planted.qed"
chown -h nobody "$D/planted.qed"
mkdir "$D/sub.qed"
qemu-img create -q -f qed "$D/.hidden.qed" 8M
qemu-img create -q -f qed "$D/bad name.qed" 8M
echo "not an image" > "$D/notes.txt"

# --log=stderr: a daemon sends its errors to syslog.
start_nbdkit s --log=stderr "$PLUGIN" dir="$D" idle-clean=1
sock=$tmp/s.sock
u () { echo "nbd+unix:///${1:-}?socket=$sock"; }
# wait_closed IMG: wait for the event "the server released IMG" (its
# last connection ended and idle-clean passed): QEMU can lock it.
_released () { qemu-img check -q "$1" >/dev/null 2>&1; }
wait_closed () {
  wait_until 120 _released "$1" || fail "the server kept $1 open"
}

# ---- nbdinfo --list: the images, with their sizes.
nbdinfo --list --json "$(u)" > "$tmp/list.json" 2>"$tmp/list.err" \
  || { cat "$tmp/list.err"; fail "nbdinfo --list"; }
/usr/bin/python3 - "$tmp/list.json" <<'EOF' || fail "nbdinfo --list"
import json, sys
exports = {e["export-name"]: e.get("export-size")
           for e in json.load(open(sys.argv[1]))["exports"]}
print(sorted(exports.items(), key=lambda x: x[0]))
want = {"alpha": 16 << 20, "beta": 32 << 20, "gamma_1.0-x": 8 << 20,
        "held": 8 << 20, "corrupt": 8 << 20}
for name, size in want.items():
    assert exports.get(name) == size, (name, exports.get(name))
# Symlinks are not listed (alias is alpha's file: one export).
for name in ("escape", "alias", "planted", "sub", ".hidden", "bad name", "notes", ""):
    assert name not in exports, name
EOF
echo "ok: nbdinfo --list shows the images in DIR with their sizes"

# ---- Data isolation, shared image per export (and per file: a
# symlink within DIR is its target's export).
/usr/bin/python3 - "$sock" <<'EOF' || fail "isolation"
import nbd, sys
sock = sys.argv[1]
def conn(name):
    h = nbd.NBD(); h.set_export_name(name)
    h.connect_unix(sock); return h
a1, a2, b = conn("alpha"), conn("alpha"), conn("beta")
a1.pwrite(b"A" * 65536, 0)
b.pwrite(b"B" * 65536, 0)
a1.flush()
assert a2.pread(65536, 0) == b"A" * 65536      # one image, two connections
assert b.pread(65536, 0) == b"B" * 65536
g = conn("gamma_1.0-x")
assert g.pread(65536, 0) == bytes(65536)
assert g.get_size() == 8 << 20
for h in (a1, a2, b, g): h.shutdown()
EOF
echo "ok: exports hold their own data; connections to one export share it"

# ---- Refused names and files: clear errors, the others unaffected.
# Keep a connection to alpha open through all of this.
/usr/bin/python3 - "$sock" "$tmp/s.log" <<'EOF' || fail "refusals"
import nbd, sys
sock, log = sys.argv[1], sys.argv[2]
def conn(name):
    h = nbd.NBD(); h.set_export_name(name)
    h.connect_unix(sock); return h
keep = conn("alpha")
cases = {
    "": "the default export (an empty name) is refused",
    "../alpha": "refused: an export name is",
    ".hidden": "refused: an export name is",
    "bad name": "refused: an export name is",
    "x" * 201: "refused: an export name is",
    "missing": "no such export",
    "escape": "is a symlink that leads out of",
    "sub": "is not a regular file",
    "planted": "is a symbolic link owned by uid 65534",
}
for name, msg in cases.items():
    try:
        conn(name)
    except nbd.Error:
        pass
    else:
        sys.exit("export %r was served" % name)
    text = open(log).read()
    assert msg in text, (name, msg)
# The corrupt image: it opens, but reading through the bad L1 entry
# fails, and only there.
c = conn("corrupt")
try:
    c.pread(4096, 0)
    sys.exit("the corrupt image read fine")
except nbd.Error:
    pass
assert keep.pread(65536, 0) == b"A" * 65536
b = conn("beta")
assert b.pread(65536, 0) == b"B" * 65536
al = conn("alias")      # a symlink within DIR: alpha's image, shared
assert al.pread(65536, 0) == b"A" * 65536
print("refusals ok")
EOF
grep -q "invalid L1 entry" "$tmp/s.log" || fail "no message about the corrupt image"
echo "ok: refused names, missing file, symlink out, subdirectory, corrupt image: errors for them only"

# ---- An image QEMU holds writable: refused, the others unaffected.
wait_closed "$D/held.qed"               # nbdinfo --list opened it
qemu-nbd -f qed -k "$tmp/qemu.sock" --persistent "$D/held.qed" &
qpid=$!
cleanup_fn "kill $qpid 2>/dev/null; wait $qpid 2>/dev/null"
wait_until 120 test -S "$tmp/qemu.sock" || fail "qemu-nbd did not start"
if nbdinfo --size "$(u held)" 2>"$tmp/held.err"; then
  fail "an image QEMU holds writable was served"
fi
grep -q "held.qed" "$tmp/s.log" || fail "no message about held.qed"
[ "$(nbdinfo --size "$(u beta)")" = $((32 * M)) ] || fail "beta is affected"
kill $qpid; wait $qpid 2>/dev/null || true
echo "ok: an image QEMU holds writable is refused; the others are served"

# ---- After the last connection: closed cleanly, QEMU can open it.
nbdsh -u "$(u beta)" -c 'h.pwrite(b"C" * 4096, 1 << 20)'
wait_closed "$D/beta.qed"
qemu-img check "$D/beta.qed" || fail "qemu-img check beta.qed after its last connection"
[ "$(need_check "$D/beta.qed")" = 0 ] || fail "beta.qed left with NEED_CHECK set"
qemu-io -f qed -c "write -P 0x44 $((2 * M)) 4096" "$D/beta.qed" >/dev/null \
  || fail "qemu-io cannot write beta.qed"
nbdsh -u "$(u beta)" -c '
assert h.pread(4096, 1 << 20) == b"C" * 4096
assert h.pread(4096, 2 << 20) == b"D" * 4096
assert h.pread(65536, 0) == b"B" * 65536
' || fail "beta reopened: wrong data"
echo "ok: closed after the last connection (check 0, NEED_CHECK clear); QEMU's write is served next"
stop_nbdkit s
for f in alpha beta gamma_1.0-x held; do qemu_check "$D/$f.qed"; done

# ---- An open export is written back and marked clean after
# idle-clean seconds without writes, its connection still open.
start_nbdkit i "$PLUGIN" dir="$D" idle-clean=1
/usr/bin/python3 - "$tmp/i.sock" "$D/gamma_1.0-x.qed" <<'EOF' || fail "idle write-back"
import nbd, sys, time
h = nbd.NBD(); h.set_export_name("gamma_1.0-x"); h.connect_unix(sys.argv[1])
h.pwrite(b"G" * 65536, 65536)
def need_check():
    with open(sys.argv[2], "rb") as f:
        f.seek(16); return f.read(1)[0] & 2
assert need_check(), "no NEED_CHECK after a write"
for _ in range(600):            # the event: the flag cleared
    if not need_check(): break
    time.sleep(0.1)
else:
    sys.exit("NEED_CHECK not cleared with the connection open")
assert h.pread(65536, 65536) == b"G" * 65536
h.shutdown()
EOF
stop_nbdkit i
echo "ok: an open export is marked clean after idle-clean without writes"

# ---- default-export=NAME; nbdkit -r changes no file.
for f in "$D"/*.qed; do [ -f "$f" ] && cp "$f" "$f.before"; done
start_nbdkit r -r "$PLUGIN" dir="$D" default-export=alpha idle-clean=0
nbdsh -u "nbd+unix:///?socket=$tmp/r.sock" -c '
assert h.is_read_only()
assert h.pread(65536, 0) == b"A" * 65536
' || fail "default-export=alpha under -r"
nbdinfo --list "$(uri r)" >/dev/null 2>&1 || true
stop_nbdkit r
for f in "$D"/*.qed.before; do
  cmp "$f" "${f%.before}" || fail "-r changed ${f%.before}"
  rm -f "$f"
done
echo "ok: default-export=NAME serves NAME for the empty name; -r changes no file"

nbdkit -U - "$PLUGIN" dir="$D" file="$D/alpha.qed" --run true 2>"$tmp/e.log" \
  && fail "file= with dir= accepted"
grep -q "file= and dir= cannot be used together" "$tmp/e.log" || fail "file+dir message"
nbdkit -U - "$PLUGIN" dir="$D" create=true size=1M --run true 2>"$tmp/e.log" \
  && fail "create= with dir= accepted"
grep -q "create= cannot be used with dir=" "$tmp/e.log" || fail "create+dir message"
nbdkit -U - "$PLUGIN" dir="$D" default-export=../x --run true 2>"$tmp/e.log" \
  && fail "a bad default-export accepted"
nbdkit -U - "$PLUGIN" dir="$tmp/none" --run true 2>"$tmp/e.log" \
  && fail "a missing dir accepted"
echo "ok: file+dir, create+dir, a bad default-export, a missing DIR: refused"
