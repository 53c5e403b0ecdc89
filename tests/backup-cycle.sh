# The backup cycle of a live filesystem, shared by the scenarios that route
# the original disk in different ways. The caller has started blksnapd and
# set $orig_backing (a file path or an NBD URI) and sources this file.

read -r orig orig_id < <(attach "$orig_backing" $((256 << 20)))
read -r store _ < <(attach "$scratch/store.img" $((320 << 20)))
mkfs.ext4 -q -F "$orig"
mkfs.ext4 -q -F "$store"
mount_at "$orig" "$scratch/orig"
mount_at "$store" "$scratch/store"
# The difference storage: a preallocated file on a filesystem that is not
# under the snapshot, as the upstream tools use.
fallocate -l 160M "$scratch/store/diff0"

for i in 1 2 3 4; do dd if=/dev/urandom of="$scratch/orig/file$i" bs=1M count=8 status=none; done
mkdir "$scratch/orig/dir"; echo "hello" > "$scratch/orig/dir/small"
sync
# Written and closed just before TAKE, with no fsync of its own: TAKE's
# freeze must put it whole into the image.
dd if=/dev/urandom of="$scratch/orig/late" bs=1M count=16 status=none
(cd "$scratch/orig" && md5sum file1 file2 file3 file4 dir/small late) > "$scratch/before.md5"

id=$(blksnap create "$orig")
event=$(blksnap waitevent "$id" 100)
# Code 0 (low free space), requested_nr_sect = 262144 = 0x40000, little-endian.
check "the first event after CREATE asks for diff_storage_minimum" test "${event:0:18}" = "0 0000040000000000"
blksnap append "$id" "$scratch/store/diff0"
blksnap take "$id"
read -r image_orig image_id < <(blksnap images "$id")
check "COLLECT_IMAGES names the original" test "$image_orig" = "$orig_id"
# libblksnap names an image by its minor: /dev/blksnap-image<minor>. The
# first is image0 only where loop0 (nbd0) was free, so derive it.
image=/dev/blksnap-image${image_id##*:}
check "$image is a block device" test -b "$image"
check "$image is the image's device ($image_id)" test "$(stat -c '%Hr:%Lr' "$image")" = "$image_id"
check "/dev/block/$image_id exists" test -e "/dev/block/$image_id"

# The original stays mounted and keeps changing.
rm "$scratch/orig/file2"
dd if=/dev/urandom of="$scratch/orig/file1" bs=1M count=8 conv=notrunc status=none
for i in 5 6; do dd if=/dev/urandom of="$scratch/orig/new$i" bs=1M count=6 status=none; done
sync

mount_at "$image" "$scratch/image" ro,noload
check "every file of the point in time is whole in the image" bash -c "cd '$scratch/image' && md5sum -c --quiet '$scratch/before.md5'"
check "files created after TAKE are not in the image" test ! -e "$scratch/image/new5"
umount "$scratch/image"

# Writes to the image land in the difference storage, never the original.
mount_at "$image" "$scratch/image"
echo "written to the image" > "$scratch/image/image-only"
umount "$scratch/image"
mount_at "$image" "$scratch/image" ro
check "a write to the image survives a remount" grep -q "written to the image" "$scratch/image/image-only"
check "a write to the image never reaches the original" test ! -e "$scratch/orig/image-only"
umount "$scratch/image"

# Changed blocks: the next snapshot's CBT map marks every block written
# after the first TAKE with a number above the first snapshot's.
blksnap destroy "$id"
check "DESTROY removes $image" test ! -e "$image"
fallocate -l 32M "$scratch/store/diff1"
id2=$(blksnap create "$orig")
blksnap append "$id2" "$scratch/store/diff1"
blksnap take "$id2"
read -r snap blk map < <(blksnap cbt "$orig")
check "the second snapshot is number 2" test "$snap" = 2
python3 - "$scratch/orig" "$blk" "$map" "$ioctl_client" > "$scratch/cbt.txt" <<'PY'
import sys, importlib.util
spec = importlib.util.spec_from_file_location("b", sys.argv[4]); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
root, blk, cbt = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
missing = 0
for name in ("file1", "new5", "new6"):
    for physical, length in b.fiemap(f"{root}/{name}"):
        for block in range(physical // blk, (physical + length - 1) // blk + 1):
            if cbt[block] <= 1: missing += 1
print(missing, sum(1 for x in cbt if x > 1))
PY
read -r missing changed < "$scratch/cbt.txt"
check "every block written after the first TAKE is marked changed ($changed blocks marked)" test "$missing" = 0
check "the CBT map is not all changed" test "$changed" -lt $(( ${#map} / 2 ))
blksnap destroy "$id2"
blksnap remove "$orig"

umount "$scratch/orig"
check "the original is fsck-clean" e2fsck -fn "$orig"
mount_at "$orig" "$scratch/orig2"
check "the original kept its own changes" test -e "$scratch/orig2/new5" -a ! -e "$scratch/orig2/file2"
check "the original never saw the image's write" test ! -e "$scratch/orig2/image-only"
umount "$scratch/orig2"
