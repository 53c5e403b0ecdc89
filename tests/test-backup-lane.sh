#!/usr/bin/env bash
# blksnap-backup through the real CUSE /dev/blksnap, no shim, on kernel
# NBD devices: one full and one incremental backup of a live ext4, both
# restored and checked file by file. For the stock-kernel lane (Debian
# 6.1 under qemu); skipped where the kernel lacks CUSE or nbd.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop
[ -e /dev/cuse ] || skip "needs CUSE (/dev/cuse): run it in the stock-kernel lane"
[ -e /sys/module/nbd ] || skip "needs the nbd module (modprobe nbd max_part=0): run it in the stock-kernel lane"
source "$(dirname "$0")/backup-functions.sh"

start_blksnapd --mode cuse --devices nbd --diff-storage-minimum 32768
for _ in $(seq 100); do [ -c /dev/blksnap ] && break; sleep 0.1; done
check "/dev/blksnap is blksnapd's CUSE character device" test -c /dev/blksnap
make_storage 64M
read -r orig _ < <(attach "$scratch/orig.img" 48M)
check "the routed device is a kernel NBD device" test "${orig#/dev/nbd}" != "$orig"
mkfs.ext4 -q -F "$orig"
mount_at "$orig" "$scratch/orig"
repo=$scratch/repo
direct() { "$blksnap_backup" "$@"; }  # no shim: /dev/blksnap is real here

write_file "$scratch/orig/a" 4; mkdir "$scratch/orig/d"; write_file "$scratch/orig/d/b" 2
record "$scratch/orig" "$scratch/rec1"
check "full backup through CUSE" direct full --device "$orig" --to "$repo" --storage "$storage"
rm "$scratch/orig/d/b"; write_file "$scratch/orig/c" 1
dd if=/dev/urandom of="$scratch/orig/a" bs=64k count=4 conv=notrunc status=none
record "$scratch/orig" "$scratch/rec2"
check "incremental backup through CUSE" direct incremental --device "$orig" --to "$repo" --storage "$storage"
check "backup 2 is incremental on 1" test "$(manifest_field "$repo" 2 "m['kind'], m['parent']")" = "incremental 1"
for n in 1 2; do
    direct restore --from "$repo" --backup $n --to "$scratch/r$n.img" >/dev/null
    check "backup $n restored: every file as at its snapshot" matches_record "$scratch/r$n.img" "$scratch/rec$n"
done
check "verify passes" direct verify --from "$repo"
check "no snapshot is left" bash -c "'$blksnapctl' status --json | python3 -c 'import json,sys; assert not json.load(sys.stdin)[\"snapshots\"]'"
finish
