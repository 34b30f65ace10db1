#!/bin/busybox sh
# /init of the nested lane's level-1 machine (tests/lanes/nested.sh builds the initramfs).
#
# First it moves itself from the initramfs onto a tmpfs and switches root there: the
# initramfs cannot be pivot_root'ed away, and runc (the benchmark's reference) pivots. Then it
# loads kvm_amd, and runs each test program in /etc/programs under its deadline (or the
# command in /etc/exec), printing lines that nested.sh reads back on the host:
#   LANE_BEGIN NAME | LANE_SKIP NAME REASON | LANE_END NAME STATUS SECONDS | LANE_EXIT STATUS
# and finally powers L1 off, whatever happened.

if [ "$$" = 1 ] && [ ! -e /.switched ]; then
    /bin/busybox mkdir -p /proc /newroot
    /bin/busybox mount -t proc proc /proc
    /bin/busybox mount -t tmpfs -o mode=0755 tmpfs /newroot
    for entry in /*; do
        case $entry in /proc|/newroot) continue ;; esac
        /bin/busybox cp -a "$entry" /newroot/
    done
    /bin/busybox mkdir -p /newroot/proc
    /bin/busybox touch /newroot/.switched
    /bin/busybox umount /proc
    exec /bin/busybox switch_root /newroot /init
fi

/bin/busybox --install -s /bin
export PATH=/hull/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mkdir -p /proc /sys /dev /run /tmp /root /sys/fs/cgroup
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
hostname l1

uptime_s() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN{printf "%.1f", b-a}'; }

echo "L1: kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
while read -r ko; do
    params=
    [ "$ko" = kvm-amd.ko ] && params=$(cat /etc/kvm_amd.params)
    # shellcheck disable=SC2086 # the parameters are words
    insmod "/lib/modules/$ko" $params || echo "L1: insmod $ko $params failed"
done </lib/modules/order
if [ ! -c /dev/kvm ]; then
    echo "L1: no /dev/kvm after loading kvm_amd:"
    dmesg | grep -iE 'kvm|svm' | tail -5
fi
echo "L1: $(hull doctor 2>&1 | grep -m1 'kvm kind')"

export HULL_HULL_VMM=/hull/bin/hull-vmm HULL_HULL=/hull/bin/hull HULL_GUEST_DIR=/hull/guest
export HULL_KERNEL=/hull/guest/vmlinux HULL_INITRAMFS=/hull/guest/initramfs.cpio
export RUST_BACKTRACE=1
cd /tmp

status=0
if [ -f /etc/exec ]; then
    ( . /etc/exec )
    status=$?
else
    while read -r name deadline flag filters; do
        if [ "$flag" != - ] && ! grep -qw "$flag" /proc/cpuinfo; then
            reason=$(awk -v n="$name" '$1==n{$1=""; print substr($0,2)}' /etc/reasons 2>/dev/null)
            echo "LANE_SKIP $name ${reason:-needs CPU flag $flag}; this CPU has no $flag"
            continue
        fi
        echo "LANE_BEGIN $name"
        t0=$(uptime_s)
        # shellcheck disable=SC2086 # the filters are words
        timeout -k 10 "$deadline" "/t/$name" $filters </dev/null 2>&1
        rc=$?
        echo "LANE_END $name $rc $(since "$t0")"
        if [ "$rc" != 0 ]; then
            status=1
            # What a failed program left behind must not spoil the next one.
            pkill -9 -f 'hull-vmm|containerd' 2>/dev/null
        fi
    done </etc/programs
fi
echo "LANE_EXIT $status"
sync
poweroff -f
