#!/usr/bin/env bash
# blksnapd's NBD exports with real clients: a routed device and a snapshot
# image are exports (loop64-style and blksnap-image0-style names), nbdcopy
# of the image equals a copy of the device taken at the take, qemu-img
# compare agrees, and nbdinfo lists the changed blocks from the CBT context.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
requires nbdinfo; requires nbdcopy; requires qemu-img; requires python3

start_blksnapd --diff-storage-minimum 32768
sock=$(dirname "$BLKSNAP_CONTROL_SOCKET")/nbd.sock
read -r dev dev_id < <(attach "$scratch/dev.img" $((64 << 20)))
read -r store _ < <(attach "$scratch/store.img" $((64 << 20)))
name=$(basename "$dev")
uri="nbd+unix:///$name?socket=$sock"

check "status lists the routed device's export" bash -c "'$blksnapctl' status | grep -q '^  $name '"
check "nbdinfo sees the export's size" test "$(nbdinfo --size "$uri")" = $((64 << 20))

dd if=/dev/urandom of="$dev" bs=1M count=64 oflag=direct status=none
dd if="$dev" of="$scratch/at-take.img" bs=1M iflag=direct status=none

# Difference storage: the whole second routed device, beneath tracking.
id=$(blksnap create "$dev")
blksnap append-device "$id" "$store"
blksnap take "$id"
read -r _ image_id < <(blksnap images "$id")
image=blksnap-image${image_id##*:}
image_uri="nbd+unix:///$image?socket=$sock"

# The original changes after the take: 3 MiB at 8 MiB.
dd if=/dev/urandom of="$dev" bs=1M count=3 seek=8 oflag=direct status=none

check "the image is an export" bash -c "nbdinfo --list 'nbd+unix:///?socket=$sock' | grep -q 'export=\"$image\"'"
nbdcopy --connections=4 --requests=16 "$image_uri" "$scratch/image-copy.img"
check "nbdcopy of the image equals the device at the take" cmp "$scratch/at-take.img" "$scratch/image-copy.img"
check "qemu-img compare agrees" qemu-img compare -q -f raw -F raw "$scratch/at-take.img" "$image_uri"
# cmp exits 1 when the files differ, 2 when it could not compare them.
differs() { local status=0; cmp -s "$1" "$2" || status=$?; [ "$status" -eq 1 ]; }
check "the original no longer equals the image" differs "$scratch/at-take.img" "$dev"

# Changed blocks over NBD: a second snapshot makes the writes after the
# first visible in the read map; the context lists exactly them.
blksnap destroy "$id"
id2=$(blksnap create "$dev")
blksnap append-device "$id2" "$store"
blksnap take "$id2"
nbdinfo --map=blksnap:changed-since:1 "$uri" > "$scratch/map.txt"
# nbdinfo prints "offset length type description"; type 1 is changed.
check "the changed extents are exactly 8 MiB..11 MiB" \
    bash -c "awk '\$3 == 1 { print \$1, \$2 }' '$scratch/map.txt' | grep -qx '$((8 << 20)) $((3 << 20))' && [ \$(awk '\$3 == 1' '$scratch/map.txt' | wc -l) = 1 ]"
check "base:allocation answers: all data" bash -c "nbdinfo --map '$uri' | grep -qE '^ *0 +$((64 << 20)) +0 +data'"
blksnap destroy "$id2"
# The listing must have worked (and still name the device) for the
# image's absence from it to mean anything.
check "nbdinfo --list works after DESTROY" bash -c "nbdinfo --list 'nbd+unix:///?socket=$sock' > '$scratch/list.txt'"
check "destroyed images are no longer exported" \
    bash -c "grep -q 'export=\"$name\"' '$scratch/list.txt' && ! grep -q blksnap-image '$scratch/list.txt'"
finish
