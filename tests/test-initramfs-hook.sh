#!/usr/bin/env bash
# The shipped initramfs-tools hook, run by the real mkinitramfs for the
# stock-kernel lane's kernel (Debian 12's, fetched by the lane): with a
# root declaration, the image carries blksnapd and blksnapctl with every
# library they need (they run in a chroot of the unpacked image), the nbd,
# cuse and fuse modules, the declarations and the local-premount script in
# its ORDER; with nothing declared, the hook adds nothing. The lane boots
# the boot script itself (test-routed-root.sh); this covers what only
# mkinitramfs does: copy_exec, manual_add_modules, the script's ordering.
# Runs in a mount namespace of its own: /etc/blksnap and /lib/modules are
# overlays and /boot the kernel's, seen by mkinitramfs only; the host's
# are left as they are.
source "$(dirname "$0")/functions.sh"
requires_root
requires mkinitramfs; requires lsinitramfs; requires unmkinitramfs; requires unshare; requires chroot

# The lane's kernel: its modules are what manual_add_modules copies.
"$top/tools/stock-kernel-lane" --fetch-kernel > "$scratch/kernel.txt" 2> "$scratch/lane.log"
status=$?
[ $status = 77 ] && skip "$(grep -h '^skipped' "$scratch/lane.log" "$scratch/kernel.txt" | head -1)"
[ $status = 0 ] || { cat "$scratch/lane.log"; echo "not ok - tools/stock-kernel-lane --fetch-kernel failed ($status)"; exit 1; }
read -r kver kdir < "$scratch/kernel.txt"
check "the lane names its kernel and modules" test -d "$kdir/lib/modules/$kver"

prefix=$scratch/usr conf=$scratch/initramfs
if ! "$top/tools/install" --debug --no-build --prefix "$prefix" --unitdir "$scratch/unit" --initramfs-dir "$conf" \
        > "$scratch/install.log" 2>&1; then
    cat "$scratch/install.log"; echo "not ok - tools/install failed"; exit 1
fi
check "the hook is installed" test -x "$conf/hooks/blksnap"
check "the boot script is installed" test -x "$conf/scripts/local-premount/blksnap"
# What a Debian machine's initramfs.conf says, but only listed modules:
# the hooks' own are what this is about.
cat > "$conf/initramfs.conf" <<EOF
MODULES=list
BUSYBOX=auto
COMPRESS=gzip
EOF
: > "$conf/modules"

# build_image DECLARATIONS OUT: mkinitramfs, with /etc/blksnap holding the files
# of DECLARATIONS (a directory) and the kernel's modules where it looks.
build_image() {
    local upper=$2.overlay
    mkdir -p "$upper/etc/blksnap" "$upper/etc.work" "$upper/lib/modules" "$upper/lib.work"
    cp -a "$1"/. "$upper/etc/blksnap/"
    ln -s "$kdir/lib/modules/$kver" "$upper/lib/modules/$kver"
    unshare -m sh -c '
        set -e
        mount --make-rprivate /
        mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1/etc,workdir=$1/etc.work" /etc
        mount -t overlay overlay -o "lowerdir=/usr/lib,upperdir=$1/lib,workdir=$1/lib.work" /usr/lib
        mount --bind "$5/boot" /boot   # its config: which compressions the kernel reads
        mkinitramfs -d "$2" -o "$3" "$4"' sh "$upper" "$conf" "$2" "$kver" "$kdir" > "$2.log" 2>&1
}

mkdir -p "$scratch/declared" "$scratch/none"
echo "root /dev/vda1" > "$scratch/declared/root.conf"
image=$scratch/initrd.img
if build_image "$scratch/declared" "$image"; then made=yes; else made=no; cat "$image.log"; fi
check "mkinitramfs makes an image with the hook" test "$made" = yes
lsinitramfs "$image" > "$scratch/list.txt" 2>&1
has() { grep -Eq "$1" "$scratch/list.txt"; }
check "the image has blksnapd" has '^(usr/)?sbin/blksnapd$'
check "the image has blksnapctl" has '^(usr/)?bin/blksnapctl$'
check "the image has the declarations" has '^etc/blksnap/root\.conf$'
check "the image has the boot script" has '^scripts/local-premount/blksnap$'
for m in nbd cuse fuse; do check "the image has the $m module" has "/$m\.ko(\.[a-z]+)?$"; done
check "the image has the Swift runtime blksnapd links" has 'libswiftCore\.so'

unmkinitramfs "$image" "$scratch/unpacked" > /dev/null 2>&1
root=$scratch/unpacked
[ -d "$root/main" ] && root=$root/main  # an image with early microcode comes in parts
check "the boot script runs in local-premount's ORDER" grep -q '/scripts/local-premount/blksnap' "$root/scripts/local-premount/ORDER"
# Every library found by copy_exec: the programs start in the image alone,
# with /proc as the initramfs's init mounts it (Swift reads arguments there).
for p in sbin/blksnapd bin/blksnapctl; do
    check "$p runs in the image alone (--help)" \
        unshare -m sh -c 'mkdir -p "$1/proc" && mount -t proc proc "$1/proc" && chroot "$1" "/$2" --help' sh "$root" "$p"
done
check "without /proc, blksnapd refuses to start rather than ignore its arguments" \
    bash -c "chroot '$root' /sbin/blksnapd --help 2>&1 | grep -q '/proc is not mounted'"

if build_image "$scratch/none" "$scratch/plain.img"; then made=yes; else made=no; cat "$scratch/plain.img.log"; fi
check "mkinitramfs makes an image with nothing declared" test "$made" = yes
lsinitramfs "$scratch/plain.img" > "$scratch/list.txt" 2>&1
check "with nothing declared, no blksnapd in the image" bash -c "! grep -Eq '(^|/)blksnapd\$' '$scratch/list.txt'"

finish
