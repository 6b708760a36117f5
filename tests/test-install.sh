#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# make install / make uninstall with DESTDIR and PREFIX: the objects in
# nbdkit's directories, the manual and its nbdkit-qed-plugin(1) and
# nbdkit-qed-filter(1) names, and nothing left after uninstall.
source "$(dirname "$0")/functions.sh"
requires make --version
requires pkg-config --exists nbdkit
plugindir=$(pkg-config --variable=plugindir nbdkit)
filterdir=$(pkg-config --variable=filterdir nbdkit)
stage=$tmp/stage
cd "$tmp"

make -s -C "$TOP" install DESTDIR="$stage" PREFIX=/opt/qed >make.log 2>&1 ||
  { cat make.log; fail "make install failed"; }
for f in "$plugindir/nbdkit-qed-plugin.so" "$filterdir/nbdkit-qed-filter.so" \
         /opt/qed/share/man/man1/nbdkit-qed.1 \
         /opt/qed/share/man/man1/nbdkit-qed-plugin.1 \
         /opt/qed/share/man/man1/nbdkit-qed-filter.1; do
  [ -f "$stage$f" ] || { find "$stage"; fail "not installed: $f"; }
done
# The installed objects load; the two page names show the manual.
nbdkit "$stage$plugindir/nbdkit-qed-plugin.so" --version | grep -q '^qed ' ||
  fail "the installed plugin does not load"
nbdkit --filter="$stage$filterdir/nbdkit-qed-filter.so" null --version |
  grep -q '^qed ' || fail "the installed filter does not load"
grep -q '^\.TH' "$stage/opt/qed/share/man/man1/nbdkit-qed.1" ||
  fail "nbdkit-qed.1 is not a man page"
for page in nbdkit-qed-plugin nbdkit-qed-filter; do
  [ "$(cat "$stage/opt/qed/share/man/man1/$page.1")" = ".so man1/nbdkit-qed.1" ] ||
    fail "$page.1 does not point at nbdkit-qed.1"
  # Where man is installed, it follows the link.
  if command -v man >/dev/null; then
    (cd "$stage/opt/qed/share/man" && man -l "man1/$page.1" 2>/dev/null) |
      grep -q "nbdkit-qed - nbdkit plugin and filter" ||
      fail "man $page does not show the manual"
  fi
done

make -s -C "$TOP" uninstall DESTDIR="$stage" PREFIX=/opt/qed >make.log 2>&1 ||
  { cat make.log; fail "make uninstall failed"; }
left=$(find "$stage" -type f)
[ -z "$left" ] || fail "left after uninstall: $left"
echo OK
