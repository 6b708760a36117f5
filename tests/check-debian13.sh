#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# make check-debian13: build both objects against Debian 13's nbdkit (1.42)
# and run the test suite with its QEMU (10.0) and libnbd (1.22), in a
# Debian 13 root made by mmdebstrap from Debian's packages.  Needs root.
#
# The root is cached in $QED_CHROOT_CACHE (default /var/cache/nbdkit-qed),
# keyed by the package list, so only the first run downloads (~1 minute).
# The tests run in a private mount namespace: /proc, /sys, /dev and a
# tmpfs /tmp are mounted inside the root there and vanish with it on any
# exit.  Ends with the suite's "N passed, M failed" line.
# Usage: tests/check-debian13.sh [PATTERN...]   (as tests/run-tests.sh)
# Each test's time limit is 600 s here (TEST_TIMEOUT): valgrind and the
# sanitizers of Debian 13 are slower, and this is CI's second pass.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)

suite=trixie
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What the build and the tests need (as tests/install-deps.sh, less the
# guestfish appliance: see EXCLUDE below).
pkgs="nbdkit nbdkit-plugin-dev qemu-utils libnbd-bin python3-libnbd
      gcc make pkg-config perl bc time procps mount fio valgrind clang
      libclang-rt-19-dev nginx"
# Tests that cannot run in the root: the guestfish and examples tests
# boot a libguestfs appliance, which supermin builds from a kernel and
# its modules in /boot and /lib/modules (the root would need its own
# kernel package, ~500 MB more with qemu-system, and TCG boots of it).
EXCLUDE=${QED_DEBIAN13_EXCLUDE:-test-filter-guestfish test-filter-remote-boot test-examples}

[ "$(id -u)" = 0 ] || { echo "check-debian13: needs root (mmdebstrap, chroot, mounts)" >&2; exit 1; }
command -v mmdebstrap >/dev/null ||
  { echo "check-debian13: needs mmdebstrap (apt-get install mmdebstrap)" >&2; exit 1; }

key=$(echo "$suite $mirror $pkgs" | tr -s ' \n' ' ' | sha256sum | cut -c1-12)
cache=${QED_CHROOT_CACHE:-/var/cache/nbdkit-qed}
root=$cache/debian13-$key
mkdir -p "$cache"

stamp=$root/.nbdkit-qed-root-complete
if [ ! -e "$stamp" ]; then
  echo "check-debian13: building the Debian 13 root in $root (once)"
  rm -rf "$root.new" "$root"
  mmdebstrap --variant=apt --include="$(echo $pkgs | tr ' ' ,)" \
    "$suite" "$root.new" "$mirror" > "$cache/mmdebstrap.log" 2>&1 ||
    { tail -n 20 "$cache/mmdebstrap.log" >&2; rm -rf "$root.new"
      echo "check-debian13: mmdebstrap failed" >&2; exit 1; }
  touch "$root.new/${stamp##*/}"
  mv "$root.new" "$root"
  # (Roots of older package lists stay: another run may be using one.
  # rm -rf $cache to reclaim the space.)
fi

# A fresh copy of the sources (tracked and new files, no build products),
# one per run, so that concurrent runs do not share a build.
build=/build/run-$$
src=$root$build
rm -rf "$src"; mkdir -p "$src"
# Keep the logs where a failure can be read; the copy goes on any exit.
finish () {
  rm -rf "$top/tests/logs-debian13"
  cp -r "$src/tests/logs" "$top/tests/logs-debian13" 2>/dev/null || true
  rm -rf "$src"
}
trap finish EXIT
if git -C "$top" rev-parse >/dev/null 2>&1; then
  git -C "$top" ls-files -z --cached --others --exclude-standard |
    tar -C "$top" --null -T - -cf - | tar -C "$src" -xf -
else
  tar -C "$top" --exclude=./tests/logs -cf - . | tar -C "$src" -xf -
fi

echo "check-debian13: $(chroot "$root" nbdkit --version), $(chroot "$root" qemu-img --version | head -n1)"

# In a private mount namespace, so the mounts go when it ends; the trap
# also unmounts them when the script is interrupted or fails.
inner='set -eu
root=$1; shift
trap "umount -R $root/tmp $root/dev $root/sys $root/proc 2>/dev/null || true" EXIT
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o size=8g tmpfs "$root/tmp"
chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
  PATH=/usr/sbin:/usr/bin:/sbin:/bin TEST_TIMEOUT="${TEST_TIMEOUT:-600}" \
  QED_EXCLUDE_TESTS="$EXCLUDE" /bin/bash -c "cd $build && mkdir -p tests/logs &&
    { make --no-print-directory all tests/unit-tests tests/unit-tests-asan \
        >tests/logs/build.log 2>&1 ||
      { tail -n 30 tests/logs/build.log; echo \"build against nbdkit 1.42 failed\"; exit 1; }; } &&
    bash tests/run-tests.sh \"\$@\"" run-tests "$@"'
status=0
EXCLUDE=$EXCLUDE build=$build unshare --mount --propagation private \
  bash -c "$inner" inner "$root" "$@" || status=$?
exit $status
