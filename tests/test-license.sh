#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Licensing as packagers expect: LICENSE is BSD-3-Clause, and every
# source file (C, shell, Python, the Makefile, CI) says so in an SPDX
# header within its first three lines.
source "$(dirname "$0")/functions.sh"
cd "$TOP"
grep -q 'Redistribution and use in source and binary forms' LICENSE ||
  fail "LICENSE is not the BSD license text"
grep -q 'Neither the name of' LICENSE || fail "LICENSE is not BSD-3-Clause"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  files=$(git ls-files --cached --others --exclude-standard)
else
  files=$(find . -type f ! -path './tests/logs*' ! -path './tests/fuzz-*' |
          sed 's|^\./||')
fi
n=0 bad=()
for f in $files; do
  case "$f" in
    *.c|*.h|*.sh|*.py|Makefile|*/Makefile|.ci/run) ;;
    *) continue ;;
  esac
  [ -f "$f" ] || continue
  n=$((n+1))
  head -n 3 "$f" | grep -q 'SPDX-License-Identifier: BSD-3-Clause' || bad+=("$f")
done
[ $n -gt 50 ] || fail "only $n source files found"
[ ${#bad[@]} = 0 ] || fail "no SPDX-License-Identifier: BSD-3-Clause header in: ${bad[*]}"
echo "OK: $n source files"
