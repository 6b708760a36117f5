#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# make check-packages: the Debian packages (debian/), built, linted,
# installed and smoke-tested on Debian 12 (bookworm: nbdkit 1.32) and
# Debian 13 (trixie: nbdkit 1.42).  Needs root and mmdebstrap.
#
# For each system, in roots made by mmdebstrap and cached as
# tests/check-debian13.sh's (tests/debian-root.sh):
#   build     dpkg-buildpackage -us -uc -b of a fresh copy of the sources
#             (the tracked and new files, what a clone has) in a minimal
#             root (mmdebstrap's buildd variant: build-essential) with only
#             the Build-Depends of debian/control, so a missing one fails
#   lintian   that system's lintian on the .changes: no error, and every
#             warning tag named in debian/README.source (where each is
#             explained)
#   depends   the filter depends on exactly the nbdkit it was built
#             against (pkg-config --modversion nbdkit in the build root)
#   install   apt install ./nbdkit-qed_*.deb ./nbdkit-qed-filter_*.deb (as
#             the README says) in a clean root that has only nbdkit and
#             the smoke test's Depends (debian/tests/control), used through a
#             throw-away overlay so that the cached root stays clean
#   smoke     each test of debian/tests/control, run there with nothing
#             of the sources on the path (just debian/tests copied in)
# and once both are built:
#   refuse    the filter built for one nbdkit does not install with the
#             other (apt refuses it: nbdkit would not load it)
# Ends with "N passed, M failed"; the exit status is non-zero on failure.
# Usage: tests/check-packages.sh [bookworm|trixie...]   (default both)
# Logs (build, lintian, install, smoke) go to tests/logs-packages/.
set -uo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
source tests/debian-root.sh

[ "$(id -u)" = 0 ] || { echo "check-packages: needs root (mmdebstrap, chroot, mounts)" >&2; exit 1; }
suites=("$@"); [ ${#suites[@]} -gt 0 ] || suites=(bookworm trixie)

logs=$top/tests/logs-packages
rm -rf "$logs"; mkdir -p "$logs"
work=$(mktemp -d /var/tmp/nbdkit-qed-packages.XXXXXX)
trap 'rm -rf "$work"' EXIT
pass=0 fail=0 failed=()
result () {     # NAME RC
  if [ "$2" = 0 ]; then pass=$((pass+1)); echo "PASS: $1"
  else fail=$((fail+1)); failed+=("$1"); echo "FAIL: $1 (log: tests/logs-packages/$1.log)"
       tail -n 15 "$logs/$1.log" 2>/dev/null | sed 's/^/    | /'; fi
}

# A field of debian/control or debian/tests/control as package names:
# alternatives reduced to the first, versions dropped, debhelper-compat
# is debhelper.
field_pkgs () {   # FILE FIELD
  sed -n "/^$2:/,/^[^ ]/p" "$1" | sed -e "s/^$2://" -e '/^[A-Z][-A-Za-z]*:/d' |
    tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' -e 's/^ *//' -e 's/ *$//' |
    sed -e 's/^debhelper-compat$/debhelper/' -e '/^@$/d' -e '/^$/d' | tr '\n' ' '
}
build_deps=$(field_pkgs debian/control Build-Depends)
# The clean roots: the smoke test's Depends, and what the packages
# depend on (nbdkit), so that apt installs them without a network.
test_deps="nbdkit $(field_pkgs debian/tests/control Depends)"
tests=$(sed -n 's/^Tests: *//p' debian/tests/control | tr ',' ' ')

# The sources: tracked and new files, no build products.
mkdir -p "$work/src"
if git rev-parse >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard |
    tar --null -T - -cf - | tar -C "$work/src" -xf -
else
  tar --exclude=./tests/logs --exclude='./tests/logs-*' -cf - . | tar -C "$work/src" -xf -
fi

for suite in "${suites[@]}"; do
  case $suite in
    bookworm) sys=debian12 ;; trixie) sys=debian13 ;;
    *) echo "check-packages: unknown suite $suite" >&2; exit 1 ;;
  esac
  t0=$(date +%s)
  out=$work/$sys
  mkdir -p "$out/build" "$out/tests"
  cp -a "$work/src" "$out/build/src"
  cp -a debian/tests/. "$out/tests/"

  # build
  rc=0
  debian_root pkgbuild-$sys "$suite" buildd "$build_deps lintian" \
    >"$logs/$sys-build.log" 2>&1 &&
  in_root "$root" --bind "$out/build:/build" -- \
    'cd /build/src && dpkg-buildpackage -us -uc -b' \
    >>"$logs/$sys-build.log" 2>&1 || rc=1
  ls "$out"/build/nbdkit-qed_*.deb "$out"/build/nbdkit-qed-filter_*.deb \
    >/dev/null 2>&1 || rc=1
  result "$sys-build" $rc
  buildroot=$root
  if [ $rc != 0 ]; then
    for c in lintian depends install smoke; do
      echo "not built" > "$logs/$sys-$c.log"; result "$sys-$c" 1
    done
    continue
  fi

  # lintian: no error; warnings only those README.source explains.
  rc=0
  in_root "$buildroot" --bind "$out/build:/build" -- \
    'cd /build && lintian --version && lintian --display-info --pedantic --fail-on error *.changes' \
    >"$logs/$sys-lintian.log" 2>&1 || rc=1
  for tag in $(sed -n 's/^W: [^ ]*: \([^ ]*\).*/\1/p' "$logs/$sys-lintian.log" | sort -u); do
    grep -qw -- "$tag" debian/README.source ||
      { echo "lintian warning $tag is not explained in debian/README.source" \
          >>"$logs/$sys-lintian.log"; rc=1; }
  done
  result "$sys-lintian" $rc
  grep -E '^[EW]: ' "$logs/$sys-lintian.log" | sed "s/^/    $sys lintian: /"

  # depends: exactly the nbdkit of the build root.
  rc=0
  {
    v=$(chroot "$buildroot" pkg-config --modversion nbdkit)
    d=$(dpkg-deb -f "$out"/build/nbdkit-qed-filter_*.deb Depends)
    echo "built against nbdkit $v; Depends: $d"
    case " $d," in
      *" nbdkit (>= $v), nbdkit (<< $v.~),"*) ;;
      *) echo "the filter does not depend on exactly nbdkit $v"; exit 1 ;;
    esac
  } >"$logs/$sys-depends.log" 2>&1 || rc=1
  result "$sys-depends" $rc

  # install, then smoke, in a throw-away overlay of the clean root.
  rc=0
  debian_root pkgtest-$sys "$suite" apt "$test_deps" \
    >"$logs/$sys-install.log" 2>&1 || rc=1
  cp "$out"/build/nbdkit-qed_*.deb "$out"/build/nbdkit-qed-filter_*.deb "$out/"
  if [ $rc = 0 ]; then
    in_root "$root" --overlay --bind "$out:/pkgs" -- '
      set -e
      cd /pkgs
      echo "== apt install ./nbdkit-qed_*.deb ./nbdkit-qed-filter_*.deb"
      apt -o Acquire::Languages=none install -y --no-install-recommends \
        ./nbdkit-qed_*.deb ./nbdkit-qed-filter_*.deb > /tmp/install.log 2>&1 ||
        { cat /tmp/install.log; echo "apt install failed" >&2; exit 1; }
      cat /tmp/install.log
      dpkg -s nbdkit-qed nbdkit-qed-filter | grep -E "^(Package|Status|Version)"
      cp -a tests /opt/debian-tests
      cd /
      ret=0
      for t in $1; do
        echo "== smoke: $t"
        export AUTOPKGTEST_TMP=$(mktemp -d)
        /opt/debian-tests/$t || { echo "== $t: FAILED"; ret=1; }
      done
      exit $ret' smoke "$tests" >"$logs/$sys-smoke.log" 2>&1 || rc=$?
    # The install log is the part before the first test.
    sed '/^== smoke: /,$d' "$logs/$sys-smoke.log" >>"$logs/$sys-install.log"
    if grep -q '^== smoke: ' "$logs/$sys-smoke.log"; then
      result "$sys-install" 0
      result "$sys-smoke" $rc
    else
      result "$sys-install" 1
      echo "not installed" >>"$logs/$sys-smoke.log"; result "$sys-smoke" 1
    fi
  else
    result "$sys-install" 1
    echo "no clean root" >"$logs/$sys-smoke.log"; result "$sys-smoke" 1
  fi
  echo "check-packages: $sys took $(( $(date +%s) - t0 )) s"
done

# refuse: each system's filter with the other's nbdkit.
if [ -e "$work/debian12/build/src" ] && [ -e "$work/debian13/build/src" ]; then
  for pair in "debian12 debian13" "debian13 debian12"; do
    set -- $pair
    from=$1 into=$2
    ls "$work/$from"/nbdkit-qed-filter_*.deb >/dev/null 2>&1 || continue
    case $into in debian12) suite=bookworm ;; *) suite=trixie ;; esac
    debian_root pkgtest-$into "$suite" apt "$test_deps" >/dev/null 2>&1 || continue
    rc=0
    in_root "$root" --overlay --bind "$work/$from:/pkgs" -- '
      cd /pkgs
      nbdkit --version
      dpkg-deb -f nbdkit-qed-filter_*.deb Depends
      if apt-get install -y --no-install-recommends ./nbdkit-qed_*.deb \
           ./nbdkit-qed-filter_*.deb; then
        echo "installed a filter built for another nbdkit"; exit 1
      fi
      echo "refused, as it should"' >"$logs/refuse-$from-into-$into.log" 2>&1 || rc=1
    result "refuse-$from-into-$into" $rc
  done
fi

[ ${#failed[@]} -gt 0 ] && echo "failed: ${failed[*]}"
echo "$pass passed, $fail failed"
[ $fail = 0 ]
