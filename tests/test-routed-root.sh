#!/usr/bin/env bash
# The root filesystem on a routed device from boot: run in a stock-kernel
# lane booted with --routed-root (tools/stock-kernel-lane), where the
# shipped initramfs-tools script routed the root disk through blksnapd and
# kernel NBD before it was mounted. Checks that "/" is that device, that
# blksnapd is a root storage daemon (argv[0] '@', a stop refused while it
# serves "/"), joins the real root as blksnapd.service makes it, and that
# the upstream CLI, unchanged, snapshots "/" through the CUSE /dev/blksnap:
# the image holds what "/" held at the take, and not what was written
# after (so those writes passed through the engine). Elsewhere it says
# "skipped: why".
source "$(dirname "$0")/functions.sh"
requires_root; requires findmnt; requires md5sum; requires mkfs.ext4; requires fallocate
root_dev=$(findmnt -n -o SOURCE /)
case $root_dev in
    /dev/nbd*) ;;
    *)
        # What runs anywhere: a private blksnapd as a root storage daemon
        # that serves no "/": argv[0] '@', joining on request, a SIGTERM
        # that stops it (nothing of "/" depends on it).
        requires_loop; requires_fuse
        start_blksnapd --devices fuse --root-storage-daemon
        check "--root-storage-daemon: argv[0] starts with @" test "$(head -c 1 "/proc/$blksnapd_pid/cmdline")" = @
        check "and its comm name is left as it is" test "$(cat "/proc/$blksnapd_pid/comm")" = blksnapd
        "$blksnapd" --state-dir "$scratch/state" --join-root-daemon && joined=0 || joined=$?
        check "--join-root-daemon: it joined, the unit is to be skipped (exit 1, got $joined)" test "$joined" -eq 1
        check "its log says so" grep -q "joined the real root (asked by process" "$scratch/blksnapd.log"
        check "it still answers" bash -c "'$blksnapctl' status >/dev/null"
        kill -TERM "$blksnapd_pid"
        check "a SIGTERM stops it, as / is not on its devices" wait_for_exit "$blksnapd_pid" 60
        "$blksnapd" --state-dir "$scratch/state" --join-root-daemon && joined=0 || joined=$?
        check "--join-root-daemon with no daemon running: the unit starts one (exit 0, got $joined)" test "$joined" -eq 0
        start_blksnapd --devices fuse
        "$blksnapd" --state-dir "$scratch/state" --join-root-daemon && joined=0 || joined=$?
        check "--join-root-daemon beside an ordinary blksnapd: exit 0, its own start then refuses (got $joined)" test "$joined" -eq 0
        [ "$failed" -eq 0 ] || finish
        skip "the root filesystem ($root_dev) is not on a routed device; the stock-kernel lane boots on one with --routed-root" ;;
esac
if [ -n "${BLKSNAP_UPSTREAM_V1_BUILD:-}" ]; then
    upstream=$BLKSNAP_UPSTREAM_V1_BUILD
else
    status=0
    upstream=$("$top/tools/build-upstream-v1") || status=$?
    [ "$status" -eq 77 ] && skip "${upstream#skipped: }"
    [ "$status" -eq 0 ] || { echo "$0: tools/build-upstream-v1 failed (exit $status)" >&2; exit 1; }
fi
cli=$upstream/build/tools/blksnap/blksnap
state=/run/blksnap
log=$state/initramfs.log
export BLKSNAP_CONTROL_SOCKET=$state/control.sock
daemon=$(head -n 1 "$state/blksnapd.lock")
echo "# / is $root_dev; blksnapd pid $daemon: $(tr '\0' ' ' <"/proc/$daemon/cmdline")"

check "blksnapd serving / is a root storage daemon (argv[0] starts with @)" test "$(head -c 1 "/proc/$daemon/cmdline")" = @
check "the kernel knows $root_dev as blksnapd's route of /dev/vda" grep -qx "blksnap-swift routes /dev/vda" "/sys/block/${root_dev#/dev/}/backend"
mkdir -p "$scratch/vda"
check "the disk under it is held: mounting /dev/vda itself is refused" bash -c "! mount -o ro /dev/vda '$scratch/vda' 2>/dev/null"

"$blksnapd" --state-dir "$state" --join-root-daemon && joined=0 || joined=$?
check "--join-root-daemon: it joined, and no second blksnapd is to start (exit 1, got $joined)" test "$joined" -eq 1
check "its log says it joined the real root" grep -q "joined the real root" "$log"
check "it answers in the real root" bash -c "'$blksnapctl' status >/dev/null"
check "/dev/blksnap is its CUSE device" test -c /dev/blksnap
kill -TERM "$daemon"
check "a SIGTERM is refused while it serves /" wait_for_grep "it keeps serving" "$log" 60
check "and it still runs" kill -0 "$daemon"

# The difference storage: a file on another routed device.
read -r store _ < <(attach "$scratch/store.img" $((160 << 20)))
mkfs.ext4 -q -F "$store"
mount_at "$store" "$scratch/store"
fallocate -l 128M "$scratch/store/diff0"

dir=/root/routed-root-test
rm -rf "$dir"; mkdir -p "$dir"
for i in $(seq 16); do head -c 65536 /dev/urandom >"$dir/f$i"; done
echo "before the take" >"$dir/changed"
sync
(cd "$dir" && md5sum f* changed) >"$scratch/at-take.md5"
id=$("$cli" snapshot_create --device "$root_dev")
check "snapshot_create of / prints an id ($id)" grep -Eq '^[0-9a-f-]{36}$' <<<"$id"
"$cli" snapshot_appendstorage --id "$id" --file "$scratch/store/diff0" >/dev/null
t0=$(date +%s%N)
"$cli" snapshot_take --id "$id"
echo "# snapshot_take of / (it freezes /) took $(( ($(date +%s%N) - t0) / 1000000 )) ms"
echo "after the take" >"$dir/changed"
head -c 65536 /dev/urandom >"$dir/after-take"
sync
image_id=$(sed -n 's/^image_dev_id=//p' <<<"$("$cli" snapshot_collect --id "$id")" | head -n 1)
image=/dev/blksnap-image${image_id#*:}
check "snapshot_collect names an image of / ($image)" test -b "$image"
mount_at "$image" "$scratch/image" ro,noload
check "the image of / holds every file as of the take" bash -c "cd '$scratch/image$dir' && md5sum -c --quiet '$scratch/at-take.md5'"
check "a file rewritten after the take reads as before in the image" grep -qx "before the take" "$scratch/image$dir/changed"
check "and as after in /" grep -qx "after the take" "$dir/changed"
check "a file written after the take is not in the image" test ! -e "$scratch/image$dir/after-take"
umount "$scratch/image"
check "the image is fsck-clean" e2fsck -f -n "$image"
"$cli" snapshot_destroy --id "$id"
check "snapshot_destroy removes the image" test ! -e "$image"
rm -rf "$dir"
finish
