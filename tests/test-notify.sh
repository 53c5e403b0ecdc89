#!/usr/bin/env bash
# blksnapd under Type=notify, without systemd as PID 1: a listener in
# systemd's place on an abstract $NOTIFY_SOCKET gets READY=1 only once the
# control socket serves, then STOPPING=1 when SIGTERM comes, each with a
# STATUS= line.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse; requires python3

name="blksnap-notify-$$"
# Records each datagram, with whether the control socket answered a
# connect at the moment it arrived.
python3 - "$name" "$scratch/notify.log" "$scratch/state/control.sock" <<'PY' &
import os, socket, sys
name, log, control = sys.argv[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + name)
open(log + ".bound", "w").write("bound\n")
s.settimeout(60)
with open(log, "a") as out:
    while True:
        try:
            data = s.recv(4096).decode()
        except socket.timeout:
            break
        c = socket.socket(socket.AF_UNIX)
        try:
            c.connect(control); serving = "serving"
        except OSError:
            serving = "not-serving"
        c.close()
        out.write(data.replace("\n", "|") + " " + serving + "\n"); out.flush()
        if "STOPPING=1" in data:
            break
PY
listener=$!
cleanup_fn "kill $listener 2>/dev/null"
wait_for_file "$scratch/notify.log.bound" 10 || { echo "the listener did not start" >&2; exit 1; }

NOTIFY_SOCKET="@$name" start_blksnapd
check "READY=1 arrives" wait_for_grep "READY=1" "$scratch/notify.log" 20
check "READY=1 comes with a STATUS= line" grep -q "^READY=1|STATUS=serving 0 routed device(s)|" "$scratch/notify.log"
check "the control socket serves when READY=1 arrives" grep -q "^READY=1.* serving$" "$scratch/notify.log"
stop_blksnapd "$blksnapd_pid"
check "STOPPING=1 arrives on SIGTERM" wait_for_grep "STOPPING=1" "$scratch/notify.log" 20
check "READY=1 came before STOPPING=1, once each" \
    test "$(cut -d'|' -f1 "$scratch/notify.log" | tr '\n' ' ')" = "READY=1 STOPPING=1 "
wait "$listener" 2>/dev/null || true
finish
