//! Tests of `vmd::sandbox` against the running kernel (they need root, like the helper).
//!
//! The lock-down is irreversible and process-wide, and a seccomp violation kills the process, so
//! every check runs in a forked child. The child of a fork has a single thread (what
//! `lock_down_process` needs), runs only the sandbox calls and the checks, reports through a
//! pipe with raw `write(2)` (allowed by both seccomp filters), and leaves with `_exit`: 0 when
//! every check passed, 1 with a message when one failed. The parent asserts the wait status
//! and the messages. Forks are serialized so that no other test of this file is in the middle
//! of something when one happens.

use std::error::Error;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use vmd::sandbox::{
    Account, FALLBACK_USER, LockDownError, ResolveUserError, SANDBOX_USER, SandboxMode, ThreadKind,
    apply_seccomp, lock_down_process,
};

/// Serializes forks (and everything a child inherits) across the tests of this file.
static FORK: Mutex<()> = Mutex::new(());

/// A child's channel to the parent: the write end of a pipe.
#[derive(Clone, Copy)]
struct Report(RawFd);

impl Report {
    /// Writes `message` and a newline with raw write(2).
    fn say(self, message: &str) {
        let line = format!("{message}\n");
        let mut bytes = line.as_bytes();
        while !bytes.is_empty() {
            // SAFETY: the pointer and length describe the live `bytes` slice.
            let written = unsafe { libc::write(self.0, bytes.as_ptr().cast(), bytes.len()) };
            match usize::try_from(written) {
                Ok(n) if n > 0 => bytes = &bytes[n..],
                _ => return,
            }
        }
    }
}

/// How a child ended and what it said.
struct Outcome {
    status: WaitStatus,
    output: String,
}

impl Outcome {
    fn assert_success(&self) {
        assert!(
            matches!(self.status, WaitStatus::Exited(_, 0)),
            "child ended with {:?}, output:\n{}",
            self.status,
            self.output
        );
    }

    /// The child was killed by seccomp after saying `reached` and before saying "survived".
    fn assert_killed_by_seccomp(&self, reached: &str) {
        assert!(
            matches!(self.status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "child ended with {:?} instead of SIGSYS, output:\n{}",
            self.status,
            self.output
        );
        assert!(
            self.output.contains(reached),
            "child died before {reached:?}, output:\n{}",
            self.output
        );
        assert!(
            !self.output.contains("survived"),
            "output:\n{}",
            self.output
        );
    }
}

/// Runs `check` in a forked child; see the module documentation.
fn in_child(check: impl FnOnce(Report) -> Result<(), String>) -> Outcome {
    let _guard = FORK.lock().unwrap_or_else(PoisonError::into_inner);
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the child only runs `check` (sandbox calls, raw system calls, allocations, which
    // glibc keeps usable after fork) and leaves with _exit; it never returns into the harness.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            drop(read_end);
            let report = Report(write_end.as_raw_fd());
            // A hung child dies of SIGALRM instead of hanging the test; a killed one must not
            // write a core file into the working directory (core_pattern may be "core").
            // SAFETY: alarm has no preconditions.
            unsafe { libc::alarm(30) };
            if let Err(err) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
                report.say(&format!("FAILED: cannot disable core dumps: {err}"));
                // SAFETY: _exit ends the child without running the harness's exit handlers.
                unsafe { libc::_exit(1) };
            }
            let code = match std::panic::catch_unwind(AssertUnwindSafe(|| check(report))) {
                Ok(Ok(())) => 0,
                Ok(Err(message)) => {
                    report.say(&format!("FAILED: {message}"));
                    1
                }
                Err(payload) => {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    report.say(&format!("PANICKED: {message}"));
                    2
                }
            };
            // SAFETY: _exit ends the child without running the harness's exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut output = String::new();
            File::from(read_end)
                .read_to_string(&mut output)
                .expect("read the child's report");
            let status = waitpid(child, None).expect("waitpid");
            Outcome { status, output }
        }
    }
}

/// `error` and its sources, on one line.
fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

/// Checks that `result` failed with `errno`.
fn expect_errno<T>(what: &str, result: std::io::Result<T>, errno: i32) -> Result<(), String> {
    match result {
        Ok(_) => Err(format!("{what}: succeeded, expected errno {errno}")),
        Err(err) if err.raw_os_error() == Some(errno) => Ok(()),
        Err(err) => Err(format!("{what}: {err}, expected errno {errno}")),
    }
}

/// Returns the value of `field` in /proc/<pid>/status text.
fn status_field<'a>(status: &'a str, field: &str) -> Result<&'a str, String> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
        .ok_or_else(|| format!("no {field} in /proc/self/status"))
}

/// The errno of the last failed libc call.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("skipped: the sandbox tests need root");
        false
    }
}

// ---------------------------------------------------------------------------------------------
// lock_down_process

#[test]
fn lock_down_denies_paths_network_and_root() {
    if !require_root() {
        return;
    }
    let tcp = TcpListener::bind("127.0.0.1:0").expect("TCP listener");
    let tcp_port = tcp.local_addr().expect("TCP address").port();
    let abstract_name = format!("vmd-sandbox-test-{}", std::process::id());
    let abstract_addr =
        SocketAddr::from_abstract_name(abstract_name.as_bytes()).expect("abstract address");
    let _unix = UnixListener::bind_addr(&abstract_addr).expect("abstract unix listener");

    let outcome = in_child(|report| {
        // Opened before: must keep working.
        let mut hostname =
            File::open("/etc/hostname").map_err(|e| format!("/etc/hostname: {e}"))?;
        let mut status_file =
            File::open("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
        // A credential change clears the parent death signal; the lock-down restores it.
        // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointer.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(format!("PR_SET_PDEATHSIG: errno {}", errno()));
        }

        let lock = lock_down_process(SandboxMode::Enforce, None)
            .map_err(|e| format!("lock_down_process: {}", chain(&e)))?;
        report.say(&lock.to_string());

        // No path can be opened, for reading, listing or creating.
        expect_errno(
            "open /etc/hostname",
            File::open("/etc/hostname"),
            libc::EACCES,
        )?;
        expect_errno("open /", File::open("/"), libc::EACCES)?;
        expect_errno(
            "create /tmp/vmd-sandbox-test",
            File::create("/tmp/vmd-sandbox-test"),
            libc::EACCES,
        )?;
        // An fd opened before still reads.
        let mut text = String::new();
        hostname
            .read_to_string(&mut text)
            .map_err(|e| format!("reading the /etc/hostname fd opened before: {e}"))?;
        if text.is_empty() {
            return Err("the /etc/hostname fd opened before read nothing".into());
        }

        // Network and abstract unix sockets (landlock ABI 4 and 6).
        expect_errno(
            "TCP connect",
            TcpStream::connect(("127.0.0.1", tcp_port)),
            libc::EACCES,
        )?;
        expect_errno("TCP bind", TcpListener::bind("127.0.0.1:0"), libc::EACCES)?;
        let abstract_addr = SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .map_err(|e| format!("abstract address: {e}"))?;
        expect_errno(
            "abstract unix connect",
            UnixStream::connect_addr(&abstract_addr),
            libc::EPERM,
        )?;

        // Not root, for good.
        let account = lock.account.as_ref().ok_or("the report names no account")?;
        if account.name != SANDBOX_USER && account.name != FALLBACK_USER {
            return Err(format!("switched to unexpected user {}", account.name));
        }
        let uids = nix::unistd::getresuid().map_err(|e| e.to_string())?;
        let gids = nix::unistd::getresgid().map_err(|e| e.to_string())?;
        for (what, id, want) in [
            ("ruid", uids.real.as_raw(), account.uid),
            ("euid", uids.effective.as_raw(), account.uid),
            ("suid", uids.saved.as_raw(), account.uid),
            ("rgid", gids.real.as_raw(), account.gid),
            ("egid", gids.effective.as_raw(), account.gid),
            ("sgid", gids.saved.as_raw(), account.gid),
        ] {
            if id != want || id == 0 {
                return Err(format!("{what} is {id}, expected {want} (non-zero)"));
            }
        }
        if nix::unistd::getuid().is_root() {
            return Err("getuid() is 0".into());
        }
        if nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok() {
            return Err("setuid(0) succeeded".into());
        }
        let groups = nix::unistd::getgroups().map_err(|e| e.to_string())?;
        if !groups.is_empty() {
            return Err(format!("supplementary groups left: {groups:?}"));
        }

        // /proc/self/status, read through the fd opened before (seq_file: generated now).
        let mut status = String::new();
        status_file
            .read_to_string(&mut status)
            .map_err(|e| format!("reading /proc/self/status: {e}"))?;
        for (field, want) in [
            ("NoNewPrivs", "1"),
            ("CapInh", "0000000000000000"),
            ("CapPrm", "0000000000000000"),
            ("CapEff", "0000000000000000"),
            ("CapBnd", "0000000000000000"),
            ("CapAmb", "0000000000000000"),
            ("Seccomp", "0"),
        ] {
            let value = status_field(&status, field)?;
            if value != want {
                return Err(format!("{field} is {value}, expected {want}"));
            }
        }

        // SAFETY: PR_GET_DUMPABLE takes no argument.
        let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
        if dumpable != 0 {
            return Err(format!("PR_GET_DUMPABLE is {dumpable}"));
        }
        let mut signal: libc::c_int = 0;
        // SAFETY: PR_GET_PDEATHSIG writes one c_int to the live local `signal`.
        if unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &raw mut signal, 0, 0, 0) } != 0 {
            return Err(format!("PR_GET_PDEATHSIG: errno {}", errno()));
        }
        if signal != libc::SIGKILL {
            return Err(format!("parent death signal is {signal}, expected SIGKILL"));
        }
        if !lock.bounding_set_cleared {
            return Err("the report says the bounding set was kept".into());
        }
        let landlock = lock.landlock.ok_or("the report has no landlock ABI")?;
        if landlock.ruleset_abi < 6 || landlock.kernel_abi < landlock.ruleset_abi {
            return Err(format!("unexpected landlock ABIs {landlock:?}"));
        }
        report.say("all checks passed");
        Ok(())
    });
    outcome.assert_success();
    assert!(
        outcome.output.contains("all checks passed"),
        "{}",
        outcome.output
    );
}

#[test]
fn lock_down_disabled_changes_nothing() {
    if !require_root() {
        return;
    }
    let outcome = in_child(|_report| {
        let lock = lock_down_process(SandboxMode::Disabled, None)
            .map_err(|e| format!("lock_down_process: {}", chain(&e)))?;
        if lock.mode != SandboxMode::Disabled || lock.landlock.is_some() || lock.account.is_some() {
            return Err(format!("unexpected report {lock:?}"));
        }
        File::open("/etc/hostname").map_err(|e| format!("/etc/hostname: {e}"))?;
        if !nix::unistd::getuid().is_root() {
            return Err("no longer root".into());
        }
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| format!("/proc/self/status: {e}"))?;
        if status_field(&status, "NoNewPrivs")? != "0" {
            return Err("no_new_privs was set".into());
        }
        if status_field(&status, "CapEff")? == "0000000000000000" {
            return Err("capabilities were dropped".into());
        }
        Ok(())
    });
    outcome.assert_success();
}

/// A launcher resolves the account once and hands it over (`vmd vm --account`): the helper
/// switches to exactly that account without a passwd lookup of its own.
#[test]
fn lock_down_switches_to_the_account_its_launcher_gave() {
    if !require_root() {
        return;
    }
    let given = Account {
        name: "given".into(),
        uid: 64_123,
        gid: 64_124,
    };
    let outcome = in_child(move |report| {
        let lock = lock_down_process(SandboxMode::Enforce, Some(given.clone()))
            .map_err(|e| format!("lock_down_process: {}", chain(&e)))?;
        report.say(&lock.to_string());
        if lock.account.as_ref() != Some(&given) || (lock.uid, lock.gid) != (64_123, 64_124) {
            return Err(format!("switched to {:?}, wanted {given:?}", lock.account));
        }
        let ids = nix::unistd::getresuid().map_err(|e| e.to_string())?;
        if ids.real.as_raw() != 64_123 || ids.effective.as_raw() != 64_123 {
            return Err(format!("uids are {ids:?}"));
        }
        Ok(())
    });
    outcome.assert_success();
}

/// A given account with uid or gid 0 is refused before anything is changed.
#[test]
fn lock_down_refuses_a_given_root_account() {
    if !require_root() {
        return;
    }
    let outcome = in_child(|_report| {
        for (uid, gid) in [(0, 64_124), (64_123, 0)] {
            let root = Account {
                name: "root-ish".into(),
                uid,
                gid,
            };
            match lock_down_process(SandboxMode::Enforce, Some(root)) {
                Err(LockDownError::ResolveUser(ResolveUserError::Privileged(_))) => {}
                other => return Err(format!("expected Privileged, got {other:?}")),
            }
        }
        File::open("/etc/hostname").map_err(|e| format!("/etc/hostname: {e}"))?;
        if !nix::unistd::getuid().is_root() {
            return Err("no longer root".into());
        }
        Ok(())
    });
    outcome.assert_success();
}

#[test]
fn lock_down_refuses_a_multithreaded_process() {
    if !require_root() {
        return;
    }
    let outcome = in_child(|_report| {
        let (sender, receiver) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || receiver.recv());
        let result = lock_down_process(SandboxMode::Enforce, None);
        drop(sender);
        let _ = thread.join();
        match result {
            Err(LockDownError::NotSingleThreaded(2)) => {}
            other => return Err(format!("expected NotSingleThreaded(2), got {other:?}")),
        }
        // Nothing was applied.
        File::open("/etc/hostname").map_err(|e| format!("/etc/hostname: {e}"))?;
        if !nix::unistd::getuid().is_root() {
            return Err("no longer root".into());
        }
        Ok(())
    });
    outcome.assert_success();
}

// ---------------------------------------------------------------------------------------------
// apply_seccomp

/// Runs `forbidden` in a child under the filter of `kind` and asserts seccomp kills it there.
fn assert_forbidden(kind: ThreadKind, forbidden: impl FnOnce() -> libc::c_long) {
    let outcome = in_child(|report| {
        apply_seccomp(kind, SandboxMode::Enforce)
            .map_err(|e| format!("apply_seccomp: {}", chain(&e)))?;
        report.say("filter installed");
        let ret = forbidden();
        report.say(&format!("survived: returned {ret}, errno {}", errno()));
        Ok(())
    });
    outcome.assert_killed_by_seccomp("filter installed");
}

fn raw_getcwd() -> libc::c_long {
    let mut buf = [0u8; 256];
    // SAFETY: getcwd writes at most `buf.len()` bytes into the live `buf`.
    unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) }
}

fn raw_socket() -> libc::c_long {
    // SAFETY: socket takes no pointer.
    unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) }
}

fn raw_openat() -> libc::c_long {
    // SAFETY: the path is a NUL-terminated string literal.
    unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/etc/hostname".as_ptr(),
            libc::O_RDONLY,
        )
    }
}

/// ioctl on an invalid fd: if the filter lets it through, the kernel says EBADF.
fn raw_ioctl(request: u64) -> libc::c_long {
    // SAFETY: fd -1 is invalid, so the kernel reads no argument.
    unsafe { libc::syscall(libc::SYS_ioctl, -1, request, 0) }
}

fn raw_mmap(prot: libc::c_int) -> libc::c_long {
    // SAFETY: an anonymous private mapping at an address the kernel chooses touches no memory
    // of ours.
    unsafe {
        libc::syscall(
            libc::SYS_mmap,
            0,
            4096,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }
}

// Values from <linux/kvm.h> (x86_64), independent of the crate's own computation.
const KVM_CREATE_VM: u64 = 0xae01;
const KVM_CREATE_VCPU: u64 = 0xae41;
const KVM_RUN: u64 = 0xae80;
const KVM_IRQ_LINE: u64 = 0x4008_ae61;
const KVM_IRQ_LINE_STATUS: u64 = 0xc008_ae67;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_SET_REGS: u64 = 0x4090_ae82;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const TCGETS: u64 = 0x5401;
const FIONBIO: u64 = 0x5421;

#[test]
fn vcpu_filter_kills_getcwd() {
    assert_forbidden(ThreadKind::Vcpu, raw_getcwd);
}

#[test]
fn vcpu_filter_kills_socket() {
    assert_forbidden(ThreadKind::Vcpu, raw_socket);
}

/// open and openat are refused with EACCES in every kind of thread rather than killing the
/// process: glibc's malloc tries one on its own (see `REFUSED_WITH_EACCES`).
fn assert_openat_refused(kind: ThreadKind) {
    let outcome = in_child(|report| {
        apply_seccomp(kind, SandboxMode::Enforce)
            .map_err(|e| format!("apply_seccomp: {}", chain(&e)))?;
        let ret = raw_openat();
        let err = errno();
        report.say(&format!("openat returned {ret}, errno {err}"));
        if ret == -1 && err == libc::EACCES {
            Ok(())
        } else {
            Err(format!(
                "openat was not refused with EACCES: {ret}, errno {err}"
            ))
        }
    });
    outcome.assert_success();
}

#[test]
fn every_filter_refuses_openat_with_eacces() {
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Vmm,
        ThreadKind::Block,
        ThreadKind::Entropy,
        ThreadKind::Net,
    ] {
        assert_openat_refused(kind);
    }
}

#[test]
fn block_filter_kills_thread_creation_and_sockets() {
    assert_forbidden(ThreadKind::Block, || {
        let _ = std::thread::spawn(|| ()).join();
        0
    });
    assert_forbidden(ThreadKind::Block, raw_socket);
    assert_forbidden(ThreadKind::Block, || raw_ioctl(KVM_RUN));
}

#[test]
fn entropy_filter_kills_file_io() {
    assert_forbidden(ThreadKind::Entropy, || {
        let mut buf = [0u8; 16];
        // SAFETY: pread64 on fd 0 writes at most 16 bytes into the live `buf`.
        unsafe { libc::syscall(libc::SYS_pread64, 0, buf.as_mut_ptr(), buf.len(), 0) }
    });
}

#[test]
fn vcpu_filter_kills_other_ioctls() {
    assert_forbidden(ThreadKind::Vcpu, || raw_ioctl(TCGETS));
    assert_forbidden(ThreadKind::Vcpu, || raw_ioctl(KVM_SET_REGS));
}

#[test]
fn vcpu_filter_kills_executable_mappings() {
    assert_forbidden(ThreadKind::Vcpu, || {
        raw_mmap(libc::PROT_READ | libc::PROT_EXEC)
    });
}

#[test]
fn vcpu_filter_kills_signals_other_than_abort() {
    assert_forbidden(ThreadKind::Vcpu, || {
        // SAFETY: signal 0 only checks that the thread exists.
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0) }
    });
}

#[test]
fn vcpu_filter_kills_read() {
    assert_forbidden(ThreadKind::Vcpu, || {
        let mut byte = 0u8;
        // SAFETY: reads at most one byte into the live `byte`.
        unsafe { libc::syscall(libc::SYS_read, 0, &raw mut byte, 1) }
    });
}

#[test]
fn vcpu_filter_allows_its_syscalls() {
    let outcome = in_child(|report| {
        let fd_to_drop = File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
        apply_seccomp(ThreadKind::Vcpu, SandboxMode::Enforce)
            .map_err(|e| format!("apply_seccomp: {}", chain(&e)))?;
        report.say("filter installed"); // write
        // Allowed KVM requests reach the kernel, which rejects the bad fd; also with garbage in
        // the upper half of the request (the kernel's cmd is 32 bits).
        for request in [
            KVM_RUN,
            KVM_IRQ_LINE,
            KVM_GET_REGS,
            KVM_GET_SREGS,
            0xffff_ffff_0000_0000 | KVM_RUN,
        ] {
            if raw_ioctl(request) != -1 || errno() != libc::EBADF {
                return Err(format!("ioctl {request:#x}: errno {}", errno()));
            }
        }
        let address = raw_mmap(libc::PROT_READ | libc::PROT_WRITE);
        if address == -1 {
            return Err(format!("mmap: errno {}", errno()));
        }
        // SAFETY: unmaps the page mapped just above, which nothing references.
        if unsafe { libc::munmap(address as *mut libc::c_void, 4096) } != 0 {
            return Err(format!("munmap: errno {}", errno()));
        }
        // malloc: small blocks, a large (mmap'd) block, a realloc of it (mremap).
        let mut big = vec![1u8; 4 << 20];
        big.resize(16 << 20, 2);
        let small: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        report.say(&format!("allocated {} + {}", big.len(), small.len()));
        drop(big);
        // A HashMap seeds itself with getrandom.
        let mut map = std::collections::HashMap::new();
        map.insert(1, 2);
        // Clocks, ids, yield, a futex wake.
        let _ = std::time::Instant::now();
        // SAFETY: these take no pointer.
        let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
        if pid <= 0 || tid <= 0 {
            return Err("getpid/gettid".into());
        }
        std::thread::yield_now();
        // Dropping an fd (debug builds of std check it with fcntl(F_GETFD) first).
        drop(fd_to_drop);
        let mutex = Mutex::new(0);
        *mutex.lock().map_err(|e| e.to_string())? += 1;
        report.say("done");
        Ok(()) // then exit_group through _exit
    });
    outcome.assert_success();
    assert!(outcome.output.contains("done"), "{}", outcome.output);
}

#[test]
fn vmm_filter_kills_socket() {
    assert_forbidden(ThreadKind::Vmm, raw_socket);
}

#[test]
fn vmm_filter_kills_kvm_run() {
    assert_forbidden(ThreadKind::Vmm, || raw_ioctl(KVM_RUN));
}

#[test]
fn vmm_filter_kills_thread_creation() {
    assert_forbidden(ThreadKind::Vmm, || {
        let _ = std::thread::spawn(|| ()).join();
        0
    });
}

#[test]
fn vmm_filter_kills_signals_to_other_processes() {
    assert_forbidden(ThreadKind::Vmm, || {
        // SAFETY: signal 0 only checks that the target exists.
        unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) }
    });
}

#[test]
fn vmm_filter_kills_fionbio() {
    // What std's set_nonblocking on sockets does; the helper must use fcntl(F_SETFL).
    assert_forbidden(ThreadKind::Vmm, || raw_ioctl(FIONBIO));
}

#[test]
fn vmm_filter_kills_other_fcntls() {
    assert_forbidden(ThreadKind::Vmm, || {
        // SAFETY: F_SETFD on fd 0 takes an integer.
        unsafe { libc::syscall(libc::SYS_fcntl, 0, libc::F_SETFD, libc::FD_CLOEXEC) }
    });
}

#[test]
fn vmm_filter_kills_sendmsg_and_recvmsg() {
    // The control channel is send()/recv() (sendto/recvfrom); no fd is ever passed over it.
    // SAFETY: fd -1 is invalid and the message header pointer is null: nothing is read.
    assert_forbidden(ThreadKind::Vmm, || unsafe {
        libc::syscall(libc::SYS_sendmsg, -1, std::ptr::null::<libc::msghdr>(), 0)
    });
    // SAFETY: as above.
    assert_forbidden(ThreadKind::Vmm, || unsafe {
        libc::syscall(libc::SYS_recvmsg, -1, std::ptr::null::<libc::msghdr>(), 0)
    });
}

#[test]
fn vmm_filter_kills_kvm_irq_line_status() {
    // Interrupts are raised with KVM_IRQ_LINE (kvm-ioctls' set_irq_line).
    assert_forbidden(ThreadKind::Vmm, || raw_ioctl(KVM_IRQ_LINE_STATUS));
}

#[test]
fn vmm_filter_allows_its_syscalls() {
    let outcome = in_child(|report| {
        let (ours, theirs) = UnixDatagram::pair().map_err(|e| e.to_string())?;
        apply_seccomp(ThreadKind::Vmm, SandboxMode::Enforce)
            .map_err(|e| format!("apply_seccomp: {}", chain(&e)))?;
        report.say("filter installed");
        // send/recv on a socket, poll, fcntl, read.
        theirs.send(b"ping").map_err(|e| format!("send: {e}"))?;
        theirs.send(b"pong").map_err(|e| format!("send: {e}"))?;
        let mut poll_fd = libc::pollfd {
            fd: ours.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        if unsafe { libc::poll(&raw mut poll_fd, 1, 1000) } != 1 {
            return Err(format!("poll: errno {}", errno()));
        }
        // Non-blocking with fcntl: std's set_nonblocking uses ioctl(FIONBIO), which is denied.
        // SAFETY: F_GETFL and F_SETFL take and return integers.
        let set_nonblocking = unsafe {
            let flags = libc::fcntl(ours.as_raw_fd(), libc::F_GETFL);
            flags >= 0
                && libc::fcntl(ours.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !set_nonblocking {
            return Err(format!("fcntl: errno {}", errno()));
        }
        let mut buf = [0u8; 4];
        // SAFETY: reads at most 4 bytes into the live `buf`.
        if unsafe { libc::read(ours.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } != 4 {
            return Err(format!("read: errno {}", errno()));
        }
        ours.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
        let mut byte = [0u8; 1];
        match ours.recv(&mut byte) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => return Err(format!("recv on an empty socket: {other:?}")),
        }
        drop(theirs); // close
        for request in [KVM_IRQ_LINE, KVM_GET_REGS, KVM_GET_SREGS] {
            if raw_ioctl(request) != -1 || errno() != libc::EBADF {
                return Err(format!("ioctl {request:#x}: errno {}", errno()));
            }
        }
        // Signals to our own threads.
        // SAFETY: signal 0 only checks that the thread exists.
        if unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0) } != 0 {
            return Err(format!("tgkill: errno {}", errno()));
        }
        std::thread::sleep(Duration::from_millis(1));
        let big = vec![0u8; 8 << 20];
        report.say(&format!("done {}", big.len()));
        Ok(())
    });
    outcome.assert_success();
    assert!(outcome.output.contains("done"), "{}", outcome.output);
}

// ---------------------------------------------------------------------------------------------
// The helper's life: lock-down, vCPU thread under its filter, kicks, thread exit, process exit.

extern "C" fn ignore_signal(_: libc::c_int) {}

#[test]
fn helper_threads_live_and_exit_under_the_sandbox() {
    if !require_root() {
        return;
    }
    let outcome = in_child(|report| {
        // Like the VcpuFd: opened before, owned by the vCPU thread, closed when it ends.
        let owned_fd = File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
        let lock = lock_down_process(SandboxMode::Enforce, None)
            .map_err(|e| format!("lock_down_process: {}", chain(&e)))?;
        report.say(&lock.to_string());
        // The kick signal's handler, installed before the filters (no rt_sigaction after).
        // SAFETY: the handler does nothing, so it is async-signal-safe; the sigaction struct is
        // fully initialized.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
            if libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) != 0 {
                return Err(format!("sigaction: errno {}", errno()));
            }
        }

        let shared = Arc::new((Mutex::new(false), Condvar::new()));
        let vcpu_tid = Arc::new(AtomicI32::new(0));
        let vcpu = std::thread::spawn({
            let shared = Arc::clone(&shared);
            let vcpu_tid = Arc::clone(&vcpu_tid);
            move || -> Result<usize, String> {
                let _owned_fd = owned_fd;
                apply_seccomp(ThreadKind::Vcpu, SandboxMode::Enforce)
                    .map_err(|e| format!("vCPU apply_seccomp: {}", chain(&e)))?;
                // First allocations of this thread: glibc creates its arena.
                let data: Vec<u64> = (0..100_000).collect();
                let mut map = std::collections::HashMap::new();
                map.insert("exits", data.len());
                // SAFETY: gettid takes no argument.
                vcpu_tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                let (lock, condvar) = &*shared;
                let mut go = lock.lock().map_err(|e| e.to_string())?;
                while !*go {
                    // Kicked by SIGUSR1 meanwhile: the handler returns with rt_sigreturn.
                    go = condvar
                        .wait_timeout(go, Duration::from_millis(50))
                        .map_err(|e| e.to_string())?
                        .0;
                }
                report.say("vCPU thread released");
                Ok(map.len() + data.len())
            }
        });
        apply_seccomp(ThreadKind::Vmm, SandboxMode::Enforce)
            .map_err(|e| format!("VMM apply_seccomp: {}", chain(&e)))?;
        let tid = loop {
            match vcpu_tid.load(Ordering::SeqCst) {
                0 => std::thread::sleep(Duration::from_millis(1)),
                tid => break tid,
            }
        };
        for _ in 0..3 {
            // SAFETY: tgkill to a live thread of this process, whose SIGUSR1 handler is empty.
            if unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) } != 0 {
                return Err(format!("tgkill: errno {}", errno()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        {
            let (lock, condvar) = &*shared;
            *lock.lock().map_err(|e| e.to_string())? = true;
            condvar.notify_all();
        }
        let result = vcpu.join().map_err(|_| "the vCPU thread panicked")??;
        report.say(&format!("vCPU thread exited with {result}"));
        Ok(())
    });
    outcome.assert_success();
    assert!(
        outcome.output.contains("vCPU thread exited with 100001"),
        "{}",
        outcome.output
    );
}

#[test]
fn kvm_works_under_the_sandbox() {
    if !require_root() {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let outcome = in_child(|report| {
        let kvm = File::options()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("/dev/kvm: {e}"))?;
        lock_down_process(SandboxMode::Enforce, None)
            .map_err(|e| format!("lock_down_process: {}", chain(&e)))?;
        // fds KVM creates after the lock-down work too.
        // SAFETY: KVM_CREATE_VM takes a machine type, no pointer.
        let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
        if vm < 0 {
            return Err(format!("KVM_CREATE_VM: errno {}", errno()));
        }
        // SAFETY: KVM_CREATE_VCPU takes a vCPU id, no pointer.
        let vcpu = unsafe { libc::ioctl(vm, KVM_CREATE_VCPU, 0) };
        if vcpu < 0 {
            return Err(format!("KVM_CREATE_VCPU: errno {}", errno()));
        }
        apply_seccomp(ThreadKind::Vcpu, SandboxMode::Enforce)
            .map_err(|e| format!("apply_seccomp: {}", chain(&e)))?;
        let mut regs = [0u64; 18]; // struct kvm_regs
        let mut sregs = [0u64; 39]; // struct kvm_sregs, 312 bytes
        // SAFETY: the buffers have the sizes of the structures the kernel writes.
        let (get_regs, get_sregs) = unsafe {
            (
                libc::ioctl(vcpu, KVM_GET_REGS, regs.as_mut_ptr()),
                libc::ioctl(vcpu, KVM_GET_SREGS, sregs.as_mut_ptr()),
            )
        };
        if get_regs != 0 || get_sregs != 0 {
            return Err(format!("KVM_GET_(S)REGS: errno {}", errno()));
        }
        // No guest memory: the first instruction fetch fails and KVM_RUN returns an exit.
        // SAFETY: KVM_RUN takes no argument.
        let run = unsafe { libc::ioctl(vcpu, KVM_RUN, 0) };
        report.say(&format!("KVM_RUN returned {run}"));
        let irq_level = [4u32, 1u32]; // struct kvm_irq_level { irq, level }
        // SAFETY: the kernel reads the 8 bytes of `irq_level`.
        let irq = unsafe { libc::ioctl(vm, KVM_IRQ_LINE, irq_level.as_ptr()) };
        report.say(&format!("KVM_IRQ_LINE returned {irq} (no irqchip)"));
        report.say("allowed KVM ioctls passed");
        // SAFETY: the kernel reads a struct kvm_regs from `regs`.
        let ret = unsafe { libc::ioctl(vcpu, KVM_SET_REGS, regs.as_ptr()) };
        report.say(&format!("survived KVM_SET_REGS: {ret}"));
        Ok(())
    });
    outcome.assert_killed_by_seccomp("allowed KVM ioctls passed");
}

#[test]
fn seccomp_disabled_is_a_no_op() {
    let outcome = in_child(|_report| {
        apply_seccomp(ThreadKind::Vcpu, SandboxMode::Disabled)
            .map_err(|e| format!("apply_seccomp: {}", chain(&e)))?;
        if raw_getcwd() < 0 {
            return Err(format!("getcwd: errno {}", errno()));
        }
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| format!("/proc/self/status: {e}"))?;
        if status_field(&status, "Seccomp")? != "0" {
            return Err("a filter was installed".into());
        }
        Ok(())
    });
    outcome.assert_success();
}
