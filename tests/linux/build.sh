#!/usr/bin/env bash
# Builds vmd's Linux test kernel from Debian's linux-source-6.1 package: `make tinyconfig`, the
# fragment config.fragment, the source changes in patches/ (modifications of Linux, GPL-2.0), and
# an embedded initramfs holding the project's own /init (init.c). Builds both vmlinux (ELF) and
# an uncompressed bzImage. Installs the Debian packages it needs (as root, with apt-get).
#
# The result is cached under ${CARGO_TARGET_DIR:-target}/linux/<key>/, where <key> hashes the
# fragment, the patches, init.c, the package version and RECIPE below (raise it when a change of
# this script changes what it builds): it is rebuilt only when one of them changes. Concurrent
# runs wait for each other. Output is quiet: the build log is target/linux/build.log, and its tail is
# printed when something fails. The last line printed is the vmlinux path (the bzImage is next
# to it).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
case $target in /*) ;; *) target=$repo/$target ;; esac
out_root=$target/linux
log=$out_root/build.log
jobs=${LINUX_BUILD_JOBS:-2}
RECIPE=1
mkdir -p "$out_root"
exec 9>"$out_root/.lock"
flock 9

# Packages: the source, a compiler and kernel build tools.
packages=(linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils patch)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "linux-guest build: installing ${missing[*]}" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >"$out_root/apt.log" 2>&1; then
        tail -n 30 "$out_root/apt.log" >&2
        echo "linux-guest build: cannot install ${missing[*]}" >&2
        exit 1
    fi
fi

version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
tarball=$(dpkg -L linux-source-6.1 | grep -E '/linux-source-6\.1\.tar\.(xz|bz2|gz)$' | head -n 1)
[ -n "$tarball" ] || { echo "linux-guest build: no source tarball in linux-source-6.1" >&2; exit 1; }

key=$(
    {
        echo "recipe $RECIPE, linux-source-6.1 $version"
        cd "$here"
        for f in config.fragment init.c patches/*.patch; do
            echo "$f"
            sha256sum <"$f"
        done
    } | sha256sum | cut -c1-16
)
out=$out_root/$key
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    echo "$out/vmlinux"
    exit 0
fi

: >"$log"
fail() {
    echo "linux-guest build: $1 (log: $log)" >&2
    tail -n 40 "$log" >&2
    exit 1
}
step() { echo "== $*" >>"$log"; }

# A fresh tree for this key (older ones are removed: a tree is about 1.4 GB).
work=$out_root/build-$key
find "$out_root" -mindepth 1 -maxdepth 1 -name 'build-*' ! -name "build-$key" -exec rm -rf {} +
rm -rf "$work"
mkdir -p "$work"
step "unpack $tarball ($version)"
tar -xf "$tarball" -C "$work" >>"$log" 2>&1 || fail "cannot unpack $tarball"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n 1)
[ -n "$src" ] || fail "no linux-source-* directory in $tarball"
for p in "$here"/patches/*.patch; do
    step "patch $(basename "$p")"
    patch -d "$src" -p1 --forward --batch <"$p" >>"$log" 2>&1 || fail "cannot apply $(basename "$p")"
done

# The initramfs: /init, /dev/console (the kernel opens it for init's stdio), mount points.
step "build /init"
gcc -Os -Wall -Wextra -Werror -static -nostdlib -mgeneral-regs-only -fno-pie -no-pie \
    -fno-stack-protector -fno-asynchronous-unwind-tables -fno-tree-loop-distribute-patterns \
    -fno-builtin -Wl,--build-id=none -o "$work/init" "$here/init.c" >>"$log" 2>&1 ||
    fail "cannot build /init"
cat >"$work/initramfs.list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
dir /proc 0555 0 0
dir /sys 0555 0 0
file /init $work/init 0755 0 0
LIST

step "configure"
{
    cat "$here/config.fragment"
    echo "CONFIG_INITRAMFS_SOURCE=\"$work/initramfs.list\""
} >"$work/fragment.config"
make -C "$src" ARCH=x86_64 tinyconfig >>"$log" 2>&1 || fail "make tinyconfig failed"
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$work/fragment.config" \
    >>"$log" 2>&1 || fail "merge_config.sh failed"
make -C "$src" ARCH=x86_64 olddefconfig >>"$log" 2>&1 || fail "make olddefconfig failed"
# Every option of the fragment must have survived (a misspelt or unmet one is dropped silently).
while IFS= read -r line; do
    case $line in
    CONFIG_*=*)
        grep -qxF -- "$line" "$src/.config" || fail "config: '$line' did not take effect"
        ;;
    "# CONFIG_"*" is not set")
        name=${line#\# }
        name=${name%% *}
        ! grep -q "^$name=" "$src/.config" || fail "config: $name is set, the fragment turns it off"
        ;;
    esac
done <"$work/fragment.config"

step "make vmlinux bzImage"
make -C "$src" ARCH=x86_64 -j"$jobs" vmlinux bzImage >>"$log" 2>&1 || fail "the kernel build failed"

mkdir -p "$out.tmp"
cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$src/.config" "$src/System.map" "$work/init" "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
# Keep only this build's outputs and tree.
find "$out_root" -mindepth 1 -maxdepth 1 -type d ! -name "$key" ! -name "build-$key" -exec rm -rf {} +
echo "$out/vmlinux"
