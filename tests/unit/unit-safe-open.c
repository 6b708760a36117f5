/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-qed unit tests: safe-open.c: backing files opened as the image's
 * owner. */

#include "harness.h"

/* ------------------------------------------------------------------ */
/* Backing files opened as the image's owner: the switch of fsuid,
 * fsgid and groups is the opening thread's alone, and undone. */

static volatile bool creds_stop;
static volatile unsigned long creds_changed;

/* The calling thread's Uid, Gid and Groups lines. */
static void
thread_creds (char *out, size_t n)
{
  FILE *fp = fopen ("/proc/thread-self/status", "r");
  char line[512];
  size_t len = 0;

  out[0] = '\0';
  if (fp == NULL)
    return;
  while (fgets (line, sizeof line, fp))
    if ((strncmp (line, "Uid:", 4) == 0 || strncmp (line, "Gid:", 4) == 0 ||
         strncmp (line, "Groups:", 7) == 0) && len + strlen (line) < n) {
      strcpy (out + len, line);
      len += strlen (line);
    }
  fclose (fp);
}

static void *
watch_creds (void *arg)
{
  const char *want = arg;
  char now[2048];

  while (!creds_stop) {
    thread_creds (now, sizeof now);
    if (strcmp (now, want) != 0)
      creds_changed++;
  }
  return NULL;
}

static void
test_owner_identity (void)
{
  char secret[256], open_file[256], before[2048], after[2048];
  struct qed_backing_open bo = { .dirfd = AT_FDCWD, .as_owner = true,
                                 .uid = 65534 };
  pthread_t watcher;
  struct stat st;
  int fd;

  if (geteuid () != 0) {
    fprintf (stderr, "  not root: the owner's identity is not tested\n");
    return;
  }
  snprintf (secret, sizeof secret, "%s/secret", tmpdir);
  snprintf (open_file, sizeof open_file, "%s/public", tmpdir);
  fd = open (secret, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  REQUIRE (fd >= 0);
  close (fd);
  fd = open (open_file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  REQUIRE (fd >= 0);
  close (fd);
  REQUIRE (chmod (tmpdir, 0711) == 0);
  thread_creds (before, sizeof before);
  REQUIRE (strstr (before, "Uid:") != NULL);
  creds_stop = false;
  REQUIRE (pthread_create (&watcher, NULL, watch_creds, before) == 0);
  for (int i = 0; i < 300; ++i) {
    bo.path = bo.name = secret;
    CHECK_ERR (qed_open_backing (&bo, &st, NULL) == -1, EACCES,
               "as the image's owner (uid 65534)");
    bo.path = bo.name = open_file;
    fd = qed_open_backing (&bo, &st, NULL);
    CHECK (fd >= 0);
    if (fd >= 0)
      close (fd);
  }
  creds_stop = true;
  pthread_join (watcher, NULL);
  CHECKF (creds_changed == 0, "another thread saw its credentials change "
          "%lu times", creds_changed);
  thread_creds (after, sizeof after);
  CHECKF (strcmp (before, after) == 0, "credentials not restored:\n%s\n%s",
          before, after);
  /* As the server (no owner), the secret opens. */
  bo.as_owner = false;
  bo.path = bo.name = secret;
  fd = qed_open_backing (&bo, &st, NULL);
  CHECK (fd >= 0);
  if (fd >= 0)
    close (fd);
  chmod (tmpdir, 0700);
}

const struct unit_test unit_tests_safe_open[] = {
  { "owner_identity", test_owner_identity },
  { NULL, NULL }
};
