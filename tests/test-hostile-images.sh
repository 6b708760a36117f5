#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Hostile images: a catalogue of corrupt and malicious QED images
# (tests/make-hostile.py) served by the plugin read-only and writable,
# and as an overlay of the filter.  For each one nbdkit must either
# refuse it with a clear message (at start-up, or at the first
# connection) or serve it, failing only the affected requests with EIO.
# Never a crash (signal, sanitizer or valgrind error), never a hang
# (everything runs under timeout), never a change to the file with -r,
# never a peak RSS of 64 MiB or more, never a writable open that grows
# the file (allocated blocks; the client's own writes are allowed for).
# The filter pass checks the manifest's expected outcome, as the plugin
# passes do.
# A subset runs under valgrind to catch reads outside buffers.
# Data read from the images QEMU can read must equal qemu-img convert.
#
# The outcome table goes to the log.  HOSTILE_FILTER=NAME runs only the
# images whose name contains NAME; HOSTILE_VALGRIND=0 skips valgrind.
# test-timeout: 900
source "$(dirname "$0")/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdkit --version
requires /usr/bin/time --version
requires /usr/bin/python3 -c 'import nbd'
[ -f "$PLUGIN" ] || skip "the plugin is not built (make $PLUGIN)"

cat=$tmp/cat
/usr/bin/python3 "$TOP/tests/make-hostile.py" "$cat" >/dev/null
nimages=$(wc -l < "$cat/manifest.tsv")
echo "catalogue: $nimages images"

# ---- The client: reads every 64K chunk (or a sample of a huge image),
# asks for block status, and when writable writes, zeroes, trims and
# flushes.  Prints one line: key=value ... ----
cat > "$tmp/client.py" <<'EOF'
import hashlib, nbd, random, sys, errno
uri, mode = sys.argv[1], sys.argv[2]
res = {}
def out(**kw):
    res.update(kw)
    print(" ".join("%s=%s" % kv for kv in sorted(res.items())))
    sys.exit(0)
h = nbd.NBD()
try:
    h.connect_uri(uri)
except nbd.Error as e:
    out(connect="fail", err=str(e).replace(" ", "_")[:60])
size = h.get_size()
chunk = 65536
nchunks = (size + chunk - 1) // chunk
full = nchunks <= 4096
if full:
    offs = [i * chunk for i in range(nchunks)]
else:
    rng = random.Random(1)
    s = set(range(min(256, nchunks)))
    s |= set(range(max(0, nchunks - 256), nchunks))
    s |= set(rng.randrange(nchunks) for _ in range(512))
    offs = [i * chunk for i in sorted(s)]
ok = eio = other = 0
md5 = hashlib.md5()
bad = []
for off in offs:
    n = min(chunk, size - off)
    try:
        md5.update(h.pread(n, off))
        ok += 1
    except nbd.Error as e:
        md5.update(bytes(n))
        if e.errnum == errno.EIO:
            eio += 1
            bad.append(off)
        else:
            other += 1
            res["othererr"] = str(e).replace(" ", "_")[:60]
            if not h.aio_is_ready() and not h.aio_is_processing():
                break
res.update(size=size, reads=len(offs), ok=ok, eio=eio, other=other)
if full:
    res["md5"] = md5.hexdigest()
# Block status over the sampled range.
bs_err = 0
if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
    for off in offs[:512]:
        n = min(chunk, size - off)
        try:
            h.block_status(n, off, lambda *a: 0)
        except nbd.Error as e:
            if e.errnum != errno.EIO:
                bs_err += 1
res["bs_other"] = bs_err
if mode == "rw" and size > 0:
    werr = weio = 0
    targets = [0, size - 1] + bad[:16] + [offs[len(offs) // 2]]
    for i, off in enumerate(targets):
        n = min(4096, size - off)
        for op in ("write", "zero", "trim", "read"):
            try:
                if op == "write":
                    h.pwrite(b"\xa5" * n, off)
                elif op == "zero":
                    h.zero(n, off)
                elif op == "trim":
                    h.trim(n, off)
                else:
                    h.pread(n, off)
            except nbd.Error as e:
                if e.errnum == errno.EIO:
                    weio += 1
                else:
                    werr += 1
                    res["werr_msg"] = str(e).replace(" ", "_")[:60]
    try:
        h.flush()
    except nbd.Error as e:
        werr += 1
    res.update(weio=weio, werr=werr)
h.shutdown()
out(connect="ok")
EOF

# run_one KIND IMAGE LOG [nbdkit args...]: runs nbdkit in the
# foreground under timeout (and VALGRIND if set), the client against it,
# then SIGTERM.  Sets: started (0/1), rc (nbdkit's exit status), client
# (the client's output line).
run_one () {
  local kind=$1 img=$2 log=$3; shift 3
  local sock=$tmp/s.sock pid i
  rm -f "$sock"
  rm -f "$log.rss"
  if [ -n "$VALGRIND" ]; then
    timeout -k 5 120 $VALGRIND nbdkit -f -v -U "$sock" "$@" >"$log" 2>&1 &
  else
    timeout -k 5 120 /usr/bin/time -o "$log.rss" -f %M \
      nbdkit -f -v -U "$sock" "$@" >"$log" 2>&1 &
  fi
  pid=$!
  started=0 client=""
  # Until it listens or exits (refused): the bound only stops a server
  # that does neither, so it is generous (a loaded machine is slow).
  for i in $(seq 1 ${START_WAIT:-2400}); do
    if [ -S "$sock" ]; then started=1; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.05
  done
  if [ $started = 1 ]; then
    client=$(timeout 120 /usr/bin/python3 "$tmp/client.py" \
               "nbd+unix:///?socket=$sock" "$kind" 2>>"$log") \
      || client="client-failed rc=$?"
    # SIGTERM to nbdkit itself (under time, the grandchild of timeout:
    # time must live to report).
    local target=$pid tp
    if [ -z "$VALGRIND" ]; then
      tp=$(pgrep -P $pid) && target=$(pgrep -P $tp) || target=$pid
    fi
    kill -TERM $target 2>/dev/null || true
  fi
  rc=0
  wait $pid || rc=$?
}

# phrase_in LOG PHRASE
phrase_in () { grep -qF -- "$2" "$1"; }

# first_error LOG: the first nbdkit error line, shortened.
first_error () {
  grep -m1 -E 'error: |nbdkit: .*error' "$1" |
    sed -e 's/.*error: //' -e "s|$cat/||g" -e 's/^w-//' | cut -c1-60
}

# Peak RSS bound (KiB) and allowed growth of a writable image's
# allocated size (the client writes a few 4K pieces).
MAX_RSS_KB=$((64 * 1024))
MAX_GROWTH=$((8 * 1024 * 1024))

# judge EXPECT LOG -> prints the outcome; returns 1 on a mismatch.
judge () {
  local expect=$1 log=$2 kv outcome rss
  if [ $rc -ge 124 ] && [ $rc != 0 ]; then
    echo "CRASH/HANG rc=$rc"; return 1
  fi
  if [ -z "$VALGRIND" ]; then
    rss=$(grep -E '^[0-9]+$' "$log.rss" 2>/dev/null | tail -n1)
    [ -n "$rss" ] || { echo "no peak RSS measured"; return 1; }
    echo "$rss $log" >> "$tmp/rss"
    [ "$rss" -lt $((MAX_RSS_KB + ${EXTRA_RSS_KB:-0})) ] ||
      { echo "peak RSS $((rss / 1024)) MiB"; return 1; }
  fi
  if grep -qE 'AddressSanitizer|runtime error:|ERROR SUMMARY: [1-9]|Invalid read|Invalid write' "$log"; then
    echo "MEMORY ERROR"; return 1
  fi
  if [ $started = 0 ]; then
    outcome="refused: $(first_error "$log")"
    echo "$outcome"
    case "$expect" in
      refuse:*) phrase_in "$log" "${expect#refuse:}" || return 1 ;;
      *) return 1 ;;
    esac
    [ $rc = 1 ] || return 1
    return 0
  fi
  [ $rc = 0 ] || { echo "nbdkit exit status $rc"; return 1; }
  case "$client" in
    *connect=fail*)
      echo "connect failed: $(first_error "$log")"
      case "$expect" in
        connect:*) phrase_in "$log" "${expect#connect:}" || return 1 ;;
        *) return 1 ;;
      esac
      return 0 ;;
    *connect=ok*) ;;
    *) echo "client: $client"; return 1 ;;
  esac
  local ok eio other bs werr weio reads
  kv () { echo "$client" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  ok=$(kv ok) eio=$(kv eio) other=$(kv other) bs=$(kv bs_other)
  reads=$(kv reads) werr=$(kv werr) weio=$(kv weio)
  outcome="served: $eio/$reads EIO"
  [ -n "$weio" ] && outcome="$outcome, writes $weio EIO"
  echo "$outcome"
  [ "$other" = 0 ] && [ "$bs" = 0 ] && [ "${werr:-0}" = 0 ] || return 1
  case "$expect" in
    serve0) [ "$eio" = 0 ] && [ "${weio:-0}" = 0 ] ;;
    serveE) [ "$eio" -gt 0 ] && [ "$ok" -gt 0 ] ;;
    serve) true ;;
    *) false ;;
  esac
}

# cluster_size IMAGE: the header's cluster_size if it is sane, else 0.
cluster_size () {
  /usr/bin/python3 -c '
import struct, sys
try:
    c = struct.unpack("<I", open(sys.argv[1], "rb").read(64)[4:8])[0]
except Exception:
    c = 0
print(c if 4096 <= c <= (64 << 20) else 0)' "$1"
}
# image_size IMAGE: the header's image_size (0 if there is none).
image_size () {
  /usr/bin/python3 -c '
import struct, sys
try:
    print(struct.unpack("<Q", open(sys.argv[1], "rb").read(64)[48:56])[0])
except Exception:
    print(0)' "$1"
}

table=$tmp/table
nfail=0
printf '%-20s | %-48s | %-48s | %s\n' IMAGE "nbdkit -r" "writable" \
  "filter overlay" > "$table"
have_filter=0
[ -f "$FILTER" ] && have_filter=1
[ $have_filter = 1 ] || fail "the filter is not built (make builds both)"

while IFS=$'\t' read -r name ero erw desc efl; do
  case "$name" in *"${HOSTILE_FILTER:-}"*) ;; *) continue ;; esac
  img=$cat/$name.qed
  VALGRIND=

  # Read-only, on the catalogue file itself: it must not change.
  sum0=$(md5sum < "$img")
  run_one ro "$img" "$tmp/$name.ro.log" -r "$PLUGIN" "$img"
  r_ro=$(judge "$ero" "$tmp/$name.ro.log") || {
    nfail=$((nfail+1)); r_ro="FAIL($ero) $r_ro"
    sed 's/^/    | /' "$tmp/$name.ro.log" | tail -n 15; echo "    | client: $client"; }
  [ "$(md5sum < "$img")" = "$sum0" ] || {
    nfail=$((nfail+1)); r_ro="FAIL(modified) $r_ro"; }
  # Data equal to QEMU's reading of the image, where QEMU can read it.
  md5=$(echo "$client" | tr ' ' '\n' | sed -n 's/^md5=//p')
  if [ "$ero" = serve0 ] && [ -n "$md5" ] &&
     qemu-img convert -U -f qed -O raw "$img" "$tmp/conv.raw" 2>/dev/null; then
    if [ "$(md5sum < "$tmp/conv.raw" | cut -d' ' -f1)" = "$md5" ]; then
      r_ro="$r_ro, = qemu"
    else
      nfail=$((nfail+1)); r_ro="FAIL(data differs from qemu-img) $r_ro"
    fi
  fi
  rm -f "$tmp/conv.raw"

  # Writable, on a copy in the same directory (relative backing names).
  w=$cat/w-$name.qed
  cp --sparse=always "$img" "$w"
  a0=$(allocated "$w")
  run_one rw "$w" "$tmp/$name.rw.log" "$PLUGIN" "$w"
  r_rw=$(judge "$erw" "$tmp/$name.rw.log") || {
    nfail=$((nfail+1)); r_rw="FAIL($erw) $r_rw"
    sed 's/^/    | /' "$tmp/$name.rw.log" | tail -n 15; echo "    | client: $client"; }
  a1=$(allocated "$w")
  [ $((a1 - a0)) -le $MAX_GROWTH ] || {
    nfail=$((nfail+1)); r_rw="FAIL(grew by $(( (a1 - a0) >> 20 )) MiB) $r_rw"; }
  # A repaired image must satisfy qemu-img afterwards.
  case "$name" in
    nc-*)
      if [ $started = 1 ]; then
        qrc=0
        qemu-img check "$w" >"$tmp/qc.log" 2>&1 || qrc=$?
        if [ $qrc = 0 ]; then
          r_rw="$r_rw, qemu-img check ok"
        elif [ $qrc = 3 ] && [ "$name" = nc-l1-at-end ]; then
          # Known limit: the L1 never moves, so leaks below it stay.
          r_rw="$r_rw, qemu-img check: leaks only"
        else
          nfail=$((nfail+1)); r_rw="FAIL(qemu-img check) $r_rw"
          sed 's/^/    | /' "$tmp/qc.log"
        fi
      fi ;;
  esac
  rm -f "$w"

  # The filter, with the image as an existing overlay.
  r_f=-
  if [ $have_filter = 1 ]; then
    size=$(/usr/bin/python3 -c '
import struct, sys
try:
    s = struct.unpack("<Q", open(sys.argv[1], "rb").read(64)[48:56])[0]
except Exception:
    s = 0
print(s if 0 < s <= (1 << 30) and s % 512 == 0 else 1048576)' "$img")
    # A memory disk of another size than the image: refused at the
    # first connection (unless the header is refused first).
    efl=${efl:-$erw}
    case "$efl" in
      refuse:*) ;;
      *) [ "$(image_size "$img")" = "$size" ] ||
           efl="connect:is an overlay of a" ;;
    esac
    cp --sparse=always "$img" "$w"
    a0=$(allocated "$w")
    run_one rw "$w" "$tmp/$name.f.log" --filter="$FILTER" memory "$size" \
      qed-overlay="$w"
    # Copy-on-read holds one whole cluster of the plugin's data (64 MiB
    # with 64M clusters) on top of the bound.
    r_f=$(EXTRA_RSS_KB=$(( $(cluster_size "$img") / 1024 )) \
          judge "$efl" "$tmp/$name.f.log") || {
      nfail=$((nfail+1)); r_f="FAIL($efl) $r_f"
      sed 's/^/    | /' "$tmp/$name.f.log" | tail -n 15; echo "    | client: $client"; }
    a1=$(allocated "$w")
    [ $((a1 - a0)) -le $MAX_GROWTH ] || {
      nfail=$((nfail+1)); r_f="FAIL(grew by $(( (a1 - a0) >> 20 )) MiB) $r_f"; }
    rm -f "$w"
  fi
  printf '%-20s | %-48s | %-48s | %s\n' "$name" "$r_ro" "$r_rw" "$r_f" \
    >> "$table"
done < "$cat/manifest.tsv"

# ---- Valgrind: a subset, read-only and writable. ----
vg_images="l2e-eof l1e-straddle l2-random trunc-mid-l2 l1e-dup l2e-own-table
           nc-l2-random nc-l2e-dup geom-2m16-l1e bk-loop-a trunc-data base4k"
if [ "${HOSTILE_VALGRIND:-1}" != 0 ] && command -v valgrind >/dev/null; then
  echo >> "$table"
  echo "valgrind (memcheck, --error-exitcode=99):" >> "$table"
  for name in $vg_images; do
    [ -f "$cat/$name.qed" ] || continue
    case "$name" in *"${HOSTILE_FILTER:-}"*) ;; *) continue ;; esac
    line=$(grep -P "^$name\t" "$cat/manifest.tsv")
    ero=$(echo "$line" | cut -f2) erw=$(echo "$line" | cut -f3)
    VALGRIND="valgrind -q --error-exitcode=99 --leak-check=no"
    START_WAIT=2400
    run_one ro "$cat/$name.qed" "$tmp/$name.vg-ro.log" -r "$PLUGIN" \
      "$cat/$name.qed"
    v_ro=$(judge "$ero" "$tmp/$name.vg-ro.log") || {
      nfail=$((nfail+1)); v_ro="FAIL rc=$rc $v_ro"
      sed 's/^/    | /' "$tmp/$name.vg-ro.log" | grep -v 'debug:' | tail -n 30; }
    w=$cat/w-$name.qed
    cp --sparse=always "$cat/$name.qed" "$w"
    run_one rw "$w" "$tmp/$name.vg-rw.log" "$PLUGIN" "$w"
    v_rw=$(judge "$erw" "$tmp/$name.vg-rw.log") || {
      nfail=$((nfail+1)); v_rw="FAIL rc=$rc $v_rw"
      sed 's/^/    | /' "$tmp/$name.vg-rw.log" | grep -v 'debug:' | tail -n 30; }
    rm -f "$w"
    printf '%-20s | %-48s | %s\n' "$name" "$v_ro" "$v_rw" >> "$table"
    VALGRIND= START_WAIT=
  done
fi

cat "$table"
echo
echo "largest peak RSS: $(sort -n "$tmp/rss" | tail -n1 | sed "s|$tmp/||")"
echo "hostile images: $nimages, failures: $nfail"
[ $nfail = 0 ]
