#!/usr/bin/env bash
# The preload shim on its own, against a small fake server: interposition,
# fork, threads, dup, bad pointers (tools/test-preload).
exec "$(dirname "$0")/../tools/test-preload"
