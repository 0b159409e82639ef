//! The virtio devices end to end: the helper (real fork + exec of `vmd vm`, real sandbox, real
//! /dev/kvm) gets disk fds as the daemon passes them, the test guest's own virtio-mmio driver
//! reads and writes them, and the images are checked afterwards with QEMU's own tools.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::{Lines, TESTGUEST, VMD, qemu_tool};
use vmd::launch::{HelperExit, HelperProcess, HelperSpawn, Launcher};
use vmd::protocol::{
    DiskConfig, DiskFds, Event, HelperFds, ImageFormat, InterfaceConfig, Request, RunState,
    VmConfig,
};

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// A run ends well within this (the slowest scenario here reads or writes 2 MiB).
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// One disk for the guest: its image, its backing chain (nearest first) and how it is shown.
struct Disk {
    image: PathBuf,
    format: ImageFormat,
    bases: Vec<(PathBuf, ImageFormat)>,
    read_only: bool,
    serial: &'static str,
}

impl Disk {
    fn raw(image: &Path) -> Disk {
        Disk {
            image: image.to_path_buf(),
            format: ImageFormat::Raw,
            bases: Vec::new(),
            read_only: false,
            serial: "",
        }
    }
}

/// A guest started with `scenario`, `disks` and (if `entropy`) an rng.
struct Guest {
    helper: HelperProcess,
    console: Lines,
}

/// A network interface for the guest: an open tap and how the device shows it.
struct Interface {
    tap: OwnedFd,
    mac: &'static str,
    locked_lladdr: bool,
}

impl Guest {
    fn start(scenario: &str, disks: &[Disk], entropy: bool) -> Guest {
        Guest::start_with(scenario, disks, entropy, Vec::new())
    }

    fn start_with(
        scenario: &str,
        disks: &[Disk],
        entropy: bool,
        interfaces: Vec<Interface>,
    ) -> Guest {
        let open = |path: &Path, write: bool| -> OwnedFd {
            OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
                .into()
        };
        let (console, helper_console) = UnixStream::pair().expect("socketpair");
        let configs: Vec<InterfaceConfig> = interfaces
            .iter()
            .map(|interface| InterfaceConfig {
                mac: interface.mac.parse().expect("MAC"),
                locked_lladdr: interface.locked_lladdr,
            })
            .collect();
        let fds = HelperFds {
            kvm: open(Path::new("/dev/kvm"), true),
            kernel: File::open(TESTGUEST).expect("test guest").into(),
            initrd: None,
            disks: disks
                .iter()
                .map(|disk| DiskFds {
                    image: open(&disk.image, !disk.read_only),
                    bases: disk.bases.iter().map(|(p, _)| open(p, false)).collect(),
                })
                .collect(),
            nets: interfaces.into_iter().map(|i| i.tap).collect(),
            console: Some(helper_console.into()),
        };
        let config = VmConfig {
            name: "virtio-test".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            cmdline: format!("testguest={scenario}"),
            disks: disks
                .iter()
                .map(|disk| DiskConfig {
                    format: disk.format,
                    read_only: disk.read_only,
                    serial: disk.serial.into(),
                    backing: disk.bases.iter().map(|(_, f)| *f).collect(),
                })
                .collect(),
            entropy,
            interfaces: configs,
        };
        let helper = Launcher::from_path(Path::new(VMD))
            .expect("open vmd")
            .spawn(HelperSpawn {
                fds: fds.into_spawn_list(),
                args: vec!["vm".into()],
            })
            .expect("spawn helper");
        helper
            .control
            .send_request(&Request::Start { config })
            .expect("send start");
        let console = Lines::collect(console);
        let first = next_event(&helper);
        assert_eq!(first, Event::Created, "console:\n{}", console.text());
        assert_eq!(
            next_event(&helper),
            Event::State {
                state: RunState::Running
            }
        );
        Guest { helper, console }
    }

    /// Waits for the helper to exit and returns how, with the console as it was then.
    fn finish(self) -> (HelperExit, String) {
        let deadline = Instant::now() + RUN_LIMIT;
        loop {
            match nix::sys::wait::waitpid(
                self.helper.pid,
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            )
            .expect("waitpid")
            {
                nix::sys::wait::WaitStatus::Exited(_, code) => {
                    self.console
                        .wait_for_eof(Instant::now() + Duration::from_secs(5));
                    return (HelperExit::Exited(code), self.console.text());
                }
                nix::sys::wait::WaitStatus::Signaled(_, signal, _) => {
                    return (HelperExit::Signaled(signal as i32), self.console.text());
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not finish within {RUN_LIMIT:?}; console:\n{}",
                self.console.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs to the end and returns the console, asserting a clean power-off.
    fn powered_off(self) -> String {
        let (exit, console) = self.finish();
        assert_eq!(exit, HelperExit::Exited(0), "console:\n{console}");
        console
    }
}

fn next_event(helper: &HelperProcess) -> Event {
    helper
        .control
        .recv_event_timeout(EVENT_TIMEOUT)
        .expect("event")
        .expect("control socket open")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn raw_image(dir: &Path, name: &str, size: &str, pattern: Option<u8>) -> PathBuf {
    let path = dir.join(name);
    qemu_tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", path_str(&path), size],
    );
    if let Some(byte) = pattern {
        let command = format!("write -P {byte:#x} 0 {size}");
        qemu_tool("qemu-io", &["-f", "raw", "-c", &command, path_str(&path)]);
    }
    path
}

fn assert_pattern(path: &Path, format: &str, byte: u8, offset: u64, len: u64) {
    let command = format!("read -P {byte:#x} {offset} {len}");
    qemu_tool(
        "qemu-io",
        &["-f", format, "-r", "-c", &command, path_str(path)],
    );
}

#[test]
fn a_guest_fills_a_raw_disk_and_the_data_is_in_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = raw_image(dir.path(), "disk.raw", "1M", None);
    let console = Guest::start("blk-fill=0xa5", &[Disk::raw(&disk)], false).powered_off();
    assert!(
        console.contains("testguest: blk-fill done 2048 sectors"),
        "{console}"
    );
    assert_pattern(&disk, "raw", 0xa5, 0, 1 << 20);

    let console = Guest::start("blk-check=0xa5", &[Disk::raw(&disk)], false).powered_off();
    assert!(
        console.contains("testguest: blk-check ok 2048 sectors"),
        "{console}"
    );
    let console = Guest::start("blk-check=0xa4", &[Disk::raw(&disk)], false).powered_off();
    assert!(
        console.contains("testguest: blk-check: FAIL at byte 0x0 got 0xa5"),
        "{console}"
    );
}

#[test]
fn writes_go_to_the_top_of_a_qcow2_chain_and_the_bases_are_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = raw_image(dir.path(), "base.raw", "1M", Some(0x11));
    let middle = dir.path().join("middle.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(&base),
            "-F",
            "raw",
            path_str(&middle),
        ],
    );
    qemu_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 0 64k",
            path_str(&middle),
        ],
    );
    qemu_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(&middle),
            "-F",
            "qcow2",
            path_str(&top),
        ],
    );
    let chain = || Disk {
        image: top.clone(),
        format: ImageFormat::Qcow2,
        bases: vec![
            (middle.clone(), ImageFormat::Qcow2),
            (base.clone(), ImageFormat::Raw),
        ],
        read_only: false,
        serial: "",
    };
    // The guest first sees the chain through, then overwrites it all.
    let console = Guest::start("blk-check=0x11", &[chain()], false).powered_off();
    assert!(
        console.contains("testguest: blk-check: FAIL at byte 0x0 got 0x22"),
        "{console}"
    );
    let console = Guest::start("blk-fill=0x5a", &[chain()], false).powered_off();
    assert!(
        console.contains("testguest: blk-fill done 2048 sectors"),
        "{console}"
    );
    qemu_tool("qemu-img", &["check", path_str(&top)]);
    assert_pattern(&top, "qcow2", 0x5a, 0, 1 << 20);
    assert_pattern(&middle, "qcow2", 0x22, 0, 64 << 10);
    assert_pattern(&middle, "qcow2", 0x11, 64 << 10, (1 << 20) - (64 << 10));
    assert_pattern(&base, "raw", 0x11, 0, 1 << 20);
}

#[test]
fn the_serial_and_read_only_flag_reach_the_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = raw_image(dir.path(), "ro.raw", "64k", Some(0x33));
    let disk = |scenario: &str| {
        let disk = Disk {
            read_only: true,
            serial: "vmd-ro-disk",
            ..Disk::raw(&image)
        };
        Guest::start(scenario, &[disk], false).powered_off()
    };
    let console = disk("blk-id");
    assert!(
        console
            .lines()
            .any(|l| l == "testguest: blk-id vmd-ro-disk"),
        "{console}"
    );
    let console = disk("blk-ro");
    assert!(console.contains("testguest: blk-ro ok"), "{console}");
    assert_pattern(&image, "raw", 0x33, 0, 64 << 10);
}

#[test]
fn malformed_requests_do_not_hurt_the_device_or_the_helper() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = raw_image(dir.path(), "bad.raw", "64k", Some(0x44));
    let console = Guest::start("blk-bad", &[Disk::raw(&image)], false).powered_off();
    assert!(
        console.contains("testguest: blk-bad: good request ok"),
        "{console}"
    );
    // Nothing the bad requests did reached the image.
    assert_pattern(&image, "raw", 0x44, 0, 64 << 10);
    qemu_tool("qemu-img", &["info", path_str(&image)]);
}

#[test]
fn the_entropy_device_gives_fresh_bytes() {
    let read = || {
        let console = Guest::start("rng", &[], true).powered_off();
        let line = console
            .lines()
            .find(|l| l.starts_with("testguest: rng "))
            .unwrap_or_else(|| panic!("no rng line:\n{console}"))
            .to_string();
        let hex = line.trim_start_matches("testguest: rng ").to_string();
        assert_eq!(hex.len(), 64, "{line}");
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
        hex
    };
    assert_ne!(read(), read());
}

#[test]
fn a_stop_before_the_guest_is_done_still_flushes_what_it_wrote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let top = dir.path().join("stop.qcow2");
    // Large enough that the guest is still writing when the stop comes (it writes tens of
    // MiB a second here); only what it wrote before the stop takes room.
    qemu_tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&top), "4G"],
    );
    let disk = Disk {
        image: top.clone(),
        format: ImageFormat::Qcow2,
        bases: Vec::new(),
        read_only: false,
        serial: "",
    };
    let guest = Guest::start("blk-fill=0x77", &[disk], false);
    guest
        .console
        .wait_for("testguest: scenario blk-fill", EVENT_TIMEOUT);
    std::thread::sleep(Duration::from_millis(500));
    guest
        .helper
        .control
        .send_request(&Request::Shutdown { deadline_ms: 100 })
        .expect("shutdown");
    let (exit, console) = guest.finish();
    assert_eq!(exit, HelperExit::Exited(0), "{console}");
    assert!(
        !console.contains("blk-fill done"),
        "the guest finished before the stop; make the disk larger:\n{console}"
    );
    // What the guest wrote before the stop is there, and the image is consistent.
    qemu_tool("qemu-img", &["check", path_str(&top)]);
    assert_pattern(&top, "qcow2", 0x77, 0, 64 << 10);
}

/// The guest's answers through its tap, seen from the namespace's side: (pings received, the
/// guest's own count line).
fn ping_guest(scenario: &str, ns_tag: &str, locked_lladdr: bool) -> (String, String) {
    let ns = NetNs::new(ns_tag);
    let tap = ns.tap("vt0");
    ns.address("vt0", "10.200.7.1/24");
    let guest = Guest::start_with(
        &format!("{scenario} ip=10.200.7.2"),
        &[],
        false,
        vec![Interface {
            tap,
            mac: "52:54:00:12:34:56",
            locked_lladdr,
        }],
    );
    guest
        .console
        .wait_for(&format!("testguest: {scenario} mac"), EVENT_TIMEOUT);
    let ping = ns.run(&["ping", "-c", "3", "-W", "2", "-i", "0.3", "10.200.7.2"]);
    let ping = String::from_utf8_lossy(&ping.stdout).into_owned();
    guest
        .helper
        .control
        .send_request(&Request::Shutdown { deadline_ms: 5000 })
        .expect("shutdown");
    let console = guest.powered_off();
    let answered = console
        .lines()
        .find(|l| l.contains(" answered "))
        .unwrap_or_else(|| panic!("no answered line:\n{console}"))
        .to_string();
    (ping, answered)
}

#[test]
fn the_host_pings_a_guest_through_its_tap() {
    let (ping, answered) = ping_guest("net", "ping", true);
    assert!(ping.contains("3 received"), "{ping}");
    assert!(answered.contains(" 3 echo"), "{answered}");
}

#[test]
fn a_guest_cannot_send_from_another_mac() {
    let (ping, answered) = ping_guest("net-spoof", "spoof", true);
    assert!(ping.contains(" 0 received"), "{ping}");
    // The guest did answer (its ARP replies at least): the device dropped them.
    assert!(!answered.contains("answered 0 arp 0 echo"), "{answered}");
    // With the lock off the same guest is heard: the lock is what stopped it.
    let (ping, _) = ping_guest("net-spoof", "unlocked", false);
    assert!(ping.contains("3 received"), "{ping}");
}
