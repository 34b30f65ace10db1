#!/usr/bin/env bash
# Build hull's guest kernel: an uncompressed ELF vmlinux from Debian's
# linux-source-6.12, configured as `make allnoconfig` + hull.config, with
# patches/*.patch applied. Results are cached by the hash of every input, so a
# second run with the same inputs only copies the cached file.
#
# Usage: kernel-config/build.sh OUT_DIR
#   Leaves OUT_DIR/vmlinux (and OUT_DIR/System.map) and prints the vmlinux path
#   on stdout; progress goes to stderr.
# Environment: HULL_CACHE_DIR (default ~/.cache/hull); the kernel cache is
#   $HULL_CACHE_DIR/kernel/<key>/{vmlinux,System.map,config}.
set -euo pipefail

readonly SRC_PKG=linux-source-6.12
readonly SRC_TARBALL=/usr/src/linux-source-6.12.tar.xz
# What building vmlinux needs (objtool needs libelf; xz unpacks the source).
readonly BUILD_DEPS=(build-essential flex bison libelf-dev bc xz-utils)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/hull.config"

log() { echo "kernel-config: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -eq 1 ]] || die "usage: $0 OUT_DIR"
out_dir=$1

# Packages from the list that are not installed.
missing_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            echo "$pkg"
    done
}

# Install packages with apt-get if any are missing (apt-get update only then).
ensure_packages() {
    local missing sudo=()
    mapfile -t missing < <(missing_packages "$@")
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "missing packages: ${missing[*]} (run as root to install them)"
        sudo=(sudo)
    fi
    log "installing ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# Copy a cached kernel to OUT_DIR (rename into place so readers never see half a file).
publish_out() {
    local from=$1 f
    mkdir -p "$out_dir"
    for f in vmlinux System.map; do
        cp -f "$from/$f" "$out_dir/.$f.tmp"
        mv -f "$out_dir/.$f.tmp" "$out_dir/$f"
    done
    echo "$(cd "$out_dir" && pwd)/vmlinux"
}

# Fail, naming the option, if anything hull.config sets did not land in .config.
verify_config() {
    local src=$1 config=$2 known line name value
    known=$(mktemp)
    # Every symbol any Kconfig file defines, to catch misspelt or renamed options.
    find "$src" -name 'Kconfig*' -type f -print0 |
        xargs -0 grep -hoE '^[[:space:]]*(menu)?config [A-Za-z0-9_]+' |
        awk '{print "CONFIG_" $2}' | sort -u >"$known"
    local errors=0
    while IFS= read -r line; do
        case $line in
            '# CONFIG_'*' is not set')
                log "hull.config: write '${line:2}' as CONFIG_...=n"; errors=1; continue ;;
            '' | '#'*) continue ;;
        esac
        if ! [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            log "hull.config: cannot parse line: $line"; errors=1; continue
        fi
        name=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
        if ! grep -qxF "$name" "$known"; then
            log "$name: no such Kconfig option in $SRC_PKG (misspelt or renamed?)"; errors=1
        elif [[ $value == n ]]; then
            if grep -q "^$name=" "$config"; then
                log "$name: hull.config says n, but the final .config has $(grep "^$name=" "$config") (selected by another option?)"
                errors=1
            fi
        elif ! grep -qxF "$name=$value" "$config"; then
            log "$name: hull.config says $value, but the final .config has:" \
                "$(grep -E "^(# )?$name[= ]" "$config" || echo 'nothing (unmet dependency)')"
            errors=1
        fi
    done <"$fragment"
    rm -f "$known"
    [[ $errors -eq 0 ]] || die "hull.config did not apply cleanly (see above)"
}

ensure_packages "$SRC_PKG"
src_version=$(dpkg-query -W -f='${Version}' "$SRC_PKG")

# The cache key covers every input: source version, compiler, fragment, patches, this script.
shopt -s nullglob
patches=("$here"/patches/*.patch)
key=$({
    echo "$SRC_PKG $src_version"
    gcc --version | head -n 1
    for f in "$fragment" "${patches[@]}" "$here/build.sh"; do
        echo "== ${f#"$here"/}"
        cat "$f"
    done
} | sha256sum | cut -c1-16)
cache_root="${HULL_CACHE_DIR:-$HOME/.cache/hull}/kernel"
cached="$cache_root/$key"

if [[ -f $cached/vmlinux ]]; then
    log "cached kernel $key ($SRC_PKG $src_version)"
    publish_out "$cached"
    exit 0
fi

# One build per key at a time; whoever waited finds the result in the cache.
mkdir -p "$cache_root"
exec 9>"$cache_root/$key.lock"
flock 9
if [[ -f $cached/vmlinux ]]; then
    publish_out "$cached"
    exit 0
fi

ensure_packages "${BUILD_DEPS[@]}"
[[ -f $SRC_TARBALL ]] || die "$SRC_TARBALL not found (is $SRC_PKG installed?)"

start=$SECONDS
# A killed build leaves only this work dir (wiped on the next attempt), never a
# half-written cache entry: the result is renamed into place at the end.
work="$cache_root/work-$key"
rm -rf "$work" "$cached.tmp"
mkdir -p "$work"
log "building kernel $key from $SRC_PKG $src_version in $work"

tar -xf "$SRC_TARBALL" -C "$work"
src="$work/${SRC_PKG}"
[[ -d $src ]] || die "$SRC_TARBALL did not unpack to $src"
for p in "${patches[@]}"; do
    log "applying ${p#"$here"/}"
    patch -d "$src" -p1 --forward --batch --quiet <"$p" || die "patch ${p#"$here"/} does not apply"
done

obj="$work/build"
# Fixed build user/host: the same inputs give the same `uname -v` text.
kmake=(make -C "$src" O="$obj" -s KBUILD_BUILD_USER=hull KBUILD_BUILD_HOST=hull)
"${kmake[@]}" allnoconfig KCONFIG_ALLCONFIG="$fragment" >&2
verify_config "$src" "$obj/.config"
log "configured; compiling vmlinux with $(nproc) jobs"
"${kmake[@]}" -j"$(nproc)" vmlinux >&2

# No debug info is built; dropping the ELF symbol table shrinks the file
# further (System.map keeps the symbols for reading guest addresses).
stage="$cached.tmp"
mkdir -p "$stage"
objcopy --strip-all "$obj/vmlinux" "$stage/vmlinux"
cp "$obj/System.map" "$stage/System.map"
cp "$obj/.config" "$stage/config"
full_size=$(stat -c %s "$obj/vmlinux")
mv -T "$stage" "$cached"
rm -rf "$work"

log "built in $((SECONDS - start)) s: vmlinux $(stat -c %s "$cached/vmlinux") bytes (unstripped $full_size)"
publish_out "$cached"
