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

# start_nbdkit NAME ARGS...: daemonise nbdkit on $tmp/NAME.sock, with a
# pidfile $tmp/NAME.pid; it is killed (SIGTERM, waited for) at exit.
start_nbdkit () {
  local name=$1; shift
  rm -f "$tmp/$name.sock" "$tmp/$name.pid"
  nbdkit -v -U "$tmp/$name.sock" -P "$tmp/$name.pid" "$@" 2>>"$tmp/$name.log" \
    || { cat "$tmp/$name.log" >&2; fail "nbdkit $name did not start"; }
  for _ in $(seq 1 300); do [ -s "$tmp/$name.pid" ] && break; sleep 0.1; done
  [ -s "$tmp/$name.pid" ] || fail "nbdkit $name: no pidfile"
  cleanup_fn stop_nbdkit "$name"
}
# _alive PID: running and not a zombie (daemons are reparented to PID 1,
# which may reap them late; a zombie has finished all its I/O).
_alive () { kill -0 "$1" 2>/dev/null && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
# stop_nbdkit NAME: SIGTERM and wait until it has exited (it flushes,
# reclaims space and clears NEED_CHECK on the way out).
stop_nbdkit () {
  local name=$1 pid
  [ -s "$tmp/$name.pid" ] || return 0
  pid=$(cat "$tmp/$name.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 600); do _alive "$pid" || break; sleep 0.05; done
  _alive "$pid" && fail "nbdkit $name did not exit"
  rm -f "$tmp/$name.pid"
}
# kill9_nbdkit NAME: simulate a crash.
kill9_nbdkit () {
  local name=$1 pid
  pid=$(cat "$tmp/$name.pid")
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 200); do _alive "$pid" || break; sleep 0.05; done
  rm -f "$tmp/$name.pid"
}
uri () { echo "nbd+unix:///?socket=$tmp/$1.sock"; }
# need_check FILE: prints 1 if the NEED_CHECK bit (byte 16, bit 1) is set.
need_check () { echo $(( ($(od -An -tu1 -j16 -N1 "$1") >> 1) & 1 )); }
# qemu_check FILE: qemu-img check must exit 0.
qemu_check () { qemu-img check "$1" || fail "qemu-img check $1 failed (rc $?)"; }
