#!/usr/bin/env bash
# A backup of a live filesystem, end to end on this machine: a routed disk
# (an image file) with ext4 on it, a snapshot taken through the preload
# shim while it stays mounted and written, the image mounted and checked,
# changed blocks read from the CBT map, and an intact original afterwards.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
requires mkfs.ext4; requires e2fsck; requires python3; requires md5sum; requires fallocate

start_blksnapd --diff-storage-minimum 262144
orig_backing=$scratch/orig.img
source "$(dirname "$0")/backup-cycle.sh"
finish
