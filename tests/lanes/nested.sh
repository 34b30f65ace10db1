#!/usr/bin/env bash
# The nested AMD lane: hull's hardware-KVM path on a machine without hardware virtualisation.
#
# QEMU emulates (TCG) an AuthenticAMD CPU with SVM and nested paging; it boots Debian's generic
# kernel (level 1, "L1") from an initramfs made here; L1 loads kvm and kvm_amd, so its
# /dev/kvm is (emulated) AMD-V, not PVM, and hull takes the path hardware users take. Inside
# L1 the given test programs run one after another, each under its own deadline; each test's
# name and result comes back on the serial console and is printed here, prefixed with the
# program's name. Intel VT-x cannot be had this way (TCG does not emulate VMX).
#
# usage: tests/lanes/nested.sh [options] PROGRAM[=FILTER,...]...
#   PROGRAM  a cargo test program of the workspace (a path to the compiled binary, or a name:
#            the newest target/release/deps/NAME-*); FILTERs are passed to it as libtest
#            filters (names of tests to run). The basename before '-' is the program's name.
#   --exec 'CMD'         run a shell command in L1 instead of test programs (for benchmarks
#                        and by-hand checks; its exit status is the lane's)
#   --require NAME=FLAG  NAME is only meaningful with CPU flag FLAG in L1; without it NAME is
#                        reported as skipped, with REASON from --reason
#   --reason NAME=TEXT   why NAME needs its flag (printed with the skip)
#   --skip-test NAME/TEST=TEXT
#                        program NAME runs without its test TEST (a libtest --skip), which is
#                        reported as skipped with TEXT; for what cannot finish in this lane
#   --deadline SECONDS   each program's deadline inside L1 (default 900)
#   --file SRC:DEST      one more file for L1 (repeatable)
#   --host-bin PATH      a host program copied to the same path in L1 with its libraries
#   --module NAME        one more L1 module, loaded with its dependencies after kvm_amd
# environment (all optional):
#   HULL_CACHE_DIR   cache root (default ~/.cache/hull); L1's kernel and module set are kept in
#                    $HULL_CACHE_DIR/nested/<hash of their inputs>
#   NESTED_CPU       QEMU -cpu (default max,-xsave: QEMU's SVM emulation never delivers the
#                    XSETBV exit, so with XSAVE L1's KVM keeps a stale XCR0 and guests' AVX faults)
#   NESTED_MEM_MIB   L1 memory (default 3072)     NESTED_SMP  L1 vCPUs (default 1)
#   NESTED_KVM_AMD   kvm_amd parameters (default "npt=1 nested=0")
#   NESTED_WORK      scratch directory (default ${TMPDIR:-/tmp}/hull-nested-$UID)
#   HULL_VMM HULL    the binaries to test (default target/release/{hull-vmm,hull})
#   HULL_SHIM        containerd-shim-hull-v2 for the cri test (default: beside HULL)
#   HULL_GUEST_DIR   vmlinux, initramfs.cpio, test-initramfs.cpio (default build/guest)
# Exit status: 0 when every program passed (or was skipped), 1 when one failed, timed out or
# was not run, 2 on a usage or set-up error, 3 when QEMU failed or hung.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
workspace=$(cd "$here/../.." && pwd)
cache_root=${HULL_CACHE_DIR:-$HOME/.cache/hull}
work=${NESTED_WORK:-${TMPDIR:-/tmp}/hull-nested-$(id -u)}
cpu=${NESTED_CPU:-max,-xsave}
mem_mib=${NESTED_MEM_MIB:-3072}
smp=${NESTED_SMP:-1}
kvm_amd_params=${NESTED_KVM_AMD-npt=1 nested=0}
hull_vmm=${HULL_VMM:-$workspace/target/release/hull-vmm}
hull=${HULL:-$workspace/target/release/hull}
guest_dir=${HULL_GUEST_DIR:-$workspace/build/guest}

log() { echo "nested: $*" >&2; }
die() { log "error: $*"; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2; }

deadline=900
exec_cmd=
programs=()
files=()
# `ip`: the network tests build their namespaces, veths and bridges with it, as CNI would.
host_bins=(/usr/bin/timeout /usr/sbin/ip)
modules=()
declare -A requires=() reasons=() skip_args=()
skip_notes=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --exec) exec_cmd=${2:?}; shift 2 ;;
        --require) requires[${2%%=*}]=${2#*=}; shift 2 ;;
        --reason) reasons[${2%%=*}]=${2#*=}; shift 2 ;;
        --skip-test)
            spec=${2:?}; target=${spec%%=*}
            [[ $spec == */*=?* && $target == */?* ]] || die "--skip-test takes NAME/TEST=REASON, not '$spec'"
            skip_args[${target%%/*}]+=" --skip ${target#*/}"
            skip_notes+=("$target: skipped (${spec#*=})")
            shift 2 ;;
        --deadline) deadline=${2:?}; shift 2 ;;
        --file) files+=("${2:?}"); shift 2 ;;
        --host-bin) host_bins+=("${2:?}"); shift 2 ;;
        --module) modules+=("${2:?}"); shift 2 ;;
        -h|--help) usage ;;
        -*) die "unknown option $1" ;;
        *) programs+=("$1"); shift ;;
    esac
done
[[ ${#programs[@]} -gt 0 || -n $exec_cmd ]] || usage
[[ $deadline =~ ^[0-9]+$ ]] || die "--deadline takes whole seconds, not '$deadline'"

for f in "$hull_vmm" "$hull" "$guest_dir/vmlinux" "$guest_dir/initramfs.cpio" \
    "$guest_dir/test-initramfs.cpio" /bin/busybox; do
    [[ -f $f ]] || die "$f is missing (run \`make kernel agent build\` first)"
done
for tool in qemu-system-x86_64 cpio modprobe depmod xz apt-get dpkg strip; do
    command -v "$tool" >/dev/null || die "$tool is missing (make deps installs it)"
done

# --- Level 1's kernel and module set, cached by a hash of their inputs. -----------------------

# The Debian kernel package behind linux-image-amd64 (its ABI name) and its version.
l1_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}
pkg=$(l1_package)
if [[ -z $pkg ]]; then
    log "apt has no package list yet: apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    pkg=$(l1_package)
fi
[[ -n $pkg ]] || die "apt knows no linux-image-amd64 dependency: cannot fetch L1's kernel"
pkg_version=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2}')
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown)
# tun, veth, bridge and tc's ingress qdisc, u32 filter and mirred action: hull's networking.
all_modules=(kvm_amd overlay tun veth bridge sch_ingress cls_u32 act_mirred "${modules[@]}")
key=$( {
    echo "$pkg $pkg_version busybox $busybox_version"
    echo "modules ${all_modules[*]}"
    sed -n '/^# --- Level 1/,/^# --- end of level 1/p' "$0"
} | sha256sum | cut -c1-16)
l1=$cache_root/nested/$key

build_l1() {
    local tmp=$l1.tmp.$$ kver ko name
    rm -rf "$tmp"
    mkdir -p "$tmp/deb" "$tmp/root"/{bin,lib/modules}
    log "fetching $pkg $pkg_version for L1"
    (cd "$tmp/deb" && apt-get download -o APT::Sandbox::User=root "$pkg=$pkg_version" >&2)
    dpkg -x "$tmp"/deb/*.deb "$tmp/pkg"
    kver=$(basename "$(ls -d "$tmp"/pkg/lib/modules/*/ | head -1)")
    depmod -b "$tmp/pkg" "$kver"
    cp "$tmp/pkg/boot/vmlinuz-$kver" "$tmp/vmlinuz"
    # The modules in load order, decompressed (busybox's insmod reads plain .ko files).
    : >"$tmp/root/lib/modules/order"
    for name in "${all_modules[@]}"; do
        modprobe -d "$tmp/pkg" -S "$kver" --show-depends "$name" | awk '$1=="insmod"{print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        name=$(basename "$ko")
        case $ko in
            *.ko.xz) xz -dc "$ko" >"$tmp/root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
            *.ko.zst) zstd -qdc "$ko" >"$tmp/root/lib/modules/${name%.zst}"; name=${name%.zst} ;;
            *) cp "$ko" "$tmp/root/lib/modules/$name" ;;
        esac
        echo "$name" >>"$tmp/root/lib/modules/order"
    done
    cp /bin/busybox "$tmp/root/bin/busybox"
    (cd "$tmp/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$tmp/base.cpio"
    echo "$kver" >"$tmp/kernel-release"
    rm -rf "$tmp/deb" "$tmp/pkg" "$tmp/root"
    rm -rf "$l1"
    mv "$tmp" "$l1"
}
# --- end of level 1 --------------------------------------------------------------------------

if [[ ! -f $l1/base.cpio ]]; then
    build_l1
else
    log "L1 from the cache ($l1)"
fi

# --- What this run brings into L1: hull, the guest, the test programs, host programs. ------

rm -rf "$work"
payload=$work/payload
mkdir -p "$payload"/{hull/bin,hull/guest,t,etc}
cp "$hull_vmm" "$hull" "$payload/hull/bin/"
cp "$guest_dir"/{vmlinux,initramfs.cpio,test-initramfs.cpio} "$payload/hull/guest/"
cp "$here/nested-init.sh" "$payload/init"
chmod +x "$payload/init"

names=()
for spec in "${programs[@]}"; do
    prog=${spec%%=*}
    filters=
    [[ $spec == *=* ]] && filters=${spec#*=}
    if [[ $prog != */* ]]; then
        # The newest build of the test program (cargo names them NAME-HASH).
        prog=$(ls -t "$workspace"/target/release/deps/"$prog"-* 2>/dev/null |
            grep -v '\.d$' | head -1) || true
        [[ -n $prog ]] || die "no compiled test program ${spec%%=*} in target/release/deps"
    fi
    [[ -x $prog ]] || die "$prog is not an executable test program"
    name=$(basename "$prog")
    name=${name%-*}
    # Debug sections are only weight here; the symbol table stays for backtraces.
    strip --strip-debug -o "$payload/t/$name" "$prog"
    names+=("$name")
    printf '%s %s %s %s%s\n' "$name" "$deadline" "${requires[$name]:--}" "${filters//,/ }" \
        "${skip_args[$name]:-}" \
        >>"$payload/etc/programs"
    [[ -n ${reasons[$name]:-} ]] && printf '%s %s\n' "$name" "${reasons[$name]}" >>"$payload/etc/reasons"
    if [[ $name == containerd ]]; then
        for b in containerd ctr containerd-shim-runc-v2 tar sha256sum; do
            path=$(command -v "$b") || die "the containerd test needs $b"
            host_bins+=("$path")
        done
    fi
    # The CRI test: containerd with its CRI plugin, runc for the runc handler, Debian's CNI
    # plugins (bridge and veth are among L1's modules; no netfilter is, so the test leaves
    # portmap out of its conflist there and keeps ipMasq off), and hull's shim beside hull,
    # where the test looks for it when HULL_CONTAINERD_SHIM_HULL_V2 is not set.
    if [[ $name == cri ]]; then
        for b in containerd ctr containerd-shim-runc-v2 runc tar sha256sum; do
            path=$(command -v "$b") || die "the cri test needs $b"
            host_bins+=("$path")
        done
        if [[ ! -x /usr/lib/cni/bridge ]]; then
            log "the cri test needs Debian's CNI plugins: apt-get install containernetworking-plugins"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                containernetworking-plugins >&2 || true
        fi
        for plugin in bridge host-local loopback; do
            [[ -x /usr/lib/cni/$plugin ]] ||
                die "the cri test needs /usr/lib/cni/$plugin (apt-get install containernetworking-plugins)"
            host_bins+=("/usr/lib/cni/$plugin")
        done
        # containerd's CRI copies the node's /etc/hosts into each sandbox.
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$payload/etc/hosts"
        shim=${HULL_SHIM:-$(dirname "$hull")/containerd-shim-hull-v2}
        # Without it the test's hull case fails, saying so.
        if [[ -f $shim ]]; then
            cp "$shim" "$payload/hull/bin/"
        fi
    fi
done
[[ -n $exec_cmd ]] && printf '%s\n' "$exec_cmd" >"$payload/etc/exec"
for f in "${files[@]}"; do
    mkdir -p "$payload$(dirname "${f#*:}")"
    cp -a "${f%%:*}" "$payload${f#*:}"
done
# Host programs and the shared libraries of everything dynamically linked (glibc's loader
# included), at the same paths as on the host.
for bin in "${host_bins[@]}"; do
    mkdir -p "$payload$(dirname "$bin")"
    cp -L "$bin" "$payload$bin"
done
for bin in "$payload"/hull/bin/* "${host_bins[@]}" "$payload"/t/*; do
    [[ -e $bin ]] || continue
    ldd "$bin" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do
        [[ -e $payload$lib ]] && continue
        mkdir -p "$payload$(dirname "$lib")"
        cp -L "$lib" "$payload$lib"
    done
done
echo "${kvm_amd_params}" >"$payload/etc/kvm_amd.params"
# Two archives one after the other: the kernel unpacks both (cached base first).
(cd "$payload" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$work/payload.cpio"
cat "$l1/base.cpio" "$work/payload.cpio" >"$work/l1.cpio"
log "L1: Debian $pkg ($(cat "$l1/kernel-release")), -cpu $cpu, ${mem_mib} MiB," \
    "initramfs $(du -m "$work/l1.cpio" | cut -f1) MiB; programs: ${names[*]:-(--exec)}"

# --- Boot L1 and follow its console. ----------------------------------------------------------

# The whole run's deadline: each program's, plus L1's boot and module loads.
total=$(( (${#names[@]} > 0 ? ${#names[@]} : 1) * deadline + 300 ))
qemu=(qemu-system-x86_64 -accel tcg -M pc -cpu "$cpu" -m "$mem_mib" -smp "$smp"
    -nodefaults -no-reboot -display none -serial stdio -monitor none
    -kernel "$l1/vmlinuz" -initrd "$work/l1.cpio"
    -append "console=ttyS0 panic=-1 mitigations=off quiet loglevel=3")
console=$work/console.log
started=$SECONDS
# However this script ends, no QEMU of this run outlives it.
trap 'pkill -TERM -f -- "-initrd $work/l1.cpio" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM
exit_status=
declare -A result=()
passed=0 failed=0 skipped=0
while IFS= read -r line; do
    line=${line//$'\r'/}
    printf '%s\n' "$line" >>"$console"
    case $line in
        "LANE_EXIT "*) exit_status=${line#LANE_EXIT } ;;
        "LANE_SKIP "*)
            rest=${line#LANE_SKIP }
            echo "nested: ${rest%% *}: skipped (${rest#* })"
            result[${rest%% *}]=skipped; skipped=$((skipped + 1)) ;;
        "LANE_BEGIN "*) echo "nested: == ${line#LANE_BEGIN }" ;;
        "LANE_END "*)
            read -r _ name rc secs <<<"$line"
            if [[ $rc == 0 ]]; then
                result[$name]=passed
            elif [[ $rc == 124 || $rc == 137 ]]; then
                result[$name]="timed out after $deadline s"
            else
                result[$name]="failed (exit $rc)"
            fi
            echo "nested: == $name: ${result[$name]}, ${secs} s" ;;
        "test "*" ... ok") passed=$((passed + 1)); echo "nested: $line" ;;
        "test "*" ... FAILED") failed=$((failed + 1)); echo "nested: $line" ;;
        "test "*" ... ignored"*|"test result: "*) echo "nested: $line" ;;
        *) printf '  | %s\n' "$line" ;;
    esac
done < <(timeout -k 10 "$total" "${qemu[@]}" </dev/null 2>&1; echo "QEMU_STATUS $?")
elapsed=$((SECONDS - started))

status=0
qemu_status=$(awk '/^QEMU_STATUS /{s=$2} END{print s}' "$console" 2>/dev/null || true)
if [[ -z $exit_status ]]; then
    log "QEMU ended after ${elapsed} s without L1's exit line (QEMU status ${qemu_status:-?}," \
        "124 = hung past ${total} s); console: $console"
    status=3
fi
not_run=()
for name in "${names[@]}"; do
    case ${result[$name]:-} in
        passed|skipped) ;;
        "") not_run+=("$name"); status=$((status ? status : 1)) ;;
        *) status=$((status ? status : 1)) ;;
    esac
done
if [[ -n $exec_cmd && -n $exit_status && $exit_status != 0 ]]; then
    status=$((status ? status : 1))
fi
if [[ ${#names[@]} -gt 0 && -n $exit_status && $exit_status != 0 && $status == 0 ]]; then
    status=1
fi
[[ ${#not_run[@]} -eq 0 ]] || log "not run or no result: ${not_run[*]}"
# The single tests left out of programs that ran (--skip-test).
for note in "${skip_notes[@]}"; do
    [[ -n ${result[${note%%/*}]:-} ]] || continue
    echo "nested: $note"
    skipped=$((skipped + 1))
done
echo "nested lane: ${passed} tests passed, ${failed} failed; ${skipped} programs or tests skipped;" \
    "${elapsed} s in all"
exit "$status"
