#!/usr/bin/env bash
# blksnapd killed (kill -9) while a filesystem on a routed device is being
# written with fsync, then started again on the same state directory.
#
# Kernel NBD (where the nbd driver is loaded: the stock-kernel lane): the
# kernel holds the device's requests (dead-connection timeout), the new
# blksnapd reconnects the device from its saved list (NBD_CMD_RECONFIGURE),
# and the writer carries on without a single error on the same mount.
#
# FUSE+loop (this machine): a FUSE connection dies with its server, so the
# device fails from the kill on; the new blksnapd takes the dead mount
# away, unbinds the dead loop device and says how to carry on; after an
# umount and a new attach of the same backing file the data is there.
#
# Either way, every write whose fsync returned before the kill is on the
# disk afterwards, and fsck finds the filesystem clean.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
requires mkfs.ext4; requires e2fsck; requires md5sum

start_blksnapd
state=$scratch/state
read -r dev dev_id < <(attach "$scratch/disk.img" $((128 << 20)))
case $dev in
    /dev/nbd*) kind=nbd ;;
    /dev/loop*) kind=loop ;;
    *) echo "unexpected routed device $dev"; exit 1 ;;
esac
echo "# routed device $dev ($kind)"
mkfs.ext4 -q -F "$dev"
mount_at "$dev" "$scratch/mnt"
check "the saved list names $dev" grep -qF "\"$dev\"" "$state/devices.json"

# A taken snapshot whose image is a device at the kill: snapshots live in
# the engine's memory, so the new blksnapd undoes the image's device.
read -r store _ < <(attach "$scratch/store.img" 160M)
mkfs.ext4 -q -F "$store"
mount_at "$store" "$scratch/store"
fallocate -l 128M "$scratch/store/diff"
id=$(blksnap create "$dev")
blksnap append "$id" "$scratch/store/diff"
blksnap take "$id"
read -r _ image_id < <(blksnap images "$id")
image_sys=$(readlink -f "/sys/dev/block/$image_id")
case $kind in
    nbd) image_bound=$image_sys/pid ;;
    loop) image_bound=$image_sys/loop/backing_file ;;
esac
image=/dev/blksnap-image${image_id##*:}
check "the image $image_id is $image" test "$(stat -c '%Hr:%Lr' "$image")" = "$image_id"
check "the image's device is bound ($image_bound)" test -e "$image_bound"

start_writer "$scratch/mnt"
check "the writer has 10 files acknowledged" wait_for_acked 10 120

[ $kind = loop ] && check "$dev is bound to its FUSE file" test -s "/sys/block/${dev#/dev/}/loop/backing_file"
kill -KILL "$blksnapd_pid"
wait "$blksnapd_pid" 2>/dev/null || true
at_kill=$(acked_count)
echo "# blksnapd killed with $at_kill files acknowledged"
sleep 1
start_blksnapd
grep -E "died|again" "$scratch/blksnapd.log" | sed 's/^/# log: /'

check "the image died with the snapshot: $image is gone" test ! -e "$image"
check "the image's device is unbound" test ! -e "$image_bound"
check "the new blksnapd says the image is gone" grep -q "image of a snapshot that died" "$scratch/blksnapd.log"

if [ $kind = nbd ]; then
    check "the new blksnapd serves $dev again" grep -q "$dev .* routes .* again" "$scratch/blksnapd.log"
    "$blksnapctl" status --json >"$scratch/status.json"
    check "status lists $dev_id as routed" grep -qF "\"$dev_id\"" "$scratch/status.json"
    check "${dev#/dev/} is exported over NBD again" grep -qF "\"${dev#/dev/}\"" "$scratch/status.json"
    # Requests in flight at the kill wait out the kernel's request timeout
    # (30 s), then go to the new connection.
    check "the writer carries on: 10 more files acknowledged" wait_for_acked $((at_kill + 10)) 180
    stop_writer
    check "no write failed" test ! -s "$writer_failed"
    check "$dev stayed mounted throughout" findmnt -n "$scratch/mnt"
    umount "$scratch/mnt"
    check "fsck finds the filesystem clean" e2fsck -n -f "$dev"
    mount "$dev" "$scratch/mnt"
else
    check "the new blksnapd says the loop device died with the old one" \
        grep -q "was served by a blksnapd that died" "$scratch/blksnapd.log"
    check "the new blksnapd says how to carry on" grep -q "cannot be served again.*blksnapctl attach" "$scratch/blksnapd.log"
    check "writes fail once the server is gone (no silent loss)" wait_for_file "$writer_failed" 30
    stop_writer
    umount "$scratch/mnt"
    umount "$scratch/store"
    check "the dead loop device is unbound once unmounted" \
        test ! -e "/sys/block/${dev#/dev/}/loop/backing_file"
    read -r dev _ < <(attach "$scratch/disk.img" $((128 << 20)))
    echo "# attached again as $dev"
    mount "$dev" "$scratch/mnt"   # replays the journal
fi
check "$at_kill files were acknowledged before the kill" test "$at_kill" -ge 10
check "every acknowledged file is whole ($(acked_count) files)" bash -c "cd '$scratch/mnt' && md5sum -c --quiet '$writer_acked'"
umount "$scratch/mnt"
[ $kind = loop ] && check "fsck finds the filesystem clean" e2fsck -n -f "$dev"

"$blksnapctl" detach "$dev"
if [ $kind = nbd ]; then
    umount "$scratch/store"
    "$blksnapctl" detach "$store"
fi
stop_blksnapd "$blksnapd_pid"
check "a clean stop leaves no saved list" test ! -e "$state/devices.json"
finish
