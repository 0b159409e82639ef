//! The helper driven directly over its control socket, as the daemon will drive it: launched by
//! the library's `Launcher` (a real fork + exec of the `vmd` binary with LISTEN_FDS), configured
//! with `Start`, then paused, resumed, fed malformed messages and shut down.

mod common;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Lines, TESTGUEST, VMD};
use vmd::launch::{HelperExit, HelperProcess, HelperSpawn, Launcher};
use vmd::protocol::{Event, Request, RunState, VmConfig};

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

fn config(scenario: &str) -> VmConfig {
    VmConfig {
        name: "control-test".into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        cmdline: format!("testguest={scenario}"),
        disks: Vec::new(),
        entropy: false,
        interfaces: Vec::new(),
    }
}

fn standard_fds() -> (Vec<(String, OwnedFd)>, UnixStream) {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("/dev/kvm");
    let kernel = File::open(TESTGUEST).expect("test guest");
    let (console, helper_console) = UnixStream::pair().expect("socketpair");
    (
        vec![
            ("kvm".into(), kvm.into()),
            ("kernel".into(), kernel.into()),
            ("console".into(), helper_console.into()),
        ],
        console,
    )
}

fn launch(fds: Vec<(String, OwnedFd)>) -> HelperProcess {
    Launcher::from_path(Path::new(VMD))
        .expect("open vmd")
        .spawn(HelperSpawn {
            fds,
            args: vec!["vm".into()],
        })
        .expect("spawn helper")
}

fn next_event(helper: &HelperProcess) -> Event {
    helper
        .control
        .recv_event_timeout(EVENT_TIMEOUT)
        .expect("event")
        .expect("control socket open")
}

/// Sends Start with `scenario` to a launched helper, checks it answers Created and Running, and
/// collects its console from then on.
fn start_guest(helper: &HelperProcess, console: UnixStream, scenario: &str) -> Lines {
    helper
        .control
        .send_request(&Request::Start {
            config: config(scenario),
        })
        .expect("send start");
    assert_eq!(next_event(helper), Event::Created);
    assert_eq!(
        next_event(helper),
        Event::State {
            state: RunState::Running
        }
    );
    Lines::collect(console)
}

/// Starts a guest with `scenario` and returns it once `first_line` is on its console.
fn running_guest(scenario: &str, first_line: &str) -> (HelperProcess, Lines) {
    let (fds, console) = standard_fds();
    let helper = launch(fds);
    let lines = start_guest(&helper, console, scenario);
    lines.wait_for(first_line, EVENT_TIMEOUT);
    (helper, lines)
}

/// A `spin` guest, once its first heartbeat is on the console.
fn running_spin() -> (HelperProcess, Lines) {
    running_guest("spin", "testguest: spin heartbeat")
}

fn heartbeats(lines: &Lines) -> usize {
    lines.count("testguest: spin heartbeat")
}

/// Each pause kicks every vCPU once (no retry loop): a kick lost in the window between the
/// vCPU's check of the request and its entry into the guest would hang a pause here.
#[test]
fn hundreds_of_pauses_and_resumes_each_complete() {
    let (helper, lines) = running_spin();
    for round in 0..300 {
        helper.control.send_request(&Request::Pause).expect("pause");
        assert_eq!(
            next_event(&helper),
            Event::State {
                state: RunState::Paused
            },
            "round {round}"
        );
        helper
            .control
            .send_request(&Request::Resume)
            .expect("resume");
        assert_eq!(
            next_event(&helper),
            Event::State {
                state: RunState::Running
            },
            "round {round}"
        );
    }
    let before = heartbeats(&lines);
    lines.wait_for(
        &format!("testguest: spin heartbeat {before}"),
        EVENT_TIMEOUT,
    );
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let (helper, lines) = running_spin();

    helper.control.send_request(&Request::Pause).expect("pause");
    assert_eq!(
        next_event(&helper),
        Event::State {
            state: RunState::Paused
        }
    );
    // Anything the guest printed before the pause has arrived by now.
    std::thread::sleep(Duration::from_millis(300));
    let before = heartbeats(&lines);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(heartbeats(&lines), before, "the guest ran while paused");

    helper
        .control
        .send_request(&Request::Resume)
        .expect("resume");
    assert_eq!(
        next_event(&helper),
        Event::State {
            state: RunState::Running
        }
    );
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while heartbeats(&lines) == before {
        assert!(Instant::now() < deadline, "no heartbeat after resume");
        std::thread::sleep(Duration::from_millis(50));
    }

    helper
        .control
        .send_request(&Request::Shutdown {
            deadline_ms: 20_000,
        })
        .expect("shutdown");
    assert_eq!(next_event(&helper), Event::GuestPowerOff);
    lines.wait_for("testguest: power button pressed", EVENT_TIMEOUT);
    assert_eq!(helper.wait().expect("wait"), HelperExit::Exited(0));
}

#[test]
fn a_sigterm_during_start_up_becomes_the_power_button() {
    let (fds, console) = standard_fds();
    let helper = launch(fds);
    // The helper has just exec'd and has not even read its fds: it starts with SIGTERM blocked,
    // so the signal waits for its signalfd instead of killing it.
    nix::sys::signal::kill(helper.pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let lines = start_guest(&helper, console, "spin");
    assert_eq!(next_event(&helper), Event::GuestPowerOff);
    lines.wait_for("testguest: power button pressed", EVENT_TIMEOUT);
    assert_eq!(helper.wait().expect("wait"), HelperExit::Exited(0));
}

#[test]
fn shutdown_of_a_paused_guest_resumes_it_to_power_off() {
    let (helper, lines) = running_spin();
    helper.control.send_request(&Request::Pause).expect("pause");
    assert_eq!(
        next_event(&helper),
        Event::State {
            state: RunState::Paused
        }
    );
    helper
        .control
        .send_request(&Request::Shutdown {
            deadline_ms: 20_000,
        })
        .expect("shutdown");
    assert_eq!(
        next_event(&helper),
        Event::State {
            state: RunState::Running
        }
    );
    assert_eq!(next_event(&helper), Event::GuestPowerOff);
    lines.wait_for("testguest: power button pressed", EVENT_TIMEOUT);
    assert_eq!(helper.wait().expect("wait"), HelperExit::Exited(0));
}

#[test]
fn a_guest_that_ignores_the_power_button_is_stopped_at_the_deadline() {
    // A long `exits` run never looks at the power button.
    let (helper, _lines) = running_guest("exits=100000000", "testguest: exits=100000000 start");
    helper
        .control
        .send_request(&Request::Shutdown { deadline_ms: 500 })
        .expect("shutdown");
    match next_event(&helper) {
        Event::Error { reason } => assert!(reason.contains("did not power off"), "{reason}"),
        other => panic!("expected an Error event, got {other:?}"),
    }
    assert_eq!(helper.wait().expect("wait"), HelperExit::Exited(0));
}

#[test]
fn malformed_requests_are_errors_and_the_vm_keeps_running() {
    let (helper, lines) = running_spin();
    let peer = helper.control.as_fd();
    for garbage in [
        &b"nonsense"[..],
        b"VMD\x01\xff\xff\xff\xff{}",
        b"VMD\x09\x02\0\0\0{}",
        b"",
    ] {
        nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&peer),
            garbage,
            nix::sys::socket::MsgFlags::empty(),
        )
        .expect("send garbage");
        match next_event(&helper) {
            Event::Error { reason } => assert!(reason.contains("malformed"), "{reason}"),
            other => panic!("expected an Error event for {garbage:?}, got {other:?}"),
        }
    }
    // Still alive and obeying.
    let before = heartbeats(&lines);
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while heartbeats(&lines) == before {
        assert!(Instant::now() < deadline, "no heartbeat after garbage");
        std::thread::sleep(Duration::from_millis(50));
    }
    helper
        .control
        .send_request(&Request::Start {
            config: config("hello"),
        })
        .expect("start");
    match next_event(&helper) {
        Event::Error { reason } => assert!(reason.contains("already started"), "{reason}"),
        other => panic!("expected an Error event, got {other:?}"),
    }
    helper
        .control
        .send_request(&Request::Shutdown {
            deadline_ms: 20_000,
        })
        .expect("shutdown");
    assert_eq!(next_event(&helper), Event::GuestPowerOff);
    assert_eq!(helper.wait().expect("wait"), HelperExit::Exited(0));
}

#[test]
fn a_malformed_first_message_fails_the_helper() {
    let (fds, _console) = standard_fds();
    let helper = launch(fds);
    nix::sys::socket::send(
        std::os::fd::AsRawFd::as_raw_fd(&helper.control.as_fd()),
        b"VMD\x01\x02\0\0\0[]",
        nix::sys::socket::MsgFlags::empty(),
    )
    .expect("send");
    match next_event(&helper) {
        Event::Failed { reason } => assert!(reason.contains("configuration"), "{reason}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(helper.wait().expect("wait"), HelperExit::Exited(1));
}

#[test]
fn an_invalid_configuration_fails_before_anything_runs() {
    let (fds, _console) = standard_fds();
    let helper = launch(fds);
    let mut bad = config("hello");
    bad.memory_bytes = 3 << 20;
    helper
        .control
        .send_request(&Request::Start { config: bad })
        .expect("send");
    match next_event(&helper) {
        Event::Failed { reason } => assert!(reason.contains("memory"), "{reason}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(helper.wait().expect("wait"), HelperExit::Exited(1));
}

#[test]
fn an_unexpected_fd_name_is_refused_on_stderr_and_control() {
    let (mut fds, _console) = standard_fds();
    let extra = File::open(TESTGUEST).expect("file");
    fds.push(("disk-of-doom".into(), extra.into()));
    let helper = launch(fds);
    match next_event(&helper) {
        Event::Failed { reason } => assert!(reason.contains("disk-of-doom"), "{reason}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(helper.wait().expect("wait"), HelperExit::Exited(1));
}

#[test]
fn a_missing_kernel_fd_is_refused() {
    let (fds, _console) = standard_fds();
    let fds = fds
        .into_iter()
        .filter(|(name, _)| name != "kernel")
        .collect();
    let helper = launch(fds);
    match next_event(&helper) {
        Event::Failed { reason } => assert!(reason.contains("no \"kernel\" fd"), "{reason}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(helper.wait().expect("wait"), HelperExit::Exited(1));
}

/// Runs `vmd vm` by hand with a given environment (LISTEN_PID=$$ is the helper's own pid, since
/// the shell execs it).
fn helper_by_hand(env: &str) -> (Option<i32>, String) {
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{env} exec \"$0\" vm"))
        .arg(VMD)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .output()
        .expect("run sh");
    let mut stderr = String::new();
    output
        .stderr
        .as_slice()
        .read_to_string(&mut stderr)
        .expect("utf-8");
    (output.status.code(), stderr)
}

#[test]
fn fd_intake_errors_exit_1_with_the_reason() {
    let cases = [
        ("", "LISTEN_PID is not set"),
        (
            "LISTEN_PID=1 LISTEN_FDS=1 LISTEN_FDNAMES=control",
            "is not this process",
        ),
        (
            "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=control",
            "but LISTEN_FDNAMES has 1 names",
        ),
        (
            "LISTEN_PID=$$ LISTEN_FDS=3 LISTEN_FDNAMES=control:kvm:bogus",
            "unexpected fd name \"bogus\"",
        ),
        (
            "LISTEN_PID=$$ LISTEN_FDS=3 LISTEN_FDNAMES=control:kvm:kvm",
            "more than once",
        ),
        (
            "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=control:kvm",
            "no \"kernel\" fd",
        ),
        // Names are fine, but nothing is open at fds 3..5.
        (
            "exec 3<&- 4<&- 5<&-; LISTEN_PID=$$ LISTEN_FDS=3 LISTEN_FDNAMES=control:kvm:kernel",
            "is not open",
        ),
        (
            "LISTEN_PID=$$ LISTEN_FDS=many LISTEN_FDNAMES=control",
            "not a valid number",
        ),
    ];
    for (env, expected) in cases {
        let (code, stderr) = helper_by_hand(env);
        assert_eq!(code, Some(1), "{env}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{env}: expected {expected:?} in {stderr:?}"
        );
    }
}

/// Without systemd on the host, the journal socket is a datagram socket of the test's, bind
/// mounted at /run/systemd/journal/socket in a private mount namespace.
const WITH_A_JOURNAL: &str = r#"
mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal &&
    : > /run/systemd/journal/socket && mount --bind "$1" /run/systemd/journal/socket || exit 99
exec 3<&- 4<&- 5<&-
LISTEN_PID=$$ LISTEN_FDS=3 LISTEN_FDNAMES=control:kvm:kernel exec "$0" vm
"#;

#[test]
fn fds_claimed_but_not_passed_are_refused_before_logging_opens_the_journal() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: a private mount namespace needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("journal.sock");
    let _journal = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    // stderr is "the journal" (JOURNAL_STREAM matches it), so the helper's logging connects to
    // the socket above, which lands on the lowest free fd: 3, claimed as `control`.
    let mut stderr = tempfile::tempfile().expect("tempfile");
    let stat = nix::sys::stat::fstat(&stderr).expect("fstat");
    let status = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c", WITH_A_JOURNAL, VMD])
        .arg(&socket_path)
        .env("JOURNAL_STREAM", format!("{}:{}", stat.st_dev, stat.st_ino))
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr.try_clone().expect("dup"))
        .status()
        .expect("run unshare");
    let mut text = String::new();
    std::io::Seek::rewind(&mut stderr).expect("rewind");
    stderr.read_to_string(&mut text).expect("read stderr");
    assert_ne!(status.code(), Some(99), "namespace set-up failed: {text}");
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("fd 3 (\"control\") is not open"),
        "the helper took an fd it was not passed for its control socket: {text}"
    );
}
