# Shared by the shell scenarios, in the style of nbdkit's tests/functions.sh:
# `requires` skips (exit 77, "skipped: why") when this machine lacks a part,
# `cleanup_fn` queues teardown that runs however the script ends.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BLKSNAP_BUILD:-$top/.build/debug}
blksnapd=$build/blksnapd
blksnapctl=$build/blksnapctl
ioctl_client=$top/tests/blksnap_ioctl.py

_cleanups=()
cleanup_fn() { _cleanups+=("$*"); }
_run_cleanups() {
    local status=$? i
    for ((i = ${#_cleanups[@]} - 1; i >= 0; i--)); do eval "${_cleanups[i]}" || true; done
    exit "$status"
}
trap _run_cleanups EXIT

skip() { echo "skipped: $(basename "$0"): $*"; exit 77; }
requires() { command -v "$1" >/dev/null 2>&1 || skip "needs $1"; }
requires_root() { [ "$(id -u)" = 0 ] || skip "needs root (loop devices, mounts)"; }
requires_loop() { [ -e /dev/loop-control ] || skip "needs loop devices (/dev/loop-control)"; }
requires_fuse() { [ -e /dev/fuse ] || skip "needs FUSE (/dev/fuse)"; }

passed=0
failed=0
check() {  # check DESCRIPTION COMMAND...
    local what=$1; shift
    if "$@"; then echo "ok - $what"; passed=$((passed + 1)); else echo "not ok - $what"; failed=$((failed + 1)); fi
}
check_quiet() {  # check_quiet DESCRIPTION COMMAND...: the command's output shows only if it fails
    local what=$1; shift
    if "$@" >"$scratch/check.out" 2>&1; then
        echo "ok - $what"; passed=$((passed + 1))
    else
        echo "not ok - $what"; sed 's/^/#   /' "$scratch/check.out"; failed=$((failed + 1))
    fi
}
finish() { echo "$(basename "$0" .sh): $passed passed, $failed failed"; [ "$failed" -eq 0 ]; }

scratch=$(mktemp -d /tmp/blksnap-test.XXXXXX)
cleanup_fn "rm -rf '$scratch'"

# Starts a private blksnapd (its own state directory, so it never meets
# another daemon) and points blksnapctl and the shim at it; its pid is
# $blksnapd_pid. Called again after a kill, it starts one on the same state.
start_blksnapd() {
    [ -x "$blksnapd" ] && [ -x "$blksnapctl" ] || { echo "$0: build first (swift build); missing $blksnapd" >&2; exit 1; }
    # Built once: a restart after a kill should not wait for a compiler.
    local preload=$top/.build/preload/libblksnap-preload.so
    if [ ! -e "$preload" ] || [ -n "$(find "$top/preload" "$top/Sources/CBlksnapABI" "$top/include" -newer "$preload" -type f 2>/dev/null | head -1)" ]; then
        "$top/tools/build-preload" >/dev/null
    fi
    local state=$scratch/state
    export BLKSNAP_CONTROL_SOCKET=$state/control.sock
    # A socket left by a killed blksnapd must not pass for the new one's.
    rm -f "$BLKSNAP_CONTROL_SOCKET"
    # After the stop: a device filesystem left by a blksnapd that died.
    cleanup_fn "umount -l '$state/devices' 2>/dev/null"
    # Last of all: a keeper still holding a connection (a scenario that
    # ended between a kill -9 and the next start) would keep its devices
    # and /dev/blksnap waiting for ever.
    [ -n "${_keepers_queued:-}" ] || cleanup_fn "_stop_keepers"
    _keepers_queued=1
    # Declarations and saved CBT maps in the scratch directory too, never
    # the machine's /etc/blksnap and /var/lib/blksnap.
    "$blksnapd" --state-dir "$state" --config-dir "$scratch/etc" --cbt-dir "$scratch/cbt" "$@" 2>>"$scratch/blksnapd.log" &
    blksnapd_pid=$!
    # Queued once, for whichever blksnapd runs last: a restarted one must
    # still stop after what was mounted since the first start is
    # unmounted, since a clean stop leaves a device in use to the next
    # blksnapd and an unmount after it would wait for one.
    _blksnapd_pids+=("$blksnapd_pid")
    [ -n "${_stop_queued:-}" ] || cleanup_fn 'for _p in "${_blksnapd_pids[@]}"; do stop_blksnapd "$_p"; done'
    _stop_queued=1
    for _ in $(seq 100); do [ -S "$BLKSNAP_CONTROL_SOCKET" ] && return 0; sleep 0.1; done
    echo "$0: blksnapd did not start:" >&2; cat "$scratch/blksnapd.log" >&2; exit 1
}

_stop_keepers() {
    local pid
    for pid in $(sed -n 's/.*started the keeper of the FUSE connections (pid \([0-9]*\).*/\1/p' "$scratch/blksnapd.log" 2>/dev/null); do
        # Only if the pid is still that keeper, not a process that took its number.
        { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -q -- "--keep-fuse-connections" && kill -KILL "$pid" 2>/dev/null
    done
    return 0
}

# upstream_tools: sets $upstream to a finished build of the upstream v1
# tools (tools/build-upstream-v1; the lane's guest, which builds nothing,
# is handed one in BLKSNAP_UPSTREAM_V1_BUILD), or skips where their source
# is absent.
upstream_tools() {
    if [ -n "${BLKSNAP_UPSTREAM_V1_BUILD:-}" ]; then
        upstream=$BLKSNAP_UPSTREAM_V1_BUILD
        [ -f "$upstream/done" ] || { echo "$0: no finished build in $upstream" >&2; exit 1; }
        return 0
    fi
    local status=0
    upstream=$("$top/tools/build-upstream-v1") || status=$?
    [ "$status" -eq 77 ] && skip "${upstream#skipped: }"
    [ "$status" -eq 0 ] || { echo "$0: tools/build-upstream-v1 failed (exit $status)" >&2; exit 1; }
}

# kill_amid_writes COUNT: in the background, the scenario's `write_block N`
# at random blocks N below 256, each N recorded in $scratch/acked once its
# write returned; blksnapd is killed (-9) once COUNT are acknowledged (or
# after 90 s), and $acked_at_kill says how many were. stop_block_writer
# ends the writer (after the next start: its write waits for blksnapd).
kill_amid_writes() {
    : >"$scratch/acked"
    (
        while [ ! -e "$scratch/block-writer.stop" ]; do
            n=$((RANDOM % 256))
            if write_block "$n" 2>/dev/null; then echo "$n" >>"$scratch/acked"; fi
        done
    ) &
    block_writer_pid=$!
    cleanup_fn "stop_block_writer"
    local deadline=$((SECONDS + 90))
    while [ "$(wc -l <"$scratch/acked")" -lt "$1" ] && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL "$blksnapd_pid"
    wait "$blksnapd_pid" 2>/dev/null || true
    acked_at_kill=$(wc -l <"$scratch/acked")
    echo "# blksnapd killed with $acked_at_kill writes acknowledged"
}
stop_block_writer() {
    touch "$scratch/block-writer.stop"
    wait "$block_writer_pid" 2>/dev/null || true
}

stop_blksnapd() {
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    echo "$0: blksnapd did not stop; its log:" >&2; cat "$scratch/blksnapd.log" >&2; kill -KILL "$1"
}

# attach FILE SIZE: routes a new image file; prints "NODE MJ:MN".
attach() {
    local node
    node=$("$blksnapctl" attach "$1" --size "$2")
    cleanup_fn "'$blksnapctl' detach ${node%% *} 2>/dev/null"
    echo "$node"
}

# blksnap CMD ARGS...: one ioctl client call through the preload shim.
blksnap() { "$blksnapctl" exec --preload "$top/.build/preload/libblksnap-preload.so" -- python3 "$ioctl_client" "$@"; }

mount_at() {  # mount_at DEV DIR [OPTIONS]
    mkdir -p "$2"
    mount ${3:+-o "$3"} "$1" "$2"
    cleanup_fn "umount -l '$2' 2>/dev/null"
}

# start_writer DIR: in the background, a new 256 KiB file at a time in DIR,
# written with fsync. A file is recorded in $writer_acked (as md5sum -c
# reads it, with the checksum of what was written) only once its fsync
# returned; a failed one is named in $writer_failed. The moment of each
# acknowledgement goes to $writer_times, for longest_pause.
writer_acked=$scratch/writer.acked.md5
writer_failed=$scratch/writer.failed
writer_times=$scratch/writer.times
start_writer() {
    : >"$writer_acked"
    : >"$writer_times"
    (
        i=0
        while [ ! -e "$scratch/writer.stop" ]; do
            head -c 262144 /dev/urandom >"$scratch/writer.buffer"
            sum=$(md5sum <"$scratch/writer.buffer")
            if dd if="$scratch/writer.buffer" of="$1/f$i" bs=64k conv=fsync status=none 2>>"$scratch/writer.err"; then
                echo "${sum%% *}  f$i" >>"$writer_acked"
                echo "$EPOCHREALTIME" >>"$writer_times"
            else
                echo "f$i" >>"$writer_failed"
                sleep 0.2
            fi
            i=$((i + 1))
        done
    ) &
    writer_pid=$!
    cleanup_fn "stop_writer"
}
stop_writer() {
    touch "$scratch/writer.stop"
    wait "$writer_pid" 2>/dev/null || true
}
acked_count() { wc -l <"$writer_acked"; }
# The longest time between two acknowledgements, in seconds.
longest_pause() { awk 'NR > 1 && $1 - last > most { most = $1 - last } { last = $1 } END { printf "%.3f\n", most }' "$writer_times"; }
wait_for_acked() {  # wait_for_acked N SECONDS: until N files are acknowledged
    local deadline=$((SECONDS + $2))
    while [ "$(acked_count)" -lt "$1" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    [ "$(acked_count)" -ge "$1" ]
}
wait_for_file() {  # wait_for_file FILE SECONDS: until it has something in it
    local deadline=$((SECONDS + $2))
    while [ ! -s "$1" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    [ -s "$1" ]
}
wait_for_gone() {  # wait_for_gone PATH SECONDS: until PATH is no more
    local deadline=$((SECONDS + $2))
    while [ -e "$1" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    [ ! -e "$1" ]
}
# wait_for_exit PID SECONDS: until the process is gone (or a zombie:
# a keeper whose parent died is reaped by whoever adopted it).
wait_for_exit() {
    local deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        [ -e "/proc/$1" ] || return 0
        [ "$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" = Z ] && return 0
        sleep 0.2
    done
    return 1
}
wait_for_grep() {  # wait_for_grep PATTERN FILE SECONDS
    local deadline=$((SECONDS + $3))
    until grep -q "$1" "$2" || [ $SECONDS -ge $deadline ]; do sleep 0.2; done
    grep -q "$1" "$2"
}
