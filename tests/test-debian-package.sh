#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The Debian packages, built here (make check-packages builds them on
# Debian 12 and 13 in clean roots and installs them; this is the quick
# form): dpkg-buildpackage -us -uc -b in a fresh git copy of the tree,
# which stays clean (every build product ignored); the two packages'
# contents in nbdkit's own directories; the filter's Depends on exactly
# the nbdkit it was built against (and what that admits); the unpacked
# objects load; lintian has no error, and every warning is explained in
# debian/README.source.
# test-timeout: 600
source "$(dirname "$0")/functions.sh"
requires dpkg-buildpackage --version
requires test -x /usr/bin/dh
requires lintian --version
requires git --version
requires pkg-config --exists nbdkit
plugindir=$(pkg-config --variable=plugindir nbdkit)
filterdir=$(pkg-config --variable=filterdir nbdkit)
v=$(pkg-config --modversion nbdkit)

# A clone of the tree as it is (tracked and new files).
mkdir "$tmp/src"
(cd "$TOP" && git ls-files -z --cached --others --exclude-standard |
   tar --null -T - -cf -) | tar -C "$tmp/src" -xf -
cd "$tmp/src"
git init -q . && git add -A &&
  git -c user.name=t -c user.email=t@example.com commit -q -m copy ||
  fail "git copy"
root=; [ "$(id -u)" = 0 ] || root=-rfakeroot
dpkg-buildpackage -us -uc -b $root > ../build.log 2>&1 ||
  { tail -n 30 ../build.log; fail "dpkg-buildpackage failed"; }
grep -q 'unit-tests: .* 0 failures' ../build.log || fail "the unit tests did not run at build time"
left=$(git status --porcelain)
[ -z "$left" ] || fail "the build left files git does not ignore: $left"
cd "$tmp"
ls ./*.deb
plugin_deb=$(ls nbdkit-qed_*.deb) filter_deb=$(ls nbdkit-qed-filter_*.deb) ||
  fail "the two packages were not built"

# Contents.
dpkg-deb -c "$plugin_deb" | awk '{print $6}' | sed 's|^\./|/|' > plugin.list
dpkg-deb -c "$filter_deb" | awk '{print $6}' | sed 's|^\./|/|' > filter.list
for f in "$plugindir/nbdkit-qed-plugin.so" /usr/share/man/man1/nbdkit-qed.1.gz \
         /usr/share/man/man1/nbdkit-qed-plugin.1.gz \
         /usr/share/man/man1/nbdkit-qed-filter.1.gz; do
  grep -qx "$f" plugin.list || { cat plugin.list; fail "nbdkit-qed lacks $f"; }
done
grep -qx "$filterdir/nbdkit-qed-filter.so" filter.list ||
  { cat filter.list; fail "nbdkit-qed-filter lacks the filter"; }
! grep -q 'filter\.so' plugin.list || fail "the filter is in nbdkit-qed"
! grep -q 'plugin\.so\|/man/' filter.list || fail "nbdkit-qed-filter has more"

# Depends: exactly the nbdkit this was built against.
d=$(dpkg-deb -f "$filter_deb" Depends)
echo "nbdkit-qed-filter Depends: $d"
case "$d" in
  "nbdkit (>= $v), nbdkit (<< $v.~),"*) ;;
  *) fail "the filter does not depend on exactly nbdkit $v" ;;
esac
# ... which admits every Debian revision of $v and nothing else.
ok () { dpkg --compare-versions "$1" ge "$v" && dpkg --compare-versions "$1" lt "$v.~"; }
for good in "$v-1" "$v-1+deb12u1" "$v+dfsg-2" "1:$v-1~bpo"; do
  [ "${good%%:*}" != "$good" ] && continue   # an epoch is another version
  ok "$good" || fail "Depends would refuse nbdkit $good"
done
IFS=. read -r a b c <<<"$v"
for bad in "$a.$b.$((c + 1))-1" "$a.$((b + 1)).0-1" "$v.1-1" "$a.$b.$((c - 1))-1" \
           "$v~rc1-1"; do
  ! ok "$bad" || fail "Depends would admit nbdkit $bad"
done
dpkg-deb -f "$plugin_deb" Depends | grep -q 'nbdkit (>= 1.32)' ||
  fail "the plugin does not depend on nbdkit >= 1.32"

# The unpacked objects load into this nbdkit.
dpkg-deb -x "$plugin_deb" stage
dpkg-deb -x "$filter_deb" stage
nbdkit "stage$plugindir/nbdkit-qed-plugin.so" --version | grep -q '^qed ' ||
  fail "the packaged plugin does not load"
nbdkit --filter="stage$filterdir/nbdkit-qed-filter.so" null --version |
  grep -q '^qed ' || fail "the packaged filter does not load"

# debian/tests/control as autopkgtest reads it (where it is installed).
if [ -f /usr/share/autopkgtest/lib/testdesc.py ]; then
  (cd "$TOP" && /usr/bin/python3 -c '
import sys
sys.path.insert(0, "/usr/share/autopkgtest/lib")
import testdesc
tests, _ = testdesc.parse_debian_source(".", ["isolation-container"], "amd64")
for t in tests:
    print("autopkgtest:", t.name, t.depends, sorted(t.restrictions))
assert [t.name for t in tests] == ["smoke"]
assert {"nbdkit-qed", "nbdkit-qed-filter", "python3-libnbd"} <= set(tests[0].depends)
') || fail "autopkgtest does not read debian/tests/control as expected"
fi

# lintian: no error; warnings only those README.source explains.
lintian --fail-on error ./*.changes > lintian.log 2>&1 ||
  { cat lintian.log; fail "lintian reports errors"; }
cat lintian.log
for tag in $(sed -n 's/^W: [^ ]*: \([^ ]*\).*/\1/p' lintian.log | sort -u); do
  grep -qw -- "$tag" "$TOP/debian/README.source" ||
    fail "lintian warning $tag is not explained in debian/README.source"
done
echo OK
