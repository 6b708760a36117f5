#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# HACKING.md agrees with the code, and the plugin and the filter do not
# repeat each other:
# - tests/check-layers.py: the layer order of HACKING.md's "Layout"
#   against the real calls between files (a call to a file listed
#   below, or to one not listed, fails), and every function HACKING.md
#   names exists (in the file it is named with);
# - tests/check-duplicates.py: no run of 6 or more lines the same in
#   plugin/ and filter/ (what both need goes to common/).
# The `duplicates` tool, where it is installed (it is not on CI
# machines, so the check above does not need it), also looks for runs
# of the same shape with other names: its rows are logged for a
# reader, and a row of identical lines between plugin/ and filter/
# fails as the check above does.
source "$(dirname "$0")/functions.sh"
requires python3 --version

python3 "$TOP/tests/check-layers.py" "$TOP" ||
  fail "HACKING.md disagrees with the code (above)"
python3 "$TOP/tests/check-duplicates.py" "$TOP" ||
  fail "plugin/ and filter/ repeat code (above): move it to common/"

if command -v duplicates >/dev/null; then
  mkdir "$tmp/dup"
  cp "$TOP"/plugin/*.c "$tmp/dup/" 2>/dev/null
  for f in "$TOP"/filter/*.c; do cp "$f" "$tmp/dup/filter-${f##*/}"; done
  duplicates --repo "$tmp/dup" --most 50 > "$tmp/dup.out" 2>&1
  cat "$tmp/dup.out"
  # A row pairs plugin and filter when one side is filter-* and the
  # other is not; "shape" rows are alike but for names (logged only).
  grep '^D[0-9]' "$tmp/dup.out" | grep -v ' shape' |
    grep -E '(^D[0-9]+ filter-[^ ]* ~ [^f])|(^D[0-9]+ [^f][^ ]* ~ filter-)' &&
    fail "duplicates: plugin/ and filter/ share identical lines"
fi
exit 0
