# SPDX-License-Identifier: BSD-3-Clause
# Cached Debian roots made by mmdebstrap, and running commands in them.
# Sourced (not run) by tests/check-debian13.sh and tests/check-packages.sh.
#
#   debian_root NAME SUITE VARIANT "PACKAGES"
#       sets $root to $QED_CHROOT_CACHE/NAME-KEY (default cache
#       /var/cache/nbdkit-qed), a root of SUITE (bookworm, trixie) with
#       mmdebstrap's VARIANT (apt, buildd) and PACKAGES, KEY being a hash
#       of all four and the mirror.  Built once (about a minute); later
#       calls with the same arguments find it at once.
#   in_root ROOT [--overlay] [--bind DIR:PATH]... -- COMMAND...
#       runs COMMAND (a bash -c script; $1... follow it) as root in ROOT
#       with a clean environment, in a private mount namespace where
#       /proc, /sys, /dev and a tmpfs /tmp are mounted in the root and go
#       with it on any exit.  --overlay: ROOT is the lower layer of a
#       throw-away overlay (or, where the kernel has no overlayfs, a
#       copy), so that installing packages leaves the cached root clean.
#       --bind DIR:PATH mounts DIR at PATH inside the root.  The
#       environment is HOME, LANG and PATH only: pass values as arguments.
# Both need root and mmdebstrap.

deb_mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
deb_cache=${QED_CHROOT_CACHE:-/var/cache/nbdkit-qed}

debian_root () {
  local name=$1 suite=$2 variant=$3 pkgs=$4 key stamp
  [ "$(id -u)" = 0 ] ||
    { echo "debian_root: needs root (mmdebstrap, chroot, mounts)" >&2; return 1; }
  command -v mmdebstrap >/dev/null ||
    { echo "debian_root: needs mmdebstrap (apt-get install mmdebstrap)" >&2; return 1; }
  # The apt variant is keyed as the first roots were (suite, mirror,
  # packages), so that existing caches stay valid.
  if [ "$variant" = apt ]; then
    key=$(echo "$suite $deb_mirror $pkgs" | tr -s ' \n' ' ' | sha256sum | cut -c1-12)
  else
    key=$(echo "$suite $deb_mirror $variant $pkgs" | tr -s ' \n' ' ' | sha256sum | cut -c1-12)
  fi
  root=$deb_cache/$name-$key
  stamp=$root/.nbdkit-qed-root-complete
  mkdir -p "$deb_cache"
  [ -e "$stamp" ] && return 0
  echo "debian_root: building the $suite root $root (once)"
  rm -rf "$root.new" "$root"
  mmdebstrap --variant="$variant" --include="$(echo $pkgs | tr ' ' ,)" \
    "$suite" "$root.new" "$deb_mirror" > "$deb_cache/mmdebstrap-$name.log" 2>&1 ||
    { tail -n 20 "$deb_cache/mmdebstrap-$name.log" >&2; rm -rf "$root.new"
      echo "debian_root: mmdebstrap $suite failed" >&2; return 1; }
  touch "$root.new/${stamp##*/}"
  mv "$root.new" "$root"
  # (Roots of older package lists stay: another run may be using one.
  # rm -rf the cache to reclaim the space.)
}

# The inner half of in_root, run by unshare in the new mount namespace.
_in_root_inner='set -eu
root=$1 overlay=$2 binds=$3; shift 3
scratch=
cleanup () {
  umount -R "$root" 2>/dev/null || true
  [ -z "$scratch" ] || rm -rf "$scratch"
}
trap cleanup EXIT
mount --make-rprivate / 2>/dev/null || true
if [ "$overlay" = 1 ]; then
  lower=$root
  scratch=$(mktemp -d /var/tmp/nbdkit-qed-root.XXXXXX)
  mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
  root=$scratch/root
  mount -t overlay overlay \
    -o "lowerdir=$lower,upperdir=$scratch/upper,workdir=$scratch/work" "$root" \
    2>/dev/null ||
    { cp -a "$lower/." "$root/"; mount --bind "$root" "$root"; }
else
  mount --bind "$root" "$root"
fi
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o size=8g tmpfs "$root/tmp"
for b in $binds; do
  mkdir -p "$root${b#*:}"
  mount --bind "${b%%:*}" "$root${b#*:}"
done
# shellcheck disable=SC2086
chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
  PATH=/usr/sbin:/usr/bin:/sbin:/bin /bin/bash -c "$@"'

in_root () {
  local root=$1 overlay=0 binds=""; shift
  while [ $# -gt 0 ]; do
    case $1 in
      --overlay) overlay=1 ;;
      --bind) binds="$binds $2"; shift ;;
      --) shift; break ;;
      *) echo "in_root: unknown option $1" >&2; return 1 ;;
    esac
    shift
  done
  unshare --mount --propagation private \
    bash -c "$_in_root_inner" inner "$root" "$overlay" "$binds" "$@"
}
