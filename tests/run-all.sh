#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit and end-to-end tests (real /dev/kvm, the
# project's test guest), short fuzz runs of the control-protocol decoder and the virtio-blk
# request path, and a build of the benchmarks. Installs what it needs first (Debian packages,
# cargo-fuzz). Run as root on a Debian 12 machine with /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
command -v gcc >/dev/null || need_packages+=(gcc)
command -v objdump >/dev/null || need_packages+=(binutils)
# The daemon's tests boot a private systemd and drive it with real clients.
command -v machinectl >/dev/null || need_packages+=(systemd-container)
command -v gdbus >/dev/null || need_packages+=(libglib2.0-bin)
command -v dbus-daemon >/dev/null || need_packages+=(dbus)
# The desktop-client test talks to the daemon through Gio from Python.
/usr/bin/python3 -c 'import gi' 2>/dev/null || need_packages+=(python3-gi)
[ -x /usr/lib/polkit-1/polkitd ] || need_packages+=(polkitd)
command -v nsenter >/dev/null || need_packages+=(util-linux)
command -v dpkg-shlibdeps >/dev/null || need_packages+=(dpkg-dev)
# Disk images for the virtio-blk tests are made and checked with QEMU's own tools.
command -v qemu-img >/dev/null || need_packages+=(qemu-utils)
command -v qemu-io >/dev/null || need_packages+=(qemu-utils)
# The virtio-net tests make a network namespace with a tap and ping the guest from it.
command -v ip >/dev/null || need_packages+=(iproute2)
command -v ping >/dev/null || need_packages+=(iputils-ping)
# The package is checked with lintian, its manual pages with man, its shell completions with
# each shell, and vmctl's console in a terminal multiplexer.
command -v lintian >/dev/null || need_packages+=(lintian)
command -v man >/dev/null || need_packages+=(man-db)
command -v zsh >/dev/null || need_packages+=(zsh)
command -v fish >/dev/null || need_packages+=(fish)
[ -f /usr/share/bash-completion/bash_completion ] || need_packages+=(bash-completion)
command -v tmux >/dev/null || need_packages+=(tmux)
# The helper benchmark measures peak RSS with GNU time, like `/usr/bin/time -f %M`.
[ -x /usr/bin/time ] || need_packages+=(time)
if ((${#need_packages[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_packages[@]}"
fi
[ -e /dev/kvm ] || { echo "run-all: /dev/kvm is missing; the VMM tests need KVM" >&2; exit 1; }

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo bench --locked --no-run

# The control-protocol decoder and the virtio-blk request path under libFuzzer for a short while
# each (stable toolchain: -s none).
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
(cd fuzz && cargo fuzz run -s none decode_control -- -max_total_time=20 -dict=decode_control.dict 2>&1 |
    tail -n 3)
(cd fuzz && cargo fuzz run -s none virtio_blk -- -max_total_time=20 -timeout=10 2>&1 | tail -n 3)

# The main job of the README, end to end, exactly as the README runs it: the example packages the
# binaries cargo built next to it, so they are built first.
cargo build --release --locked
cargo run --release --locked --example daemon_demo

# The Linux test kernel (tests/linux/): built from Debian's linux-source-6.1 with the project's
# configuration, source changes and /init; it installs the packages it needs, takes a few minutes
# the first time and is cached under target/linux/ afterwards. tests/linux_guest.rs boots it, and
# tests/daemon.rs runs it through the daemon.
linux_kernel=$(tests/linux/build.sh)
echo "run-all: Linux test kernel: $linux_kernel"

# Every test; the Linux boot test last and uncaptured, so that a host without hardware
# virtualization says why it skips.
cargo test --all-targets --locked -- --skip a_stock_debian_kernel
cargo test --locked --test linux_boot -- --nocapture
