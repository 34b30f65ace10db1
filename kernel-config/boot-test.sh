#!/usr/bin/env bash
# Boot the guest kernel under QEMU with software emulation (TCG, no KVM) and
# check that it reaches /init and that user space makes system calls, once
# without and once with the hull_pvm_syscall flag. tests/pvm_syscall.c
# reproduces the PVM fault (a user-mode jump to entry_SYSCALL_64), so both
# sides of the patch are exercised here without a PVM host.
#
# Usage: kernel-config/boot-test.sh [WORK_DIR]
# Needs: qemu-system-x86, busybox-static, gcc with static glibc (libc6-dev).
# QEMU boots the ELF vmlinux through its PVH note (CONFIG_PVH).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=${1:-$(mktemp -d /tmp/hull-boot-test.XXXXXX)}
mkdir -p "$work"

log() { echo "boot-test: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in qemu-system-x86_64 gcc cpio; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install qemu-system-x86 gcc cpio)"
done
[[ -x /bin/busybox ]] || die "/bin/busybox not found (apt-get install busybox-static)"

vmlinux=$("$here/build.sh" "$work/kernel")
entry=$(awk '$3 == "entry_SYSCALL_64" { print $1 }' "$work/kernel/System.map")
[[ -n $entry ]] || die "entry_SYSCALL_64 not in System.map"

# An uncompressed newc initramfs: busybox, the test program and a shell script as /init.
root="$work/initramfs"
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp /bin/busybox "$root/bin/busybox"
gcc -O2 -static -Wall -o "$root/pvm_syscall" "$here/tests/pvm_syscall.c"
mknod "$root/dev/console" c 5 1 2>/dev/null || log "not root: no /dev/console in the initramfs"
cat >"$root/init" <<EOF
#!/bin/busybox sh
B=/bin/busybox
\$B mount -t devtmpfs devtmpfs /dev && exec </dev/console >/dev/console 2>&1
\$B echo "hull-init: uname -r = \$(\$B uname -r)"
\$B mount -t proc proc /proc
\$B mount -t sysfs sysfs /sys
\$B mount -t tmpfs tmpfs /tmp
\$B mkdir -p /sys/fs/cgroup && \$B mount -t cgroup2 cgroup2 /sys/fs/cgroup
\$B echo "hull-init: filesystems: \$(\$B awk '{ print \$NF }' /proc/filesystems | \$B tr '\n' ' ')"
\$B echo "hull-init: cgroup controllers: \$(\$B cat /sys/fs/cgroup/cgroup.controllers)"
\$B echo "hull-init: fork+exec: \$(\$B sh -c '\$B echo child ran')"
if \$B grep -q hull_pvm_syscall /proc/cmdline; then mode=on; else mode=off; fi
/pvm_syscall $entry \$mode
\$B echo "hull-init: done"
\$B reboot -f
EOF
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$work/initramfs.cpio"

# Boot once; the rest of the arguments are extra kernel parameters.
boot() {
    local name=$1; shift
    local start=$SECONDS
    timeout 300 qemu-system-x86_64 -M pc -m 256 -nographic -no-reboot \
        -kernel "$vmlinux" -initrd "$work/initramfs.cpio" \
        -append "console=ttyS0 reboot=k panic=1 $*" >"$work/$name.log" 2>&1 ||
        die "qemu failed or timed out, see $work/$name.log"
    log "$name: booted and powered off in $((SECONDS - start)) s (log: $work/$name.log)"
    grep -aE '(Linux version|^Kernel command line|^hull|^Run /init|^pvm_syscall|^reboot:)' "$work/$name.log" >&2 || true
}

expect() {
    grep -aq -- "$2" "$work/$1.log" || die "$1: expected '$2' in $work/$1.log"
}

boot plain
expect plain 'hull-init: uname -r = .*-hull'
expect plain 'pvm_syscall: ok: without hull_pvm_syscall the fault is a SIGSEGV'
expect plain 'hull-init: done'

boot pvm hull_pvm_syscall
expect pvm 'hull: PVM system call fixup enabled'
expect pvm 'pvm_syscall: all passed'
expect pvm 'hull-init: done'

log "all passed"
