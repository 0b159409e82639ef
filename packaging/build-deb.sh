#!/usr/bin/env bash
# Builds the Debian package of vmd: vmd_<version>_amd64.deb. See packaging/README.md.
#
#   packaging/build-deb.sh [--profile debug|release] [--out DIR] [--no-build]
#                          [--vmd PATH --vmctl PATH]
#
# --profile  which cargo profile to build or take the binaries from (default: release)
# --out      where the .deb goes (default: <target dir>/debian)
# --no-build do not run cargo; take target/<profile>/{vmd,vmctl} as they are
# --vmd, --vmctl
#            take these binaries (implies --no-build: nothing is built). Tests running under
#            `cargo test` must use this: a nested cargo would wait forever for the build
#            directory lock that `cargo test` holds.
#
# Prints the path of the package on stdout (and nothing else there).
set -euo pipefail

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

repo=$(cd "$(dirname "$0")/.." && pwd)
profile=release
out=
build=yes
vmd_bin=
vmctl_bin=

while (($#)); do
    case $1 in
    --profile) profile=${2:?--profile needs a value}; shift 2 ;;
    --profile=*) profile=${1#*=}; shift ;;
    --out) out=${2:?--out needs a value}; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    --no-build) build=no; shift ;;
    --vmd) vmd_bin=${2:?--vmd needs a value}; build=no; shift 2 ;;
    --vmd=*) vmd_bin=${1#*=}; build=no; shift ;;
    --vmctl) vmctl_bin=${2:?--vmctl needs a value}; build=no; shift 2 ;;
    --vmctl=*) vmctl_bin=${1#*=}; build=no; shift ;;
    -h | --help) usage ;;
    *) echo "build-deb: unknown argument: $1" >&2; usage ;;
    esac
done

case $profile in
debug | release) ;;
*) echo "build-deb: --profile must be debug or release, not '$profile'" >&2; exit 2 ;;
esac
if [[ -n $vmd_bin && -z $vmctl_bin || -z $vmd_bin && -n $vmctl_bin ]]; then
    echo "build-deb: give both --vmd and --vmctl, or neither" >&2
    exit 2
fi

for tool in dpkg-deb install; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool is missing" >&2; exit 1; }
done

target_dir=${CARGO_TARGET_DIR:-$repo/target}
[[ $target_dir = /* ]] || target_dir=$repo/$target_dir
out=${out:-$target_dir/debian}

if [[ $build = yes ]]; then
    # cargo's own output goes to stderr, so stdout stays the package path alone.
    cargo_profile=()
    [[ $profile = release ]] && cargo_profile=(--release)
    (cd "$repo" && cargo build --locked "${cargo_profile[@]}" --bin vmd --bin vmctl) >&2
fi
vmd_bin=${vmd_bin:-$target_dir/$profile/vmd}
vmctl_bin=${vmctl_bin:-$target_dir/$profile/vmctl}
for bin in "$vmd_bin" "$vmctl_bin"; do
    [[ -f $bin && -x $bin ]] || {
        echo "build-deb: $bin is missing or not executable (build it, or drop --no-build)" >&2
        exit 1
    }
done

# The version of the [package] section of Cargo.toml.
version=$(awk '
    /^\[/ { in_package = ($0 == "[package]"); next }
    in_package && /^version[ \t]*=/ {
        sub(/^version[ \t]*=[ \t]*"/, ""); sub(/".*/, ""); print; exit
    }' "$repo/Cargo.toml")
[[ $version =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || {
    echo "build-deb: no usable version in Cargo.toml ('$version')" >&2
    exit 1
}
arch=amd64
# A placeholder (packaging/README.md): set VMD_MAINTAINER for a package others install.
maintainer=${VMD_MAINTAINER:-vmd maintainers <maintainers@vmd.example.org>}

work=$(mktemp -d "${TMPDIR:-/tmp}/vmd-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/vmd_${version}_$arch
umask 022

# The file tree. Debian 12 (bookworm) keeps packaged units in /lib/systemd/system (the path
# `pkg-config --variable=systemdsystemunitdir systemd` gives there); systemd reads
# /usr/lib/systemd/system as well, and on merged-/usr systems both are the same directory.
install -d "$root/usr/sbin" "$root/usr/bin" "$root/lib/systemd/system" \
    "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" \
    "$root/usr/share/dbus-1/system-services" "$root/usr/share/dbus-1/system.d" \
    "$root/usr/share/dbus-1/interfaces" "$root/usr/share/polkit-1/actions" \
    "$root/usr/share/doc/vmd/examples" "$root/usr/share/man/man5" "$root/usr/share/man/man8" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d" "$root/DEBIAN"
install -m 0755 "$vmd_bin" "$root/usr/sbin/vmd"
install -m 0755 "$vmctl_bin" "$root/usr/bin/vmctl"
if [[ $profile = release ]] && command -v strip >/dev/null; then
    # What a Debian build does (the debug symbols would go to a -dbgsym package).
    strip --strip-unneeded --remove-section=.comment "$root/usr/sbin/vmd" "$root/usr/bin/vmctl"
fi
install -m 0644 "$repo/systemd/vmd.service" "$repo/systemd/vmd.socket" "$root/lib/systemd/system/"
install -m 0644 "$repo/systemd/sysusers.d/vmd.conf" "$root/usr/lib/sysusers.d/vmd.conf"
install -m 0644 "$repo/systemd/tmpfiles.d/vmd.conf" "$root/usr/lib/tmpfiles.d/vmd.conf"
install -m 0644 "$repo/dbus/org.vmd.vmd1.service" "$root/usr/share/dbus-1/system-services/"
install -m 0644 "$repo/dbus/org.vmd.vmd1.conf" "$root/usr/share/dbus-1/system.d/"
install -m 0644 "$repo/dbus/org.vmd.vmd1.xml" "$root/usr/share/dbus-1/interfaces/"
install -m 0644 "$repo/dbus/org.vmd.vmd1.policy" "$root/usr/share/polkit-1/actions/"
# The user's README (the repository's README.md is the developers' and points into the source).
install -m 0644 "$repo/packaging/doc/README" "$root/usr/share/doc/vmd/README"
install -m 0644 "$repo/packaging/examples/web.toml" "$repo/packaging/examples/lan.toml" \
    "$repo/packaging/examples/50-vmd.rules" "$root/usr/share/doc/vmd/examples/"
# Manual pages, compressed as Debian's policy wants (gzip -9n: no name or time stamp).
for page in vmctl.8 vmd.8 vmd.toml.5; do
    gzip -9n <"$repo/man/$page" >"$root/usr/share/man/man${page##*.}/$page.gz"
    chmod 0644 "$root/usr/share/man/man${page##*.}/$page.gz"
done
install -m 0644 "$repo/completions/vmctl.bash" "$root/usr/share/bash-completion/completions/vmctl"
install -m 0644 "$repo/completions/_vmctl" "$root/usr/share/zsh/vendor-completions/_vmctl"
install -m 0644 "$repo/completions/vmctl.fish" "$root/usr/share/fish/vendor_completions.d/vmctl.fish"
cat >"$root/usr/share/doc/vmd/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vmd

Files: *
Copyright: 2026 the vmd authors
License: ISC

License: ISC
 Permission to use, copy, modify, and/or distribute this software for any
 purpose with or without fee is hereby granted, provided that the above
 copyright notice and this permission notice appear in all copies.
 .
 THE SOFTWARE IS PROVIDED "AS IS" AND THE AUTHOR DISCLAIMS ALL WARRANTIES
 WITH REGARD TO THIS SOFTWARE INCLUDING ALL IMPLIED WARRANTIES OF
 MERCHANTABILITY AND FITNESS. IN NO EVENT SHALL THE AUTHOR BE LIABLE FOR
 ANY SPECIAL, DIRECT, INDIRECT, OR CONSEQUENTIAL DAMAGES OR ANY DAMAGES
 WHATSOEVER RESULTING FROM LOSS OF USE, DATA OR PROFITS, WHETHER IN AN
 ACTION OF CONTRACT, NEGLIGENCE OR OTHER TORTIOUS ACTION, ARISING OUT OF
 OR IN CONNECTION WITH THE USE OR PERFORMANCE OF THIS SOFTWARE.
EOF
# A native package's changelog: one entry for this build (dated SOURCE_DATE_EPOCH when set).
build_date=$(date -R ${SOURCE_DATE_EPOCH:+-d "@$SOURCE_DATE_EPOCH"})
gzip -9n >"$root/usr/share/doc/vmd/changelog.gz" <<EOF
vmd ($version) unstable; urgency=medium

  * Built from the vmd source tree by packaging/build-deb.sh.

 -- $maintainer  $build_date
EOF
chmod 0644 "$root/usr/share/doc/vmd/copyright" "$root/usr/share/doc/vmd/changelog.gz"

# Shared library dependencies, as dpkg-shlibdeps computes them when it is there (dpkg-dev);
# what a Rust binary links on Debian 12 otherwise.
shlibs=
if command -v dpkg-shlibdeps >/dev/null; then
    mkdir -p "$work/src/debian"
    printf 'Source: vmd\n\nPackage: vmd\nArchitecture: any\n' >"$work/src/debian/control"
    shlibs=$(cd "$work/src" && dpkg-shlibdeps -O "$root/usr/sbin/vmd" "$root/usr/bin/vmctl" 2>/dev/null |
        sed -n 's/^shlibs:Depends=//p') || shlibs=
fi
shlibs=${shlibs:-libc6, libgcc-s1}

installed_size=$(du -s -k --apparent-size --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: vmd
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $shlibs, systemd (>= 252), dbus, init-system-helpers (>= 1.54)
Section: admin
Priority: optional
Description: virtual machine manager: sandboxed KVM guests in systemd scopes
 vmd runs virtual machines on KVM. Each VM runs in its own helper process,
 which receives everything it needs as file descriptors and locks itself down
 (landlock, seccomp, an unprivileged user) before the guest runs.
 .
 The daemon (vmd.service) offers the D-Bus API org.vmd.vmd1 on the system bus
 and on /run/vmd/vmd.sock, and starts each VM in its own systemd scope;
 vmctl is its command-line client.
EOF

# Maintainer scripts, in the shape debhelper's dh_installsystemd gives them: units are enabled,
# started and stopped through deb-systemd-helper and deb-systemd-invoke (init-system-helpers),
# which keep an administrator's choices (a disabled or masked unit) and honour policy-rc.d.
# They never depend on systemd running (a chroot, a container build).
cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e

if [ "$1" = configure ]; then
    # The helpers' user. Works without a running systemd.
    systemd-sysusers /usr/lib/sysusers.d/vmd.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/vmd.conf ||
        echo "vmd: systemd-tmpfiles failed; vmd.service creates its directories itself" >&2
fi

if [ "$1" = configure ] || [ "$1" = abort-upgrade ] || [ "$1" = abort-deconfigure ] ||
    [ "$1" = abort-remove ]; then
    for unit in vmd.socket vmd.service; do
        # Lifts only the mask postrm set at removal.
        deb-systemd-helper unmask "$unit" >/dev/null || true
        # Enabled on the first installation (and after a purge); an administrator's
        # "systemctl disable" survives upgrades. Works without a running systemd.
        if deb-systemd-helper --quiet was-enabled "$unit"; then
            deb-systemd-helper enable "$unit" >/dev/null || true
        else
            deb-systemd-helper update-state "$unit" >/dev/null || true
        fi
    done

    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        # dbus-daemon notices new policy files itself (inotify); ask anyway, best effort.
        busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
            ReloadConfig >/dev/null 2>&1 || true
        # Listen now if enabled (also after a removal and reinstallation); no-op if listening.
        deb-systemd-invoke start vmd.socket >/dev/null || true
        if [ -n "$2" ]; then
            # An upgrade: restart (never stop + start) a running daemon, so that systemd keeps
            # its fd store and the new daemon re-adopts the running VMs.
            deb-systemd-invoke try-restart vmd.service >/dev/null || true
        fi
    fi
fi
exit 0
EOF

cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e

# On upgrade, nothing: the running daemon keeps going until postinst restarts it.
# On removal, stop it: the VMs' control sockets close with it and the VMs power off.
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    deb-systemd-invoke stop vmd.socket vmd.service >/dev/null || true
fi
exit 0
EOF

cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e

if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
        ReloadConfig >/dev/null 2>&1 || true
fi

if [ "$1" = remove ] && command -v deb-systemd-helper >/dev/null; then
    # Keeps the units from being started (by the socket, the bus) while the package is
    # removed but not purged; postinst lifts it on reinstallation.
    deb-systemd-helper mask vmd.socket vmd.service >/dev/null || true
fi

if [ "$1" = purge ]; then
    if command -v deb-systemd-helper >/dev/null; then
        # Forget that the units were enabled, and the mask.
        deb-systemd-helper purge vmd.socket vmd.service >/dev/null || true
        deb-systemd-helper unmask vmd.socket vmd.service >/dev/null || true
    fi
    rm -rf /run/vmd
    # /var/lib/vmd and /etc/vmd hold VM definitions and disk images: kept. So is the user
    # vmd-vm (Debian never removes system users).
    if [ -d /var/lib/vmd ] || [ -d /etc/vmd ]; then
        echo "vmd: /var/lib/vmd and /etc/vmd are kept; remove them by hand if you wish" >&2
    fi
fi
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

# A debug build is 100 MB of mostly debug info, packaged for tests: compress it quickly.
compression=()
[[ $profile = debug ]] && compression=(-Zgzip -z1)
mkdir -p "$out"
deb=$(cd "$out" && pwd)/vmd_${version}_$arch.deb
dpkg-deb --root-owner-group "${compression[@]}" --build "$root" "$deb" >&2
echo "$deb"
