#!/usr/bin/env bash
# The stock-kernel lane: Debian's 6.1 kernel under qemu (TCG), where CUSE
# and nbd exist. Inside: blksnapd --mode cuse, the conformance suite
# through the real CUSE /dev/blksnap (no shim), the backup cycle of a
# live filesystem on kernel NBD devices, and, under a filesystem being
# written on kernel NBD devices, blksnapd stalled past the request timeout
# and blksnapd killed and started again. Skipped (77) where qemu cannot
# start a guest here.
exec "$(dirname "$0")/../tools/stock-kernel-lane" -- \
    'tools/lane/cuse-conformance && modprobe nbd max_part=0 && bash tests/test-e2e-filesystem.sh &&
     bash tests/test-nbd-stall.sh && bash tests/test-crash-restart.sh'
