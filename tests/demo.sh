#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# `make run`: create a demo QED image over a raw backing file and serve
# it in the foreground on a unix socket.
set -eu
cd "$(dirname "$0")/.."
export PATH=/usr/bin:$PATH          # nbdsh needs Debian's python3
top=$(pwd)
dir=$top/demo
sock=$dir/qed.sock
mkdir -p "$dir"
if [ ! -f "$dir/disk.qed" ]; then
  # A 64 MiB raw base with a recognisable pattern in its first MiB.
  rm -f "$dir/base.raw"
  truncate -s 64M "$dir/base.raw"
  yes "nbdkit-qed backing data" | head -c 1M | dd of="$dir/base.raw" conv=notrunc status=none
  rm -f "$dir/new.qed"
  nbdkit -U - "$top/plugin/nbdkit-qed-plugin.so" "$dir/new.qed" \
    create=true size=64M backing=base.raw backing-format=raw \
    --run 'nbdsh -u "$uri" -c "
h.pwrite(b\"Hello from the QED plugin!\n\" * 2000, 8 << 20)
h.zero(1 << 20, 16 << 20)        # 1 MiB of zero clusters over the backing file
h.flush()
"'
  mv "$dir/new.qed" "$dir/disk.qed"
fi
rm -f "$sock"
cat <<MSG
Serving $dir/disk.qed (64 MiB, raw backing file base.raw) on $sock
Try, from another terminal:
  nbdinfo --map 'nbd+unix:///?socket=$sock'
  qemu-img map --output=json 'nbd+unix:///?socket=$sock'
  qemu-img info 'nbd+unix:///?socket=$sock'
  qemu-img map -U --output=json $dir/disk.qed  (the zero clusters, in the file;
                                               -U: nbdkit holds its write lock)
  guestfish --format=raw -a 'nbd://?socket=$sock'      (then: run, list-devices)
Press ^C to stop (the image is flushed and marked clean on exit).
MSG
exec nbdkit -f -U "$sock" "$top/plugin/nbdkit-qed-plugin.so" "$dir/disk.qed"
