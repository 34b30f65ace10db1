#!/usr/bin/env bash
# Builds the static hull-agent for the guest initramfs and copies it to OUT_DIR/hull-agent.
#
# usage: guest-agent/build.sh OUT_DIR
#
# glibc is linked statically (-C target-feature=+crt-static; the agent uses no NSS). The flags
# apply only to this build: it has its own target directory (target/agent) and an explicit
# --target, so the rest of the workspace and build scripts keep their usual flags and cache.
# Size settings come from CARGO_PROFILE_RELEASE_* variables, not from the workspace profile.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out_dir=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
workspace=$(dirname "$here")
target=x86_64-unknown-linux-gnu

export RUSTFLAGS="-C target-feature=+crt-static"
export CARGO_TARGET_DIR="$workspace/target/agent"
export CARGO_PROFILE_RELEASE_OPT_LEVEL=s
export CARGO_PROFILE_RELEASE_LTO=true
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
export CARGO_PROFILE_RELEASE_PANIC=abort
export CARGO_PROFILE_RELEASE_STRIP=symbols
export CARGO_PROFILE_RELEASE_DEBUG=false

cargo build --manifest-path "$workspace/Cargo.toml" --release -p hull-agent \
    --target "$target" >&2
bin="$CARGO_TARGET_DIR/$target/release/hull-agent"

# Statically linked: no program interpreter and no shared libraries needed.
if readelf --program-headers --wide "$bin" | grep -q 'INTERP'; then
    echo "error: $bin has a program interpreter (dynamically linked)" >&2
    exit 1
fi
if readelf --dynamic --wide "$bin" | grep -q '(NEEDED)'; then
    echo "error: $bin needs shared libraries:" >&2
    readelf --dynamic --wide "$bin" | grep '(NEEDED)' >&2
    exit 1
fi

mkdir -p "$out_dir"
install -m 0755 "$bin" "$out_dir/hull-agent.tmp"
mv -f "$out_dir/hull-agent.tmp" "$out_dir/hull-agent"
echo "$out_dir/hull-agent: $(stat -c %s "$out_dir/hull-agent") bytes, statically linked" >&2
