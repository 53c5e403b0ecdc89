#!/usr/bin/env python3
"""The part of systemd that blksnapd's crash recovery uses, for machines
where systemd is not PID 1: a service with Restart=always and a file
descriptor store (FileDescriptorStoreMax), nothing else.

Usage: fake_fdstore.py STATE_DIR PIDFILE -- COMMAND...

Runs COMMAND with NOTIFY_SOCKET and FDSTORE set, as systemd does; keeps
each descriptor it is sent with FDSTORE=1 under its FDNAME (the first one
per name: blksnapd stores each connection once), forgets those named by
FDSTOREREMOVE=1. When COMMAND is killed by a signal it is started again
after a second, with the store passed as LISTEN_FDS from descriptor 3 on,
LISTEN_FDNAMES and LISTEN_PID. When it exits on its own, the store is
closed (the unit stopped) and this ends with its status. The running
command's pid is written to PIDFILE.
"""
import array, os, select, signal, socket, sys, time

state, pidfile = sys.argv[1], sys.argv[2]
command = sys.argv[sys.argv.index("--") + 1:]
path = os.path.join(state, "fake-notify.sock")
os.makedirs(state, exist_ok=True)
if os.path.exists(path):
    os.unlink(path)
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.bind(path)
store = {}  # name -> fd

def receive():
    fds = array.array("i")
    data, ancdata, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(16 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
    name = fields.get("FDNAME", "stored")
    if fields.get("FDSTORE") == "1":
        for fd in fds:
            if name in store:
                os.close(fd)
            else:
                store[name] = fd
                print(f"fake-fdstore: stored {name}", file=sys.stderr, flush=True)
    elif fields.get("FDSTOREREMOVE") == "1":
        if name in store:
            os.close(store.pop(name))
            print(f"fake-fdstore: removed {name}", file=sys.stderr, flush=True)
    else:
        for fd in fds:
            os.close(fd)

def start():
    names = sorted(store)
    pid = os.fork()
    if pid == 0:
        for i, name in enumerate(names):
            os.dup2(store[name], 3 + i, inheritable=True)
        env = dict(os.environ, NOTIFY_SOCKET=path, FDSTORE="8")
        if names:
            env.update(LISTEN_FDS=str(len(names)), LISTEN_FDNAMES=":".join(names), LISTEN_PID=str(os.getpid()))
        os.execvpe(command[0], command, env)
    with open(pidfile, "w") as f:
        f.write(f"{pid}\n")
    return pid

pid = start()
while True:
    ready, _, _ = select.select([notify], [], [], 0.1)
    if ready:
        receive()
        continue
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        continue
    if os.WIFSIGNALED(status):
        print(f"fake-fdstore: killed by signal {os.WTERMSIG(status)}; starting again", file=sys.stderr, flush=True)
        time.sleep(1)
        pid = start()
        continue
    for fd in store.values():
        os.close(fd)
    sys.exit(os.waitstatus_to_exitcode(status))
