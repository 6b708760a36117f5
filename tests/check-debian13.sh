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

source tests/debian-root.sh
# What the build and the tests need (as tests/install-deps.sh, less the
# guestfish appliance: see EXCLUDE below).
pkgs="nbdkit nbdkit-plugin-dev qemu-utils libnbd-bin python3-libnbd
      gcc make pkg-config perl bc time procps mount fio valgrind clang
      libclang-rt-19-dev nginx"
# Tests that cannot run in the root: the guestfish and examples tests
# boot a libguestfs appliance, which supermin builds from a kernel and
# its modules in /boot and /lib/modules (the root would need its own
# kernel package, ~500 MB more with qemu-system, and TCG boots of it).
# test-debian-package: make check-packages builds the packages on Debian
# 13, in a root with their Build-Depends (this one has none of debhelper).
EXCLUDE=${QED_DEBIAN13_EXCLUDE:-test-filter-guestfish test-filter-remote-boot test-examples test-debian-package}

[ "$(id -u)" = 0 ] || { echo "check-debian13: needs root (mmdebstrap, chroot, mounts)" >&2; exit 1; }
debian_root debian13 trixie apt "$pkgs" || exit 1

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

status=0
in_root "$root" -- 'cd "$1" && mkdir -p tests/logs &&
    { make --no-print-directory all tests/unit-tests tests/unit-tests-asan \
        >tests/logs/build.log 2>&1 ||
      { tail -n 30 tests/logs/build.log; echo "build against nbdkit 1.42 failed"; exit 1; }; } &&
    export TEST_TIMEOUT="$2" QED_EXCLUDE_TESTS="$3" && shift 3 &&
    bash tests/run-tests.sh "$@"' run-tests "$build" "${TEST_TIMEOUT:-600}" \
  "$EXCLUDE" "$@" || status=$?
exit $status
