#!/usr/bin/env bash
# blksnapd under a service manager with a file descriptor store (systemd's
# FDSTORE=1 / LISTEN_FDS protocol, Restart=always), killed with -9 under a
# filesystem being written with fsync: the manager holds the FUSE
# connection instead of blksnapd's keeper, starts blksnapd again with it,
# and the writer carries on without an error on the same mount.
#
# Where systemd is PID 1, systemd-run is the manager; elsewhere (this
# machine's PID 1 is not systemd) tests/fake_fdstore.py plays its part.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
requires mkfs.ext4; requires e2fsck; requires md5sum; requires python3

IFS=. read -r major minor _ < <(uname -r)
[ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 9 ]; } || skip "needs Linux 6.9 (FUSE_NOTIFY_RESEND)"

state=$scratch/state
pidfile=$scratch/blksnapd.pid
"$top/tools/build-preload" >/dev/null
export BLKSNAP_CONTROL_SOCKET=$state/control.sock
if [ "$(cat /proc/1/comm)" = systemd ] && command -v systemd-run >/dev/null; then
    manager=systemd
    unit=blksnap-test-$$
    systemd-run --unit "$unit" -p Restart=always -p RestartSec=1 -p FileDescriptorStoreMax=8 \
        -p Type=simple "$blksnapd" --state-dir "$state" --devices fuse
    cleanup_fn "systemctl stop '$unit' 2>/dev/null"
    current_pid() { systemctl show -p MainPID --value "$unit"; }
    log() { journalctl -u "$unit" --no-pager -o cat; }
    stop() { systemctl stop "$unit"; }
else
    manager=fake
    python3 "$top/tests/fake_fdstore.py" "$state" "$pidfile" -- \
        "$blksnapd" --state-dir "$state" --devices fuse 2>>"$scratch/blksnapd.log" &
    manager_pid=$!
    cleanup_fn "kill -TERM \$(cat '$pidfile') 2>/dev/null; wait $manager_pid 2>/dev/null"
    current_pid() { cat "$pidfile"; }
    log() { cat "$scratch/blksnapd.log"; }
    stop() { kill -TERM "$(current_pid)"; wait "$manager_pid"; }
fi
echo "# service manager: $manager"
for _ in $(seq 100); do [ -S "$BLKSNAP_CONTROL_SOCKET" ] && break; sleep 0.1; done

read -r dev _ < <(attach "$scratch/disk.img" $((128 << 20)))
mkfs.ext4 -q -F "$dev"
mount_at "$dev" "$scratch/mnt"
log_has() { log | grep -q "$1"; }
check "the service manager's store keeps the FUSE connection" \
    log_has "systemd's file descriptor store keeps the device filesystem's FUSE connection"
check "no keeper process is started" eval '! log_has "started the keeper"'

start_writer "$scratch/mnt"
check "the writer has 10 files acknowledged" wait_for_acked 10 120
sleep "$(printf '%d.%03d' $((RANDOM % 3)) $((RANDOM % 1000)))"
killed=$(current_pid)
rm -f "$BLKSNAP_CONTROL_SOCKET"
kill -KILL "$killed"
at_kill=$(acked_count)
echo "# blksnapd (pid $killed) killed with $at_kill files acknowledged"
for _ in $(seq 100); do [ -S "$BLKSNAP_CONTROL_SOCKET" ] && break; sleep 0.1; done
check "the manager started blksnapd again" test "$(current_pid)" != "$killed"
check "the new blksnapd took the FUSE connection over" log_has "took over the device filesystem"
check "the new blksnapd serves $dev again" log_has "$dev .* routes .* again"
carried=yes
wait_for_acked $((at_kill + 10)) 120 || carried=no
check "the writer carries on: 10 more files acknowledged" test $carried = yes
# Requests nobody answers wait for ever: the manager's end (it closes its
# store) and blksnapd's end the connection, so they fail.
[ $carried = yes ] || { kill -KILL "${manager_pid:-0}" "$(current_pid)"; }
stop_writer
echo "# longest pause between two acknowledged files: $(longest_pause) s"
check "no write failed" test ! -s "$writer_failed"
check "$dev stayed mounted throughout" mountpoint -q "$scratch/mnt"
check "every acknowledged file is whole ($(acked_count) files)" bash -c "cd '$scratch/mnt' && md5sum -c --quiet '$writer_acked'"
umount "$scratch/mnt"
check "fsck finds the filesystem clean" e2fsck -n -f "$dev"
"$blksnapctl" detach "$dev"
stop
check "a clean stop leaves no saved list" test ! -e "$state/devices.json"
[ $manager = fake ] && check "the clean stop took the connection out of the store" log_has "removed blksnap-devices"
finish
