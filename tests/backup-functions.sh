# Shared by the blksnap-backup scenarios (sourced after functions.sh).
blksnap_backup=$build/blksnap-backup
requires qemu-img; requires qemu-nbd; requires sha256sum; requires mkfs.ext4; requires md5sum
[ -x "$blksnap_backup" ] || { echo "$0: build first (swift build); missing $blksnap_backup" >&2; exit 1; }

# backup ARGS...: blksnap-backup through the preload shim (which passes
# every call through where a real /dev/blksnap exists: the module, CUSE).
backup() { "$blksnapctl" exec --preload "$top/.build/preload/libblksnap-preload.so" -- "$blksnap_backup" "$@"; }

# The difference storage disk: a routed device with ext4, as the upstream
# tools use one, so storage works the same on every kernel and in the lane
# (whose root file system is 9p, with no block device under it).
make_storage() {  # make_storage SIZE
    read -r storage_dev _ < <(attach "$scratch/storage.img" "$1")
    mkfs.ext4 -q -F "$storage_dev"
    mount_at "$storage_dev" "$scratch/storage"
    storage=$scratch/storage/diff
}

# record DIR FILE: every regular file of DIR with its md5, sorted.
record() { (cd "$1" && find . -type f ! -path './lost+found/*' -print0 | sort -z | xargs -0 -r md5sum) > "$2"; }

# matches_record DEV_OR_FILE RECORD: mounts it read-only and compares the
# whole file list and every checksum with the record.
matches_record() {
    local mnt=$scratch/check.$RANDOM
    mkdir -p "$mnt"
    if [ -b "$1" ]; then mount -o ro,noload "$1" "$mnt"; else mount -o ro,noload,loop "$1" "$mnt"; fi || return 1
    record "$mnt" "$mnt.md5"
    umount "$mnt"
    if ! cmp -s "$2" "$mnt.md5"; then diff "$2" "$mnt.md5" | head -5 >&2; return 1; fi
}

# write_file PATH MIB: random data.
write_file() { head -c $(($2 << 20)) /dev/urandom > "$1"; }

manifest_field() {  # manifest_field REPO N EXPR (python expression over m)
    python3 -c "import json,sys; m=json.load(open('$1/$(printf %04d "$2")/manifest.json')); print($3)"
}
good_backups() { backup list --from "$1" --json | python3 -c "import json,sys; print(' '.join(str(b['number']) for b in json.load(sys.stdin)['backups']))"; }
