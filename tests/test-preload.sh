#!/usr/bin/env bash
# The preload shim on its own, against a small fake server
# (preload/fake-server.c), no blksnapd: what it exports, every interposed
# open and ioctl entry, dup and fcntl, threads, fork with a request in
# flight, signals during WAIT_EVENT, bad caller memory, a daemon that
# drops or dies. preload/test-preload.c prints an "ok -" line per check.
source "$(dirname "$0")/functions.sh"
requires cc; requires nm

"$top/tools/build-preload"
so=$top/.build/preload/libblksnap-preload.so

want="__open64_2 __open_2 __openat64_2 __openat_2 close dup dup2 dup3 fcntl fcntl64 ioctl open open64 openat openat64"
have=$(nm -D --defined-only "$so" | awk '{print $3}' | sort | tr '\n' ' ' | sed 's/ $//')
check "the shim exports only the interposed functions${have:+ (it exports: $have)}" [ "$have" = "$want" ]

flags=(-std=gnu11 -O2 -Wall -Wextra -Werror -U_FORTIFY_SOURCE -I"$top/include" -I"$top/Sources/CBlksnapABI/include")
cc "${flags[@]}" -o "$scratch/fake-server" "$top/preload/fake-server.c" -lpthread
cc "${flags[@]}" -o "$scratch/test-preload" "$top/preload/test-preload.c" -lpthread

# The program's checks count as this scenario's; its exit status says
# whether it got to the end.
while IFS= read -r line; do
    echo "$line"
    case $line in
        "ok - "*) passed=$((passed + 1)) ;;
        "not ok - "*) failed=$((failed + 1)) ;;
    esac
done < <(status=0
         timeout 600 env LD_PRELOAD="$so" "$scratch/test-preload" "$scratch/fake-server" 2>&1 || status=$?
         echo "$status" >"$scratch/status")
check "test-preload ran to its end (exit $(cat "$scratch/status"))" [ "$(cat "$scratch/status")" = 0 ]
finish
