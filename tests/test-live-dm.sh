#!/usr/bin/env bash
# Live routing of a device-mapper device: an ext4 on a dm-linear volume
# (what an LVM logical volume is), mounted and written with fsync, is
# routed in place (attach --live), snapshotted by its own name, given its
# own table back (detach --live), all under the writer; then blksnapd is
# killed while the volume is live-routed and started again. Refusals too.
# Needs dm and kernel NBD, so it runs in the stock-kernel lane; here only
# the refusal on FUSE+loop runs, and the rest says "skipped: why".
source "$(dirname "$0")/functions.sh"
requires_root; requires python3; requires md5sum; requires mkfs.ext4; requires e2fsck; requires fallocate

if ! { [ -e /dev/nbd0 ] && [ -e /dev/mapper/control ] && command -v dmsetup >/dev/null && dmsetup version >/dev/null 2>&1; }; then
    # What can be shown without dm and nbd: the refusal, with its reason.
    requires_loop; requires_fuse
    start_blksnapd --devices fuse
    out=$("$blksnapctl" attach --live /dev/null 2>&1) && status=0 || status=$?
    check "attach --live on FUSE+loop fails" test "$status" -ne 0
    check "and says it needs kernel NBD devices" grep -q "live routing needs kernel NBD devices" <<<"$out"
    echo "skipped: $(basename "$0"): the live switch needs device-mapper and the kernel's nbd driver (the stock-kernel lane has both)"
    [ "$failed" -eq 0 ] || finish
    exit 77
fi

# Under TCG on a busy host a restart can take a while: give the kernel
# longer than the default 60 s to hold the volume's requests.
daemon_options=(--devices nbd --diff-storage-minimum 262144 --nbd-dead-timeout 300)
start_blksnapd "${daemon_options[@]}"
sectors=$((256 << 11))
truncate -s 256M "$scratch/pv.img"
pv=$(losetup -f --show "$scratch/pv.img")
cleanup_fn "losetup -d '$pv'"
name=blksnaptest$$
dmsetup create "$name" --table "0 $sectors linear $pv 0"
dmsetup mknodes "$name"  # where no udev makes /dev/mapper nodes (the lane)
cleanup_fn "dmsetup remove --retry '$name' 2>/dev/null; dmsetup remove blksnap-base-$name 2>/dev/null"
vol=/dev/mapper/$name
vol_id=$(stat -L -c '%Hr:%Lr' "$vol")
mkfs.ext4 -q -F "$vol"
mount_at "$vol" "$scratch/mnt"

# The store for the snapshot: a file on another routed disk.
read -r store _ < <(attach "$scratch/store.img" $((320 << 20)))
mkfs.ext4 -q -F "$store"
mount_at "$store" "$scratch/store"
fallocate -l 160M "$scratch/store/diff0"

# Pauses: a 4 KiB fsync'd write in a loop, each's start and end in ns.
pauses=$scratch/pauses
start_pause_meter() {
    : >"$pauses"
    (while [ ! -e "$scratch/meter.stop" ]; do
        a=$(date +%s%N)
        dd if=/dev/zero of="$scratch/mnt/meter" bs=4k count=1 conv=fsync status=none 2>/dev/null || echo "failed" >>"$pauses"
        echo "$a $(date +%s%N)" >>"$pauses"
    done) &
    meter_pid=$!
    cleanup_fn "touch '$scratch/meter.stop'; wait $meter_pid 2>/dev/null"
}
longest_pause_ms() {  # the longest write, in ms, between two marks (ns)
    awk -v from="$1" -v to="$2" '$2 >= from && $1 <= to { d = ($2 - $1) / 1e6; if (d > m) m = d } END { printf "%d", m }' "$pauses"
}

start_writer "$scratch/mnt"
start_pause_meter
check "the writer has 5 files acknowledged" wait_for_acked 5 120

t0=$(date +%s%N)
read -r node routed_id < <("$blksnapctl" attach --live "$vol")
t1=$(date +%s%N)
echo "# attach --live: $node $routed_id in $(( (t1 - t0) / 1000000 )) ms; longest write during it: $(longest_pause_ms "$t0" "$t1") ms"
check "attach --live keeps the volume's name" test "$node" = "$vol"
check "and its major:minor" test "$routed_id" = "$vol_id"
table=$(dmsetup table "$name")
check "the volume now maps onto an nbd device ($table)" grep -Eq "linear (/dev/nbd|43:)" <<<"$table"
out=$("$blksnapctl" attach --live "$vol" 2>&1) && again=0 || again=$?
check "a second attach --live fails" test "$again" -ne 0
check "and says it is routed already" grep -q "routed already" <<<"$out"

check "the writer carries on" wait_for_acked $(( $(acked_count) + 5 )) 120
sync
cp "$writer_acked" "$scratch/acked-at-take"
id=$(blksnap create "$vol")
blksnap append "$id" "$scratch/store/diff0"
blksnap take "$id"
read -r image_orig image_id < <(blksnap images "$id")
check "the snapshot names the volume ($image_orig)" test "$image_orig" = "$vol_id"
image=/dev/blksnap-image${image_id##*:}
mount_at "$image" "$scratch/image" ro,noload
check "every file acknowledged before TAKE is whole in the image" \
    bash -c "cd '$scratch/image' && md5sum -c --quiet '$scratch/acked-at-take'"
umount "$scratch/image"
blksnap destroy "$id"

t0=$(date +%s%N)
"$blksnapctl" detach --live "$vol"
t1=$(date +%s%N)
echo "# detach --live in $(( (t1 - t0) / 1000000 )) ms; longest write during it: $(longest_pause_ms "$t0" "$t1") ms"
check "detach --live gives the volume its own table" test "$(dmsetup table "$name")" = "0 $sectors linear $(stat -c '%Hr:%Lr' "$pv") 0"
check "the hidden copy is gone" bash -c "! dmsetup info blksnap-base-$name >/dev/null 2>&1"
check "the writer carries on after detach" wait_for_acked $(( $(acked_count) + 5 )) 120

# Killed while live-routed: the NBD device waits, the new blksnapd takes it.
"$blksnapctl" attach --live "$vol" >/dev/null
check "the writer carries on after attach again" wait_for_acked $(( $(acked_count) + 3 )) 120
kill -KILL "$blksnapd_pid"; wait "$blksnapd_pid" 2>/dev/null || true
at_kill=$(acked_count)
start_blksnapd "${daemon_options[@]}"
grep -E "died|again|cannot" "$scratch/blksnapd.log" | sed 's/^/# log: /'
check "the new blksnapd serves the volume again" grep -q "routes /dev/mapper/blksnap-base-$name again" "$scratch/blksnapd.log"
check "the writer carries on after the restart" wait_for_acked $((at_kill + 5)) 180
"$blksnapctl" detach --live "$vol"
check "and the volume has its own table back" test "$(dmsetup table "$name")" = "0 $sectors linear $(stat -c '%Hr:%Lr' "$pv") 0"

# Declared live: attach --live --name --persist writes a live declaration.
# A clean stop gives the volume its own table back (it is written directly
# while blksnapd is away), and the next start routes it again before it
# reports ready; the writer never sees a failed write.
own_table="0 $sectors linear $(stat -c '%Hr:%Lr' "$pv") 0"
"$blksnapctl" attach --live --name lv --persist "$vol" >/dev/null
check "--persist declares the volume live" grep -qx "lv $vol live" "$scratch/etc/devices.conf"
check "its stable link names the volume itself" test "$(readlink /dev/disk/by-blksnap/lv)" = "$vol"
for round in 1 2; do
    check "the writer carries on (round $round)" wait_for_acked $(( $(acked_count) + 3 )) 120
    t0=$(date +%s%N)
    stop_blksnapd "$blksnapd_pid"
    t1=$(date +%s%N)
    check "a clean stop gives the volume its own table (round $round)" test "$(dmsetup table "$name")" = "$own_table"
    check "the writer carries on while blksnapd is stopped (round $round)" wait_for_acked $(( $(acked_count) + 2 )) 120
    t2=$(date +%s%N)
    start_blksnapd "${daemon_options[@]}"
    t3=$(date +%s%N)
    table=$(dmsetup table "$name")
    check "the start routes the declared volume again before it is ready (round $round: $table)" grep -Eq "linear (/dev/nbd|43:)" <<<"$table"
    check "status shows lv routed (round $round)" bash -c "'$blksnapctl' status | grep -E '^ *lv +routed'"
    echo "# restart $round: stop in $(( (t1 - t0) / 1000000 )) ms (longest write $(longest_pause_ms "$t0" "$t1") ms), start in $(( (t3 - t2) / 1000000 )) ms (longest write $(longest_pause_ms "$t2" "$t3") ms)"
done
check "the writer carries on after the restarts" wait_for_acked $(( $(acked_count) + 3 )) 120
"$blksnapctl" detach --live --forget lv
check "detach --live --forget removes the declaration" bash -c "! grep -q '^lv ' '$scratch/etc/devices.conf'"
check "and the volume has its own table again" test "$(dmsetup table "$name")" = "$own_table"
check "and its link is gone" test ! -e /dev/disk/by-blksnap/lv

echo "# longest write of the whole run: $(longest_pause_ms 0 99999999999999999999) ms"
stop_writer
touch "$scratch/meter.stop"; wait "$meter_pid" 2>/dev/null || true
check "no write failed" test ! -s "$writer_failed"
check "the meter saw no failed write" bash -c "! grep -q failed '$pauses'"
umount "$scratch/mnt"
check "the volume is fsck-clean" e2fsck -f -n "$vol"
mount_at "$vol" "$scratch/mnt" ro
check "every acknowledged file is whole" bash -c "cd '$scratch/mnt' && md5sum -c --quiet '$writer_acked'"
umount "$scratch/mnt"

# Refusals: a table that is not linear or striped.
dmsetup create "${name}z" --table "0 2048 error"
dmsetup mknodes "${name}z"
cleanup_fn "dmsetup remove '${name}z' 2>/dev/null"
out=$("$blksnapctl" attach --live "/dev/mapper/${name}z" 2>&1) && st=0 || st=$?
check "an error-target table is refused" test "$st" -ne 0
check "naming the target and what is supported" grep -q "error target" <<<"$out"
out=$("$blksnapctl" attach --live "$pv" 2>&1) && st=0 || st=$?
check "a device that is not dm is refused" grep -q "not a device-mapper device" <<<"$out"
finish
