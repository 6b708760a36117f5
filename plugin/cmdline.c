/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed: was nbdkit started with -r?  See cmdline.h.
 *
 * nbdkit 1.32 tells a plugin about -r only in .open, so work that is
 * done with no connection (the repair, demote and compaction at exit)
 * learns it here: /proc/self/cmdline is nbdkit's own argv, parsed as
 * nbdkit's getopt_long parses it, with nbdkit's option table.
 *
 * That is GNU getopt_long with its default argument permutation
 * (options may follow the plugin name) unless POSIXLY_CORRECT is set,
 * "--" ends the options, long options may be abbreviated to any
 * unambiguous prefix, take their argument as --opt=ARG or --opt ARG,
 * and short options cluster (-fr) or take an attached argument
 * (-Dqed.verbose=1).  The table below is nbdkit's option table of
 * 1.32, with the options added up to 1.42.
 *
 * The answer is trusted only if the parse is consistent with what
 * nbdkit did: every option is known, and the first operand is this
 * plugin (by short name or by path).  Anything else is "cannot tell",
 * and the caller writes nothing.
 */

#include <stdio.h>
#include <stdlib.h>
#include <stdbool.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <dlfcn.h>

#include "cmdline.h"
#include "util.h"

struct long_opt {
  const char *name;
  bool has_arg;
  char val;                     /* the short option, or 0 */
};

/* nbdkit 1.32 (server/options.h), plus the options later versions
 * added by 1.42 (in their manual's synopsis: --keepalive, --no-mc,
 * --no-meta-contexts, --no-structured-replies, --print-uri, and
 * --timeout=TIMEOUT, the one with an argument).  An option missing
 * here makes the answer unknown (nothing is written), never wrong. */
static const char short_options[] = "46D:e:fg:i:nop:P:rst:u:U:vV";
static const struct long_opt long_options[] = {
  { "debug", true, 'D' },
  { "dump-config", false, 0 },
  { "dump-plugin", false, 0 },
  { "exit-with-parent", false, 0 },
  { "export", true, 'e' },
  { "export-name", true, 'e' },
  { "exportname", true, 'e' },
  { "filter", true, 0 },
  { "foreground", false, 'f' },
  { "no-fork", false, 'f' },
  { "group", true, 'g' },
  { "help", false, 0 },
  { "ip-addr", true, 'i' },
  { "ipaddr", true, 'i' },
  { "ipv4-only", false, '4' },
  { "ipv6-only", false, '6' },
  { "keepalive", false, 0 },
  { "log", true, 0 },
  { "long-options", false, 0 },
  { "mask-handshake", true, 0 },
  { "new-style", false, 'n' },
  { "newstyle", false, 'n' },
  { "no-mc", false, 0 },
  { "no-meta-contexts", false, 0 },
  { "no-sr", false, 0 },
  { "no-structured-replies", false, 0 },
  { "old-style", false, 'o' },
  { "oldstyle", false, 'o' },
  { "pid-file", true, 'P' },
  { "pidfile", true, 'P' },
  { "port", true, 'p' },
  { "print-uri", false, 0 },
  { "read-only", false, 'r' },
  { "readonly", false, 'r' },
  { "run", true, 0 },
  { "selinux-label", true, 0 },
  { "short-options", false, 0 },
  { "single", false, 's' },
  { "stdin", false, 's' },
  { "swap", false, 0 },
  { "threads", true, 't' },
  { "timeout", true, 0 },
  { "tls", true, 0 },
  { "tls-certificates", true, 0 },
  { "tls-psk", true, 0 },
  { "tls-verify-peer", false, 0 },
  { "unix", true, 'U' },
  { "user", true, 'u' },
  { "verbose", false, 'v' },
  { "version", false, 'V' },
  { "vsock", false, 0 },
};

/* getopt_long's lookup: an exact name, else the prefix of names that
 * all mean the same option.  NULL if unknown or ambiguous. */
static const struct long_opt *
find_long (const char *name, size_t len)
{
  const struct long_opt *found = NULL;

  for (size_t i = 0; i < sizeof long_options / sizeof *long_options; ++i) {
    const struct long_opt *o = &long_options[i];
    if (strncmp (o->name, name, len) != 0)
      continue;
    if (strlen (o->name) == len)
      return o;
    if (found && (found->has_arg != o->has_arg || found->val != o->val ||
                  found->val == 0))
      return NULL;              /* ambiguous */
    found = o;
  }
  return found;
}

/* Read our own argv.  Returns argc, or -1. */
static int
read_cmdline (char **bufp, char ***argvp)
{
  size_t cap = 4096, len = 0;
  char *buf = NULL;
  char **argv;
  int fd, argc = 0;
  ssize_t r;

  fd = open ("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
  if (fd == -1)
    return -1;
  for (;;) {
    char *nb = realloc (buf, cap + 1);
    if (nb == NULL)
      goto err;
    buf = nb;
    r = read (fd, buf + len, cap - len);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      goto err;
    if (r == 0)
      break;
    len += r;
    if (len == cap)
      cap *= 2;
  }
  close (fd);
  buf[len] = '\0';
  for (size_t i = 0; i < len; ++i)
    argc += buf[i] == '\0';
  argv = calloc (argc + 1, sizeof *argv);
  if (argv == NULL) {
    free (buf);
    return -1;
  }
  for (size_t i = 0, n = 0; i < len; i += strlen (buf + i) + 1)
    argv[n++] = buf + i;
  *bufp = buf;
  *argvp = argv;
  return argc;

 err:
  close (fd);
  free (buf);
  return -1;
}

/* Is the operand the plugin nbdkit loaded, i.e. this object? */
static bool
is_this_plugin (const char *arg)
{
  Dl_info info;
  char *a, *self;
  bool same;

  /* nbdkit's is_short_name: no '.' and no '/'. */
  if (strchr (arg, '.') == NULL && strchr (arg, '/') == NULL)
    return strcmp (arg, "qed") == 0;
  if (dladdr ((void *) is_this_plugin, &info) == 0 || info.dli_fname == NULL)
    return false;
  a = realpath (arg, NULL);
  self = realpath (info.dli_fname, NULL);
  same = a && self && strcmp (a, self) == 0;
  free (a);
  free (self);
  return same;
}

/* One short-option cluster (argv[*i] without its '-').  Returns 0, or
 * -1 for an unknown option. */
static int
parse_short (int argc, char **argv, int *i, bool *readonly)
{
  const char *p = argv[*i] + 1;

  for (; *p; ++p) {
    const char *o = strchr (short_options, *p);
    if (*p == ':' || o == NULL)
      return -1;
    if (*p == 'r')
      *readonly = true;
    if (o[1] == ':') {
      if (p[1] == '\0')         /* the argument is the next word */
        ++*i;
      return *i < argc ? 0 : -1;
    }
  }
  return 0;
}

int
nbdkit_cmdline_readonly (bool *readonly, const char **why)
{
  CLEANUP_FREE char *buf = NULL;
  CLEANUP_FREE char **argv = NULL;
  int argc = read_cmdline (&buf, &argv);
  bool permute = getenv ("POSIXLY_CORRECT") == NULL;
  bool ro = false;
  const char *plugin = NULL;

  if (argc < 1) {
    *why = "cannot read /proc/self/cmdline";
    return -1;
  }
  for (int i = 1; i < argc; ++i) {
    const char *a = argv[i];

    if (strcmp (a, "--") == 0) {
      if (plugin == NULL && i + 1 < argc)
        plugin = argv[i + 1];
      break;
    }
    if (a[0] != '-' || a[1] == '\0') {  /* an operand */
      if (plugin == NULL)
        plugin = a;
      if (!permute)
        break;
      continue;
    }
    if (a[1] == '-') {
      const char *eq = strchr (a + 2, '=');
      size_t len = eq ? (size_t) (eq - (a + 2)) : strlen (a + 2);
      const struct long_opt *o = find_long (a + 2, len);
      if (o == NULL) {
        *why = "an option of nbdkit this plugin does not know";
        return -1;
      }
      if (o->val == 'r')
        ro = true;
      if (o->has_arg && !eq && ++i >= argc) {
        *why = "an option without its argument";
        return -1;
      }
      continue;
    }
    if (parse_short (argc, argv, &i, &ro) == -1) {
      *why = "an option of nbdkit this plugin does not know";
      return -1;
    }
  }
  if (plugin == NULL || !is_this_plugin (plugin)) {
    *why = "the command line does not name this plugin where nbdkit "
      "found it";
    return -1;
  }
  *readonly = ro;
  return 0;
}
