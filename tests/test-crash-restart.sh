#!/usr/bin/env bash
# blksnapd killed (kill -9, at a random moment) while a filesystem on a
# routed device is being written with fsync, then started again on the
# same state directory; a snapshot is taken and its image mounted.
#
# Kernel NBD (where the nbd driver is loaded: the stock-kernel lane): the
# kernel holds the device's requests (dead-connection timeout), the new
# blksnapd reconnects the device from its saved list (NBD_CMD_RECONFIGURE),
# and the writer carries on without a single error on the same mount.
#
# FUSE+loop (this machine): a keeper process (or systemd's file descriptor
# store, in test-crash-systemd.sh) holds the FUSE connection, so the mount
# and the loop devices survive; the new blksnapd takes the connection
# over, serves the same files under the same inode numbers and, on Linux
# 6.9 or later, has the kernel send again what the dead one had read and
# not answered (FUSE_NOTIFY_RESEND): the writer carries on without an
# error on the same mount. On an older kernel the connection is let go:
# the device fails from the kill on, and after an umount and a new attach
# of the same backing file the data is there.
#
# Either way, every write whose fsync returned before the kill is on the
# disk afterwards, fsck finds the filesystem clean, the snapshot is gone
# (it lived in the engine's memory) and its mounted image fails reads
# with an I/O error instead of hanging.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
requires mkfs.ext4; requires e2fsck; requires md5sum

# Kernel NBD: the kernel holds a dead device's requests for this long; a
# slow guest (the lane under TCG) may take a minute to start blksnapd again.
options=(--nbd-dead-timeout 600)
# Kernel NBD: two connections per device, each handed over again after the kill.
connections=2
options+=(--nbd-connections $connections)
start_blksnapd "${options[@]}"
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
if [ $kind = nbd ]; then
    # The kernel gives a device a hardware queue per connection (at most one
    # per CPU) and sends each queue's requests on its own socket.
    queues=$(( connections < $(nproc) ? connections : $(nproc) ))
    nbd_queues() { find "/sys/block/${dev#/dev/}/mq" -mindepth 1 -maxdepth 1 | wc -l; }
    check "$dev has $queues hardware queues: $connections connections on $(nproc) CPUs" test "$(nbd_queues)" -eq $queues
    check "the saved list says $connections connections" grep -Eq "\"connections\" *: *$connections\b" "$state/devices.json"
    check "status says $connections of $connections connections serve $dev" \
        bash -c "'$blksnapctl' status | grep -E '^ *[0-9]+:[0-9]+ +$dev .* $connections/$connections +'"
    reconnected() { dmesg | grep -c "${dev#/dev/}: reconnected socket" || true; }
    reconnected_before=$(reconnected)
fi

# What takes over on FUSE+loop: a kernel from 6.9 on can send requests again.
resend=no
IFS=. read -r major minor _ < <(uname -r)
[ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 9 ]; } && resend=yes
keeper_pid=
if [ $kind = loop ]; then
    keeper_pid=$(sed -n 's/.*started the keeper of the FUSE connections (pid \([0-9]*\).*/\1/p' "$scratch/blksnapd.log" | tail -1)
    check "a keeper holds the FUSE connection" grep -q "the keeper process keeps the device filesystem's FUSE connection" "$scratch/blksnapd.log"
    # A keeper left holding a connection nobody serves would hang whatever waits on it.
    cleanup_fn '[ -n "$keeper_pid" ] && kill -KILL "$keeper_pid" 2>/dev/null'
fi

# A taken snapshot whose image is a mounted device at the kill: snapshots
# live in the engine's memory, so the new blksnapd undoes the image.
read -r store _ < <(attach "$scratch/store.img" 160M)
mkfs.ext4 -q -F "$store"
mount_at "$store" "$scratch/store"
fallocate -l 128M "$scratch/store/diff"
echo "on the original at the take" >"$scratch/mnt/taken"
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
mount_at "$image" "$scratch/image" ro,noload
check "the mounted image reads what the take saw" grep -q "at the take" "$scratch/image/taken"

start_writer "$scratch/mnt"
# Runs before the cleanups queued earlier: a writer waiting on a
# connection nobody serves is ended first.
cleanup_fn '[ -n "$keeper_pid" ] && kill -KILL "$keeper_pid" 2>/dev/null'
check "the writer has 10 files acknowledged" wait_for_acked 10 120
sleep "$(printf '%d.%03d' $((RANDOM % 3)) $((RANDOM % 1000)))"   # the kill lands anywhere in a write

[ $kind = loop ] && check "$dev is bound to its FUSE file" test -s "/sys/block/${dev#/dev/}/loop/backing_file"
kill -KILL "$blksnapd_pid"
wait "$blksnapd_pid" 2>/dev/null || true
at_kill=$(acked_count)
echo "# blksnapd killed with $at_kill files acknowledged"
sleep 1   # the outage
start_blksnapd "${options[@]}"
ready=$EPOCHREALTIME
grep -E "died|again|took over" "$scratch/blksnapd.log" | sed 's/^/# log: /'

check "the image died with the snapshot: $image is gone" test ! -e "$image"
check "the new blksnapd says the image is gone" grep -q "image of a snapshot that died" "$scratch/blksnapd.log"
check "the mounted image fails a read with an I/O error" \
    bash -c "! dd if='$scratch/image/taken' of=/dev/null iflag=direct bs=4096 count=1 status=none 2>'$scratch/image.err' && grep -q 'Input/output error' '$scratch/image.err'"
umount "$scratch/image"
check "the image's device is unbound once unmounted" wait_for_gone "$image_bound" 10

carries_on=$kind
[ $kind = loop ] && [ $resend = no ] && carries_on=no
if [ $kind = loop ] && [ $resend = yes ]; then
    check "the new blksnapd took the FUSE connection over" grep -q "took over the device filesystem" "$scratch/blksnapd.log"
    check "the keeper outlived the kill" kill -0 "$keeper_pid"
fi
if [ $carries_on != no ]; then
    check "the new blksnapd serves $dev again" grep -q "$dev .* routes .* again" "$scratch/blksnapd.log"
    if [ $kind = nbd ]; then
        check "the new blksnapd handed the kernel $connections sockets (NBD_CMD_RECONFIGURE)" \
            test "$(reconnected)" -eq $((reconnected_before + connections))
        check "$dev still has $queues hardware queues" test "$(nbd_queues)" -eq $queues
    fi
    "$blksnapctl" status --json >"$scratch/status.json"
    check "status lists $dev_id as routed" grep -qF "\"$dev_id\"" "$scratch/status.json"
    if [ $kind = nbd ]; then
        check "status says $connections of $connections connections serve $dev again" \
            python3 -c 'import json, sys; sys.exit(not any(d.get("connections") == sys.argv[2]
                        for d in json.load(open(sys.argv[1]))["devices"]))' "$scratch/status.json" "$connections/$connections"
    fi
    check "${dev#/dev/} is exported over NBD again" grep -qF "\"${dev#/dev/}\"" "$scratch/status.json"
    # Kernel NBD: requests in flight at the kill wait out the kernel's
    # request timeout (30 s), then go to the new connection. FUSE: the
    # kernel sends them again at once.
    carried=yes
    wait_for_acked $((at_kill + 10)) 180 || carried=no
    check "the writer carries on: 10 more files acknowledged" test $carried = yes
    # FUSE: requests nobody answers wait for ever; ending the connection fails them.
    [ $carried = yes ] || [ -z "$keeper_pid" ] || kill -KILL "$blksnapd_pid" "$keeper_pid"
    stop_writer
    echo "# longest pause between two acknowledged files: $(longest_pause) s;" \
        "the first file after the restart was acknowledged $(awk -v r="$ready" '$1 > r { printf "%.3f", $1 - r; exit }' "$writer_times") s after the new blksnapd was up"
    check "no write failed" test ! -s "$writer_failed"
    check "$dev stayed mounted throughout" mountpoint -q "$scratch/mnt"
    umount "$scratch/mnt"
    check "fsck finds the filesystem clean" e2fsck -n -f "$dev"
    mount "$dev" "$scratch/mnt"
else
    check "the new blksnapd says the kernel cannot send requests again" grep -q "cannot send requests again" "$scratch/blksnapd.log"
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
check "the original kept what was written before the take" grep -q "at the take" "$scratch/mnt/taken"
umount "$scratch/mnt"
[ $carries_on = no ] && check "fsck finds the filesystem clean" e2fsck -n -f "$dev"

"$blksnapctl" detach "$dev"
if [ $carries_on != no ]; then
    umount "$scratch/store"
    "$blksnapctl" detach "$store"
fi
stop_blksnapd "$blksnapd_pid"
check "a clean stop leaves no saved list" test ! -e "$state/devices.json"
if [ -n "$keeper_pid" ]; then
    check "the keeper ends after the clean stop" wait_for_exit "$keeper_pid" 10
fi
finish
