//! `vmd run --net` end to end: in a network namespace of the test's own, the host's `ping`
//! reaches the `net` test guest through a tap that `vmd run` attached to by name, or through a
//! tap fd it inherited.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::netns::NetNs;
use common::{RunningVm, TESTGUEST, VMD};

const LIMIT: Duration = Duration::from_secs(60);

fn run_args(ip: &str, net: &str) -> Vec<String> {
    [
        "run",
        "--kernel",
        TESTGUEST,
        "--memory",
        "64M",
        "--cmdline",
        &format!("testguest=net ip={ip}"),
        "--net",
        net,
    ]
    .map(str::to_string)
    .to_vec()
}

fn watch(mut command: Command) -> RunningVm {
    let child = command
        .env("VMD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmd run");
    RunningVm::watch(child)
}

/// Pings `ip` three times from the namespace, then powers the guest off (SIGTERM to `vmd run`)
/// and returns the guest's `answered` line.
fn ping_and_stop(ns: &NetNs, vm: RunningVm, ip: &str) -> String {
    let ping = ns.run(&["ping", "-c", "3", "-W", "2", "-i", "0.3", ip]);
    let ping = String::from_utf8_lossy(&ping.stdout).into_owned();
    vm.signal(libc::SIGTERM);
    let finished = vm.wait(LIMIT);
    assert!(ping.contains("3 received"), "{ping}\n{}", finished.stderr);
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    finished
        .console
        .lines()
        .find(|l| l.contains("testguest: net answered"))
        .unwrap_or_else(|| panic!("no answered line:\n{}", finished.console))
        .to_string()
}

#[test]
fn the_host_pings_a_guest_on_a_tap_named_on_the_command_line() {
    let ns = NetNs::new("run-tap");
    ns.exec(&[
        "ip", "tuntap", "add", "dev", "vt0", "mode", "tap", "vnet_hdr",
    ]);
    ns.address("vt0", "10.200.8.1/24");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &ns.name, VMD])
        .args(run_args("10.200.8.2", "tap=vt0,mac=52:54:00:0a:0b:0c"));
    let vm = watch(command);
    vm.console
        .wait_for("testguest: net mac 52:54:00:0a:0b:0c ip 10.200.8.2", LIMIT);
    let answered = ping_and_stop(&ns, vm, "10.200.8.2");
    assert!(answered.contains(" 3 echo"), "{answered}");
}

#[test]
fn the_host_pings_a_guest_on_an_inherited_tap_fd() {
    let ns = NetNs::new("run-fd");
    let tap = ns.tap("vt1");
    ns.address("vt1", "10.200.8.1/24");
    const TAP_FD: i32 = 10;
    let mut command = Command::new(VMD);
    command.args(run_args("10.200.8.2", &format!("fd={TAP_FD}")));
    let raw = tap.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe and only duplicates the tap, which the parent keeps
    // open until the child has started; the fd at TAP_FD is not close-on-exec.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set.
            let ret = if raw == TAP_FD {
                libc::fcntl(TAP_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, TAP_FD)
            };
            if ret < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let vm = watch(command);
    drop::<OwnedFd>(tap);
    // The default MAC: stable for the VM's name ("run") and index.
    let mac = vmd::cli::net_option::default_mac("run", 0);
    vm.console
        .wait_for(&format!("testguest: net mac {mac} ip 10.200.8.2"), LIMIT);
    let answered = ping_and_stop(&ns, vm, "10.200.8.2");
    assert!(answered.contains(" 3 echo"), "{answered}");
}
