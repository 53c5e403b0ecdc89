#!/usr/bin/env bash
# The difference storage is a real disk that starts failing, under a taken
# snapshot of a mounted ext4 being written with fsync.
#
# Where device-mapper works (the stock-kernel lane: dm-mod, dmsetup), the
# storage is a dm device, linear over a loop device, whose table is swapped
# for the `error` target (built into dm-mod). Elsewhere (this machine: FUSE
# and loop, no dm) it is a loop device on a FUSE file (nbdfuse) of an
# nbdkit memory disk whose `error` filter fails every request (EIO) once
# its trigger file exists. Either way the kernel's block layer hands
# blksnapd the error, as it would from a dying disk.
#
# Then: every write the writer had acknowledged is there (md5 of each file)
# and fsck finds the original clean; the writer never saw an error; the
# snapshot reports corrupted (one corrupted event for the device, through
# the ioctl client, and in the status); the image fails reads with EIO; and
# blksnapd keeps serving: a new snapshot on healthy storage is created,
# taken, read and destroyed.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop
requires mkfs.ext4; requires e2fsck; requires md5sum; requires python3

if command -v dmsetup >/dev/null && { [ -e /dev/mapper/control ] || modprobe dm-mod 2>/dev/null; } &&
   [ -e /dev/mapper/control ] && dmsetup version >/dev/null 2>&1; then
    kind=dm
else
    requires_fuse; requires nbdkit; requires nbdfuse
    nbdkit --dump-plugin memory >/dev/null 2>&1 || skip "needs nbdkit's memory plugin"
    nbdkit --filter=error memory 1M --dump-plugin >/dev/null 2>&1 || skip "needs nbdkit's error filter"
    kind=fuse
fi
echo "# failing storage through $kind"

store_bytes=$((64 << 20))
if [ $kind = dm ]; then
    truncate -s $store_bytes "$scratch/store.raw"
    store_loop=$(losetup --find --show "$scratch/store.raw")
    cleanup_fn "losetup -d '$store_loop'"
    dm_name=blksnap-failing-$$
    # No udev in the lane's guest: dmsetup makes the node itself.
    dmsetup create "$dm_name" --noudevsync --table "0 $((store_bytes / 512)) linear $store_loop 0"
    cleanup_fn "dmsetup remove --noudevsync '$dm_name'"
    dmsetup mknodes "$dm_name" 2>/dev/null || true
    store=/dev/mapper/$dm_name
    storage_fails() {
        dmsetup suspend --noudevsync "$dm_name" &&
        dmsetup reload --noudevsync "$dm_name" --table "0 $((store_bytes / 512)) error" &&
        dmsetup resume --noudevsync "$dm_name"
    }
else
    trigger=$scratch/store.fail
    mkdir -p "$scratch/fuse"
    # nbdfuse runs nbdkit (-s: over its stdin) and serves it as one file.
    nbdfuse -P "$scratch/nbdfuse.pid" "$scratch/fuse/disk" --command \
        nbdkit -s --exit-with-parent --filter=error memory $store_bytes \
        error=EIO error-rate=100% error-file="$trigger" 2>>"$scratch/nbdkit.log" &
    cleanup_fn "fusermount3 -u '$scratch/fuse' 2>/dev/null; kill $! 2>/dev/null"
    wait_for_file "$scratch/nbdfuse.pid" 30 || { echo "nbdfuse did not start"; exit 1; }
    store=$(losetup --find --show "$scratch/fuse/disk")
    cleanup_fn "losetup -d '$store'"
    storage_fails() { touch "$trigger"; }
fi
check "the storage $store is a block device" test -b "$store"

start_blksnapd
read -r dev dev_id < <(attach "$scratch/disk.img" $((128 << 20)))
echo "# routed device $dev ($dev_id)"
mkfs.ext4 -q -F "$dev"
mount_at "$dev" "$scratch/mnt"
for i in 1 2 3; do dd if=/dev/urandom of="$scratch/mnt/before$i" bs=1M count=4 conv=fsync status=none; done

id=$(blksnap create "$dev")
blksnap append-device "$id" "$store"
blksnap take "$id"
read -r _ image_id < <(blksnap images "$id")
image=/dev/block/$image_id
check "the image $image_id is readable while the storage is healthy" \
    dd if="$image" of=/dev/null bs=1M count=16 iflag=direct status=none

start_writer "$scratch/mnt"
check "the writer has 5 files acknowledged" wait_for_acked 5 120
storage_fails
at_failure=$(acked_count)
echo "# the storage fails now ($at_failure files acknowledged)"

# WAIT_EVENT gives the low-free-space request of CREATE first, then the
# corrupted event: code 1, data = orig_dev_id (major, minor) and err_code.
events=$scratch/events
: >"$events"
for _ in $(seq 60); do
    line=$(blksnap waitevent "$id" 1000) || true
    [ -n "$line" ] && echo "$line" >>"$events"
    grep -q '^1 ' "$events" && break
done
sed 's/^/# event: /' "$events"
le32() { python3 -c "import struct,sys; print(struct.pack('<i', int(sys.argv[1])).hex())" "$1"; }
expected_event="1 $(le32 "${dev_id%%:*}")$(le32 "${dev_id##*:}")$(le32 5)"
check "a corrupted event for $dev_id with EIO" grep -q "^${expected_event}" "$events"
check "exactly one corrupted event" test "$(grep -c '^1 ' "$events")" = 1
check "no further event is queued" bash -c "! blksnap waitevent '$id' 200 >/dev/null 2>&1"

check "the writer carries on: 10 more files acknowledged" wait_for_acked $((at_failure + 10)) 120
stop_writer
[ $kind = fuse ] && echo "# nbdkit failed $(grep -c 'injecting EIO' "$scratch/nbdkit.log") requests of the storage"
check "no write of the original failed" test ! -s "$writer_failed"

"$blksnapctl" status --json >"$scratch/status.json"
check "the status says the snapshot is corrupted" python3 -c "
import json, sys
s = json.load(open(sys.argv[1]))
snap = next(x for x in s['snapshots'] if x['id'] == sys.argv[2])
sys.exit(0 if snap['corrupted'] and all(i['corrupted'] for i in snap['images']) else 1)" "$scratch/status.json" "$id"
check "blksnapd logs why" grep -q "snapshot $id is corrupted" "$scratch/blksnapd.log"
if dd if="$image" of=/dev/null bs=1M count=16 iflag=direct 2>"$scratch/image.err"; then image_read=0; else image_read=1; fi
check "an image read fails" test $image_read = 1
check "with an I/O error" grep -q "Input/output error" "$scratch/image.err"
blksnap destroy "$id"
check "the corrupted snapshot is destroyed" bash -c "! blksnap images '$id' 2>/dev/null"

# blksnapd keeps serving: a new snapshot on healthy storage.
read -r store2 _ < <(attach "$scratch/store2.img" $((64 << 20)))
id2=$(blksnap create "$dev")
blksnap append-device "$id2" "$store2"
blksnap take "$id2"
read -r _ image2_id < <(blksnap images "$id2")
sync
(cd "$scratch/mnt" && md5sum before1 before2 before3) >"$scratch/before.md5"
echo "after the new take" >"$scratch/mnt/after-take"
sync
mount_at "/dev/block/$image2_id" "$scratch/image" ro,noload
check "the new snapshot's image holds the files" bash -c "cd '$scratch/image' && md5sum -c --quiet '$scratch/before.md5'"
check "and not what came after its TAKE" test ! -e "$scratch/image/after-take"
umount "$scratch/image"
blksnap destroy "$id2"
check "the new snapshot is destroyed" bash -c "! blksnap images '$id2' 2>/dev/null"

umount "$scratch/mnt"
check "fsck finds the original clean" e2fsck -n -f "$dev"
mount "$dev" "$scratch/mnt"
check "every acknowledged file is whole ($(acked_count) files)" \
    bash -c "cd '$scratch/mnt' && md5sum -c --quiet '$writer_acked'"
umount "$scratch/mnt"
"$blksnapctl" detach "$store2"
"$blksnapctl" detach "$dev"
finish
