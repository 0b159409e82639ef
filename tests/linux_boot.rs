//! Boots a stock Debian cloud kernel with a busybox initramfs through `vmd run` on 2 vCPUs: the
//! init script prints a marker and the CPU count, then powers off through ACPI.
//!
//! Needs hardware virtualization (kvm_intel or kvm_amd). Where /dev/kvm is the kvm_pvm module,
//! which emulates every instruction of a non-PVM guest kernel and stops on some of them, a stock
//! kernel cannot finish booting, so the test says so and skips. The kernel and busybox come
//! from Debian's packages at test time (`apt-get download`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::run_scenario;

/// Why this host cannot boot a stock kernel, if it cannot.
fn skip_reason() -> Option<String> {
    let module = |name: &str| Path::new("/sys/module").join(name).exists();
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".into());
    }
    if module("kvm_intel") || module("kvm_amd") {
        return None;
    }
    if module("kvm_pvm") {
        return Some(
            "/dev/kvm is provided by kvm_pvm (no VMX/SVM): it emulates every instruction of a \
             non-PVM guest kernel and cannot run some of them, so a stock Linux kernel cannot \
             finish booting here; this test runs on hosts with kvm_intel or kvm_amd"
                .into(),
        );
    }
    Some("neither kvm_intel nor kvm_amd is loaded".into())
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Downloads and unpacks a Debian package into `dir`.
fn unpack_package(package: &str, dir: &Path) {
    run(Command::new("apt-get")
        .args(["download", package])
        .current_dir(dir));
    let deb = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(package))
        })
        .unwrap_or_else(|| panic!("no .deb for {package}"));
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root")));
}

/// The newest cloud kernel image package Debian offers.
fn cloud_kernel_package() -> String {
    let depends = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
    depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::to_string)
        .expect("linux-image-cloud-amd64 depends on a kernel package")
}

/// A newc ("070701") cpio archive.
struct Cpio {
    data: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            data: Vec::new(),
            inode: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            body.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.inode += 1;
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

fn initramfs(busybox: &Path) -> Vec<u8> {
    let init = b"#!/bin/busybox sh\n\
        /bin/busybox mount -t proc proc /proc\n\
        /bin/busybox echo \"vmd-linux-boot: userspace is up on $(/bin/busybox nproc) cpus\"\n\
        /bin/busybox poweroff -f\n";
    let mut cpio = Cpio::new();
    for dir in ["bin", "dev", "proc"] {
        cpio.entry(dir, 0o040755, (0, 0), &[]);
    }
    cpio.entry("dev/console", 0o020600, (5, 1), &[]);
    cpio.entry(
        "bin/busybox",
        0o100755,
        (0, 0),
        &std::fs::read(busybox).expect("busybox"),
    );
    cpio.entry("init", 0o100755, (0, 0), init);
    cpio.finish()
}

#[test]
fn a_stock_debian_kernel_boots_to_userspace_and_powers_off() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED a_stock_debian_kernel_boots_to_userspace_and_powers_off: {reason}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    unpack_package(&cloud_kernel_package(), dir.path());
    unpack_package("busybox-static", dir.path());
    let root = dir.path().join("root");
    let kernel: PathBuf = std::fs::read_dir(root.join("boot"))
        .expect("boot dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .expect("vmlinuz in the package");
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(&initrd, initramfs(&root.join("bin/busybox"))).expect("write initramfs");

    let finished = run_scenario(
        "none",
        &[
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--initrd",
            initrd.to_str().expect("utf-8"),
            "--cpus",
            "2",
            "--memory",
            "512M",
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
        ],
        Duration::from_secs(180),
    );
    assert!(
        finished
            .console
            .contains("vmd-linux-boot: userspace is up on 2 cpus"),
        "console:\n{}\nstderr:\n{}",
        finished.console,
        finished.stderr
    );
    assert_eq!(finished.code, Some(0), "stderr:\n{}", finished.stderr);
}
