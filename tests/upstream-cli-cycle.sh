# The upstream v1 `blksnap` CLI, unchanged, through a whole cycle on routed
# devices, checking what each command prints. Shared by the scenarios that
# reach /dev/blksnap in different ways: the caller has sourced
# functions.sh, started blksnapd with --diff-storage-minimum
# $diff_storage_minimum, set the array $upstream_cli to the command line
# that runs the CLI (through the preload shim, or straight at a CUSE
# /dev/blksnap) and sources this file.
#
# Sizes: a 64 MiB original (64 KiB tracking blocks, 256 KiB chunks) and a
# 128 MiB ext4 that holds the difference storage files, as the tools use
# (a preallocated file's FIEMAP extents on the filesystem's device).

requires mkfs.ext4; requires md5sum; requires python3; requires fallocate
cli() { "${upstream_cli[@]}" "$@"; }
read -r orig orig_id < <(attach "$scratch/orig.img" $((64 << 20)))
read -r store store_id < <(attach "$scratch/store.img" $((128 << 20)))
mkfs.ext4 -q -F "$store"
mount_at "$store" "$scratch/store"
echo "# original $orig ($orig_id), storage filesystem on $store ($store_id)"

# snapshot_field ID FIELD: one field of a snapshot in blksnapd's status.
snapshot_field() {
    "$blksnapctl" status --json | python3 -c '
import json, sys
for s in json.load(sys.stdin)["snapshots"]:
    if s["id"] == sys.argv[1]:
        print(str(s[sys.argv[2]]).lower())' "$1" "$2"
}
wait_for_capacity() {  # wait_for_capacity ID SECTORS SECONDS
    local deadline=$((SECONDS + $3))
    until [ "$(snapshot_field "$1" storageCapacitySectors)" = "$2" ] || [ $SECONDS -ge $deadline ]; do sleep 0.2; done
    [ "$(snapshot_field "$1" storageCapacitySectors)" = "$2" ]
}
# field NAME TEXT: the value of the first NAME=value line of the CLI's output.
field() { sed -n "s/^$1=//p" <<<"$2" | head -n 1; }
write_random() {  # write_random OFFSET LENGTH (bytes, multiples of 4096)
    local bs=4096
    (($1 % 65536 == 0 && $2 % 65536 == 0)) && bs=65536
    dd if=/dev/urandom of="$orig" bs=$bs seek=$(($1 / bs)) count=$(($2 / bs)) \
        oflag=direct conv=notrunc status=none
}
# wait_or_kill PID SECONDS: sets $waited to the exit status of a background
# command, or to "killed" when it has not ended by then (it is then stopped
# with SIGTERM). Not in a $(...): only this shell can wait for its child.
wait_or_kill() {
    local deadline=$((SECONDS + $2))
    while kill -0 "$1" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if kill -0 "$1" 2>/dev/null; then
        kill -TERM "$1"; wait "$1" 2>/dev/null || true; waited=killed; return
    fi
    waited=0
    wait "$1" || waited=$?
}
image_of() {  # image_of ID: the image node snapshot_collect names
    local id
    id=$(field image_dev_id "$(cli snapshot_collect --id "$1")")
    echo "/dev/blksnap-image${id#*:}"
}
device_md5() { md5sum <"$1" | cut -d' ' -f1; }
uuid_re='^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
# cbt_is FILE EXPECTED: the CBT map FILE holds exactly EXPECTED, given as
# "COUNT FIRST-LAST=V ..." (block ranges with a byte; every other block 0).
cbt_is() {
    python3 - "$1" "$2" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
spec = sys.argv[2].split()
want = bytearray(int(spec[0]))
for item in spec[1:]:
    blocks, value = item.split("=")
    first, _, last = blocks.partition("-")
    for b in range(int(first), int(last or first) + 1):
        want[b] = int(value)
if data == bytes(want):
    sys.exit(0)
print(f"# CBT map: {len(data)} bytes, expected {len(want)}")
wrong = [i for i in range(min(len(data), len(want))) if data[i] != want[i]]
for i in wrong[:10]:
    print(f"#   block {i}: {data[i]}, expected {want[i]}")
sys.exit(1)
PY
}

# ---- version, MOD, SETLOG
out=$(cli version)
check "version prints the v1 module's version 1.0.0.0 (got '$out')" test "$out" = "1.0.0.0"
out=$(cli version --modification)
check "version --modification names blksnap-swift (got '$out')" test "$out" = "blksnap-swift"
out=$(cli version --compatibility | tr '\n' ' ')
check "version --compatibility lists debug_sector_state and setlog (got '$out')" \
    test "$out" = "debug_sector_state setlog "
setlog=$scratch/setlog.log
cli setlog --level 7 --path "$setlog"
check "setlog --level 7 starts the log file" grep -q "Start log for module blksnap-swift, level 7" "$setlog"

out=$(cli tracker_collect | tr '\n' ' ')
check "tracker_collect with nothing tracked prints count=0 (got '$out')" test "$out" = "count=0 . "

# ---- snapshot 1: storage from a file, take, images, CBT
id=$(cli snapshot_create --device "$orig")
check "snapshot_create prints a UUID (got '$id')" grep -Eq "$uuid_re" <<<"$id"
check "setlog's file records the CREATE" wait_for_grep "$id" "$setlog" 10
tc=$(cli tracker_collect)
blk_size=$(field blk_size "$tc")
blk_count=$(field blk_count "$tc")
generation=$(field generationId "$tc")
check "tracker_collect: count=1, device=$orig_id" \
    test "$(field count "$tc") $(field device "$tc")" = "1 $orig_id"
check "tracker_collect: 64 KiB blocks, 1024 of them, capacity 67108864 bytes (got $blk_size $blk_count $(field device_capacity "$tc"))" \
    test "$blk_size $blk_count $(field device_capacity "$tc")" = "65536 1024 67108864"
check "tracker_collect: a generation id and snap_number=0 before TAKE" \
    bash -c "grep -Eq '$uuid_re' <<<'$generation' && [ '$(field snap_number "$tc")' = 0 ]"

ev=$(cli snapshot_waitevent --id "$id" --timeout 1000)
check "snapshot_waitevent after CREATE: low_free_space for diff_storage_minimum ($diff_storage_minimum)" \
    test "$(field result "$ev") $(field event "$ev") $(field requested_nr_sect "$ev")" = "ok low_free_space $diff_storage_minimum"
check "snapshot_waitevent prints the event's time" grep -Eq '^time=[0-9]+$' <<<"$ev"
ev=$(cli snapshot_waitevent --id "$id" --timeout 100)
check "snapshot_waitevent with nothing queued: result=timeout (got '$ev')" test "$ev" = "result=timeout"

fallocate -l 16M "$scratch/store/diff0"
out=$(cli snapshot_appendstorage --id "$id" --file "$scratch/store/diff0")
sectors=$(awk -F'cnt=' '/^allocate range: ofs=[0-9]+ cnt=[0-9]+$/ { n += $2 } END { print n + 0 }' <<<"$out")
check "snapshot_appendstorage --file lists the file's extents: 32768 sectors (got $sectors)" test "$sectors" = 32768
check "blksnapd holds 32768 sectors of storage for the snapshot" test "$(snapshot_field "$id" storageCapacitySectors)" = 32768

# Tracked writes before TAKE: the first 8 MiB (blocks 0-127).
write_random 0 $((8 << 20))
at_take=$(device_md5 "$orig")
cli snapshot_take --id "$id"
sc=$(cli snapshot_collect)
image_id=$(field image_dev_id "$sc")
image=/dev/blksnap-image${image_id#*:}
check "snapshot_collect: the snapshot, one image of $orig_id" \
    test "$(sed -n '1,4p' <<<"$sc" | tr '\n' ' ')" = "snapshot=$id count=1 , orig_dev_id=$orig_id "
check "snapshot_collect: image_dev_id $image_id is $image" \
    test "$(printf '%d:%d' "0x$(stat -c %t "$image")" "0x$(stat -c %T "$image")")" = "$image_id"
check "snapshot_collect --id prints the same" test "$(cli snapshot_collect --id "$id")" = "$sc"
tc=$(cli tracker_collect)
check "tracker_collect after TAKE: snap_number=1, the same generation" \
    test "$(field snap_number "$tc") $(field generationId "$tc")" = "1 $generation"

# The original changes after TAKE: block 5, block 200, blocks 301-302 (one
# write across their boundary) and the last block.
write_random $((5 * blk_size)) 4096
write_random $((200 * blk_size + 8192)) 4096
write_random $((302 * blk_size - 4096)) 8192
write_random $((1023 * blk_size)) $blk_size
check "the image reads as the original did at TAKE (md5)" test "$(device_md5 "$image")" = "$at_take"
check "the original has changed since TAKE" test "$(device_md5 "$orig")" != "$at_take"

cli tracker_readcbtmap --device "$orig" --file "$scratch/cbt1"
check "tracker_readcbtmap: blocks 0-127 (written before TAKE) are 1, the rest 0" cbt_is "$scratch/cbt1" "1024 0-127=1"
cli tracker_markdirtyblock --device "$orig" --ranges "$((600 * blk_size / 512)):8" "$((700 * blk_size / 512)):$((2 * blk_size / 512))"
cli tracker_readcbtmap --device "$orig" --file "$scratch/cbt1b"
check "tracker_markdirtyblock marks blocks 600 and 700-701 in the read map with the previous number (1)" \
    cbt_is "$scratch/cbt1b" "1024 0-127=1 600=1 700-701=1"
err=$(cli tracker_markdirtyblock --device "$store" --ranges 0:8 2>&1; echo "exit $?")
check "tracker_markdirtyblock on an untracked device fails: ENODEV, exit 1 (got '${err//$'\n'/ | }')" \
    test "$err" = "Failed to mark dirty blocks in change tracking map.: No such device"$'\n'"exit 1"

cli snapshot_destroy --id "$id"
check "snapshot_destroy: snapshot_collect lists nothing" test -z "$(cli snapshot_collect)"
check "snapshot_destroy removes $image" test ! -e "$image"
err=$(cli snapshot_destroy --id "$id" 2>&1; echo "exit $?")
check "snapshot_destroy of a gone snapshot fails: ENODEV, exit 1 (got '${err//$'\n'/ | }')" \
    test "$err" = "Failed to destroy snapshot.: No such device"$'\n'"exit 1"

# ---- snapshot 2: stretch_snapshot feeds the storage as the events ask.
id2=$(cli snapshot_create --device "$orig")
mkdir "$scratch/store/stretch"
"${upstream_cli[@]}" stretch_snapshot --id "$id2" --path "$scratch/store/stretch/" \
    >"$scratch/stretch.out" 2>"$scratch/stretch.err" &
stretch_pid=$!
cleanup_fn "kill $stretch_pid 2>/dev/null"
check "stretch_snapshot appends diff_storage_minimum at CREATE's event" wait_for_capacity "$id2" "$diff_storage_minimum" 30
check "stretch_snapshot made diff_storage#0 of $diff_storage_minimum sectors" \
    test "$(stat -c %s "$scratch/store/stretch/diff_storage#0")" = $((diff_storage_minimum * 512))
at_take2=$(device_md5 "$orig")
cli snapshot_take --id "$id2"
tc=$(cli tracker_collect)
check "tracker_collect after the second TAKE: snap_number=2, the same generation" \
    test "$(field snap_number "$tc") $(field generationId "$tc")" = "2 $generation"
cli tracker_readcbtmap --device "$orig" --file "$scratch/cbt2"
check "tracker_readcbtmap: the blocks written and marked after the first TAKE are 2" \
    cbt_is "$scratch/cbt2" "1024 0-127=1 5=2 200=2 301-302=2 600=2 700-701=2 1023=2"

# Writes of fresh chunks, each 3/4 of diff_storage_minimum: the storage
# runs low (half of the minimum left) and stretch_snapshot appends more,
# twice, before it could run out.
step=$((diff_storage_minimum * 512 * 3 / 4))
write_random $((16 << 20)) $step
check "stretch_snapshot appends again when space runs low (2 x minimum)" \
    wait_for_capacity "$id2" $((2 * diff_storage_minimum)) 30
write_random $(((16 << 20) + step)) $step
check "and again (3 x minimum)" wait_for_capacity "$id2" $((3 * diff_storage_minimum)) 30
check "stretch_snapshot printed three requests of $diff_storage_minimum sectors" \
    test "$(grep -c "Low free space in diff storage. Requested $diff_storage_minimum sectors.$" "$scratch/stretch.out")" = 3
check "the second snapshot is not corrupted" test "$(snapshot_field "$id2" corrupted)" = false
check "the second image reads as the original did at its TAKE (md5)" \
    test "$(device_md5 "$(image_of "$id2")")" = "$at_take2"
cli snapshot_destroy --id "$id2"
wait_or_kill "$stretch_pid" 30
check "stretch_snapshot exits 0 once its snapshot is gone (got '$waited')" test "$waited" = 0
check "stretch_snapshot says the snapshot no longer exists, then finishes" \
    test "$(tail -n 2 "$scratch/stretch.out" | tr '\n' ' ')" = "The snapshot no longer exists. Stretch snapshot service finished. "

# ---- snapshot 3: stretch_snapshot --limit 1 (MiB) appends only the first
# request; writes past it overflow the storage, the snapshot is corrupted,
# and stretch_snapshot stops by itself and removes its files.
id3=$(cli snapshot_create --device "$orig")
mkdir "$scratch/store/limited"
"${upstream_cli[@]}" stretch_snapshot --id "$id3" --path "$scratch/store/limited/" --limit 1 \
    >"$scratch/limited.out" 2>"$scratch/limited.err" &
limited_pid=$!
cleanup_fn "kill $limited_pid 2>/dev/null"
check "stretch_snapshot --limit appends the first request" wait_for_capacity "$id3" "$diff_storage_minimum" 30
cli snapshot_take --id "$id3"
image3=$(image_of "$id3")
head -c $((2 * diff_storage_minimum * 512)) /dev/urandom >"$scratch/overflow"
dd if="$scratch/overflow" of="$orig" bs=1M seek=32 oflag=direct conv=notrunc status=none
wait_or_kill "$limited_pid" 30
check "stretch_snapshot --limit exits 0 after the corruption (got '$waited')" test "$waited" = 0
check "stretch_snapshot --limit refused the second request: the limit" \
    grep -qx "The diff storage limit has been achieved." "$scratch/limited.err"
check "stretch_snapshot --limit reports the corruption of $orig_id with ENOSPC" \
    grep -Eq "^[0-9]+ - The snapshot was corrupted for device \[$orig_id\] with error \"No space left on device\"\.$" "$scratch/limited.out"
check "stretch_snapshot --limit removed its diff_storage#0" test ! -e "$scratch/store/limited/diff_storage#0"
check "blksnapd holds the snapshot corrupted, with only the first request's storage" \
    test "$(snapshot_field "$id3" corrupted) $(snapshot_field "$id3" storageCapacitySectors)" = "true $diff_storage_minimum"
check "the original has every byte written past the overflow" \
    cmp -n $((2 * diff_storage_minimum * 512)) "$scratch/overflow" <(dd if="$orig" bs=1M skip=32 iflag=direct status=none)
check "reading the corrupted image fails with EIO" \
    bash -c "dd if='$image3' of=/dev/null bs=1M count=1 iflag=direct status=none 2>&1 | grep -q 'Input/output error'"
cli snapshot_destroy --id "$id3"

# ---- the end: tracker_remove, setlog --disable
cli tracker_remove --device "$orig"
check "tracker_remove: tracker_collect prints count=0" test "$(cli tracker_collect | tr '\n' ' ')" = "count=0 . "
err=$(cli tracker_remove --device "$orig" 2>&1; echo "exit $?")
check "tracker_remove of an untracked device fails: ENODATA, exit 1 (got '${err//$'\n'/ | }')" \
    test "$err" = "Failed to remove block device from change tracking.: No data available"$'\n'"exit 1"
cli setlog --disable
size=$(stat -c %s "$setlog")
id4=$(cli snapshot_create --device "$orig")
cli snapshot_destroy --id "$id4"
check "setlog --disable: nothing more is logged to the file" test "$(stat -c %s "$setlog")" = "$size"
cli tracker_remove --device "$orig"
