#!/usr/bin/env python3
"""A recording proxy for a Unix stream socket: every connection to LISTEN is
forwarded to TARGET, and each direction's bytes are logged, in the order
they passed, to OUT (a JSON list of [connection, direction, hex] items,
direction "c" from client, "s" from server). Runs until SIGTERM.

    record-proxy.py LISTEN TARGET OUT
"""
import json, os, signal, socket, sys, threading

listen_path, target_path, out_path = sys.argv[1:4]
log, lock = [], threading.Lock()


def pump(conn_id, direction, src, dst):
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        if not data:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        with lock:
            log.append([conn_id, direction, data.hex()])
        try:
            dst.sendall(data)
        except OSError:
            return


def serve(conn_id, client):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.connect(target_path)
    a = threading.Thread(target=pump, args=(conn_id, "c", client, server))
    b = threading.Thread(target=pump, args=(conn_id, "s", server, client))
    a.start(); b.start(); a.join(); b.join()
    client.close(); server.close()


def finish(*_):
    with lock:
        with open(out_path, "w") as f:
            json.dump(log, f)
    os._exit(0)


signal.signal(signal.SIGTERM, finish)
try:
    os.unlink(listen_path)
except FileNotFoundError:
    pass
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(listen_path)
listener.listen(64)
n = 0
while True:
    client, _ = listener.accept()
    n += 1
    threading.Thread(target=serve, args=(n, client), daemon=True).start()
