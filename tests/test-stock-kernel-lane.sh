#!/usr/bin/env bash
# The stock-kernel lane: Debian's 6.1 kernel under qemu (TCG), where CUSE
# and nbd exist. Inside (tools/lane/scenarios, each run and reported on
# its own): blksnapd --mode cuse, the conformance suite through the real
# CUSE /dev/blksnap (no shim), the backup cycle of a live filesystem on
# kernel NBD devices, blksnapd stalled past the request timeout and
# blksnapd killed and started again under a filesystem being written, and
# the upstream `blksnap` CLI cycle through the CUSE /dev/blksnap; then a
# second boot whose root filesystem is routed from the initramfs
# (tests/test-routed-root.sh). Skipped
# (77) only where qemu cannot start a guest here.
set -uo pipefail
cd "$(dirname "$0")/.."
# The guest builds nothing: the upstream tools are built here first, in
# .build/ (the repository is the guest's at the same path). Where their
# source is absent the guest's scenario says so and is skipped.
status=0
upstream=$(tools/build-upstream-v1) || status=$?
case $status in
    0) env="BLKSNAP_UPSTREAM_V1_BUILD=$upstream " ;;
    77) echo "# $upstream: the lane's upstream CLI cycle will be skipped"; env= ;;
    *) echo "tests/test-stock-kernel-lane.sh: tools/build-upstream-v1 failed (exit $status)" >&2; exit 1 ;;
esac
# Under TCG the twelve scenarios take about 17 minutes on an idle host, much longer on a busy one.
status=0
tools/stock-kernel-lane --timeout 3600 -- "${env}tools/lane/scenarios" || status=$?
[ "$status" -eq 77 ] && exit 77
# A second boot, on a root filesystem routed from the initramfs by the
# shipped boot script: the upstream CLI snapshots "/".
routed=0
tools/stock-kernel-lane --routed-root --timeout 1800 -- "${env}tools/lane/scenarios tests/test-routed-root.sh" || routed=$?
echo "# lane: scenarios exit $status, routed-root boot exit $routed"
[ "$status" -eq 0 ] && [ "$routed" -eq 0 ]
