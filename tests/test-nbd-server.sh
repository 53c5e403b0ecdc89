#!/usr/bin/env bash
# The NBD server on its own (blksnap-nbd-serve) against real clients:
# nbdinfo, nbdcopy, qemu-img, qemu-io, nbdkit's nbd plugin (tools/test-nbd.sh).
exec "$(dirname "$0")/../tools/test-nbd.sh"
