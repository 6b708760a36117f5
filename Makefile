# SPDX-License-Identifier: BSD-3-Clause
# nbdkit-qed: plain GNU make.
#   make            build the plugin and the filter
#   make check      run the test suite (ends with "N passed, M failed")
#   make check-debian13   the same against Debian 13's nbdkit 1.42 and
#                   QEMU 10 in an mmdebstrap root (root only)
#   make check-packages   the Debian packages (debian/) built, linted,
#                   installed and smoke-tested on Debian 12 and 13 in
#                   mmdebstrap roots (root only)
#   make run        build, create a demo image and serve it
#   make install    install into nbdkit's plugin and filter directories
#                   and the man pages under $(PREFIX)/share/man
#   make uninstall  remove what make install installed
# Install variables: DESTDIR (staging root, prepended to every path),
# PREFIX (default: nbdkit's prefix, from pkg-config), MANDIR (default
# $(PREFIX)/share/man), PLUGINDIR and FILTERDIR (default: nbdkit's own
# directories, the only places where nbdkit finds a plugin by name).

CC       ?= cc
CFLAGS   ?= -O2 -g
WARNINGS  = -Wall -Wextra -Wno-unused-parameter -Wshadow -Wvla \
            -Wno-missing-field-initializers
# -fvisibility=hidden: nbdkit loads the plugin and filters RTLD_GLOBAL,
# so each object must keep its own copy of the core to itself.
QED_CFLAGS = -std=gnu11 -D_GNU_SOURCE -fPIC -fvisibility=hidden -pthread \
             -Icommon $(WARNINGS)
PKG_CONFIG ?= pkg-config
NBDKIT_CFLAGS := $(shell $(PKG_CONFIG) --cflags nbdkit 2>/dev/null)
PLUGINDIR ?= $(shell $(PKG_CONFIG) --variable=plugindir nbdkit 2>/dev/null)
FILTERDIR ?= $(shell $(PKG_CONFIG) --variable=filterdir nbdkit 2>/dev/null)
PREFIX   ?= $(or $(shell $(PKG_CONFIG) --variable=prefix nbdkit 2>/dev/null),/usr/local)
MANDIR   ?= $(PREFIX)/share/man
# nbdkit's naming: a page per object, both the same manual.
MANLINKS  = nbdkit-qed-plugin.1 nbdkit-qed-filter.1

# The core, bottom layer first (HACKING.md).
# io-file.c is the I/O seam over the kernel (seam.h): the fuzz target
# links an in-memory file in its place.
CORE_SRCS = common/io-file.c common/progress.c \
            common/io.c common/lock.c common/safe-open.c \
            common/header.c common/alloc.c common/table.c common/map.c \
            common/write.c common/check.c common/freelist.c common/image.c \
            common/header-area.c common/backing.c common/idle.c
CORE_HDRS = common/qed.h common/qed-internal.h common/geometry.h \
            common/progress.h common/defaults.h \
            common/seam.h common/util.h common/safe-open.h

PLUGIN = plugin/nbdkit-qed-plugin.so
FILTER = filter/nbdkit-qed-filter.so

all: $(PLUGIN) $(FILTER) nbdkit-qed.1

# seam-nbdkit.c routes the core's messages to nbdkit, and glue-nbdkit.c
# is what the plugin and the filter share (neither is in unit tests).
SEAM_SRC = common/seam-nbdkit.c common/glue-nbdkit.c
SEAM_HDRS = common/glue-nbdkit.h

# The plugin: its callbacks (qed-plugin.c), dir= (dir.c), one served
# image (export.c), and nbdkit's -r read from its command line.
PLUGIN_SRCS = plugin/qed-plugin.c plugin/dir.c plugin/export.c \
              plugin/cmdline.c
PLUGIN_HDRS = plugin/options.h plugin/dir.h plugin/export.h \
              plugin/cmdline.h

$(PLUGIN): $(PLUGIN_SRCS) $(PLUGIN_HDRS) $(CORE_SRCS) $(SEAM_SRC) \
           $(CORE_HDRS) $(SEAM_HDRS)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(QED_CFLAGS) $(NBDKIT_CFLAGS) -Iplugin \
	  -shared $(LDFLAGS) -o $@ $(PLUGIN_SRCS) $(CORE_SRCS) $(SEAM_SRC)

FILTER_SRCS = filter/qed-filter.c filter/readahead.c filter/origin.c \
              filter/overlay-set.c filter/shared-cache.c \
              filter/prefetch.c filter/offline.c
FILTER_HDRS = filter/readahead.h filter/origin.h filter/prefetch.h \
              filter/overlay-set.h filter/shared-cache.h \
              filter/offline.h

$(FILTER): $(FILTER_SRCS) $(FILTER_HDRS) $(CORE_SRCS) $(SEAM_SRC) \
           $(CORE_HDRS) $(SEAM_HDRS)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(QED_CFLAGS) $(NBDKIT_CFLAGS) -shared $(LDFLAGS) \
	  -o $@ $(FILTER_SRCS) $(CORE_SRCS) $(SEAM_SRC)

nbdkit-qed.1: nbdkit-qed.pod
	pod2man --section=1 --center="nbdkit-qed" --release="nbdkit-qed" \
	  --name=nbdkit-qed $< > $@

# Unit tests of the core: a normal build and a sanitizer build.  One
# file per core file (tests/unit/unit-FILE.c) and a shared harness.
UNIT_SRCS = $(sort $(wildcard tests/unit/*.c))
UNIT_HDRS = tests/unit/harness.h
tests/unit-tests: $(UNIT_SRCS) $(UNIT_HDRS) $(CORE_SRCS) $(CORE_HDRS)
	$(CC) $(CFLAGS) $(QED_CFLAGS) -Itests/unit -o $@ $(UNIT_SRCS) \
	  $(CORE_SRCS)

tests/unit-tests-asan: $(UNIT_SRCS) $(UNIT_HDRS) $(CORE_SRCS) $(CORE_HDRS)
	$(CC) -O1 -g $(QED_CFLAGS) -fsanitize=address,undefined \
	  -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
	  -Itests/unit -o $@ $(UNIT_SRCS) $(CORE_SRCS)

# The tests' helper programs, built here and nowhere else: a test
# script asks for the one it needs (build_helper in tests/functions.sh),
# so that running one script alone builds it too.  LD_PRELOAD shims:
# crashsim.so (power loss), faultsim.so (failing calls), nolock.so
# (file systems without OFD locks), slow-pread.so (a slow disk),
# syslog-record.so (syslog into a file); ThreadSanitizer builds of the
# plugin and the filter; the in-memory file's test.
TEST_HELPERS = tests/crashsim.so tests/faultsim.so tests/nolock.so \
               tests/slow-pread.so tests/syslog-record.so \
               tests/fuzz-io-mem-test
# Built only by the tests that need them (they skip without libtsan).
TSAN_HELPERS = tests/tsan-plugin.so tests/tsan-filter.so

# Written under a temporary name and renamed: a script may run while
# another builds.
tests/%.so: tests/%.c
	$(CC) -O2 -g -Wall -shared -fPIC -o $@.$$$$ $< -ldl && \
	  mv -f $@.$$$$ $@

tests/fuzz-io-mem-test: tests/fuzz-io-mem-test.c tests/fuzz-io-mem.c \
                        tests/fuzz-io-mem.h common/seam.h common/util.h
	$(CC) -O1 -g $(QED_CFLAGS) -fsanitize=address,undefined \
	  -fno-sanitize-recover=undefined -Itests -o $@.$$$$ \
	  tests/fuzz-io-mem-test.c tests/fuzz-io-mem.c && mv -f $@.$$$$ $@

TSAN_CFLAGS = -O1 -g $(QED_CFLAGS) $(NBDKIT_CFLAGS) -Wno-maybe-uninitialized \
              -fsanitize=thread -shared
tests/tsan-plugin.so: $(PLUGIN_SRCS) $(PLUGIN_HDRS) $(CORE_SRCS) $(SEAM_SRC) \
                      $(CORE_HDRS) $(SEAM_HDRS)
	$(CC) $(TSAN_CFLAGS) -Iplugin -o $@.$$$$ $(PLUGIN_SRCS) $(CORE_SRCS) \
	  $(SEAM_SRC) && mv -f $@.$$$$ $@

tests/tsan-filter.so: $(FILTER_SRCS) $(FILTER_HDRS) $(CORE_SRCS) \
                      $(SEAM_SRC) $(CORE_HDRS) $(SEAM_HDRS)
	$(CC) $(TSAN_CFLAGS) -o $@.$$$$ $(FILTER_SRCS) $(CORE_SRCS) \
	  $(SEAM_SRC) && mv -f $@.$$$$ $@

test-helpers: $(TEST_HELPERS)

# check and run first install missing Debian packages (as root), or
# print the one-line install command.
check:
	@echo "make check: about 6 minutes on 2 cores (more when the machine is busy);"
	@echo "  one test boots a small VM (libguestfs appliance, TCG); logs in tests/logs/"
	@bash tests/install-deps.sh
	@$(MAKE) --no-print-directory all tests/unit-tests tests/unit-tests-asan \
	  test-helpers
	@bash tests/run-tests.sh

# Debian 13 (nbdkit 1.42, QEMU 10.0) in a cached mmdebstrap root: see
# tests/check-debian13.sh.
check-debian13:
	@bash tests/check-debian13.sh

# The Debian packages on Debian 12 and 13: see tests/check-packages.sh.
check-packages:
	@bash tests/check-packages.sh

install: all
	@test -n "$(PLUGINDIR)" -a -n "$(FILTERDIR)" || \
	  { echo "pkg-config nbdkit failed: install nbdkit's development" \
	         "package, or set PLUGINDIR and FILTERDIR" >&2; exit 1; }
	install -d $(DESTDIR)$(PLUGINDIR) $(DESTDIR)$(FILTERDIR) \
	  $(DESTDIR)$(MANDIR)/man1
	install -m 755 $(PLUGIN) $(DESTDIR)$(PLUGINDIR)/
	install -m 755 $(FILTER) $(DESTDIR)$(FILTERDIR)/
	install -m 644 nbdkit-qed.1 $(DESTDIR)$(MANDIR)/man1/
	for l in $(MANLINKS); do \
	  echo ".so man1/nbdkit-qed.1" > $(DESTDIR)$(MANDIR)/man1/$$l && \
	  chmod 644 $(DESTDIR)$(MANDIR)/man1/$$l || exit 1; \
	done

uninstall:
	rm -f $(DESTDIR)$(PLUGINDIR)/nbdkit-qed-plugin.so \
	  $(DESTDIR)$(FILTERDIR)/nbdkit-qed-filter.so \
	  $(DESTDIR)$(MANDIR)/man1/nbdkit-qed.1 \
	  $(addprefix $(DESTDIR)$(MANDIR)/man1/,$(MANLINKS))

run:
	@bash tests/install-deps.sh --run
	@$(MAKE) --no-print-directory all
	@bash tests/demo.sh

deps:
	@bash tests/install-deps.sh

# Longer runs (not part of check):
#   make crash-test [TRIALS=300]   crash and power-loss trials
#   make fault-test [TRIALS=2000] [SEED=S] [FIRST=N]
#                                  random operations with injected faults
#   make fuzz [SECONDS=300]        libFuzzer over images in memory: open,
#                                  check, repair, writes, injected faults
#   make fuzz-file [SECONDS=300]   files through the kernel, every input
#                                  through every pass
#   make bench [QUICK=1]           against qemu-nbd and the file plugin
crash-test: all
	@bash tests/crash-long.sh $(TRIALS)

# Random operations with random injected faults, long form (the short
# form, tests/test-faults-property.sh, runs in make check).  It prints
# its seed first and ends with "N trials, F failures, T s (seed S,
# trials A-B)"; SEED=S FIRST=n TRIALS=1 replays trial n.
fault-test: all
	@FAULT_TRIALS=$(or $(TRIALS),2000) FAULT_SEED=$(or $(SEED),$(FAULT_SEED)) \
	  FAULT_FIRST=$(or $(FIRST),$(FAULT_FIRST)) bash tests/test-faults-property.sh

fuzz:
	@bash tests/fuzz.sh $(SECONDS)

fuzz-file:
	@bash tests/fuzz.sh --file $(SECONDS)

bench: all
	@bash bench/run.sh $(if $(QUICK),--quick)

# For scripts that build the core themselves (tests/fuzz.sh).
print-core-srcs:
	@echo $(CORE_SRCS)

clean:
	rm -f $(PLUGIN) $(FILTER) nbdkit-qed.1 tests/unit-tests \
	  tests/unit-tests-asan $(TEST_HELPERS) $(TSAN_HELPERS)

.PHONY: all check check-debian13 check-packages install uninstall run deps clean crash-test \
        fault-test fuzz fuzz-file bench \
        print-core-srcs test-helpers
