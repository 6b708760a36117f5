# nbdkit-qed: plain GNU make.
#   make            build the plugin and the filter
#   make check      run the test suite (ends with "N passed, M failed")
#   make check-debian13   the same against Debian 13's nbdkit 1.42 and
#                   QEMU 10 in an mmdebstrap root (root only)
#   make run        build, create a demo image and serve it
#   make install    install into nbdkit's plugin and filter directories

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
PLUGINDIR := $(shell $(PKG_CONFIG) --variable=plugindir nbdkit 2>/dev/null)
FILTERDIR := $(shell $(PKG_CONFIG) --variable=filterdir nbdkit 2>/dev/null)
MANDIR   ?= /usr/share/man

# The core, bottom layer first (HACKING.md).
CORE_SRCS = common/io.c common/header.c common/alloc.c common/table.c \
            common/write.c common/map.c common/check.c common/image.c \
            common/backing.c common/idle.c common/lock.c common/safe-open.c
CORE_HDRS = common/qed.h common/qed-internal.h common/geometry.h \
            common/seam.h common/util.h common/safe-open.h

PLUGIN = plugin/nbdkit-qed-plugin.so
FILTER = filter/nbdkit-qed-filter.so

all: $(PLUGIN) $(FILTER) nbdkit-qed.1

# seam-nbdkit.c routes the core's messages to nbdkit (not in unit tests).
SEAM_SRC = common/seam-nbdkit.c

$(PLUGIN): plugin/qed-plugin.c $(CORE_SRCS) $(SEAM_SRC) $(CORE_HDRS)
	$(CC) $(CFLAGS) $(QED_CFLAGS) $(NBDKIT_CFLAGS) -shared \
	  -o $@ plugin/qed-plugin.c $(CORE_SRCS) $(SEAM_SRC)

FILTER_SRCS = filter/qed-filter.c filter/readahead.c

$(FILTER): $(FILTER_SRCS) filter/readahead.h $(CORE_SRCS) $(SEAM_SRC) \
           $(CORE_HDRS)
	$(CC) $(CFLAGS) $(QED_CFLAGS) $(NBDKIT_CFLAGS) -shared \
	  -o $@ $(FILTER_SRCS) $(CORE_SRCS) $(SEAM_SRC)

nbdkit-qed.1: nbdkit-qed.pod
	pod2man --section=1 --center="nbdkit-qed" --release="nbdkit-qed" \
	  --name=nbdkit-qed $< > $@

# Unit tests of the core: a normal build and a sanitizer build.
tests/unit-tests: tests/unit-tests.c $(CORE_SRCS) $(CORE_HDRS)
	$(CC) $(CFLAGS) $(QED_CFLAGS) -o $@ tests/unit-tests.c $(CORE_SRCS)

tests/unit-tests-asan: tests/unit-tests.c $(CORE_SRCS) $(CORE_HDRS)
	$(CC) -O1 -g $(QED_CFLAGS) -fsanitize=address,undefined \
	  -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
	  -o $@ tests/unit-tests.c $(CORE_SRCS)

# check and run first install missing Debian packages (as root), or
# print the one-line install command.
check:
	@bash tests/install-deps.sh
	@$(MAKE) --no-print-directory all tests/unit-tests tests/unit-tests-asan
	@bash tests/run-tests.sh

# Debian 13 (nbdkit 1.42, QEMU 10.0) in a cached mmdebstrap root: see
# tests/check-debian13.sh.
check-debian13:
	@bash tests/check-debian13.sh

install: all
	install -d $(DESTDIR)$(PLUGINDIR) $(DESTDIR)$(FILTERDIR) \
	  $(DESTDIR)$(MANDIR)/man1
	install -m 755 $(PLUGIN) $(DESTDIR)$(PLUGINDIR)/
	install -m 755 $(FILTER) $(DESTDIR)$(FILTERDIR)/
	install -m 644 nbdkit-qed.1 $(DESTDIR)$(MANDIR)/man1/

run:
	@bash tests/install-deps.sh --run
	@$(MAKE) --no-print-directory all
	@bash tests/demo.sh

deps:
	@bash tests/install-deps.sh

# Longer runs (not part of check):
#   make crash-test [TRIALS=300]   crash and power-loss trials
#   make fuzz [SECONDS=300]        libFuzzer over open/validate/lookup/check
#   make bench [QUICK=1]           against qemu-nbd and the file plugin
crash-test: all
	@bash tests/crash-long.sh $(TRIALS)

fuzz:
	@bash tests/fuzz.sh $(SECONDS)

bench: all
	@bash bench/run.sh $(if $(QUICK),--quick)

# For scripts that build the core themselves (tests/fuzz.sh).
print-core-srcs:
	@echo $(CORE_SRCS)

clean:
	rm -f $(PLUGIN) $(FILTER) nbdkit-qed.1 tests/unit-tests \
	  tests/unit-tests-asan

.PHONY: all check check-debian13 install run deps clean crash-test fuzz bench print-core-srcs
