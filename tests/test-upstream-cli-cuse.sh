#!/usr/bin/env bash
# The upstream v1 `blksnap` CLI, unchanged, through the whole cycle of
# tests/upstream-cli-cycle.sh against blksnapd --mode cuse: the CLI opens
# the real character device /dev/blksnap, no shim. Needs CUSE: the
# stock-kernel lane runs it, with the tools built on the host beforehand
# (tests/test-stock-kernel-lane.sh passes their folder in
# BLKSNAP_UPSTREAM_V1_BUILD; the guest builds nothing).
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
[ -e /dev/cuse ] || skip "needs CUSE (/dev/cuse; the stock-kernel lane has it)"
# The CUSE device of a blksnapd that just stopped goes away with it.
for _ in $(seq 50); do [ -e /dev/blksnap ] || break; sleep 0.1; done
[ ! -e /dev/blksnap ] || skip "/dev/blksnap exists already (the module, or another blksnapd)"

upstream_tools

diff_storage_minimum=8192
start_blksnapd --mode cuse --diff-storage-minimum $diff_storage_minimum
for _ in $(seq 300); do [ -c /dev/blksnap ] && break; sleep 0.1; done
[ -c /dev/blksnap ] || { echo "$0: blksnapd --mode cuse made no /dev/blksnap in 30 s" >&2; cat "$scratch/blksnapd.log" >&2; exit 1; }
echo "# /dev/blksnap: $(stat -c '%A %t:%T' /dev/blksnap)"
unset LD_PRELOAD
upstream_cli=("$upstream/build/tools/blksnap/blksnap")
source "$top/tests/upstream-cli-cycle.sh"
finish
