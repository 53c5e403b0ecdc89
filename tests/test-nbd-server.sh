#!/usr/bin/env bash
# The NBD frontend (blksnap-nbd-serve) against real clients, in the style of
# nbdkit's tests: nbdinfo, nbdcopy and nbdsh (libnbd-bin), qemu-img and
# qemu-io (qemu-utils), and nbdkit's nbd plugin as a proxy.
#
# Builds nothing: run `swift build` first; the binary comes from
# $BLKSNAP_BUILD (default .build/debug). Installs nothing: a missing client
# skips the script (prints "skipped: why", exits 77). Every server listens
# on a Unix socket in the scenario's scratch directory.
source "$(dirname "$0")/functions.sh"
# Each check decides for itself; a fixture that fails shows in the checks
# that need it.
set +e
cd "$top"

serve=$build/blksnap-nbd-serve
if [[ ! -x $serve ]]; then
    echo "$(basename "$0"): $serve is missing; build it first: swift build --product blksnap-nbd-serve" >&2
    echo "  (or point BLKSNAP_BUILD at a build dir that has it)" >&2
    exit 1
fi

# A client that is there but does not work is a skip too, never a pass.
requires_working() {
    "$@" >/dev/null 2>&1 || skip "'$*' failed (install libnbd-bin, qemu-utils and nbdkit)"
}
requires_working nbdinfo --version
requires_working nbdcopy --version
requires_working qemu-img --version
requires_working qemu-io --version
requires_working nbdkit --version
requires_working nbdkit nbd --version
requires_working cmp --version

# nbdsh is `python3 -m nbd`; under a python3 other than the system's (pyenv,
# a venv) the module is missing, so fall back to the system interpreter.
if nbdsh -c pass >/dev/null 2>&1; then
    nbdsh=(nbdsh)
elif /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then
    nbdsh=(/usr/bin/python3 -m nbd)
else
    skip "nbdsh cannot import the nbd module (install python3-libnbd)"
fi

tmp=$scratch
pids=()
stop_servers() {
    for p in "${pids[@]}"; do
        kill -TERM "$p" 2>/dev/null
    done
    for p in "${pids[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$p" 2>/dev/null
    done
}
cleanup_fn stop_servers
trap 'exit 130' INT TERM

# start_serve NAME ARGS...: runs blksnap-nbd-serve on $tmp/NAME.sock and
# waits for its pidfile, which it writes once it listens. Sets $server_pid.
start_serve() {
    local name=$1
    shift
    rm -f "$tmp/$name.pid"
    "$serve" --socket "$tmp/$name.sock" --pidfile "$tmp/$name.pid" "$@" >"$tmp/$name.log" 2>&1 &
    server_pid=$!
    pids+=("$server_pid")
    for _ in $(seq 200); do
        [[ -s $tmp/$name.pid ]] && return 0
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "$(basename "$0"): blksnap-nbd-serve $name did not start:" >&2
    cat "$tmp/$name.log" >&2
    return 1
}

uri() { echo "nbd+unix:///$2?socket=$tmp/$1.sock"; }

# ---- fixtures: a 64 MiB disk with data at both ends and a hole between
size=$((64 << 20))
truncate -s $size "$tmp/disk.img"
head -c $((4 << 20)) /dev/urandom | dd of="$tmp/disk.img" conv=notrunc status=none
head -c $((1 << 20)) /dev/urandom | dd of="$tmp/disk.img" bs=1M seek=63 conv=notrunc status=none
cp "$tmp/disk.img" "$tmp/ro.img"
cp "$tmp/disk.img" "$tmp/ro.orig"
head -c $size /dev/urandom >"$tmp/random.img"
head -c $size /dev/urandom >"$tmp/random2.img"

start_serve main disk="$tmp/disk.img" || exit 1
start_serve ro --read-only ro="$tmp/ro.img" || exit 1

# ---- scenarios

t_list() {
    nbdinfo --list "$(uri main disk)" | tee /dev/stderr | grep -q 'export="disk"' &&
        [[ $(nbdinfo --size "$(uri main disk)") == "$size" ]]
}
check_quiet "nbdinfo lists the export and its size" t_list

t_copy_out() {
    nbdcopy "$(uri main disk)" "$tmp/out.img" && cmp "$tmp/disk.img" "$tmp/out.img"
}
check_quiet "nbdcopy from the export equals the file" t_copy_out

t_copy_in() {
    nbdcopy "$tmp/random.img" "$(uri main disk)" && cmp "$tmp/random.img" "$tmp/disk.img"
}
check_quiet "nbdcopy into the export reaches the file" t_copy_in

t_qemu_compare() {
    qemu-img compare -f raw -F raw "$tmp/disk.img" "$(uri main disk)"
}
check_quiet "qemu-img compare of the export and the file" t_qemu_compare

t_map() {
    local map
    map=$(nbdinfo --map "$(uri main disk)") || return 1
    echo "$map"
    # One extent over the whole disk: allocated (type 0), "data".
    [[ $(echo "$map" | awk '{print $1, $2, $3}') == "0 $size 0" ]]
}
check_quiet "nbdinfo --map shows base:allocation" t_map

t_read_only() {
    # Strict mode off, so libnbd sends the write instead of refusing it
    # itself on seeing NBD_FLAG_READ_ONLY: the server must say EPERM.
    "${nbdsh[@]}" -u "$(uri ro ro)" -c '
assert h.is_read_only()
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 4096, 0)
    raise SystemExit("write to a read-only export succeeded")
except nbd.Error as e:
    print(e)
    assert e.errno == "EPERM", e.errno
try:
    h.trim(4096, 0)
    raise SystemExit("trim on a read-only export succeeded")
except nbd.Error as e:
    assert e.errno == "EPERM", e.errno
' && cmp "$tmp/ro.orig" "$tmp/ro.img"
}
check_quiet "a read-only export refuses writes with EPERM" t_read_only

t_out_of_range() {
    "${nbdsh[@]}" -u "$(uri main disk)" -c '
h.set_strict_mode(0)
size = h.get_size()
for offset in (size, size - 256, 1 << 62):
    try:
        h.pread(512, offset)
        raise SystemExit("read past the end succeeded")
    except nbd.Error as e:
        print(e)
        assert e.errno == "EINVAL", e.errno
try:
    h.pwrite(b"y" * 512, size - 256)
    raise SystemExit("write past the end succeeded")
except nbd.Error as e:
    assert e.errno == "ENOSPC", e.errno
# The connection is still in step.
assert len(h.pread(4096, size - 4096)) == 4096
h.pwrite(b"z" * 512, 0)
assert h.pread(512, 0) == b"z" * 512
'
}
check_quiet "out-of-range read is EINVAL and the connection keeps working" t_out_of_range

t_many_in_flight() {
    nbdcopy --requests=64 --connections=4 "$tmp/random2.img" "$(uri main disk)" &&
        cmp "$tmp/random2.img" "$tmp/disk.img" &&
        nbdcopy --requests=64 --connections=4 --request-size=65536 "$(uri main disk)" "$tmp/out2.img" &&
        cmp "$tmp/random2.img" "$tmp/out2.img"
}
check_quiet "nbdcopy with 64 requests on 4 connections" t_many_in_flight

t_qemu_io() {
    qemu-io -f raw -c 'write -P 0x5a 1M 3M' -c 'aio_write -P 0x6b 8M 64k' -c 'aio_flush' \
        -c 'read -P 0x5a 1M 3M' -c 'read -P 0x6b 8M 64k' "$(uri main disk)" &&
        qemu-img compare -f raw -F raw "$tmp/disk.img" "$(uri main disk)"
}
check_quiet "qemu-io writes and reads through the export" t_qemu_io

t_write_zeroes_trim() {
    "${nbdsh[@]}" -u "$(uri main disk)" -c '
h.pwrite(b"\xff" * 65536, 0)
h.zero(65536, 0, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 0) == bytes(65536)
h.pwrite(b"\xff" * 65536, 0)
h.zero(65536, 0)
assert h.pread(65536, 0) == bytes(65536)
h.pwrite(b"\xee" * 512, 65536, nbd.CMD_FLAG_FUA)
h.trim(65536, 131072)
h.flush()
'
}
check_quiet "WRITE_ZEROES, FUA, TRIM and FLUSH" t_write_zeroes_trim

t_nbdkit_proxy() {
    # nbdkit's nbd plugin as the client, serving our export on to nbdcopy.
    nbdkit -U - nbd socket="$tmp/main.sock" export=disk \
        --run 'nbdcopy "$uri" '"$tmp/proxied.img" &&
        cmp "$tmp/disk.img" "$tmp/proxied.img"
}
check_quiet "nbdkit's nbd plugin reads the export" t_nbdkit_proxy

t_tcp() {
    start_serve tcp --tcp 127.0.0.1:0 disk="$tmp/ro.img" || return 1
    local port
    for _ in $(seq 50); do
        port=$(sed -n 's/^blksnap-nbd-serve: tcp port //p' "$tmp/tcp.log")
        [[ -n $port ]] && break
        sleep 0.1
    done
    [[ $(nbdinfo --size "nbd://127.0.0.1:$port/disk") == "$size" ]] &&
        [[ $(stat -c %a "$tmp/tcp.sock") == 600 ]]
}
check_quiet "TCP on 127.0.0.1 when asked; the Unix socket is mode 0600" t_tcp

# ---- change block tracking: blksnap:changed-since:N

cp "$tmp/random.img" "$tmp/cbt.img"
start_serve cbt --snapshot cbt --tracking-block-shift 16 cbt="$tmp/cbt.img" || exit 1

# wait_taken N: until the server reports snapshot N.
wait_taken() {
    for _ in $(seq 100); do
        grep -q "took snapshot $1 of cbt" "$tmp/cbt.log" && return 0
        sleep 0.05
    done
    cat "$tmp/cbt.log"
    return 1
}

t_cbt_list() {
    "${nbdsh[@]}" --opt-mode -u "$(uri cbt cbt)" -c '
h.add_meta_context("blksnap:")
names = []
h.opt_list_meta_context(lambda name: names.append(name))
print(names)
assert names == ["blksnap:changed-since:0", "blksnap:changed-since:1"], names
h.opt_abort()
'
}
check_quiet "LIST_META_CONTEXT blksnap: lists changed-since:0..1 after the first snapshot" t_cbt_list

t_cbt_map() {
    wait_taken 1 || return 1
    nbdcopy "$(uri cbt cbt@snapshot)" "$tmp/snap1.img" || return 1
    # Blocks of 64 KiB: write into blocks 3, 10-11 (across the boundary),
    # and 1000; then take snapshot 2.
    "${nbdsh[@]}" -u "$(uri cbt cbt)" -c '
h.pwrite(b"a" * 4096, 3 * 65536 + 100)
h.pwrite(b"b" * 512, 11 * 65536 - 256)
h.pwrite(b"c" * 1, 1000 * 65536 + 65535)
' || return 1
    kill -USR1 "$cbt_pid"
    wait_taken 2 || return 1
    local map expected
    map=$(nbdinfo --map=blksnap:changed-since:1 "$(uri cbt cbt)") || return 1
    echo "$map"
    expected=$(printf '%s\n' \
        "0 196608 0" "196608 65536 1" "262144 393216 0" "655360 131072 1" \
        "786432 64749568 0" "65536000 65536 1" "65601536 1507328 0")
    [[ $(echo "$map" | awk '{print $1, $2, $3}') == "$expected" ]] || return 1
    # Since snapshot 2 nothing changed; since 0, the same blocks.
    [[ $(nbdinfo --map=blksnap:changed-since:2 "$(uri cbt cbt)" | awk '{print $1, $2, $3}') == "0 $size 0" ]] &&
        [[ $(nbdinfo --map=blksnap:changed-since:0 "$(uri cbt cbt)" | awk '{print $1, $2, $3}') == "$expected" ]]
}
cbt_pid=$server_pid
check_quiet "nbdinfo --map=blksnap:changed-since:1 lists exactly the written blocks" t_cbt_map

t_cbt_qemu() {
    # qemu reads a custom context through x-dirty-bitmap (libnbd's
    # interop/dirty-bitmap.sh does the same); dirty blocks show data=false.
    qemu-img map --output=json --image-opts \
        "driver=nbd,export=cbt,server.type=unix,server.path=$tmp/cbt.sock,x-dirty-bitmap=blksnap:changed-since:1" |
        tee /dev/stderr | grep -c '"data": false' | grep -qx 3
}
check_quiet "qemu-img map reads blksnap:changed-since:1 as a dirty bitmap" t_cbt_qemu

t_cbt_image() {
    # The image of snapshot 2 is the disk at TAKE; later writes to the
    # disk do not reach it, and snapshot 1's copy differs only in the
    # changed blocks. (cmp: 1 the files differ, 2 it could not compare.)
    nbdcopy "$(uri cbt cbt@snapshot)" "$tmp/snap2.img" && cmp "$tmp/snap2.img" "$tmp/cbt.img" &&
        "${nbdsh[@]}" -u "$(uri cbt cbt)" -c 'h.pwrite(b"d" * 65536, 0)' &&
        nbdcopy "$(uri cbt cbt@snapshot)" "$tmp/snap2b.img" && cmp "$tmp/snap2.img" "$tmp/snap2b.img" &&
        { cmp -s "$tmp/snap2.img" "$tmp/cbt.img"; [[ $? -eq 1 ]]; } &&
        cmp <(head -c 196608 "$tmp/snap1.img") <(head -c 196608 "$tmp/snap2.img")
}
check_quiet "the snapshot image export holds the point in time" t_cbt_image

finish
