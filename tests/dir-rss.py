#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
# dir-rss.py SOCKET PID N MODE COUNT: open N exports e000..e(N-1) of a
# dir= server (one connection each, all kept open), read from each
# (MODE stride: one byte every 2 MiB, so that every L2 page of a
# 4K-cluster image is loaded; MODE random: COUNT random 4K reads),
# then print the server's peak and current RSS in KiB:
#   exports=N hwm_kib=... rss_kib=...
# Used by tests/test-plugin-dir-rss.sh and bench/dir-rss.sh.
import nbd, random, sys

sock, pid, n, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    sys.argv[4], int(sys.argv[5])
handles = []
for i in range(n):
    h = nbd.NBD()
    h.set_export_name("e%03d" % i)
    h.connect_unix(sock)
    handles.append(h)
rng = random.Random(20261206)
for h in handles:
    size = h.get_size()
    if mode == "stride":
        for off in range(0, size, 2 << 20):
            h.pread(1, off)
    else:
        for _ in range(count):
            h.pread(4096, rng.randrange(0, size // 4096) * 4096)
status = dict(line.split(":", 1) for line in open("/proc/%s/status" % pid))
hwm = int(status["VmHWM"].split()[0])
rss = int(status["VmRSS"].split()[0])
print("exports=%d hwm_kib=%d rss_kib=%d" % (n, hwm, rss))
for h in handles:
    h.shutdown()
