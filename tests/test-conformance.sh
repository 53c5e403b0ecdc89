#!/usr/bin/env bash
# The ioctl conformance suite (conformance/blksnap-conformance.c) through
# the preload shim against a private blksnapd and three routed devices.
exec "$(dirname "$0")/../tools/test-conformance"
