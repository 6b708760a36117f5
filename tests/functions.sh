# SPDX-License-Identifier: BSD-3-Clause
# Sourced by every tests/test-*.sh.  Conventions:
#   exit 0 = pass, 77 = skip (with a reason on the last line), else fail.
#   Work in $tmp (removed at exit); servers on unix sockets in $tmp.
set -euo pipefail
TOP=${TOP:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PLUGIN=$TOP/plugin/nbdkit-qed-plugin.so
FILTER=$TOP/filter/nbdkit-qed-filter.so
export PATH=/usr/bin:/usr/sbin:/bin:/sbin:$PATH
export LANG=C LC_ALL=C
tmp=$(mktemp -d /tmp/nbdkit-qed-test.XXXXXX)
_cleanups=()
cleanup_fn () { _cleanups+=("$*"); }
_run_cleanups () {
  local rc=$?
  for ((i=${#_cleanups[@]}-1; i>=0; i--)); do eval "${_cleanups[i]}" || true; done
  rm -rf "$tmp"
  exit $rc
}
trap _run_cleanups EXIT INT TERM

skip () { echo "SKIP: $*"; exit 77; }
fail () { echo "FAIL: $*" >&2; exit 1; }
requires () { "$@" >/dev/null 2>&1 || skip "requires: $*"; }

# wait_until SECONDS CMD...: run CMD every 0.05 s until it succeeds;
# returns 1 if it still fails after SECONDS.  For events nothing
# notifies us of (a timer in the server, a pidfile, a process gone):
# a pass costs only the time to the event, so the bound is generous
# (a machine loaded with other work is many times slower).
wait_until () {
  local n=$(( $1 * 20 )); shift
  until "$@"; do
    n=$((n - 1)); [ $n -gt 0 ] || return 1
    sleep 0.05
  done
}
# start_nbdkit NAME ARGS...: daemonise nbdkit on $tmp/NAME.sock, with a
# pidfile $tmp/NAME.pid; it is killed (SIGTERM, waited for) at exit.
# The parent returns once the socket listens; the daemon writes the
# pidfile just after, so wait for it (not for a fixed time).
start_nbdkit () {
  local name=$1; shift
  rm -f "$tmp/$name.sock" "$tmp/$name.pid"
  nbdkit -v -U "$tmp/$name.sock" -P "$tmp/$name.pid" "$@" 2>>"$tmp/$name.log" \
    || { cat "$tmp/$name.log" >&2; fail "nbdkit $name did not start"; }
  wait_until 120 test -s "$tmp/$name.pid" || fail "nbdkit $name: no pidfile"
  cleanup_fn stop_nbdkit "$name"
}
# _alive PID: the process, or any of its threads, still runs.  Daemons
# are reparented to PID 1, which may reap them late, so a zombie counts
# as gone, but only once it is the last of its threads: the thread
# group's leader turns zombie as soon as it exits itself, while the
# other threads may still be exiting, holding the descriptors (and with
# them an image's locks) until the last one is gone.
_alive () {
  kill -0 "$1" 2>/dev/null || return 1
  grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null || return 0
  [ "$(ls "/proc/$1/task" 2>/dev/null | wc -l)" -gt 1 ]
}
# stop_nbdkit NAME: SIGTERM and wait until it has exited (it flushes,
# reclaims space and clears NEED_CHECK on the way out).
stop_nbdkit () {
  local name=$1 pid
  [ -s "$tmp/$name.pid" ] || return 0
  pid=$(cat "$tmp/$name.pid")
  kill "$pid" 2>/dev/null || true
  wait_until 300 _gone "$pid" || fail "nbdkit $name did not exit"
  rm -f "$tmp/$name.pid"
}
_gone () { ! _alive "$1"; }
# wait_log NAME PATTERN: wait until the log of start_nbdkit NAME has a
# line matching PATTERN (an event the server logs); fails if the server
# exits first.
wait_log () {
  local pid
  pid=$(cat "$tmp/$1.pid")
  until grep -q "$2" "$tmp/$1.log"; do
    _alive "$pid" || { cat "$tmp/$1.log"; fail "$1 exited before '$2'"; }
    sleep 0.1
  done
}
# kill9_nbdkit NAME: simulate a crash.
kill9_nbdkit () {
  local name=$1 pid
  pid=$(cat "$tmp/$name.pid")
  kill -9 "$pid" 2>/dev/null || true
  # Its locks go only when it is gone: the next step may reopen.
  wait_until 120 _gone "$pid" || fail "nbdkit $name survived SIGKILL"
  rm -f "$tmp/$name.pid"
}
uri () { echo "nbd+unix:///?socket=$tmp/$1.sock"; }
# need_check FILE: prints 1 if the NEED_CHECK bit (byte 16, bit 1) is set.
need_check () { echo $(( ($(od -An -tu1 -j16 -N1 "$1") >> 1) & 1 )); }
# qemu_check FILE: qemu-img check must exit 0.
qemu_check () { qemu-img check "$1" || fail "qemu-img check $1 failed (rc $?)"; }
# qemu_check_phantom IMAGE: like qemu_check, for files that may hold
# cluster_size-1 clusters or more (16 MiB with 4K clusters): QEMU counts
# the file's clusters dividing by cs-1 and reports the difference as
# leaks past EOF (docs/qemu-differences.md).  Exit 3 passes only when
# the leaks are exactly those, so one real leak still fails.
qemu_check_phantom () {
  local img=$1 rc=0 json
  json=$(qemu-img check --output=json "$img") || rc=$?
  [ $rc = 0 ] && return 0
  [ $rc = 3 ] || { echo "$json"; fail "qemu-img check $img: rc $rc"; }
  /usr/bin/python3 - "$img" "$json" <<'EOF' || fail "qemu-img check $img: real leaks"
import json, os, struct, sys
img, j = sys.argv[1], json.loads(sys.argv[2])
cs = struct.unpack("<I", open(img, "rb").read(8)[4:8])[0]
n = (os.path.getsize(img) + cs - 1) // cs
phantom = n * cs // (cs - 1) - n
print("leaks", j.get("leaks"), "of which phantom", phantom)
assert j.get("corruptions", 0) == 0 and j.get("check-errors", 0) == 0
assert j.get("leaks", 0) == phantom
EOF
}
# qemu_check_live IMAGE: the same while a server has IMAGE open for
# writing (its lock makes QEMU refuse without -U, force-share).
qemu_check_live () {
  qemu-img check -U "$1" || fail "qemu-img check -U $1 failed (rc $?)"; }
# run_nbdkit ARGS...: run nbdkit (usually with --run) on $tmp/run.sock.
run_nbdkit () { rm -f "$tmp/run.sock"; nbdkit -U "$tmp/run.sock" "$@"; }
# allocated FILE: bytes the file occupies (its length may include holes).
allocated () { echo $(( $(stat -c %b "$1") * $(stat -c %B "$1") )); }
# info_field FILE KEY: the value of "KEY: VALUE" in nbdinfo's text output
# saved in FILE (its first word: newer nbdinfo adds " (64K)" to sizes).
info_field () {
  awk -v k="$2:" '{ sub(/^[ \t]+/, "") } $1 == k { print $2; exit }' "$1"; }
# maps_match URI IMAGE: nbdinfo's data / hole,zero runs over the export
# equal qemu-img map's data / zero runs of IMAGE (through its chain).
# IMAGE may be open in the server (-U: share its lock).
maps_match () {
  nbdinfo --map --json "$1" > "$tmp/nbd.map"
  qemu-img map -U --output=json "$2" > "$tmp/qemu.map"
  /usr/bin/python3 - "$tmp/nbd.map" "$tmp/qemu.map" <<'EOF'
import json, sys
def runs(items):
    out = []
    for start, length, kind in items:
        if out and out[-1][2] == kind and out[-1][1] == start:
            out[-1][1] = start + length
        else:
            out.append([start, start + length, kind])
    return out
names = {0: "data", 3: "hole,zero"}
nbd = runs([(e["offset"], e["length"], names.get(e["type"], "type%d" % e["type"]))
            for e in json.load(open(sys.argv[1]))])
qm = runs([(e["start"], e["length"],
            "data" if e["data"] else "hole,zero" if e["zero"] else "hole")
           for e in json.load(open(sys.argv[2]))])
if nbd != qm:
    print("nbdinfo --map:", nbd)
    print("qemu-img map: ", qm)
    sys.exit(1)
EOF
}
# start_nginx DOCROOT: serve DOCROOT over HTTP (with Range support, as
# any static server) on 127.0.0.1 and a free port, set NGINX_URL
# (http://127.0.0.1:PORT); stopped at exit.  The access log
# $tmp/nginx/access.log has one line per request: METHOD STATUS
# BODY-BYTES "RANGE".
start_nginx () {
  local root=$1 port try d=$tmp/nginx
  command -v nginx >/dev/null || skip "nginx is not installed (apt-get install nginx-light)"
  mkdir -p "$d"
  for try in 1 2 3 4 5; do
    port=$(/usr/bin/python3 -c 'import socket; s = socket.socket()
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat > "$d/nginx.conf" <<NGINX
daemon off;
master_process off;
pid $d/nginx.pid;
error_log $d/error.log;
events { worker_connections 64; }
http {
  log_format bytes '\$request_method \$status \$body_bytes_sent "\$http_range"';
  access_log $d/access.log bytes;
  client_body_temp_path $d/body;
  proxy_temp_path $d/proxy;
  fastcgi_temp_path $d/fastcgi;
  uwsgi_temp_path $d/uwsgi;
  scgi_temp_path $d/scgi;
  types { }
  default_type application/octet-stream;
  server { listen 127.0.0.1:$port; root $root; }
}
NGINX
    nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" &
    NGINX_PID=$!
    for _ in $(seq 1 50); do
      /usr/bin/python3 -c 'import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" \
        2>/dev/null && break
      _alive "$NGINX_PID" || break
      sleep 0.1
    done
    if _alive "$NGINX_PID"; then
      cleanup_fn "kill $NGINX_PID; wait $NGINX_PID"
      NGINX_URL=http://127.0.0.1:$port
      return 0
    fi
    wait "$NGINX_PID" || true              # the port was taken: again
  done
  cat "$d/error.log" >&2
  fail "nginx did not start"
}
# http_body_bytes: bytes of data (GET bodies) the nginx of start_nginx
# has sent so far.
http_body_bytes () {
  awk '$1 == "GET" { n += $3 } END { print n + 0 }' "$tmp/nginx/access.log"; }

# expect_fail WHAT PATTERN NBDKIT-ARGS...: nbdkit must refuse to start
# (or fail its first connection), saying PATTERN ($tmp/err.txt).
expect_fail () {
  local what=$1 pattern=$2; shift 2
  if nbdkit -U - "$@" --run 'nbdinfo --size "$uri"' >"$tmp/out.txt" \
       2>"$tmp/err.txt"; then
    fail "$what: nbdkit succeeded"
  fi
  grep -q -- "$pattern" "$tmp/err.txt" ||
    { cat "$tmp/err.txt"; fail "$what: no message '$pattern'"; }
}

# as_nobody CMD...: run CMD as the user nobody (the tests run as root).
as_nobody () { runuser -u nobody -- "$@"; }

# same_data QED RAW: the QED image reads as RAW does (qemu-img compare).
same_data () {
  qemu-img compare -f qed -F raw "$1" "$2" >/dev/null || fail "$1 differs from $2"
}

# The free-cluster list tool (tests/freelist-tool.py): flags FILE prints
# the features, compat and autoclear words; autoclear FILE its bit 0x1.
FREELIST_TOOL="/usr/bin/python3 $TOP/tests/freelist-tool.py"
flags () { $FREELIST_TOOL flags "$1"; }
autoclear () { set -- $(flags "$1"); echo $(( $3 & 1 )); }

# build_helper NAME: the helper program tests/NAME, built (or found up
# to date) by the Makefile, which holds every helper's build rule.
build_helper () {
  make -s -C "$TOP" "tests/$1" >/dev/null || fail "cannot build tests/$1"
}

# Fault injection (tests/faultsim.c): build_faultsim builds the shim and
# sets $FAULTSIM; with FAULTSIM_FILE and FAULTSIM_DIR exported and
# LD_PRELOAD=$FAULTSIM, `inject KIND SPEC` makes calls of KIND
# (pread|pwrite|fdatasync|ftruncate|fallocate) on that file fail,
# `uninject KIND` stops it, `fault_hits KIND` counts injected failures.
build_faultsim () {
  build_helper faultsim.so
  FAULTSIM=$TOP/tests/faultsim.so
  export FAULTSIM_DIR=$tmp/faults
  mkdir -p "$FAULTSIM_DIR"
}
inject () { echo "$2" > "$FAULTSIM_DIR/$1.new"; mv -f "$FAULTSIM_DIR/$1.new" "$FAULTSIM_DIR/$1"; }
uninject () { rm -f "$FAULTSIM_DIR/$1"; }
fault_hits () { grep -c "^$1 " "$FAULTSIM_DIR/log" 2>/dev/null || true; }
# small_fs DIR SIZE: mount a tmpfs of SIZE on DIR (unmounted at exit),
# for ENOSPC; fill_fs DIR: use up its free space (leaves DIR/filler).
small_fs () {
  mkdir -p "$1"
  mount -t tmpfs -o size="$2" tmpfs "$1" || skip "cannot mount a tmpfs (not root?)"
  cleanup_fn "umount -l '$1'"
}
fill_fs () { dd if=/dev/zero of="$1/filler" bs=64k status=none 2>/dev/null || true; }
# make_gapped_base: base.raw, 8 MiB of 3 MiB random data, a 2 MiB hole
# (zero clusters from the plugin's extents) and 3 MiB random data, and
# its copy orig.raw (the detach tests change base.raw later).
make_gapped_base () {
  head -c $((3 << 20)) /dev/urandom > base.raw
  truncate -s $((5 << 20)) base.raw
  head -c $((3 << 20)) /dev/urandom >> base.raw
  cp base.raw orig.raw
}
