#!/usr/bin/env bash
# Change tracking across a clean restart and a kill -9 of blksnapd, driven
# by the unchanged upstream v1 `blksnap` CLI (issue 10's proof; built from
# ../shared/upstream/blksnap-v1 by tools/build-upstream-v1, nothing of it
# in the project). tests/test-persist.sh covers the same with the ioctl
# client, plus the bad inputs; this one shows that the upstream tools see
# the same generation and an exact (clean stop) or covering (crash) CBT map.
#
# Two devices are declared: A carries an ext4, mounted by its
# /dev/disk/by-blksnap name, that holds the difference storage files
# (snapshot_appendstorage --file: their FIEMAP extents); B is written raw,
# one 4 KiB write at the start of chosen tracking blocks, and snapshotted.
# Each snapshot is snapshot_create, snapshot_appendstorage,
# snapshot_take, tracker_readcbtmap, snapshot_destroy.
#
# The CLI reaches blksnapd through a real CUSE /dev/blksnap where the
# kernel has CUSE (the stock-kernel lane, kernel NBD devices), else through
# the preload shim (FUSE+loop here).
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
requires mkfs.ext4; requires python3; requires dd; requires fallocate

upstream_tools
cli_binary=$upstream/build/tools/blksnap/blksnap

mode=shim
if [ -e /dev/cuse ]; then
    mode=cuse
    # The CUSE device of a blksnapd that just stopped goes away with it.
    wait_for_gone /dev/blksnap 5 || skip "/dev/blksnap exists already (the module, or another blksnapd)"
fi
# The lane's kernel NBD devices outlive a killed blksnapd for this long; a
# debug blksnapd under TCG on a busy host can take over a minute to start.
daemon_options=(--mode "$mode" --diff-storage-minimum 32768 --nbd-dead-timeout 600)
# start: a blksnapd, once it serves (it logs "engine ready" after its
# declared devices are routed and /dev/blksnap is up, made anew or taken over).
start() {
    local ready
    ready=$(grep -c "engine ready" "$scratch/blksnapd.log" 2>/dev/null || true)
    start_blksnapd "${daemon_options[@]}"
    for _ in $(seq 600); do [ "$(grep -c "engine ready" "$scratch/blksnapd.log")" -gt "${ready:-0}" ] && break; sleep 0.1; done
    if [ "$mode" = cuse ] && [ ! -c /dev/blksnap ]; then
        echo "$0: no /dev/blksnap after 60 s" >&2; tail -n 30 "$scratch/blksnapd.log" >&2; exit 1
    fi
}
cli() {
    if [ "$mode" = cuse ]; then
        env -u LD_PRELOAD "$cli_binary" "$@"
    else
        "$blksnapctl" exec --preload "$top/.build/preload/libblksnap-preload.so" -- "$cli_binary" "$@"
    fi
}
echo "# the upstream CLI reaches blksnapd through $mode"

etc=$scratch/etc
mkdir -p "$etc"
a=ua$$ b=ub$$
truncate -s $((128 << 20)) "$scratch/a.img"
truncate -s $((64 << 20)) "$scratch/b.img"
printf '%s\n' "# test-persist-upstream" "$a $scratch/a.img" "$b $scratch/b.img" >"$etc/devices.conf"
link_a=/dev/disk/by-blksnap/$a link_b=/dev/disk/by-blksnap/$b
cleanup_fn "rm -f $link_a $link_b"
store=$scratch/store

start
check "$link_a and $link_b are block devices" test -b "$link_a" -a -b "$link_b"
mkfs.ext4 -q -F "$link_a"
mount_at "$link_a" "$store"
echo kept >"$store/kept"
sync

# field NAME TEXT: the value of the first NAME=value line of the CLI's output.
field() { sed -n "s/^$1=//p" <<<"$2" | head -n 1; }
# collect: "GENERATION SNAP_NUMBER BLK_SIZE" of B's tracker, from tracker_collect.
collect() {
    local out dev
    dev=$(stat -L -c '%t %T' "$link_b" | (read -r mj mn; echo "$((16#$mj)):$((16#$mn))"))
    out=$(cli tracker_collect)
    # One block of lines per tracker, each starting with ",".
    awk -v dev="$dev" -F= '
        $0 == "," { mine = 0 } $1 == "device" { mine = ($2 == dev) }
        mine && $1 == "generationId" { g = $2 } mine && $1 == "snap_number" { s = $2 } mine && $1 == "blk_size" { b = $2 }
        END { if (g != "") print g, s, b }' <<<"$out"
}
# cycle N: snapshot N of B, its storage a file on A's ext4; leaves B's CBT
# map, read while the snapshot is taken, in $scratch/map.
cycle() {
    local id out
    id=$(cli snapshot_create --device "$link_b")
    fallocate -l 16M "$store/diff$1"
    out=$(cli snapshot_appendstorage --id "$id" --file "$store/diff$1")
    grep -q "^allocate range: " <<<"$out" || { echo "# snapshot_appendstorage said: $out"; return 1; }
    cli snapshot_take --id "$id"
    cli tracker_readcbtmap --device "$link_b" --file "$scratch/map"
    cli snapshot_destroy --id "$id"
    rm -f "$store/diff$1"
}
# blocks_with EXPR: the blocks whose byte in the last map satisfies EXPR ("== 2").
blocks_with() {
    python3 -c "import sys; m=open('$scratch/map','rb').read(); print(' '.join(str(i) for i,v in enumerate(m) if v $1))"
}
# write_block N: 4 KiB at the start of tracking block N of B, O_DIRECT, fsync'd.
write_block() { dd if=/dev/urandom of="$link_b" bs=4096 seek=$(($1 * blk / 4096)) count=1 oflag=direct conv=fsync,notrunc status=none; }
# same_as_before WHAT: after WHAT, both names are there and B's tracker has
# the generation and snap_number it had before ($gen_before, $snap_before).
same_as_before() {
    local gen snap
    check "after $1, $link_a and $link_b are there again" test -b "$link_a" -a -b "$link_b"
    read -r gen snap _ < <(collect)
    echo "# before $1: generation $gen_before, snap_number $snap_before; after: $gen, $snap"
    check "tracker_collect after $1: the same generation id" test "$gen" = "$gen_before"
    check "tracker_collect after $1: the same snap_number ($snap_before)" test "$snap" = "$snap_before"
}
sorted() { tr ' ' '\n' <<<"$*" | sed '/^$/d' | sort -n | tr '\n' ' ' | sed 's/ $//'; }

cycle 1
read -r gen1 snap1 blk < <(collect)
echo "# snapshot 1: generation $gen1, snap_number $snap1, tracking blocks of $blk bytes"
check "tracker_collect after the first snapshot: snap_number 1 and a generation" test "$snap1" = 1 -a -n "$gen1"
w1="3 100 517"
for n in $w1; do write_block "$n"; done
cycle 2
check "tracker_readcbtmap after snapshot 2 marks exactly w1 ($w1)" test "$(blocks_with '!= 0')" = "$w1"
w2="5 700"
for n in $w2; do write_block "$n"; done
read -r gen_before snap_before _ < <(collect)

# ---- a clean stop (SIGTERM) and a new blksnapd
umount "$store"
stop_blksnapd "$blksnapd_pid"
check "the clean stop saved B's CBT" test "$(grep -l "$scratch/b.img" "$scratch"/cbt/*.cbt 2>/dev/null | wc -l)" -ge 1
start
same_as_before "a clean restart"
mount "$link_a" "$store"
check "the ext4 mounted by name has its file" grep -qx kept "$store/kept"
w3="9 701 1000"
for n in $w3; do write_block "$n"; done
cycle 3
check "tracker_readcbtmap after the restart: exactly w1 ($w1) under snapshot 2" test "$(blocks_with '== 2')" = "$w1"
check "tracker_readcbtmap after the restart: exactly w2 and w3 ($(sorted $w2 $w3)) under snapshot 3" \
    test "$(blocks_with '== 3')" = "$(sorted $w2 $w3)"
check "tracker_readcbtmap after the restart: nothing else marked" test "$(blocks_with '!= 0')" = "$(sorted $w1 $w2 $w3)"

# ---- kill -9 in the middle of writes to random blocks of the first 256
read -r gen_before snap_before _ < <(collect)
umount "$store"
kill_amid_writes 100
start
stop_block_writer
check "writes were acknowledged before the kill ($acked_at_kill)" test "$acked_at_kill" -ge 20
same_as_before "a crash"
mount "$link_a" "$store"
cycle 4
acked=$(sort -nu "$scratch/acked" | tr '\n' ' ' | sed 's/ $//')
marked=$(blocks_with '== 4')
missing=$(comm -23 <(tr ' ' '\n' <<<"$acked" | sort) <(tr ' ' '\n' <<<"$marked" | sort) | tr '\n' ' ')
check "tracker_readcbtmap after a crash: every acknowledged block marked under snapshot 4${missing:+ (missing: $missing)}" test -z "$missing"
n_acked=$(wc -w <<<"$acked") n_marked=$(wc -w <<<"$marked")
echo "# crash: $n_acked distinct blocks written, $n_marked marked, $((n_marked - n_acked)) extra (of $(($(stat -c %s "$scratch/b.img") / blk)) blocks)"
region_blocks=$(((1 << 20) / blk))   # the write-intent region: 1 MiB
check "the crash marks nothing past the write-intent regions written" python3 -c "
m=open('$scratch/map','rb').read(); import sys
sys.exit(0 if all(v != 4 for v in m[(256 + $region_blocks - 1) // $region_blocks * $region_blocks:]) else 1)"
check "the blocks written before the crash keep a mark at least as new" python3 -c "
m=open('$scratch/map','rb').read(); import sys
sys.exit(0 if all(m[i] >= 2 for i in [$(tr ' ' ',' <<<"$w1")]) and all(m[i] >= 3 for i in [$(echo $w2 $w3 | tr ' ' ',')]) else 1)"
umount "$store"
stop_blksnapd "$blksnapd_pid"
finish
