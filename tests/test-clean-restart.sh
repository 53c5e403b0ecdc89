#!/usr/bin/env bash
# A clean stop (SIGTERM: `systemctl stop` or `restart`, an upgrade) while a
# filesystem on a routed device is mounted and being written with fsync,
# then a new blksnapd on the same state directory.
#
# Kernel NBD (the stock-kernel lane): a device in use is not taken away.
# blksnapd stops serving it, saves its CBT exactly (nothing reaches the
# engine after), and leaves it configured, as a crash would: the kernel
# holds its requests for the dead-connection timeout, the saved list keeps
# it, and the next blksnapd serves it again. The writer carries on without
# a failed write, the CBT comes back as "restored" (exact, not "after a
# crash") with the same generation, and fsck finds the filesystem clean.
# A device not in use is removed at the stop, as before.
#
# FUSE+loop (this machine), from Linux 6.9: the same, through the keeper
# that holds the FUSE connection across a crash. blksnapd leaves the
# device's requests unanswered from the stop on (once those running are
# answered), the keeper keeps the connection, and the next blksnapd takes
# it over and has the kernel send them again (FUSE_NOTIFY_RESEND). Before
# 6.9 a FUSE device cannot outlive its server: skipped.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
requires mkfs.ext4; requires e2fsck; requires md5sum; requires python3

options=(--nbd-dead-timeout 600 --diff-storage-minimum 262144)
start_blksnapd "${options[@]}"
state=$scratch/state
read -r dev dev_id < <(attach "$scratch/disk.img" $((128 << 20)))
case $dev in
    /dev/nbd*) kind=nbd ;;
    /dev/loop*)
        kind=loop
        read -r major minor _ < <(uname -r | tr '.-' '  ')
        [ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 9 ]; } ||
            skip "a FUSE device cannot outlive its server before Linux 6.9 (FUSE_NOTIFY_RESEND); this is $(uname -r)" ;;
    *) echo "unexpected routed device $dev"; exit 1 ;;
esac
read -r idle _ < <(attach "$scratch/idle.img" $((16 << 20)))
read -r store _ < <(attach "$scratch/store.img" $((64 << 20)))
echo "# routed device $dev ($dev_id), an idle one $idle, storage $store"
mkfs.ext4 -q -F "$dev"
mount_at "$dev" "$scratch/mnt"

# One snapshot, taken and destroyed, so the device is tracked.
id=$(blksnap create "$dev")
blksnap append-device "$id" "$store" >/dev/null
blksnap take "$id"
blksnap destroy "$id"
collect() { blksnap collect | awk -v d="$dev_id" '$1 == d { print $2, $3 }'; }
before=$(collect)
echo "# tracker before the stop: generation and snapshot number $before"
check "the device is tracked" test -n "$before"

start_writer "$scratch/mnt"
check "the writer has 5 files acknowledged" wait_for_acked 5 120
stop_blksnapd "$blksnapd_pid"
at_stop=$(acked_count)
echo "# blksnapd stopped with $at_stop files acknowledged"
grep -E "in use|left|fails from now on" "$scratch/blksnapd.log" | sed 's/^/# log: /'
check "the stop says $dev is in use and left routed" \
    grep -q "$dev is in use (mounted on .*): left routed for the next blksnapd" "$scratch/blksnapd.log"
check "the stop saved its CBT" test "$(ls "$scratch/cbt"/*.cbt 2>/dev/null | wc -l)" -ge 1
check "the saved list keeps $dev" grep -qF "\"$dev\"" "$state/devices.json"
check "the saved list does not keep $idle, which nothing used" bash -c "! grep -qF '\"$idle\"' '$state/devices.json'"
check "$dev is still a configured device ($(cat "/sys/block/${dev#/dev/}/size") sectors)" \
    test "$(cat "/sys/block/${dev#/dev/}/size")" -gt 0
check "$idle was taken away" test "$(cat "/sys/block/${idle#/dev/}/size" 2>/dev/null || echo 0)" -eq 0
if [ $kind = loop ]; then
    keeper_pid=$(sed -n 's/.*started the keeper of the FUSE connections (pid \([0-9]*\).*/\1/p' "$scratch/blksnapd.log" | tail -1)
    check "the keeper outlived the stop, holding the connection" kill -0 "$keeper_pid"
fi
check "no write failed during the stop" test ! -s "$writer_failed"

start_blksnapd "${options[@]}"
grep -E "again|restored" "$scratch/blksnapd.log" | tail -3 | sed 's/^/# log: /'
check "the new blksnapd serves $dev again" grep -q "$dev .* routes .* again" "$scratch/blksnapd.log"
check "the writer carries on on the same mount" wait_for_acked $((at_stop + 5)) 120
stop_writer
check "no write failed across the restart" test ! -s "$writer_failed"
echo "# longest pause between acknowledged files: $(longest_pause) s"
"$blksnapctl" status --json >"$scratch/status.json"
check "status says its CBT was restored exactly" \
    python3 -c 'import json, sys; sys.exit(not any(d["devId"] == sys.argv[2] and d.get("cbt", "").startswith("restored") and "crash" not in d["cbt"]
                for d in json.load(open(sys.argv[1]))["devices"]))' "$scratch/status.json" "$dev_id"
check "the tracker has the same generation and snapshot number ($(collect))" test "$(collect)" = "$before"
check "every acknowledged file is whole ($(acked_count) files)" bash -c "cd '$scratch/mnt' && md5sum -c --quiet '$writer_acked'"
umount "$scratch/mnt"
check "fsck finds the filesystem clean" e2fsck -n -f "$dev"

"$blksnapctl" detach "$dev"
check "the storage device, idle at the stop, was removed with it" \
    python3 -c 'import json, sys; d = json.load(open(sys.argv[1]))["devices"]; sys.exit(not d or any(x.get("node") == sys.argv[2] for x in d))' \
        "$scratch/status.json" "$store"
stop_blksnapd "$blksnapd_pid"
check "with nothing in use, a clean stop leaves no saved list" test ! -e "$state/devices.json"
finish
