#!/usr/bin/env bash
# blksnapd --metrics: a Prometheus scrape with curl before and after known
# I/O and a snapshot cycle on a routed device; every counter moves by
# exactly what was done.
source "$(dirname "$0")/functions.sh"
requires_root; requires_loop; requires_fuse
requires curl; requires python3; requires dd

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start_blksnapd --diff-storage-minimum 65536 --metrics "127.0.0.1:$port"
wait_for_grep "metrics at http://127.0.0.1:$port/metrics" "$scratch/blksnapd.log" 20

read -r orig orig_id < <(attach "$scratch/orig.img" $((64 << 20)))
read -r store _ < <(attach "$scratch/store.img" $((64 << 20)))

scrape() { curl -fsS --max-time 10 "http://127.0.0.1:$port/metrics" > "$1"; }
# value FILE NAME [LABELS]: the sample of NAME whose labels contain LABELS
# (e.g. device="7:64",op="write"), or "none".
value() {
    awk -v name="$2" -v labels="${3:-}" '
        $0 !~ /^#/ {
            split($1, parts, "{")
            if (parts[1] != name) next
            n = split(labels, want, ",")
            for (i = 1; i <= n; i++) if (index($1, want[i]) == 0) next
            print $2 + 0; found++
        }
        END { if (!found) print "none" }' "$1"
}
delta() { echo $(( $(value "$2" "$3" "${4:-}") - $(value "$1" "$3" "${4:-}") )); }
d="device=\"$orig_id\""

scrape "$scratch/m0"
check "the scrape is Prometheus text with TYPE lines" grep -q '^# TYPE blksnap_routed_bytes_total counter' "$scratch/m0"
check "two devices are routed" test "$(value "$scratch/m0" blksnap_routed_devices)" = 2
check "no snapshot is alive" test "$(value "$scratch/m0" blksnap_snapshots_alive)" = 0

# 16 direct writes of 64 KiB and 8 direct reads of 64 KiB.
dd if=/dev/urandom of="$orig" bs=64k count=16 oflag=direct status=none
dd if="$orig" of=/dev/null bs=64k count=8 iflag=direct status=none
scrape "$scratch/m1"
check "write bytes grew by 1 MiB" test "$(delta "$scratch/m0" "$scratch/m1" blksnap_routed_bytes_total "$d,op=\"write\"")" = 1048576
check "read bytes grew by 512 KiB" test "$(delta "$scratch/m0" "$scratch/m1" blksnap_routed_bytes_total "$d,op=\"read\"")" = 524288
writes=$(delta "$scratch/m0" "$scratch/m1" blksnap_routed_requests_total "$d,op=\"write\"")
reads=$(delta "$scratch/m0" "$scratch/m1" blksnap_routed_requests_total "$d,op=\"read\"")
check "write requests grew by 16 ($writes)" test "$writes" = 16
check "read requests grew by 8 ($reads)" test "$reads" = 8
check "no chunk was copied without a snapshot" test "$(delta "$scratch/m0" "$scratch/m1" blksnap_chunks_copied_total "$d")" = 0

# A snapshot: chunks are 256 KiB here (--chunk-minimum-shift 18 on 64 MiB),
# so writes into two chunks copy two, and a rewrite of one copies nothing.
id=$(blksnap create "$orig")
blksnap append-device "$id" "$store"
blksnap take "$id"
dd if=/dev/urandom of="$orig" bs=64k count=1 seek=0 oflag=direct status=none
dd if=/dev/urandom of="$orig" bs=64k count=1 seek=16 oflag=direct status=none
dd if=/dev/urandom of="$orig" bs=64k count=1 seek=1 oflag=direct status=none
scrape "$scratch/m2"
s="snapshot=\"$id\""
check "two chunks were copied on write" test "$(delta "$scratch/m1" "$scratch/m2" blksnap_chunks_copied_total "$d")" = 2
check "one snapshot is alive" test "$(value "$scratch/m2" blksnap_snapshots_alive)" = 1
check "one snapshot was created" test "$(delta "$scratch/m1" "$scratch/m2" blksnap_snapshots_created_total)" = 1
check "the difference storage is the store's 64 MiB" test "$(value "$scratch/m2" blksnap_diff_storage_capacity_bytes "$s")" = $((64 << 20))
check "two chunks fill 512 KiB of it" test "$(value "$scratch/m2" blksnap_diff_storage_filled_bytes "$s")" = $((512 << 10))
check "CREATE posted one low-free-space event" \
    test "$(delta "$scratch/m1" "$scratch/m2" blksnap_events_total 'kind="low_free_space"')" = 1
check "no corrupted event" test "$(value "$scratch/m2" blksnap_events_total 'kind="corrupted"')" = 0
check "one tracker started its CBT anew" \
    test "$(delta "$scratch/m1" "$scratch/m2" blksnap_cbt_trackers_total 'origin="started_anew"')" = 1
check "no tracker was restored" test "$(value "$scratch/m2" blksnap_cbt_trackers_total 'origin="restored"')" = 0
check "one device is tracked" test "$(value "$scratch/m2" blksnap_trackers)" = 1

blksnap destroy "$id"
scrape "$scratch/m3"
check "DESTROY leaves no snapshot alive" test "$(value "$scratch/m3" blksnap_snapshots_alive)" = 0
check "a destroyed snapshot's storage series is gone" test "$(value "$scratch/m3" blksnap_diff_storage_filled_bytes "$s")" = none
check "the counters keep their totals" test "$(delta "$scratch/m2" "$scratch/m3" blksnap_chunks_copied_total "$d")" = 0

check "a path other than /metrics is 404" \
    test "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/")" = 404
check "blksnapd refuses a metrics address without a port" \
    bash -c "! '$blksnapd' --state-dir '$scratch/other' --metrics 127.0.0.1 2>'$scratch/refused.txt'"
check "blksnapd refuses an unbracketed IPv6 address" \
    bash -c "! '$blksnapd' --state-dir '$scratch/other' --metrics ::1:9100 2>>'$scratch/refused.txt'"
blksnap remove "$orig"
finish
