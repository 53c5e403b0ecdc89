#!/usr/bin/env bash
# blksnap-backup beyond the happy path: two devices in one backup, each
# restored as it was at the one snapshot; a new CBT generation and a
# resized device force a full backup, and it says so; SIGINT mid-copy, a
# difference storage that overflows, and a full repository disk each fail
# cleanly: no snapshot left, nothing half written listed as good, the
# earlier chain intact.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
source "$(dirname "$0")/backup-functions.sh"

# 4 MiB difference storage portions, so a small limit can be overrun.
start_blksnapd --diff-storage-minimum 8192
make_storage 128M
read -r dev_a _ < <(attach "$scratch/a.img" 64M)
read -r dev_b _ < <(attach "$scratch/b.img" 48M)
# Stable names for the devices (routed again after a resize, a device may
# get another node); backups find a device by the name they were given.
ln -s "$dev_a" "$scratch/disk-a"
ln -s "$dev_b" "$scratch/disk-b"
a=$scratch/disk-a b=$scratch/disk-b
for d in "$dev_a" "$dev_b"; do mkfs.ext4 -q -F "$d"; done
mount_at "$dev_a" "$scratch/ma"
mount_at "$dev_b" "$scratch/mb"
repo=$scratch/repo

# --- two devices in one backup
write_file "$scratch/ma/one" 3; write_file "$scratch/mb/two" 2
record "$scratch/ma" "$scratch/rec-a1"; record "$scratch/mb" "$scratch/rec-b1"
check "full backup of two devices" backup full --device "$a" --device "$b" --to "$repo" --storage "$storage"
write_file "$scratch/ma/three" 1; rm "$scratch/mb/two"; write_file "$scratch/mb/four" 1
record "$scratch/ma" "$scratch/rec-a2"; record "$scratch/mb" "$scratch/rec-b2"
check "incremental of two devices" backup incremental --device "$a" --device "$b" --to "$repo" --storage "$storage"
check "backup 2 is incremental on 1" test "$(manifest_field "$repo" 2 "m['kind'], m['parent']")" = "incremental 1"
for n in 1 2; do
    for d in a b; do
        backup restore --from "$repo" --backup $n --device disk-$d --to "$scratch/r$n$d.img" >/dev/null
        check "backup $n of disk-$d: files as at the snapshot" matches_record "$scratch/r$n$d.img" "$scratch/rec-$d$n"
    done
done
check "restore refuses an ambiguous device" bash -c "! '$blksnapctl' exec -- '$blksnap_backup' restore --from '$repo' --to '$scratch/x.img' 2>/dev/null"

# --- a new CBT generation: the tracker removed and created again
blksnap remove "$dev_b"
write_file "$scratch/ma/five" 1
backup incremental --device "$a" --device "$b" --to "$repo" --storage "$storage" > "$scratch/gen.out" 2> "$scratch/gen.err" ||
    { echo "# the backup after the new generation failed:"; sed 's/^/#   /' "$scratch/gen.err"; false; }
check "a new CBT generation forces a full backup" test "$(manifest_field "$repo" 3 "m['kind']")" = "full"
check "... and says why" grep -q "new CBT generation" "$scratch/gen.err"
check "... in the manifest too" test "$(manifest_field "$repo" 3 "'generation' in m['fallbackReason']")" = True

# --- a resized device
umount "$scratch/mb"
"$blksnapctl" detach "$dev_b"
truncate -s 64M "$scratch/b.img"
read -r dev_b2 _ < <(attach "$scratch/b.img" 64M)
ln -sfn "$dev_b2" "$scratch/disk-b"
resize2fs -f "$dev_b2" >"$scratch/resize.out" 2>&1 || { echo "# resize2fs failed:"; sed "s/^/#   /" "$scratch/resize.out"; false; }
mount_at "$dev_b2" "$scratch/mb"
record "$scratch/mb" "$scratch/rec-b4"
backup incremental --device "$a" --device "$b" --to "$repo" --storage "$storage" > "$scratch/size.out" 2> "$scratch/size.err" ||
    { echo "# the backup after the resize failed:"; sed 's/^/#   /' "$scratch/size.err"; false; }
check "a resized device forces a full backup" test "$(manifest_field "$repo" 4 "m['kind'], m['devices'][1]['sizeBytes']")" = "full $((64 << 20))"
check "... and says why" grep -q "changed size" "$scratch/size.err"
backup restore --from "$repo" --backup 4 --device disk-b --to "$scratch/r4b.img" >/dev/null
check "the resized device's backup restores" matches_record "$scratch/r4b.img" "$scratch/rec-b4"

no_snapshot() { "$blksnapctl" status --json | python3 -c 'import json,sys; sys.exit(1 if json.load(sys.stdin)["snapshots"] else 0)'; }

# --- SIGINT in the middle of the copy (--max-rate makes it last seconds)
write_file "$scratch/ma/big" 24
"$blksnapctl" exec -- "$blksnap_backup" full --device "$a" --to "$repo" --storage "$storage" \
    --max-rate 4M --workers 1 --json 2> "$scratch/int.err" > /dev/null &
pid=$!
check "the interrupted backup was copying" wait_for_grep '"event":"progress"' "$scratch/int.err" 30
kill -INT "$pid"
set +e; wait "$pid"; status=$?; set -e
check "SIGINT ends the backup with status 130 (got $status)" test "$status" = 130
check "after SIGINT no snapshot is left" no_snapshot
check "after SIGINT no backup 5 is listed" test "$(good_backups "$repo")" = "1 2 3 4"
check "after SIGINT its directory is gone" test ! -e "$repo/0005"
check "after SIGINT the storage files are gone" test -z "$(ls -A "$storage")"

# --- the difference storage overflows: 8 MiB at most, 24 MiB rewritten
# while the copy runs slowly
"$blksnapctl" exec -- "$blksnap_backup" incremental --device "$a" --device "$b" --to "$repo" --storage "$storage" \
    --storage-limit 8M --max-rate 2M --workers 1 --json 2> "$scratch/ovf.err" > /dev/null &
pid=$!
wait_for_grep '"event":"start"' "$scratch/ovf.err" 30
dd if=/dev/urandom of="$scratch/ma/big" bs=1M count=24 conv=notrunc,fsync status=none
set +e; wait "$pid"; status=$?; set -e
check "an overflowing difference storage fails the backup (status $status)" test "$status" = 1
check "... with a clear message" grep -q "snapshot is corrupted" "$scratch/ovf.err"
check "after the overflow no snapshot is left" no_snapshot
check "after the overflow nothing new is listed" test "$(good_backups "$repo")" = "1 2 3 4"
check "the earlier chain still verifies" backup verify --from "$repo"

# --- the repository's disk fills up
mkdir -p "$scratch/small"
mount -t tmpfs -o size=12M tmpfs "$scratch/small"
cleanup_fn "umount -l '$scratch/small'"
set +e
backup full --device "$a" --to "$scratch/small/repo" --storage "$storage" > /dev/null 2> "$scratch/full.err"
status=$?
set -e
check "a full repository disk fails the backup (status $status)" test "$status" = 1
check "... saying so" grep -qi "no space" "$scratch/full.err"
check "... leaving no snapshot" no_snapshot
check "... and nothing listed" test -z "$(good_backups "$scratch/small/repo")"
check "... and no backup directory" test -z "$(ls "$scratch/small/repo" | grep -v '^\.lock$' || true)"
finish
