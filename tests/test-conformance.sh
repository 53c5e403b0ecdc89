#!/usr/bin/env bash
# The ioctl-level conformance suite (conformance/blksnap-conformance.c):
# every command and errno of ABI-v1.md, from C through the preload shim,
# against a private blksnapd with three attached 64 MiB image files (DEV1,
# DEV2, STORAGE_DEV) and, where / is on a block device, that device as the
# unrouted one. The suite prints an "ok - " line per check and its own
# summary. Skipped (77) only when this host cannot route devices, decided
# before anything starts: once blksnapd is up, a suite that cannot start is
# a failure.
source "$(dirname "$0")/functions.sh"
requires_root
[[ -e /sys/module/nbd || ( -e /dev/fuse && -e /dev/loop-control ) ]] ||
    skip "needs FUSE and loop devices, or the kernel's nbd driver"
minimum=262144
size=67108864
started=$(date +%s.%N)
cleanup_fn "awk -v a='$started' -v b=\"\$(date +%s.%N)\" 'BEGIN { printf \"# test-conformance: %.1f s\\n\", b - a }'"

suite=$top/.build/conformance/blksnap-conformance
mkdir -p "$top/.build/conformance"
cc -std=c11 -O2 -Wall -Wextra -Werror -I"$top/include" -o "$suite" "$top/conformance/blksnap-conformance.c"

start_blksnapd --diff-storage-minimum "$minimum"
nodes=()
for i in 1 2 3; do
    attach "$scratch/disk$i.img" "$size" >"$scratch/attached"
    nodes+=("$(cut -d' ' -f1 "$scratch/attached")")
    echo "# disk$i: $(cat "$scratch/attached")"
done

unrouted=()
rootdev=$(findmnt -no SOURCE / 2>/dev/null || true)
if [[ -n $rootdev && -b $rootdev ]]; then
    unrouted=(--unrouted "$rootdev")
else
    echo "# / is not on a block device ($rootdev): the unrouted check is skipped"
fi

set +e
"$blksnapctl" exec --preload "$top/.build/preload/libblksnap-preload.so" -- "$suite" \
    "${nodes[@]}" "${unrouted[@]}" --diff-storage-minimum "$minimum"
status=$?
set -e
# blksnapd is up and the devices are attached: nothing is missing that
# could excuse a skip.
if [[ $status -eq 77 ]]; then
    echo "test-conformance: FAILED: the suite could not start (exit 77) with blksnapd up and its devices attached" >&2
    status=1
fi
if [[ $status -ne 0 ]]; then
    echo "# blksnapd log (last 80 lines):"
    tail -n 80 "$scratch/blksnapd.log" | sed 's/^/#   /'
fi
exit "$status"
