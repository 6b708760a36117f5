#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Install the Debian 12 packages nbdkit-qed needs to build, run and test.
#   tests/install-deps.sh          build + run + test packages
#   tests/install-deps.sh --run    only what `make run` needs
# As root, missing packages are installed with apt-get; otherwise the
# exact install command is printed and the script fails.
set -eu
run_pkgs="gcc make pkg-config perl nbdkit nbdkit-plugin-dev libnbd-bin qemu-utils"
test_pkgs="python3-libnbd fio bc time procps valgrind clang libclang-rt-14-dev nginx-light
           libguestfs-tools linux-image-amd64 qemu-system-x86 systemd mmdebstrap
           git dpkg-dev debhelper fakeroot lintian"
pkgs=$run_pkgs
[ "${1:-}" = --run ] || pkgs="$run_pkgs $test_pkgs"

missing=()
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    missing+=("$p")
done
[ ${#missing[@]} = 0 ] && exit 0

cmd="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" != 0 ]; then
  echo "Missing packages. Install them with:" >&2
  echo "  sudo apt-get update && sudo $cmd" >&2
  exit 1
fi
echo "Installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086
$cmd
