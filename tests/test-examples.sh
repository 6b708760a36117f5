#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Runs the examples of the manual's EXAMPLES section (nbdkit-qed.pod),
# as written there, so that the documentation cannot rot: every command
# line of the section must be run here (checked at the end), and each
# one run here must be in the manual verbatim.  Paths are moved into
# the test's directory (/run/nbdkit-qed and /var/lib/nbdkit-qed), and
# "qed" names the objects built here.  The libvirt XML is checked to
# name the export (libvirt itself is not run); the VM is started
# paused, and its block layer reads the export (no guest boots).
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-system-x86_64 --version
requires virt-filesystems --version
requires guestfish --version
requires systemd-socket-activate --version
cd "$tmp"
mkdir run images upload
pod=$TOP/nbdkit-qed.pod

# The section's verbatim lines, continuations joined, one per line.
perl -ne '
  $in = 1 if /^=head1 EXAMPLES/; $in = 0 if /^=head1 (?!EXAMPLES)/;
  next unless $in && /^ /;
  s/^ //; chomp;
  if ($cont) { s/^\s+//; $line .= " " . $_ } else { $line = $_ }
  $cont = $line =~ s/\s*\\$//;
  print "$line\n" unless $cont;' "$pod" > pod-lines.txt
[ "$(wc -l < pod-lines.txt)" -gt 20 ] || fail "no examples found in $pod"
: > ran.txt

# localize LINE: the command as run here.
localize () {
  local l=$1
  l=${l//\/run\/nbdkit-qed/$tmp/run}
  l=${l//\/var\/lib\/nbdkit-qed/$tmp/images}
  l=${l//\/srv\/upload/$tmp/upload}
  echo "$l"
}
# nbdkit as the examples call it: "qed" is the plugin built here, a
# pidfile lets the test stop it, and a server without -U gets a socket
# here (not a TCP port on every address).
n_servers=0
nbdkit () {
  local args=() a has_u=0
  for a in "$@"; do
    case "$a" in
      qed) args+=("$PLUGIN") ;;
      --filter=qed) args+=("--filter=$FILTER") ;;
      -U|--unix) has_u=1; args+=("$a") ;;
      *) args+=("$a") ;;
    esac
  done
  n_servers=$((n_servers+1))
  [ $has_u = 1 ] || args=(-U "$tmp/run/default.sock" "${args[@]}")
  rm -f "$tmp/ex$n_servers.pid"
  command nbdkit -P "$tmp/ex$n_servers.pid" "${args[@]}" || return
  wait_until 120 test -s "$tmp/ex$n_servers.pid" || fail "no pidfile: $*"
  cleanup_fn stop_example $n_servers
}
stop_example () {
  local pid
  [ -s "$tmp/ex$1.pid" ] || return 0
  pid=$(cat "$tmp/ex$1.pid"); kill "$pid" 2>/dev/null || true
  wait_until 300 _gone "$pid" || fail "example server $1 did not exit"
  rm -f "$tmp/ex$1.pid"
}
stop_last () { stop_example $n_servers; rm -f "$tmp/run/default.sock"; }
# example LINE [EXTRA...]: run a line of the manual (must be there
# verbatim), with EXTRA words appended (the test's own options).
example () {
  local line=$1; shift
  grep -qxF -- "$line" pod-lines.txt || fail "not in the manual's EXAMPLES: $line"
  echo "$line" >> ran.txt
  echo "+ $line $*"
  eval "$(localize "$line") $*"
}
# seen LINE: a line checked here other than by running it (XML, units).
seen () {
  grep -qxF -- "$1" pod-lines.txt || fail "not in the manual's EXAMPLES: $1"
  echo "$1" >> ran.txt
}
sock=$tmp/run/disk.sock
disk_uri="nbd+unix:///?socket=$sock"

# Serve an image made by QEMU.
example 'qemu-img create -f qed disk.qed 10G'
example 'nbdkit qed disk.qed'
[ "$(nbdinfo --size "nbd+unix:///?socket=$tmp/run/default.sock")" = 10737418240 ] ||
  fail "disk.qed not served"
stop_last

# An overlay over a raw base.
truncate -s 1G base.raw
printf 'base data' | dd of=base.raw conv=notrunc status=none
example 'nbdkit qed overlay.qed create=true size=10G backing=base.raw backing-format=raw'
nbdsh -u "nbd+unix:///?socket=$tmp/run/default.sock" \
  -c 'assert h.pread(9, 0) == b"base data"' || fail "overlay: base not seen"
stop_last
qemu_check overlay.qed

# An untrusted image: served, unless it names a backing file.
qemu-img create -f qed untrusted.qed 1M >/dev/null
example 'nbdkit -r qed untrusted.qed follow-backing=false'
stop_last
qemu-img create -f qed -b /etc/passwd -F raw untrusted.qed 1M >/dev/null
if example 'nbdkit -r qed untrusted.qed follow-backing=false' 2>err.txt; then
  fail "an image naming a backing file was served with follow-backing=false"
fi

# An uploaded image: backing files only beside it.
qemu-img create -q -f raw upload/base.raw 1M
qemu-img create -q -f qed -b base.raw -F raw upload/disk.qed 1M
example 'nbdkit -r qed /srv/upload/disk.qed follow-backing=beneath'
stop_last
qemu-img create -q -f qed -b /etc/passwd -F raw upload/disk.qed 1M
if example 'nbdkit -r qed /srv/upload/disk.qed follow-backing=beneath' 2>err.txt; then
  fail "follow-backing=beneath followed a name outside the image's directory"
fi

# A cache that lets go: the prefetch copies all of golden.raw (data and
# a hole), then the overlay is detached (its header's backing bit
# clears: waited for, the first connection starts it).
head -c 3M /dev/urandom > golden.raw
truncate -s 8M golden.raw
head -c 1M /dev/urandom >> golden.raw
example 'nbdkit -U /run/nbdkit-qed/vm1.sock --filter=qed file golden.raw qed-overlay=vm1.qed qed-backing-name=golden.raw qed-prefetch=true qed-detach=true'
nbdinfo --size "nbd+unix:///?socket=$tmp/run/vm1.sock" >/dev/null
pid=$(cat "$tmp/ex$n_servers.pid")
until [ $(( $(od -An -tu1 -j16 -N1 vm1.qed) & 1 )) = 0 ]; do
  _alive "$pid" || fail "the vm1 server died before detaching"
  sleep 0.1
done
stop_last
example 'qemu-img compare vm1.qed golden.raw' || fail "vm1.qed differs from golden.raw"
example 'qemu-img check vm1.qed' || fail "qemu-img check vm1.qed"

# Maintenance from the command line (no client).  crash_disk: writes,
# a trim, then SIGKILL: NEED_CHECK set, clusters leaked.
crash_disk () {
  rm -f crash.pid run/crash.sock
  command nbdkit -U "$tmp/run/crash.sock" -P crash.pid "$PLUGIN" disk.qed idle-clean=0
  for _ in $(seq 1 100); do [ -s crash.pid ] && break; sleep 0.1; done
  nbdsh -u "nbd+unix:///?socket=$tmp/run/crash.sock" -c '
h.pwrite(b"x" * (4 << 20), 0); h.flush(); h.trim(2 << 20, 0); h.flush()'
  kill -9 "$(cat crash.pid)"
  for _ in $(seq 1 100); do _alive "$(cat crash.pid)" || break; sleep 0.05; done
  [ "$(need_check disk.qed)" = 1 ] || fail "the crash left NEED_CHECK clear"
}
# with_list GIB: a clean image with a free-cluster list (compact-limit=0):
# 8M written at GIB GiB, its first half trimmed.
with_list () {
  command nbdkit -U - "$PLUGIN" disk.qed compact-limit=0 --run \
    "nbdsh -u \"\$uri\" -c 'o = $1 << 30; h.pwrite(b\"z\" * (8 << 20), o); h.flush(); h.trim(4 << 20, o)'"
  [ "$(/usr/bin/python3 "$TOP/tests/freelist-tool.py" flags disk.qed | cut -d' ' -f3)" = 1 ] ||
    fail "no free-cluster list"
}
# An example with --run has exited: forget its pidfile and socket.
ran_to_end () { rm -f "$tmp/ex$n_servers.pid" "$tmp/run/default.sock"; }
crash_disk
example 'nbdkit qed disk.qed --run true'
ran_to_end
[ "$(need_check disk.qed)" = 0 ] || fail "--run true: NEED_CHECK still set"
qemu_check disk.qed
crash_disk
example 'qemu-img check -r all disk.qed' >/dev/null || true
[ "$(need_check disk.qed)" = 0 ] || fail "qemu-img check -r all: NEED_CHECK still set"
rc=0; qemu-img check disk.qed >/dev/null || rc=$?
[ $rc = 3 ] || fail "qemu-img check after QEMU's repair: rc $rc (leaks expected)"
with_list 1
example 'nbdkit qed disk.qed freelist=false --run true'
ran_to_end
read -r _ _ autoclear < <(/usr/bin/python3 "$TOP/tests/freelist-tool.py" flags disk.qed)
[ "$autoclear" = 0 ] || fail "freelist=false --run true left the list"
qemu_check disk.qed
with_list 2
example 'nbdkit qed disk.qed demote=true --run true'
ran_to_end
read -r _ compat autoclear < <(/usr/bin/python3 "$TOP/tests/freelist-tool.py" flags disk.qed)
[ "$compat$autoclear" = 00 ] || fail "demote=true --run true: compat $compat autoclear $autoclear"
qemu_check disk.qed

# A golden image shared by many VMs: an overlay per export over one
# shared cache; after the server stops, a QEMU chain down to golden.raw.
mkdir images/overlays
head -c 2M /dev/urandom > images/golden.raw
truncate -s 6M images/golden.raw
example 'nbdkit -U /run/nbdkit-qed/golden.sock --filter=qed file /var/lib/nbdkit-qed/golden.raw qed-overlay-dir=/var/lib/nbdkit-qed/overlays qed-shared-cache=/var/lib/nbdkit-qed/overlays/golden-cache.qed qed-backing-name=/var/lib/nbdkit-qed/golden.raw'
nbdsh -u "nbd+unix:///vm1?socket=$tmp/run/golden.sock" -c 'h.pwrite(b"vm1" * 1000, 4096)'
example "qemu-img convert -O qcow2 'nbd+unix:///vm1?socket=/run/nbdkit-qed/golden.sock' vm1.qcow2"
stop_last
example 'qemu-img info --backing-chain /var/lib/nbdkit-qed/overlays/vm1.qed' > chain.txt
grep -q '^backing file: golden-cache.qed' chain.txt ||
  { cat chain.txt; fail "vm1.qed does not name the shared cache"; }
example 'qemu-img compare /var/lib/nbdkit-qed/overlays/vm1.qed vm1.qcow2' ||
  fail "vm1.qed differs from what was served"
qemu_check images/overlays/vm1.qed
qemu_check images/overlays/golden-cache.qed

# A directory of VM disks.
mkdir images/vms
qemu-img create -q -f qed images/vms/web.qed 1G
qemu-img create -q -f qed images/vms/db.qed 2G
qemu-io -f qed -c 'write -P 0x77 1M 1M' images/vms/web.qed >/dev/null
example 'nbdkit -U /run/nbdkit-qed/vms.sock qed dir=/var/lib/nbdkit-qed/vms'
example "nbdinfo --list 'nbd+unix:///?socket=/run/nbdkit-qed/vms.sock'" > list.txt
grep -q '^export="web":' list.txt && grep -q '^export="db":' list.txt ||
  { cat list.txt; fail "nbdinfo --list: web and db not listed"; }
example "qemu-img convert -O qcow2 'nbd+unix:///web?socket=/run/nbdkit-qed/vms.sock' web.qcow2"
qemu-img compare -U -f qcow2 -F qed web.qcow2 images/vms/web.qed || fail "web.qcow2 differs"
stop_last
qemu_check images/vms/web.qed

# The export the other examples use, with some data in it.
qemu-io -f qed -c 'write -P 0x61 0 1M' -c 'write -P 0x62 5G 64k' disk.qed >/dev/null
example 'nbdkit -U /run/nbdkit-qed/disk.sock qed disk.qed'

# qemu-img convert from the export and onto it.
example "qemu-img convert -O qcow2 'nbd+unix:///?socket=/run/nbdkit-qed/disk.sock' copy.qcow2"
qemu-img compare -f qcow2 -F raw copy.qcow2 "$disk_uri" || fail "copy.qcow2 differs"
qemu-img create -f qcow2 source.qcow2 10G >/dev/null
qemu-io -f qcow2 -c 'write -P 0x63 1M 2M' source.qcow2 >/dev/null
example "qemu-img convert -n -O raw source.qcow2 'nbd+unix:///?socket=/run/nbdkit-qed/disk.sock'"
qemu-img compare -f qcow2 -F raw source.qcow2 "$disk_uri" ||
  fail "the export differs from source.qcow2"

# A VM's block layer on the export (paused: no guest to boot); its
# monitor's qemu-io reads what convert wrote.
printf 'info block\nqemu-io virtio0 "read -P 0x63 1M 2M"\nquit\n' > hmp.txt
example "qemu-system-x86_64 -m 1G -drive 'file=nbd+unix:///?socket=/run/nbdkit-qed/disk.sock,format=raw,if=virtio'" \
  -display none -S -monitor stdio -nodefaults < hmp.txt > vm.txt 2>&1 ||
  { cat vm.txt; fail "qemu-system-x86_64 failed"; }
tr -d '\r' < vm.txt | grep -a -q "virtio0.*nbd+unix://?socket=$sock (raw)" ||
  { cat vm.txt; fail "the VM has no nbd drive"; }
tr -d '\r' < vm.txt | grep -a -q "read 2097152/2097152 bytes" ||
  { cat vm.txt; fail "the VM could not read the export"; }

# libvirt: the snippet names this export, over NBD, as a raw disk.
grep '^<\|^ *<' pod-lines.txt > disk.xml
[ "$(wc -l < disk.xml)" -ge 5 ] || fail "no libvirt snippet in the manual"
while IFS= read -r l; do seen "$l"; done < disk.xml
xml_sock=$(/usr/bin/python3 - disk.xml <<'EOF'
import sys, xml.etree.ElementTree as ET
d = ET.parse(sys.argv[1]).getroot()
assert d.tag == "disk" and d.get("type") == "network", d.attrib
assert d.find("driver").get("type") == "raw"
src = d.find("source")
assert src.get("protocol") == "nbd"
host = src.find("host")
assert host.get("transport") == "unix"
print(host.get("socket"))
EOF
) || fail "the libvirt snippet is not a network NBD disk"
nbdinfo --size "nbd+unix:///?socket=$(localize "$xml_sock")" >/dev/null ||
  fail "the libvirt snippet's socket is not the export"

# libguestfs (TCG: this machine's /dev/kvm may not work).
export LIBGUESTFS_BACKEND_SETTINGS=force_tcg
example 'export LIBGUESTFS_BACKEND=direct'
[ "${LIBGUESTFS_BACKEND:-}" = direct ] || fail "LIBGUESTFS_BACKEND not set"
example "virt-filesystems --format=raw -a 'nbd://?socket=/run/nbdkit-qed/disk.sock' --all --long" \
  > vf.txt 2>&1 || { cat vf.txt; fail "virt-filesystems failed"; }
grep -q '^/dev/sda .*device' vf.txt || { cat vf.txt; fail "virt-filesystems: no /dev/sda"; }
example "guestfish --ro --format=raw -a 'nbd://?socket=/run/nbdkit-qed/disk.sock' run : list-devices" \
  > gf.txt 2>&1 || { cat gf.txt; fail "guestfish failed"; }
grep -qx '/dev/sda' gf.txt || { cat gf.txt; fail "guestfish: no /dev/sda"; }
stop_last

# systemd socket activation: the units' socket and command, run by
# systemd-socket-activate (what systemd does for a .socket unit).
listen=$(sed -n 's/^ListenStream=//p' pod-lines.txt)
execstart=$(sed -n 's/^ExecStart=//p' pod-lines.txt)
[ -n "$listen" ] && [ -n "$execstart" ] || fail "no systemd units in the manual"
for l in '[Socket]' "ListenStream=$listen" '[Install]' 'WantedBy=sockets.target' \
         '[Service]' "ExecStart=$execstart"; do
  seen "$l"
done
listen=$(localize "$listen")
cmd=$(localize "$execstart")
cmd=${cmd/#\/usr\/sbin\/nbdkit /nbdkit }
cmd=${cmd/ qed / $PLUGIN }
[ "${cmd%% *}" = nbdkit ] || fail "ExecStart does not run nbdkit: $execstart"
rm -f "$listen"
systemd-socket-activate -l "$listen" bash -c "exec $cmd" > sa.log 2>&1 &
sa_pid=$!
cleanup_fn "kill $sa_pid 2>/dev/null; wait $sa_pid 2>/dev/null"
wait_until 120 test -S "$listen" || fail "socket activation: no socket"
[ -e images/disk.qed ] && fail "the image exists before the first connection"
nbdsh -u "nbd+unix:///?socket=$listen" -c 'h.pwrite(b"activated", 0)' ||
  { cat sa.log; fail "socket activation: no NBD server"; }
[ "$(nbdinfo --size "nbd+unix:///?socket=$listen")" = 10737418240 ] ||
  fail "socket activation: wrong size"
kill "$sa_pid"; wait "$sa_pid" 2>/dev/null || true
qemu_check images/disk.qed
# A restart serves the image it created (create=if-missing).
rm -f "$listen"
systemd-socket-activate -l "$listen" bash -c "exec $cmd" > sa2.log 2>&1 &
sa_pid=$!
cleanup_fn "kill $sa_pid 2>/dev/null; wait $sa_pid 2>/dev/null"
wait_until 120 test -S "$listen" || fail "socket activation: no socket"
nbdsh -u "nbd+unix:///?socket=$listen" -c 'assert h.pread(9, 0) == b"activated"' ||
  { cat sa2.log; fail "socket activation: the restart lost the data"; }
kill "$sa_pid"; wait "$sa_pid" 2>/dev/null || true

# The README's copies of these examples are the manual's lines.
# (Its indented shell lines; the XML and unit files are in fenced blocks.)
sed -n '/^### Using the export/,/^## /p' "$TOP/README.md" |
  perl -ne 'if (/^```/) { $f = !$f; next } next if $f || !/^    / || /^\s*#/;
            chomp; s/^    //;
            if ($c) { s/^\s+//; $l .= " $_" } else { $l = $_ }
            $c = $l =~ s/\s*\\$//; print "$l\n" unless $c' > readme-lines.txt
[ "$(wc -l < readme-lines.txt)" -ge 7 ] || fail "no examples found in README.md"
stray=$(grep -vxF -f pod-lines.txt readme-lines.txt || true)
[ -z "$stray" ] || fail "README.md examples that are not the manual's: $stray"

# Every line of the section was run or checked.
missing=$(grep -vxF -f ran.txt pod-lines.txt || true)
[ -z "$missing" ] || fail "examples in the manual that this test does not run: $missing"
echo OK
