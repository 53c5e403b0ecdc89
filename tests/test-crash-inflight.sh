#!/usr/bin/env bash
# FUSE+loop: blksnapd killed (kill -9) while it is in the middle of
# requests it has read from the kernel and not answered, then started
# again: the kernel sends those requests again (FUSE_NOTIFY_RESEND, Linux
# 6.9) and the writer on the routed device carries on without an error.
#
# The routed disk is exported by nbdkit with every write delayed by
# 100 ms, so blksnapd spends nearly all its time inside a write and a
# kill at any moment finds requests in flight; without the resend they
# would wait for ever (test-crash-restart.sh kills at a random moment,
# which an idle blksnapd mostly is).
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
requires mkfs.ext4; requires e2fsck; requires md5sum; requires nbdkit
IFS=. read -r major minor _ < <(uname -r)
[ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 9 ]; } || skip "needs Linux 6.9 (FUSE_NOTIFY_RESEND)"

truncate -s $((128 << 20)) "$scratch/exported.img"
nbdkit --unix "$scratch/nbdkit.sock" --pidfile "$scratch/nbdkit.pid" --filter=delay \
    file "$scratch/exported.img" delay-write=100ms
cleanup_fn "kill \$(cat '$scratch/nbdkit.pid') 2>/dev/null"
for _ in $(seq 50); do [ -S "$scratch/nbdkit.sock" ] && break; sleep 0.1; done

start_blksnapd --devices fuse
read -r dev _ < <(attach "nbd+unix:///?socket=$scratch/nbdkit.sock" $((128 << 20)))
mkfs.ext4 -q -F "$dev"
mount_at "$dev" "$scratch/mnt"
keeper_pid=$(sed -n 's/.*started the keeper of the FUSE connections (pid \([0-9]*\).*/\1/p' "$scratch/blksnapd.log" | tail -1)
check "a keeper holds the FUSE connection" test -n "$keeper_pid"

start_writer "$scratch/mnt"
# Before the writer's stop: with no server, the keeper's end fails what waits.
cleanup_fn '[ -n "$keeper_pid" ] && kill -KILL "$keeper_pid" 2>/dev/null'
check "the writer has 5 files acknowledged" wait_for_acked 5 120
kill -KILL "$blksnapd_pid"
wait "$blksnapd_pid" 2>/dev/null || true
at_kill=$(acked_count)
echo "# blksnapd killed inside a delayed write with $at_kill files acknowledged"
start_blksnapd --devices fuse
ready=$EPOCHREALTIME
check "the new blksnapd took the FUSE connection over" grep -q "took over the device filesystem" "$scratch/blksnapd.log"
carried=yes
wait_for_acked $((at_kill + 5)) 60 || carried=no
check "the writer carries on: 5 more files acknowledged" test $carried = yes
# Requests nobody answers wait for ever: end the connection, so they fail.
[ $carried = yes ] || kill -KILL "$blksnapd_pid" "$keeper_pid"
stop_writer
echo "# longest pause between two acknowledged files: $(longest_pause) s;" \
    "the first file after the restart was acknowledged $(awk -v r="$ready" '$1 > r { printf "%.3f", $1 - r; exit }' "$writer_times") s after the new blksnapd was up"
check "no write failed" test ! -s "$writer_failed"
check "every acknowledged file is whole ($(acked_count) files)" bash -c "cd '$scratch/mnt' && md5sum -c --quiet '$writer_acked'"
umount "$scratch/mnt"
check "fsck finds the filesystem clean" e2fsck -n -f "$dev"
"$blksnapctl" detach "$dev"
stop_blksnapd "$blksnapd_pid"
check "the keeper ends after the clean stop" wait_for_exit "$keeper_pid" 10
finish
