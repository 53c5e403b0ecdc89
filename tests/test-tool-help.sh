#!/usr/bin/env bash
# Every tool a person runs from tools/ answers --help with what it does and
# how to call it, at once and without side effects: no build, no boot, no
# device (a tool that ignored --help would start its real work, and the
# timeout, or the changed tree, says so).
source "$(dirname "$0")/functions.sh"

before=$(cd "$top" && git status --porcelain 2>/dev/null || true)
for tool in "$top"/tools/*; do
    [ -f "$tool" ] && [ -x "$tool" ] || continue
    name=$(basename "$tool")
    check_quiet "tools/$name --help exits 0 within 10 s" timeout 10 "$tool" --help
    # The text is the tool's own header: more than a line, and it names
    # what the tool is called with or what it does.
    check "tools/$name --help prints its description" \
        test "$(timeout 10 "$tool" --help 2>/dev/null | grep -c .)" -ge 2
done
check "no tool changed the tree when asked for --help" \
    test "$(cd "$top" && git status --porcelain 2>/dev/null || true)" = "$before"
finish
