#!/usr/bin/env bash
# The same backup cycle with the original disk exported by another NBD
# server (nbdkit) and routed through libnbd: a disk the engine reaches only
# over NBD is tracked and snapshotted like a local one.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
requires mkfs.ext4; requires e2fsck; requires python3; requires md5sum; requires fallocate; requires nbdkit

truncate -s $((256 << 20)) "$scratch/exported.img"
nbdkit --unix "$scratch/nbdkit.sock" --pidfile "$scratch/nbdkit.pid" file "$scratch/exported.img"
cleanup_fn "kill \$(cat '$scratch/nbdkit.pid') 2>/dev/null"
for _ in $(seq 50); do [ -S "$scratch/nbdkit.sock" ] && break; sleep 0.1; done

start_blksnapd --diff-storage-minimum 262144
orig_backing="nbd+unix:///?socket=$scratch/nbdkit.sock"
source "$(dirname "$0")/backup-cycle.sh"
check "nbdkit's disk holds the original's filesystem" bash -c "e2fsck -fn '$scratch/exported.img' >/dev/null 2>&1"
finish
