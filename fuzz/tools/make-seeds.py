#!/usr/bin/env python3
"""Turns the recordings of record-seeds (record-proxy.py logs) into seed
corpora, one folder per harness:

  dispatch, cuse       IOCTL frames of all connections in the order they
                       were sent, in runs of a few calls; snapshot ids made
                       within a run become placeholders ("SNAPSHOT", 7
                       zeros, the creation index: see SnapshotPlaceholder)
  control-socket       each connection's bytes to blksnapd as they were
  nbd-handshake        each NBD connection's bytes from the client
  nbd-transmission     a config byte (bit 0 structured replies, bit 1
                       base:allocation, bit 2 blksnap:changed-since:0,
                       bit 3 the snapshot image) and the requests after
                       the negotiation

    make-seeds.py CONTROL.json NBD.json OUTDIR
"""
import hashlib, json, os, struct, sys

MAX = 16384
control_log, nbd_log, outdir = sys.argv[1:4]


def streams(path):
    """Per connection and direction: the bytes, and for each byte offset
    where a chunk began, its position in the global log."""
    out = {}
    for pos, (conn, direction, hexdata) in enumerate(json.load(open(path))):
        data, starts = out.setdefault((conn, direction), (bytearray(), []))
        starts.append((len(data), pos))
        data += bytes.fromhex(hexdata)
    return out


def position(starts, offset):
    best = 0
    for start, pos in starts:
        if start <= offset:
            best = pos
    return best


def control_frames(data):
    """(offset, bytes, header fields) of each whole request."""
    frames, i = [], 0
    while len(data) - i >= 32:
        magic, ftype, command, count, argument, payload, _ = struct.unpack_from("<IIIIQII", data, i)
        j = i + 32
        regions = []
        if ftype == 1:
            for _ in range(count):
                address, length, flow = struct.unpack_from("<QII", data, j)
                j += 16
                start = j
                if flow & 1:
                    j += length
                regions.append((address, length, flow, start))
        else:
            j += payload
        if j > len(data):
            break
        frames.append(dict(offset=i, end=j, type=ftype, command=command, argument=argument, regions=regions))
        i = j
    return frames


def control_replies(data):
    replies, i = [], 0
    while len(data) - i >= 16:
        magic, result, writes, payload = struct.unpack_from("<IiII", data, i)
        i += 16
        ws = []
        for _ in range(writes):
            address, length, _ = struct.unpack_from("<QII", data, i)
            i += 16
            ws.append((address, bytes(data[i:i + length])))
            i += length
        i += payload
        replies.append((result, ws))
    return replies


def save(folder, blobs, limit=60):
    path = os.path.join(outdir, folder)
    os.makedirs(path, exist_ok=True)
    seen = set()
    for blob in blobs:
        name = hashlib.sha1(blob).hexdigest()
        if not blob or name in seen:
            continue
        seen.add(name)
        if len(seen) > limit:
            break
        with open(os.path.join(path, name), "wb") as f:
            f.write(blob)
    print(f"{folder}: {len(seen)} seeds")


# -- control
s = streams(control_log)
calls = []   # (global position, frame bytes, created id or None)
socket_seeds = []
for (conn, direction), (data, starts) in sorted(s.items()):
    if direction != "c":
        continue
    frames = control_frames(data)
    replies = control_replies(s.get((conn, "s"), (b"", []))[0])
    cut = 0
    for f in frames:
        if f["end"] <= MAX:
            cut = f["end"]
    socket_seeds.append(bytes(data[:cut]))
    for f, (result, writes) in zip(frames, replies):
        if f["type"] != 1:
            continue
        created = None
        for address, b in writes:
            # SNAPSHOT_CREATE ('V', 5) gives back its 32-byte struct, the id at 16.
            if (f["command"] & 0xFFFF == 0x5605 and result == 0 and address == f["argument"]
                    and len(b) == 32):
                created = b[16:32]
        calls.append((position(starts, f["offset"]), bytes(data[f["offset"]:f["end"]]), created))
calls.sort(key=lambda c: c[0])
runs, run, size = [], [], 0
for call in calls:
    if run and (len(run) >= 10 or size + len(call[1]) > MAX):
        runs.append(run)
        run, size = [], 0
    run.append(call)
    size += len(call[1])
if run:
    runs.append(run)
# A run that names a snapshot made before it starts with the CREATE that
# made it, so that every run stands alone.
creates = {created: (pos, frame, created) for pos, frame, created in calls if created}
seeds = []
for run in runs:
    inside = {c for _, _, c in run if c}
    needed = sorted({creates[i] for i in creates if i not in inside and any(i in f for _, f, _ in run)})
    run = needed + run
    blob, made = b"", []
    for _, frame, created in run:
        for i, real in enumerate(made):
            frame = frame.replace(real, b"SNAPSHOT" + bytes(7) + bytes([i]))
        blob += frame
        if created:
            made.append(created)
    seeds.append(blob)
save("dispatch", seeds)
save("cuse", seeds)
save("control-socket", socket_seeds)

# -- NBD
s = streams(nbd_log)
hand, trans = [], []
for (conn, direction), (data, _) in sorted(s.items()):
    if direction != "c":
        continue
    hand.append(bytes(data[:MAX]))
    i, structured, contexts, image, done = 4, False, 0, False, False
    while len(data) - i >= 16 and not done:
        _, option, length = struct.unpack_from(">QII", data, i)
        body = bytes(data[i + 16:i + 16 + length])
        i += 16 + length
        if option == 8:
            structured = True
        elif option == 10:
            if b"base:allocation" in body:
                contexts |= 2
            if b"blksnap:changed-since" in body:
                contexts |= 4
        elif option in (1, 7):
            image = b"@snapshot" in body
            done = True
    if done and i < len(data):
        config = (1 if structured else 0) | contexts | (8 if image else 0)
        trans.append(bytes([config]) + bytes(data[i:i + MAX]))
save("nbd-handshake", hand)
save("nbd-transmission", trans)
