#!/usr/bin/env bash
# The CUSE /dev/blksnap across a kill -9 of blksnapd (issue 16): the
# keeper holds the connection's /dev/cuse, so the node stays, and a tool
# that opened /dev/blksnap before the kill is answered on the same
# descriptor by the next blksnapd, which has the declared device routed
# again and its CBT restored (the same generation and snapshot number).
#
# A request in flight at the kill (a WAIT_EVENT sleeping in blksnapd) is
# sent again where the kernel has FUSE_NOTIFY_RESEND (Linux 6.9); the
# lane's 6.1 has not, so there the new blksnapd lets the connection go:
# the waiting caller gets an error at once instead of waiting for ever,
# and a new /dev/blksnap serves the next open. Either way the caller is
# answered long before its timeout.
#
# Needs CUSE: only the stock-kernel lane has it.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse; requires python3
[ -e /dev/cuse ] || skip "needs CUSE (/dev/cuse; the stock-kernel lane has it)"
wait_for_gone /dev/blksnap 5 || skip "/dev/blksnap exists already (the module, or another blksnapd)"

IFS=. read -r kmajor kminor _ < <(uname -r)
resend=0
{ [ "$kmajor" -gt 6 ] || { [ "$kmajor" -eq 6 ] && [ "$kminor" -ge 9 ]; }; } && resend=1
echo "# kernel $(uname -r): FUSE_NOTIFY_RESEND $([ $resend = 1 ] && echo yes || echo no)"

mkdir -p "$scratch/etc"
b=cb$$
truncate -s $((64 << 20)) "$scratch/b.img"
echo "$b $scratch/b.img" >"$scratch/etc/devices.conf"
link_b=/dev/disk/by-blksnap/$b
cleanup_fn "rm -f $link_b"
truncate -s $((64 << 20)) "$scratch/store.img"
store=$(losetup -f --show "$scratch/store.img")
cleanup_fn "losetup -d $store"

# start: a blksnapd, once it serves /dev/blksnap (it logs "engine ready"
# after the CUSE device is up, made anew or taken over).
start() {
    local ready
    ready=$(grep -c "engine ready" "$scratch/blksnapd.log" 2>/dev/null || true)
    start_blksnapd --mode cuse --diff-storage-minimum 32768 --nbd-dead-timeout 600
    for _ in $(seq 600); do [ "$(grep -c "engine ready" "$scratch/blksnapd.log")" -gt "${ready:-0}" ] && break; sleep 0.1; done
    [ -c /dev/blksnap ] || { echo "$0: no /dev/blksnap after 60 s" >&2; tail -n 30 "$scratch/blksnapd.log" >&2; exit 1; }
}
# Straight at the real /dev/blksnap, no shim.
ioctl() { env -u LD_PRELOAD python3 "$ioctl_client" "$@"; }
dev_b() { stat -L -c '%t %T' "$link_b" | (read -r mj mn; echo "$((16#$mj)):$((16#$mn))"); }
collect_b() { ioctl collect | awk -v d="$(dev_b)" '$1 == d { print $2, $3 }'; }

# client NAME: a process that opens /dev/blksnap once and, for each line
# of the fifo $scratch/NAME.in, runs that command on the same descriptor,
# printing one answer line per command to $scratch/NAME.out:
# "version", "collect" (the trackers, "MJ:MN GENERATION SNAP" each), or
# "wait ID MS" (SNAPSHOT_WAIT_EVENT); an error prints "error ERRNO NAME".
client() {
    mkfifo "$scratch/$1.in"
    env -u LD_PRELOAD python3 - "$top/tests" "$scratch/$1.in" >"$scratch/$1.out" 2>&1 <<'PY' &
import ctypes, errno, os, sys, uuid
sys.path.insert(0, sys.argv[1])
import blksnap_ioctl as b
class Version(ctypes.Structure): _fields_ = [("major", ctypes.c_uint16), ("minor", ctypes.c_uint16), ("revision", ctypes.c_uint16), ("build", ctypes.c_uint16)]
fd = os.open("/dev/blksnap", os.O_RDWR)
print("open", flush=True)
for line in open(sys.argv[2]):
    words = line.split()
    try:
        if words[0] == "version":
            v = Version(); b.call(fd, 0, v); print(f"version {v.major}.{v.minor}.{v.revision}.{v.build}", flush=True)
        elif words[0] == "collect":
            p = b.TrackerCollect(); b.call(fd, 2, p)
            infos = (b.CbtInfo * max(p.count, 1))(); p.cbt_info_array = infos; b.call(fd, 2, p)
            print("collect " + " ".join(f"{i.dev_id.mj}:{i.dev_id.mn} {uuid.UUID(bytes=bytes(i.generation_id))} {i.snap_number}" for i in infos[:p.count]), flush=True)
        elif words[0] == "wait":
            e = b.Event(id=b.uuid_bytes(words[1]), timeout_ms=int(words[2])); b.call(fd, 11, e); print(f"event {e.code}", flush=True)
    except OSError as e:
        print(f"error {e.errno} {errno.errorcode.get(e.errno, '?')}", flush=True)
PY
    eval "${1}_pid=$!"
    exec {fifo}>"$scratch/$1.in"
    eval "${1}_fd=$fifo"
    cleanup_fn "kill \$${1}_pid 2>/dev/null"
    wait_for_grep "^open" "$scratch/$1.out" 30
}
ask() {  # ask NAME COMMAND...: sends one command to a client
    local fd_var=${1}_fd
    echo "${*:2}" >&"${!fd_var}"
}
answers() { grep -c -v '^open' "$scratch/$1.out" || true; }
wait_for_answers() {  # wait_for_answers NAME COUNT SECONDS
    local deadline=$((SECONDS + $3))
    while [ "$(answers "$1")" -lt "$2" ] && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    [ "$(answers "$1")" -ge "$2" ]
}
last_answer() { grep -v '^open' "$scratch/$1.out" | tail -n 1; }

start
check "$link_b is routed at start" test -b "$link_b"
check "the keeper keeps the CUSE connection" wait_for_grep "keeps the connection of /dev/blksnap" "$scratch/blksnapd.log" 10
# One snapshot cycle, so that B has a tracker with a generation and snap 1.
id=$(ioctl create "$(readlink -f "$link_b")")
ioctl append-device "$id" "$store" >/dev/null
ioctl take "$id"
ioctl destroy "$id"
dd if=/dev/urandom of="$link_b" bs=4096 count=1 seek=100 oflag=direct conv=fsync status=none
read -r gen snap < <(collect_b)
echo "# before the kill: generation $gen, snap_number $snap"

# ---- a descriptor opened before the kill, idle at the kill
client held
ask held version
check "the held descriptor is answered before the kill" wait_for_answers held 1 30
rdev_before=$(stat -c '%t:%T' /dev/blksnap)
kill -KILL "$blksnapd_pid"
wait "$blksnapd_pid" 2>/dev/null || true
check "/dev/blksnap stays after the kill (the keeper holds its connection)" test -c /dev/blksnap
start
check "the new blksnapd took over /dev/blksnap" grep -q "took over /dev/blksnap from a blksnapd that died" "$scratch/blksnapd.log"
check "/dev/blksnap is the same device ($rdev_before)" test "$(stat -c '%t:%T' /dev/blksnap)" = "$rdev_before"
ask held version
check "the same descriptor gets VERSION after the restart" wait_for_answers held 2 60
check "... and it is 1.0.0.0 (got '$(last_answer held)')" test "$(last_answer held)" = "version 1.0.0.0"
ask held collect
check "the same descriptor gets TRACKER_COLLECT after the restart" wait_for_answers held 3 60
echo "# TRACKER_COLLECT on the held descriptor: $(last_answer held)"
check "... with the declared device's tracker: the same generation and snap_number ($gen $snap)" \
    grep -q " $(dev_b) $gen $snap\b" <<<"$(last_answer held) "
check "$link_b is routed again" test -b "$link_b"
"$blksnapctl" status >"$scratch/status.txt"
check "status: $b routed, its CBT restored after a crash" grep -qE "^  $b +routed .* restored after a crash" "$scratch/status.txt"

# ---- a request in flight at the kill
id=$(ioctl create "$(readlink -f "$link_b")")
# CREATE queues a low-free-space event; the WAIT_EVENT below must sleep.
while ioctl waitevent "$id" 200 >/dev/null 2>&1; do :; done
client waiter
ask waiter wait "$id" 120000
inflight() { od -An -t d8 "$scratch/state/cuse-inflight" 2>/dev/null | tr -d ' '; }
deadline=$((SECONDS + 30))
until [ "$(inflight)" = 1 ] || [ $SECONDS -ge $deadline ]; do sleep 0.1; done
check "blksnapd counts the sleeping WAIT_EVENT in flight" test "$(inflight)" = 1
kill -KILL "$blksnapd_pid"
wait "$blksnapd_pid" 2>/dev/null || true
killed_at=$SECONDS
start
check "the WAIT_EVENT in flight at the kill is answered within 60 s, not left for its 120 s" wait_for_answers waiter 1 60
echo "# the WAIT_EVENT in flight: '$(last_answer waiter)' after $((SECONDS - killed_at)) s"
if [ $resend = 1 ]; then
    check "the kernel sent it again; the new blksnapd, with no such snapshot, answered it" \
        grep -q "took over /dev/blksnap .* sends again" "$scratch/blksnapd.log"
else
    check "without FUSE_NOTIFY_RESEND the new blksnapd let the connection go, saying why" \
        grep -q "cannot send requests again .* was answering 1 request(s) of /dev/blksnap" "$scratch/blksnapd.log"
    check "... so the waiting caller got an error ($(last_answer waiter))" grep -q "^error" <<<"$(last_answer waiter)"
    ask held version
    check "... and the descriptor held since before gets an error, not a wait" wait_for_answers held 4 30
    echo "# the held descriptor after the connection was let go: $(last_answer held)"
fi
check "a new open of /dev/blksnap is answered" test "$(ioctl collect | awk -v d="$(dev_b)" '$1 == d { print $2, $3 }')" = "$gen $snap"
stop_blksnapd "$blksnapd_pid"
check "a clean stop removes /dev/blksnap" wait_for_gone /dev/blksnap 10
finish
