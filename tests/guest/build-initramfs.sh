#!/usr/bin/env bash
# Builds the test initramfs for end-to-end runs: OUT_DIR/test-initramfs.cpio (uncompressed newc).
#
# usage: tests/guest/build-initramfs.sh OUT_DIR AGENT_BINARY
#
# Contents: the agent as /init (with the base entries of guest-agent/mkinitramfs.py), Debian's
# static busybox as /bin/busybox with links for the applets below, /bin/ymm-stress, and
# /bin/vsock-send and /bin/vsock-echo, which this script compiles from tests/guest/ymm_stress.c,
# vsock_send.c and vsock_echo.c (with vsock_common.h) into OUT_DIR/ymm-stress, OUT_DIR/vsock-send
# and OUT_DIR/vsock-echo first. The kernel command line then picks what runs, e.g.
# hull.exec="ls /proc | wc -l", hull.exec="/bin/ymm-stress 4 2000" or
# hull.exec="echo hello | vsock-send 5000" (see docs/agent.md).
#
# busybox-static is installed with apt-get if it is missing (needs root). AGENT_BINARY must be
# statically linked (guest-agent/build.sh makes one); HULL_TEST_INITRAMFS_ANY_AGENT=1 skips that
# check, for host tests that only look at the archive.
#
# The archive is deterministic (see mkinitramfs.py; SOURCE_DATE_EPOCH sets the mtimes). Nothing
# is rebuilt when OUT_DIR/test-initramfs.stamp records the same inputs: the agent, busybox,
# ymm_stress.c, the vsock_* sources, mkinitramfs.py, this script, the gcc version and
# SOURCE_DATE_EPOCH.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 OUT_DIR AGENT_BINARY" >&2
    exit 2
fi
out_dir=$1
agent=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
workspace=$(dirname "$(dirname "$here")")
mkinitramfs="$workspace/guest-agent/mkinitramfs.py"
stress_src="$here/ymm_stress.c"
vsock_srcs=("$here/vsock_common.h" "$here/vsock_send.c" "$here/vsock_echo.c")
busybox=/bin/busybox
applets=(sh ls wc cat echo true false sleep ps grep head seq yes uname kill mount dmesg)

log() { echo "build-initramfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

is_static() { ! readelf --program-headers --wide "$1" 2>/dev/null | grep -q INTERP; }

[[ -f $agent ]] || die "agent binary $agent not found"
if [[ ${HULL_TEST_INITRAMFS_ANY_AGENT:-} != 1 ]] && ! is_static "$agent"; then
    die "$agent is dynamically linked; the guest has no libraries (build it with guest-agent/build.sh)"
fi

# Debian's busybox-static: a static /bin/busybox.
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
    log "installing busybox-static"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends busybox-static >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends busybox-static >&2; } ||
        die "cannot install busybox-static"
fi
[[ -x $busybox ]] || die "$busybox missing after installing busybox-static"
is_static "$busybox" || die "$busybox is dynamically linked"
available=$("$busybox" --list)
for applet in "${applets[@]}"; do
    grep -qx -- "$applet" <<<"$available" || die "$busybox has no applet $applet"
done

mkdir -p "$out_dir"
cpio_out="$out_dir/test-initramfs.cpio"
stress_out="$out_dir/ymm-stress"
send_out="$out_dir/vsock-send"
echo_out="$out_dir/vsock-echo"
stamp="$out_dir/test-initramfs.stamp"
inputs=$(
    sha256sum "$agent" "$busybox" "$stress_src" "${vsock_srcs[@]}" "$mkinitramfs" \
        "${BASH_SOURCE[0]}" | cut -d' ' -f1
    gcc --version | head -n1
    echo "SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-}"
)
if [[ -f $cpio_out && -f $stress_out && -f $send_out && -f $echo_out && -f $stamp &&
    $(<"$stamp") == "$inputs" ]]; then
    log "$cpio_out is up to date"
    exit 0
fi

# -fno-tree-vectorize keeps the checking code scalar (see the comment in ymm_stress.c).
gcc -O2 -static -mavx2 -fno-tree-vectorize -Wall -Wextra -s \
    -o "$stress_out.tmp" "$stress_src"
mv -f "$stress_out.tmp" "$stress_out"
gcc -O2 -static -Wall -Wextra -s -o "$send_out.tmp" "$here/vsock_send.c"
mv -f "$send_out.tmp" "$send_out"
gcc -O2 -static -Wall -Wextra -s -o "$echo_out.tmp" "$here/vsock_echo.c"
mv -f "$echo_out.tmp" "$echo_out"

args=(
    --add "$busybox:/bin/busybox:0755"
    --add "$stress_out:/bin/ymm-stress:0755"
    --add "$send_out:/bin/vsock-send:0755"
    --add "$echo_out:/bin/vsock-echo:0755"
)
for applet in "${applets[@]}"; do
    args+=(--symlink "/bin/$applet:busybox")
done
python3 "$mkinitramfs" "$cpio_out" "$agent" "${args[@]}"
printf '%s\n' "$inputs" >"$stamp.tmp"
mv -f "$stamp.tmp" "$stamp"
log "$cpio_out: $(stat -c %s "$cpio_out") bytes"
