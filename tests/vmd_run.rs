//! `vmd run` end to end: the real binary, a real fork+exec'd helper, real /dev/kvm, and the
//! project's test guest, one scenario per test.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use common::{RunningVm, proc_status, run_scenario, status_field, vmd_run_command};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn hello_prints_and_powers_off() {
    let run = run_scenario("hello", &[], LIMIT);
    assert!(
        run.console.contains("testguest: scenario hello")
            && run
                .console
                .contains("testguest: hello from the vmd test guest"),
        "console:\n{}\nstderr:\n{}",
        run.console,
        run.stderr
    );
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

#[test]
fn reboot_exits_75() {
    let run = run_scenario("reboot", &[], LIMIT);
    assert!(
        run.console.contains("testguest: rebooting"),
        "{}",
        run.console
    );
    assert_eq!(run.code, Some(75), "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("asked to reboot"), "{}", run.stderr);
}

#[test]
fn smp_brings_up_every_vcpu() {
    let run = run_scenario("smp", &["--cpus", "2"], LIMIT);
    assert!(
        run.console.contains("testguest: smp: 2 cpus in MADT"),
        "{}\n{}",
        run.console,
        run.stderr
    );
    assert!(
        run.console.contains("testguest: cpu 1 up"),
        "{}",
        run.console
    );
    assert!(
        run.console.contains("testguest: smp: all 2 cpus up"),
        "{}",
        run.console
    );
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

#[test]
fn port_exits_are_counted_through() {
    let run = run_scenario("exits=2000", &[], LIMIT);
    assert!(
        run.console.contains("testguest: exits=2000 start"),
        "{}",
        run.console
    );
    assert!(
        run.console.contains("testguest: exits done"),
        "{}",
        run.console
    );
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

#[test]
fn unmapped_io_reads_all_ones_and_the_vmm_survives() {
    let run = run_scenario("badio", &[], LIMIT);
    assert!(
        run.console.contains(
            "testguest: badio: pio8 0xff pio16 0xffff pio32 0xffffffff mmio32 0xffffffff"
        ),
        "{}",
        run.console
    );
    assert!(
        run.console.contains("testguest: badio: survived"),
        "{}",
        run.console
    );
    assert!(
        run.stderr.contains("hits no device"),
        "unmapped access not logged:\n{}",
        run.stderr
    );
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

#[test]
fn a_crashing_guest_is_a_reported_failure() {
    let run = run_scenario("crash", &[], LIMIT);
    assert!(
        run.console.contains("testguest: crashing with ud2"),
        "{}",
        run.console
    );
    assert_eq!(run.code, Some(1), "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("triple-faulted") || run.stderr.contains("KVM_EXIT_INTERNAL_ERROR"),
        "no failure reason:\n{}",
        run.stderr
    );
}

#[test]
fn memtest_verifies_guest_ram() {
    let run = run_scenario("memtest=4", &[], LIMIT);
    assert!(
        run.console.contains("testguest: memtest 4 MiB OK"),
        "{}\n{}",
        run.console,
        run.stderr
    );
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

#[test]
fn memtest_beyond_ram_fails_inside_the_guest() {
    // 32 MiB of RAM cannot hold 16 MiB + 32 MiB: the guest sees it in e820 and says so.
    let run = run_scenario("memtest=32", &["--memory", "32M"], LIMIT);
    assert!(
        run.console
            .contains("testguest: memtest: FAIL not enough RAM"),
        "{}",
        run.console
    );
}

#[test]
fn sigterm_presses_the_power_button() {
    let vm = RunningVm::start("spin", &[]);
    vm.console.wait_for("testguest: spin heartbeat", LIMIT);
    vm.signal(libc::SIGTERM);
    vm.console
        .wait_for("testguest: power button pressed, powering off", LIMIT);
    let run = vm.wait(LIMIT);
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

/// `machinectl poweroff` sends SIGRTMIN+4 to the machine's leader, the helper.
#[test]
fn machinectl_poweroff_signal_presses_the_power_button() {
    let vm = RunningVm::start("spin", &[]);
    vm.console.wait_for("testguest: spin heartbeat", LIMIT);
    let helper = vm.helper_pid() as i32;
    // SAFETY: kill with our own child's child and a valid signal number.
    assert_eq!(unsafe { libc::kill(helper, libc::SIGRTMIN() + 4) }, 0);
    vm.console
        .wait_for("testguest: power button pressed, powering off", LIMIT);
    let run = vm.wait(LIMIT);
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

/// `machinectl reboot` sends SIGINT to the leader: the VM is reset (the helper ends with the
/// reboot status, which `vmd run` passes on), without waiting for the guest.
#[test]
fn machinectl_reboot_signal_resets_the_vm() {
    let vm = RunningVm::start("spin", &[]);
    vm.console.wait_for("testguest: spin heartbeat", LIMIT);
    let helper = vm.helper_pid() as i32;
    // SAFETY: kill with our own child's child and a valid signal number.
    assert_eq!(unsafe { libc::kill(helper, libc::SIGINT) }, 0);
    let run = vm.wait(LIMIT);
    assert_eq!(run.code, Some(75), "stderr:\n{}", run.stderr);
    assert!(
        !run.console.contains("power button pressed"),
        "{}",
        run.console
    );
}

#[test]
fn the_helper_runs_locked_down() {
    let vm = RunningVm::start("spin", &[]);
    vm.console.wait_for("testguest: spin heartbeat", LIMIT);
    let helper = vm.helper_pid();
    let status = proc_status(helper, None);
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    assert_eq!(status_field(&status, "Seccomp"), "2");
    assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
    assert_eq!(status_field(&status, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(&status, "CapInh"), "0000000000000000");
    assert_eq!(status_field(&status, "CapAmb"), "0000000000000000");
    if nix::unistd::geteuid().is_root() {
        let uids = status_field(&status, "Uid");
        assert!(
            uids.split_whitespace().all(|uid| uid != "0"),
            "helper still root: {uids}"
        );
        let gids = status_field(&status, "Gid");
        assert!(
            gids.split_whitespace().all(|gid| gid != "0"),
            "helper still in group 0: {gids}"
        );
        assert_eq!(status_field(&status, "Groups"), "");
    }
    // Every thread (the VMM thread and each vCPU) runs under its own filter.
    let tasks = std::fs::read_dir(format!("/proc/{helper}/task")).expect("tasks");
    let mut threads = 0;
    for task in tasks {
        let tid: u32 = task
            .expect("task")
            .file_name()
            .to_string_lossy()
            .parse()
            .expect("tid");
        let status = proc_status(helper, Some(tid));
        assert_eq!(status_field(&status, "Seccomp"), "2", "thread {tid}");
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "thread {tid}");
        threads += 1;
    }
    assert!(
        threads >= 2,
        "expected a VMM and a vCPU thread, found {threads}"
    );
    vm.signal(libc::SIGTERM);
    let run = vm.wait(LIMIT);
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

#[test]
fn the_sandbox_lets_no_path_be_opened_but_passed_fds_work() {
    let run = run_scenario("hello", &["--probe-sandbox"], LIMIT);
    for path in ["/etc/hostname", "/dev/kvm", "/"] {
        assert!(
            run.stderr
                .contains(&format!("sandbox probe: open {path}: EACCES")),
            "{path} not refused:\n{}",
            run.stderr
        );
    }
    assert!(
        run.stderr
            .contains("sandbox probe: passed kvm fd: API version 12"),
        "{}",
        run.stderr
    );
    assert!(run.console.contains("testguest: hello"), "{}", run.console);
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let missing = run_scenario("hello", &["--kernel", "/nonexistent/vmlinux"], LIMIT);
    assert_eq!(missing.code, Some(1));
    assert!(
        missing
            .stderr
            .contains("cannot open the kernel /nonexistent/vmlinux"),
        "{}",
        missing.stderr
    );

    let garbage = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(garbage.path(), vec![0x90u8; 65536]).expect("write");
    let garbage_path = garbage.path().to_str().expect("utf-8");
    let run = run_scenario("hello", &["--kernel", garbage_path], LIMIT);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("neither a 64-bit ELF"),
        "{}",
        run.stderr
    );

    let tiny = run_scenario("hello", &["--memory", "1M"], LIMIT);
    assert_eq!(tiny.code, Some(1));
    assert!(tiny.stderr.contains("memory"), "{}", tiny.stderr);

    let no_cpus = run_scenario("hello", &["--cpus", "0"], LIMIT);
    assert_eq!(no_cpus.code, Some(1));
    assert!(no_cpus.stderr.contains("vcpus"), "{}", no_cpus.stderr);
}

#[test]
fn a_helper_whose_launcher_dies_powers_the_guest_off() {
    let vm = RunningVm::start("spin", &[]);
    vm.console.wait_for("testguest: spin heartbeat", LIMIT);
    // SIGKILL leaves the helper no one to talk to: its control socket reaches EOF. Its console
    // now goes nowhere, but it still logs to the stderr it inherited from `vmd run`.
    vm.signal(libc::SIGKILL);
    vm.stderr
        .wait_for("the control socket closed: nobody manages this VM", LIMIT);
    // Logged only when the guest itself writes SLP_EN to PM1 after seeing the button (a guest
    // that missed it would be stopped at the deadline instead).
    vm.stderr.wait_for("the guest powered off", LIMIT);
    let run = vm.wait(LIMIT);
    assert!(
        !run.stderr.contains("did not power off in time"),
        "{}",
        run.stderr
    );
}

#[test]
fn string_port_io_reaches_the_port_one_element_at_a_time() {
    let run = run_scenario("stringio", &[], LIMIT);
    for line in [
        "testguest: stringio: rep outsb to COM1",
        "testguest: stringio: rep insb from COM1 scratch 0xa5a5a5a5",
    ] {
        assert!(
            run.console.lines().any(|l| l == line),
            "no line {line:?} in:\n{}\nstderr:\n{}",
            run.console,
            run.stderr
        );
    }
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

/// `vmd run` of the spin guest with fd 9 open on `path` without close-on-exec, as
/// `vmd run ... 9<path` in a shell.
fn spin_with_fd_9(path: &Path) -> RunningVm {
    let file = File::open(path).expect("open the stray file");
    let mut command = vmd_run_command("spin", &[]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the closure only makes async-signal-safe system calls on fd numbers.
    unsafe {
        command.pre_exec(move || {
            let fd = file.as_raw_fd();
            let ret = if fd == 9 {
                libc::fcntl(9, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 9)
            };
            if ret < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    RunningVm::watch(command.spawn().expect("spawn vmd run"))
}

#[test]
fn the_helper_does_not_inherit_stray_fds() {
    let stray = tempfile::NamedTempFile::new().expect("tempfile");
    let stray_path = stray.path().canonicalize().expect("canonical path");
    let vm = spin_with_fd_9(&stray_path);
    vm.console.wait_for("testguest: spin heartbeat", LIMIT);
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/fd/9", vm.child.id())).ok(),
        Some(stray_path.clone()),
        "vmd run itself did not get fd 9"
    );
    let helper = vm.helper_pid();
    let fd_dir = format!("/proc/{helper}/fd");
    let fds: Vec<_> = std::fs::read_dir(&fd_dir)
        .unwrap_or_else(|e| panic!("read {fd_dir}: {e}"))
        .map(|entry| {
            let path = entry.expect("fd entry").path();
            (path.clone(), std::fs::read_link(&path).ok())
        })
        .collect();
    assert!(fds.len() >= 3, "{fds:?}");
    for (fd, target) in &fds {
        assert_ne!(
            target.as_deref(),
            Some(stray_path.as_path()),
            "the helper has the stray file open as {}",
            fd.display()
        );
    }
    vm.signal(libc::SIGTERM);
    let run = vm.wait(LIMIT);
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

#[test]
fn the_helper_gets_no_backtrace_variables() {
    // A backtrace would have a panicking helper open its own executable, which its seccomp
    // filter answers with SIGSYS instead of the reported failure.
    let child = vmd_run_command("spin", &[])
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "full")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmd run");
    let vm = RunningVm::watch(child);
    vm.console.wait_for("testguest: spin heartbeat", LIMIT);
    let environ = |pid: u32| {
        let path = format!("/proc/{pid}/environ");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        bytes
            .split(|&b| b == 0)
            .map(|var| String::from_utf8_lossy(var).into_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        environ(vm.child.id()).contains(&"RUST_BACKTRACE=1".to_string()),
        "vmd run itself did not get RUST_BACKTRACE"
    );
    let helper_env = environ(vm.helper_pid());
    assert!(
        helper_env
            .iter()
            .any(|var| var.starts_with("LISTEN_FDNAMES=")),
        "{helper_env:?}"
    );
    assert!(
        !helper_env.iter().any(|var| var.starts_with("RUST_BACKTRACE=")
            || var.starts_with("RUST_LIB_BACKTRACE=")),
        "{helper_env:?}"
    );
    vm.signal(libc::SIGTERM);
    let run = vm.wait(LIMIT);
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
}

/// Bytes `pid` has read with read(2) and friends (`rchar` in /proc/PID/io).
fn bytes_read(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    io.lines()
        .find_map(|line| line.strip_prefix("rchar: "))
        .and_then(|value| value.trim().parse().ok())
        .expect("rchar in /proc/PID/io")
}

#[test]
fn a_stalled_stdout_does_not_stop_sigterm() {
    // stdout is a one-page pipe, full before the guest prints anything, that nobody reads
    // until the guest is off.
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
    fcntl(&write_end, FcntlArg::F_SETPIPE_SZ(4096)).expect("F_SETPIPE_SZ");
    let capacity = fcntl(&write_end, FcntlArg::F_GETPIPE_SZ).expect("F_GETPIPE_SZ");
    let filler = vec![b'x'; usize::try_from(capacity).expect("size")];
    assert_eq!(
        nix::unistd::write(&write_end, &filler).expect("fill"),
        filler.len()
    );
    let mut child = vmd_run_command("spin", &[])
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmd run");
    let stderr = common::Lines::collect(child.stderr.take().expect("stderr piped"));
    stderr.wait_for("VM run created", LIMIT);
    // Once vmd run reads console output after this point it has something stdout does not take
    // (a blocking write would now hang there for good).
    let before = bytes_read(child.id());
    let deadline = Instant::now() + LIMIT;
    while bytes_read(child.id()) == before {
        assert!(Instant::now() < deadline, "vmd run read no console output");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill with the pid of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    stderr.wait_for("the guest powered off", LIMIT);
    // Now read stdout: vmd run writes out what it kept and exits.
    let vm = RunningVm {
        child,
        console: common::Lines::collect(File::from(read_end)),
        stderr,
    };
    let run = vm.wait(LIMIT);
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
    assert!(
        run.console
            .contains("testguest: power button pressed, powering off"),
        "{}",
        run.console
    );
}
