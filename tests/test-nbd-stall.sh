#!/usr/bin/env bash
# blksnapd stalled (SIGSTOP) for longer than the kernel's request timeout
# while a filesystem on a kernel NBD device is written with fsync: the
# kernel gives up on the connection and queues its requests again; once
# blksnapd runs again it sees the connection gone and gives the device a
# new one (NBD_CMD_RECONFIGURE), and the writer carries on without an error.
# Needs the kernel's nbd driver: the stock-kernel lane runs it.
source "$(dirname "$0")/functions.sh"
requires_root; requires mkfs.ext4; requires e2fsck; requires md5sum
[ -e /sys/module/nbd ] || skip "needs the kernel's nbd driver (modprobe nbd max_part=0; the stock-kernel lane has it)"

timeout=5
start_blksnapd --devices nbd --nbd-request-timeout $timeout
read -r dev _ < <(attach "$scratch/disk.img" $((64 << 20)))
mkfs.ext4 -q -F "$dev"
mount_at "$dev" "$scratch/mnt"
start_writer "$scratch/mnt"
check "the writer has 5 files acknowledged" wait_for_acked 5 60

kill -STOP "$blksnapd_pid"
sleep $((timeout * 3))
at_stall=$(acked_count)
kill -CONT "$blksnapd_pid"
echo "# blksnapd stalled for $((timeout * 3)) s with $at_stall files acknowledged"
check "the kernel timed the requests out" bash -c "dmesg | grep -q '${dev#/dev/}: Connection timed out'"
check "blksnapd reconnected $dev" wait_for_grep "dropped ${dev}'s connection" "$scratch/blksnapd.log" 30
check "the writer carries on: 10 more files acknowledged" wait_for_acked $((at_stall + 10)) 120
stop_writer
check "no write failed" test ! -s "$writer_failed"
umount "$scratch/mnt"
check "fsck finds the filesystem clean" e2fsck -n -f "$dev"
mount "$dev" "$scratch/mnt"
check "every acknowledged file is whole ($(acked_count) files)" bash -c "cd '$scratch/mnt' && md5sum -c --quiet '$writer_acked'"
umount "$scratch/mnt"
finish
