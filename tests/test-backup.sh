#!/usr/bin/env bash
# blksnap-backup on a live ext4: a full backup, files changed, added and
# deleted, an incremental, again; every backup of the chain restored to a
# new file and checked file by file against a record taken at its
# snapshot; verify passes, one flipped byte makes it fail; a mounted
# backup shows its own files; prune keeps the rest restorable.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
source "$(dirname "$0")/backup-functions.sh"

start_blksnapd --diff-storage-minimum 65536
make_storage 192M
read -r orig _ < <(attach "$scratch/orig.img" 96M)
mkfs.ext4 -q -F "$orig"
mount_at "$orig" "$scratch/orig"
repo=$scratch/repo

for i in 1 2 3 4; do write_file "$scratch/orig/file$i" 4; done
mkdir "$scratch/orig/dir"; echo "small" > "$scratch/orig/dir/small"
# Nothing else writes to the file system, so the state just before the
# backup is the state at its snapshot; the last file is not synced: TAKE's
# freeze must put it in whole.
write_file "$scratch/orig/late" 3
record "$scratch/orig" "$scratch/rec1"
check "full backup" backup full --device "$orig" --to "$repo" --storage "$storage"

rm "$scratch/orig/file2"
dd if=/dev/urandom of="$scratch/orig/file1" bs=1M count=1 seek=1 conv=notrunc status=none
write_file "$scratch/orig/new5" 2
echo "changed" > "$scratch/orig/dir/small"
record "$scratch/orig" "$scratch/rec2"
backup incremental --device "$orig" --to "$repo" --storage "$storage" --json > "$scratch/inc2.json" 2> "$scratch/inc2.err"
check "incremental backup 2" test "$(manifest_field "$repo" 2 "m['kind'], m['parent']")" = "incremental 1"
check "--json progress events on stderr" grep -q '"event":"done"' "$scratch/inc2.err"
check "the JSON result on stdout is backup 2's manifest" python3 -c "import json; assert json.load(open('$scratch/inc2.json'))['number'] == 2"

rm "$scratch/orig/file3"
write_file "$scratch/orig/dir/new6" 1
record "$scratch/orig" "$scratch/rec3"
check "incremental backup 3" backup incremental --device "$orig" --to "$repo" --storage "$storage"

check "three good backups listed" test "$(good_backups "$repo")" = "1 2 3"
full_bytes=$(manifest_field "$repo" 1 "m['devices'][0]['bytesCopied']")
inc_bytes=$(manifest_field "$repo" 2 "m['devices'][0]['bytesCopied']")
echo "# bytes copied: full $full_bytes, incremental $inc_bytes"
check "the full backup holds the files (>= 19 MiB copied)" test "$full_bytes" -ge $((19 << 20))
check "the incremental copies only changed blocks (< 8 MiB)" test "$inc_bytes" -lt $((8 << 20))
check "the full backup skips free space (< 40 MiB of 96 MiB)" test "$full_bytes" -lt $((40 << 20))
check "the storage files are gone after the backups" test -z "$(ls -A "$storage")"

for n in 1 2 3; do
    check "restore of backup $n" backup restore --from "$repo" --backup "$n" --to "$scratch/restore$n.img"
    check "backup $n restored: every file as recorded at its snapshot" matches_record "$scratch/restore$n.img" "$scratch/rec$n"
done
check "verify passes" backup verify --from "$repo"
check "verify --against an image equal to backup 3" backup verify --from "$repo" --backup 3 --against "$scratch/restore3.img"
check "verify --against an image of another point fails" \
    bash -c "! '$blksnapctl' exec -- '$blksnap_backup' verify --from '$repo' --backup 3 --against '$scratch/restore2.img' >/dev/null 2>&1"

mkdir -p "$scratch/mnt2"
check "mount of backup 2" backup mount --from "$repo" --backup 2 --options noload "$scratch/mnt2"
cleanup_fn "'$blksnap_backup' umount --blksnapctl '$blksnapctl' '$scratch/mnt2' 2>/dev/null"
record "$scratch/mnt2" "$scratch/mnt2.md5"
check "the mounted backup 2 shows backup 2's files" cmp -s "$scratch/rec2" "$scratch/mnt2.md5"
check "the mounted backup is read-only" bash -c "! touch '$scratch/mnt2/x' 2>/dev/null"
check "umount" backup umount "$scratch/mnt2"
check "umount detached the routed device" bash -c "! mountpoint -q '$scratch/mnt2'"

qcow=$repo/0002/$(basename "$orig").qcow2
size=$(stat -c %s "$qcow")
offset=$((size / 2))
python3 - "$qcow" "$offset" <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2])); b = f.read(1); f.seek(int(sys.argv[2])); f.write(bytes([b[0] ^ 0xff]))
PY
check "verify fails after one byte of backup 2 is flipped" bash -c "! '$blksnapctl' exec -- '$blksnap_backup' verify --from '$repo' >'$scratch/verify.out' 2>&1"
check "verify names the damaged file" grep -q "0002/.*sha256" "$scratch/verify.out"
python3 - "$qcow" "$offset" <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2])); b = f.read(1); f.seek(int(sys.argv[2])); f.write(bytes([b[0] ^ 0xff]))
PY
check "verify passes again with the byte restored" backup verify --from "$repo"

check "prune --keep 2" backup prune --from "$repo" --keep 2
check "backups 2 and 3 are left" test "$(good_backups "$repo")" = "2 3"
check "backup 2 is now a full backup" test "$(manifest_field "$repo" 2 "m['kind'], m['merged']")" = "full [1]"
check "verify passes after prune" backup verify --from "$repo"
for n in 2 3; do
    rm -f "$scratch/restore$n.img"
    backup restore --from "$repo" --backup "$n" --to "$scratch/restore$n.img" >/dev/null
    check "backup $n after prune: every file as recorded" matches_record "$scratch/restore$n.img" "$scratch/rec$n"
done
check "no snapshot is left" bash -c "'$blksnapctl' status --json | python3 -c 'import json,sys; assert not json.load(sys.stdin)[\"snapshots\"]'"
finish
