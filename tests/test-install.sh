#!/usr/bin/env bash
# tools/install into a temporary DESTDIR: every file where it belongs, the
# unit passes systemd-analyze verify, the installed blksnapctl runs and
# finds the installed preload library, and --uninstall leaves nothing.
# Installs the debug build the tests use (--debug): what differs in a
# release install is only the compiler's optimisation.
source "$(dirname "$0")/functions.sh"
requires systemd-analyze; requires install

root=$scratch/root
prefix=/usr/local
# The release build and the docs are what tools/install makes; its output
# goes to a log, shown on failure.
if ! "$top/tools/install" --debug --destdir "$root" --prefix "$prefix" > "$scratch/install.log" 2>&1; then
    cat "$scratch/install.log"; exit 1
fi
p=$root$prefix
for f in sbin/blksnapd bin/blksnapctl; do check "$f is installed, executable" test -x "$p/$f"; done
check "the preload library is installed" test -f "$p/lib/blksnap/libblksnap-preload.so"
check "the preload library has no Swift runtime in it" \
    bash -c "! ldd '$p/lib/blksnap/libblksnap-preload.so' | grep -q swift"
for page in blksnapd.8 blksnapctl.8 blksnapctl.status.8 blksnapctl.attach.8 blksnapctl.detach.8 blksnapctl.exec.8; do
    check "man page $page is installed" test -s "$p/share/man/man8/$page"
done
check "blksnapctl.attach(8) carries the examples" grep -q 'blksnapctl attach /dev/sdb' "$p/share/man/man8/blksnapctl.attach.8"
for tool in blksnapd blksnapctl; do
    check "bash completion for $tool" grep -q "$tool" "$p/share/bash-completion/completions/$tool"
    check "zsh completion for $tool" grep -q "#compdef $tool" "$p/share/zsh/site-functions/_$tool"
    check "fish completion for $tool" grep -q "^complete -c '$tool'" "$p/share/fish/vendor_completions.d/$tool.fish"
done
check "bash completes blksnapctl's subcommands" \
    bash -c "source '$p/share/bash-completion/completions/blksnapctl' 2>/dev/null; COMP_WORDS=(blksnapctl ''); COMP_CWORD=1; COMP_LINE='blksnapctl '; COMP_POINT=11; _blksnapctl 2>/dev/null; printf '%s\n' \"\${COMPREPLY[@]}\" | grep -qx attach"

unit=$p/lib/systemd/system/blksnapd.service
check "the unit is installed" test -f "$unit"
check "the unit runs the installed blksnapd" grep -qx "ExecStart=$prefix/sbin/blksnapd \$BLKSNAPD_OPTIONS" "$unit"
for line in Type=notify DefaultDependencies=no KillMode=mixed; do
    check "the unit says $line" grep -qx "$line" "$unit"
done
check "the unit starts before local-fs-pre.target" grep -q '^Before=.*local-fs-pre.target' "$unit"
# verify checks the unit's syntax, its dependencies, that ExecStart's
# binary exists (under --root: the installed one) and that the
# Documentation= man pages exist (MANPATH: the installed ones).
if MANPATH=$p/share/man systemd-analyze verify --root="$root" "$unit" > "$scratch/verify.txt" 2>&1; then
    verified=yes
else
    verified=no
fi
cat "$scratch/verify.txt"
check "systemd-analyze verify passes on the installed unit" test "$verified" = yes
check "systemd-analyze verify printed no warning" test ! -s "$scratch/verify.txt"

# Without a store systemd sets no $FDSTORE and blksnapd's keeper holds the
# connections; with one, systemd holds them across a crash.
check "the unit gives blksnapd a file descriptor store" grep -Eq '^FileDescriptorStoreMax=[1-9][0-9]*$' "$unit"
check "the unit defers to a root storage daemon" grep -qx "ExecCondition=$prefix/sbin/blksnapd --join-root-daemon" "$unit"
hook=$root/usr/share/initramfs-tools/hooks/blksnap
boot_script=$root/usr/share/initramfs-tools/scripts/local-premount/blksnap
check "the initramfs-tools hook is installed, executable" test -x "$hook"
check "the hook copies the installed blksnapd" grep -q "^blksnapd=$prefix/sbin/blksnapd\$" "$hook"
check "the local-premount script is installed, executable" test -x "$boot_script"
for s in "$hook" "$boot_script"; do
    check "$(basename "$(dirname "$s")")/blksnap is valid sh" sh -n "$s"
    check "$(basename "$(dirname "$s")")/blksnap answers prereqs" test "$(sh "$s" prereqs)" = ""
done

check "the installed blksnapctl --help lists its commands" \
    bash -c "'$p/bin/blksnapctl' --help | grep -q 'attach'"
for sub in status attach detach exec; do
    check "blksnapctl $sub --help shows examples" bash -c "'$p/bin/blksnapctl' $sub --help | grep -q '^  blksnapctl $sub'"
done
check "blksnap-nbd-serve --help shows examples" bash -c "'$build/blksnap-nbd-serve' --help | grep -q '^  blksnap-nbd-serve --socket'"
check "the installed blksnapd --help shows examples" \
    bash -c "'$p/sbin/blksnapd' --help | grep -q 'blksnapd --metrics 127.0.0.1:'"
# exec finds lib/blksnap/libblksnap-preload.so beside its own prefix: the
# child sees it in LD_PRELOAD.
check "the installed blksnapctl finds the installed preload library" \
    bash -c "'$p/bin/blksnapctl' exec -- printenv LD_PRELOAD | grep -qx '$p/bin/../lib/blksnap/libblksnap-preload.so'"

check "tools/install --uninstall succeeds" "$top/tools/install" --uninstall --destdir "$root" --prefix "$prefix"
left=$(cd "$root" && find . -mindepth 1 | sort)
[ -z "$left" ] || printf 'left behind: %s\n' $left
check "nothing is left under DESTDIR" test -z "$left"
check "a second --uninstall says there is nothing" bash -c "! '$top/tools/install' --uninstall --destdir '$root' 2>/dev/null"

# A folder that was there before the install stays, with what it held.
mkdir -p "$root/usr/local/share/man/man8"; echo keep > "$root/usr/local/share/man/man8/other.8"
"$top/tools/install" --debug --no-build --destdir "$root" > /dev/null
"$top/tools/install" --uninstall --destdir "$root" > /dev/null
check "uninstall keeps a folder and file it did not make" test -f "$root/usr/local/share/man/man8/other.8"
finish
