#!/usr/bin/env bash
# The upstream v1 tools, unchanged (../shared/upstream/blksnap-v1, built by
# tools/build-upstream-v1), through the preload shim against a private
# blksnapd on routed devices: the whole `blksnap` CLI cycle
# (tests/upstream-cli-cycle.sh), then the C++ tests test_boundary,
# test_diff_storage and test_corrupt for one minute each (-u counts
# minutes; the shortest run). test_cbt and test_performance are empty stubs
# upstream, so there is nothing of them to run. test_diff_storage's --blksz
# sets the block size from --duration's value (an upstream bug), so it is
# not given.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse

status=0
upstream=$("$top/tools/build-upstream-v1") || status=$?
[ "$status" -eq 77 ] && skip "${upstream#skipped: }"
[ "$status" -eq 0 ] || { echo "$0: tools/build-upstream-v1 failed (exit $status)" >&2; exit 1; }
preload=$top/.build/preload/libblksnap-preload.so
through_shim() { echo "$blksnapctl" exec --preload "$preload" --; }

# The CLI cycle wants a small diff_storage_minimum (4 MiB), so that its
# low-space events come after a few MiB of writes.
diff_storage_minimum=8192
start_blksnapd --diff-storage-minimum $diff_storage_minimum
upstream_cli=($(through_shim) "$upstream/build/tools/blksnap/blksnap")
cycle_started=$SECONDS
source "$top/tests/upstream-cli-cycle.sh"
echo "# the CLI cycle: $((SECONDS - cycle_started)) s"
umount "$scratch/store"
"$blksnapctl" detach "$orig" >/dev/null
"$blksnapctl" detach "$store" >/dev/null

# The C++ tests with the module parameter the upstream shell tests load it
# with (diff_storage_minimum=262144, 128 MiB), all three at once on their
# own devices, to keep the scenario short.
stop_blksnapd "$blksnapd_pid"
start_blksnapd --diff-storage-minimum 262144
read -r boundary_dev _ < <(attach "$scratch/boundary.img" $((256 << 20)))
read -r corrupt_dev _ < <(attach "$scratch/corrupt.img" $((256 << 20)))
# test_diff_storage carves its storage out of the device it snapshots.
read -r diff_dev _ < <(attach "$scratch/diff.img" $((1 << 30)))
read -r files_dev _ < <(attach "$scratch/files.img" $((2 << 30)))
mkfs.ext4 -q -F "$files_dev"
mount_at "$files_dev" "$scratch/files"
mkdir "$scratch/files/boundary" "$scratch/files/corrupt"
run_cpp() {  # run_cpp NAME ARGS...: in the background, its log in $scratch/NAME.log
    local name=$1; shift
    (cd "$scratch" && exec $(through_shim) "$upstream/src/tests/$name" "$@") >"$scratch/$name.log" 2>&1 &
    cpp_pids+=("$!")
}
cpp_pids=()
cpp_started=$SECONDS
run_cpp test_boundary -u 1 --device "$boundary_dev" --diff_storage "$scratch/files/boundary/"
run_cpp test_corrupt -u 1 --device "$corrupt_dev" --diff_storage "$scratch/files/corrupt/"
run_cpp test_diff_storage -u 1 --device "$diff_dev"
names=(test_boundary test_corrupt test_diff_storage)
successes=("Success: boundary conditions" "Success: check corruption" "Success: diff storage")
for i in 0 1 2; do
    cpp_status=0
    wait "${cpp_pids[i]}" || cpp_status=$?
    log=$scratch/${names[i]}.log
    snapshots=$(grep -c -- "-- Create snapshot" "$log" || true)
    echo "# ${names[i]}: exit $cpp_status after $((SECONDS - cpp_started)) s, $snapshots snapshots"
    if ! check "${names[i]} -u 1 passes: exit 0, '${successes[i]}', at least one snapshot" \
        bash -c "[ $cpp_status = 0 ] && grep -q -- '--- ${successes[i]} ---' '$log' && [ $snapshots -ge 1 ]"; then
        echo "# the last lines of its log:"; tail -n 30 "$log" | sed 's/^/#   /'
    fi
done
finish
