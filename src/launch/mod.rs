//! Starting a VM helper: the Linux form of OpenBSD vmd's `vmm_start_vm`.
//!
//! Everything is prepared before `fork`: the fd table, argv, envp and signal masks. The parent
//! blocks every signal around `fork`, so none of its handlers can run in the child. The child
//! then does only async-signal-safe work (the parent may be multi-threaded): every signal
//! disposition back to the default, exactly the helper's termination signals blocked (one sent
//! during start-up waits for the helper's signalfd), new session, stdin/stdout on /dev/null,
//! the passed fds moved to 3.. with close-on-exec cleared on exactly those and set on every
//! other fd it inherited, its own pid written into `LISTEN_PID`, and `execveat` of the
//! executable through an fd opened when the launcher was created, so a package upgrade on disk
//! never pairs an old parent with a new helper. An exec failure comes back to the parent
//! through a close-on-exec pipe.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{OFlag, open};
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::helper::event_loop::handled_signals;
use crate::helper::listen_fds::LISTEN_FDS_START;
use crate::protocol::ControlChannel;
use crate::sandbox::{Account, resolve_target_account};

/// Errors from starting a helper.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot open the vmd executable {path}")]
    OpenExecutable {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create the control socket")]
    ControlSocket(#[source] std::io::Error),
    #[error("cannot open /dev/null")]
    DevNull(#[source] nix::Error),
    #[error("an fd name ({0:?}) is empty or contains ':' or a NUL byte")]
    BadFdName(String),
    #[error("an argument or environment variable contains a NUL byte")]
    NulByte,
    #[error("cannot create the exec status pipe")]
    Pipe(#[source] nix::Error),
    #[error("cannot block signals around fork")]
    SignalMask(#[source] nix::Error),
    #[error("fork failed")]
    Fork(#[source] nix::Error),
    #[error("cannot execute the helper")]
    Exec(#[source] nix::Error),
    #[error("cannot open a pidfd for helper {pid}")]
    Pidfd {
        pid: i32,
        #[source]
        source: nix::Error,
    },
}

/// Starts helpers from one executable, opened once.
pub struct Launcher {
    executable: OwnedFd,
    /// The account helpers switch to, when [`Launcher::resolve_account`] looked it up once for
    /// all of them (`vmd vm --account`); otherwise each helper looks it up itself.
    account: Option<Account>,
}

/// What to pass to a helper besides the control socket, which the launcher creates itself.
pub struct HelperSpawn {
    /// Named fds, in order; they become fds 4.. in the helper (3 is `control`).
    pub fds: Vec<(String, OwnedFd)>,
    /// Arguments after the program name, starting with `vm` (the launcher adds `--account`).
    pub args: Vec<String>,
}

/// A started helper.
pub struct HelperProcess {
    pub pid: Pid,
    /// Readable once the helper has exited (the daemon tracks helpers with these, never by
    /// polling).
    pub pidfd: OwnedFd,
    pub control: ControlChannel,
}

/// How a helper ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelperExit {
    Exited(i32),
    Signaled(i32),
}

impl HelperProcess {
    /// Reaps the helper (blocking until it exits).
    pub fn wait(&self) -> nix::Result<HelperExit> {
        loop {
            match waitpid(self.pid, None)? {
                WaitStatus::Exited(_, code) => return Ok(HelperExit::Exited(code)),
                WaitStatus::Signaled(_, signal, _) => {
                    return Ok(HelperExit::Signaled(signal as i32));
                }
                _ => continue,
            }
        }
    }
}

impl Launcher {
    /// Launches the running executable (`/proc/self/exe`), as the daemon and `vmd run` do.
    pub fn current_executable() -> Result<Self, LaunchError> {
        Self::from_path(Path::new("/proc/self/exe"))
    }

    /// Launches the executable at `path` (tests start the built `vmd` binary this way).
    pub fn from_path(path: &Path) -> Result<Self, LaunchError> {
        let executable =
            open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).map_err(|source| {
                LaunchError::OpenExecutable {
                    path: path.display().to_string(),
                    source,
                }
            })?;
        Ok(Launcher {
            executable,
            account: None,
        })
    }

    /// Looks up the account helpers switch to once, here, and hands it to every helper: a
    /// long-lived launcher (the daemon) saves each start the passwd lookup through NSS, which
    /// loads its modules and probes the userdb directories every time. Nothing is handed over
    /// when the launcher does not run as root or the lookup fails: each helper then looks the
    /// account up itself and reports a failure as its own. A one-shot launcher (`vmd run`) gains
    /// nothing from it: the lookup would only move from its helper to itself.
    pub fn resolve_account(mut self) -> Self {
        self.account = match resolve_target_account() {
            Ok(account) => account,
            Err(err) => {
                tracing::warn!("helpers will look their account up themselves: {err}");
                None
            }
        };
        self
    }

    /// Forks and execs a helper with `spawn.fds` passed as LISTEN_FDS after `control`.
    pub fn spawn(&self, spawn: HelperSpawn) -> Result<HelperProcess, LaunchError> {
        let (ours, theirs) = ControlChannel::pair().map_err(LaunchError::ControlSocket)?;
        let mut names = vec!["control".to_string()];
        let mut fds: Vec<OwnedFd> = vec![theirs.into_fd()];
        for (name, fd) in spawn.fds {
            if name.is_empty() || name.contains([':', '\0']) {
                return Err(LaunchError::BadFdName(name));
            }
            names.push(name);
            fds.push(fd);
        }

        let program = CString::new("vmd").map_err(|_| LaunchError::NulByte)?;
        let mut argv = vec![program];
        for arg in spawn.args {
            argv.push(CString::new(arg).map_err(|_| LaunchError::NulByte)?);
        }
        if let Some(account) = &self.account {
            argv.push(c"--account".into());
            argv.push(CString::new(account.to_argument()).map_err(|_| LaunchError::NulByte)?);
        }
        let mut env = environment_without_listen_vars()?;
        env.push(
            CString::new(format!("LISTEN_FDS={}", fds.len())).map_err(|_| LaunchError::NulByte)?,
        );
        env.push(
            CString::new(format!("LISTEN_FDNAMES={}", names.join(":")))
                .map_err(|_| LaunchError::NulByte)?,
        );
        // Filled in by the child with its own pid: "LISTEN_PID=" + up to 20 digits + NUL.
        let mut listen_pid = Vec::with_capacity(LISTEN_PID_PREFIX.len() + 21);
        listen_pid.extend_from_slice(LISTEN_PID_PREFIX);
        listen_pid.resize(LISTEN_PID_PREFIX.len() + 21, 0);

        let dev_null = open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(LaunchError::DevNull)?;
        let (status_read, status_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(LaunchError::Pipe)?;

        let argv_ptrs = null_terminated(&argv);
        let mut envp_ptrs: Vec<*const libc::c_char> = env.iter().map(|s| s.as_ptr()).collect();
        envp_ptrs.push(listen_pid.as_ptr().cast());
        envp_ptrs.push(std::ptr::null());
        let raw_fds: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let helper_mask = handled_signals();
        let child = ChildSetup {
            executable: self.executable.as_raw_fd(),
            dev_null: dev_null.as_raw_fd(),
            status_pipe: status_write.as_raw_fd(),
            fds: &raw_fds,
            argv: &argv_ptrs,
            envp: &envp_ptrs,
            listen_pid: listen_pid.as_mut_ptr(),
            signal_mask: *helper_mask.as_ref(),
        };

        // No signal may run one of this process's handlers in the child: block them all from
        // before the fork until the child has reset every disposition.
        let parent_mask = SigSet::all()
            .thread_swap_mask(SigmaskHow::SIG_SETMASK)
            .map_err(LaunchError::SignalMask)?;
        // SAFETY: fork has no memory-safety preconditions of its own; in the child we only call
        // `ChildSetup::exec`, which performs async-signal-safe system calls on memory prepared
        // before the fork and never returns.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: we are the child of a fork; see ChildSetup::exec.
            unsafe { child.exec() };
        }
        let fork_error = nix::Error::last();
        // Restoring a mask this thread had a moment ago cannot fail.
        let _ = parent_mask.thread_set_mask();
        if pid < 0 {
            return Err(LaunchError::Fork(fork_error));
        }
        let pid = Pid::from_raw(pid);
        drop(status_write);
        drop(fds);
        let exec_result = read_exec_status(&status_read);
        if let Err(errno) = exec_result {
            let _ = waitpid(pid, None);
            return Err(LaunchError::Exec(errno));
        }
        let pidfd = pidfd_open(pid).map_err(|source| LaunchError::Pidfd {
            pid: pid.as_raw(),
            source,
        })?;
        Ok(HelperProcess {
            pid,
            pidfd,
            control: ours,
        })
    }
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

fn environment_without_listen_vars() -> Result<Vec<CString>, LaunchError> {
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        // The helper gets its own LISTEN_* below, and must not talk to the service manager
        // as if it were the service (sd_notify, watchdog). A backtrace would make a panic in
        // the helper read its own executable to symbolize it: an openat its seccomp filter
        // punishes with SIGSYS, where the panic should have been a reported failure.
        if key.as_bytes().starts_with(b"LISTEN_")
            || [
                &b"NOTIFY_SOCKET"[..],
                b"WATCHDOG_USEC",
                b"WATCHDOG_PID",
                b"RUST_BACKTRACE",
                b"RUST_LIB_BACKTRACE",
            ]
            .contains(&key.as_bytes())
        {
            continue;
        }
        let mut entry = key.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(OsStr::as_bytes(&value));
        env.push(CString::new(entry).map_err(|_| LaunchError::NulByte)?);
    }
    Ok(env)
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Blocks until the child has exec'd (the pipe closes: Ok) or reported an errno.
fn read_exec_status(pipe: &OwnedFd) -> Result<(), nix::Error> {
    let mut buf = [0u8; 4];
    loop {
        match nix::unistd::read(pipe.as_fd(), &mut buf) {
            Ok(4) => return Err(nix::Error::from_raw(i32::from_ne_bytes(buf))),
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(err) => return Err(err),
        }
    }
}

fn pidfd_open(pid: Pid) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns (pidfds are close-on-exec).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Raw pointers and numbers the child needs, all prepared before `fork`.
struct ChildSetup<'a> {
    executable: RawFd,
    dev_null: RawFd,
    status_pipe: RawFd,
    fds: &'a [RawFd],
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    listen_pid: *mut u8,
    /// The helper's termination signals, blocked across exec.
    signal_mask: libc::sigset_t,
}

impl ChildSetup<'_> {
    /// Runs in the forked child; execs, or reports the errno through the status pipe and exits
    /// with 127.
    ///
    /// # Safety
    /// Must be called only in the child of `fork`, once. Only async-signal-safe calls are made;
    /// nothing allocates or takes a lock.
    unsafe fn exec(&self) -> ! {
        let first_free = LISTEN_FDS_START + self.fds.len() as RawFd;
        // Move the status pipe out of the target range first: a dup2 below may overwrite its
        // original number.
        // SAFETY: fcntl on an fd number; no memory is involved.
        let moved = unsafe { libc::fcntl(self.status_pipe, libc::F_DUPFD_CLOEXEC, first_free) };
        let status_pipe = if moved >= 0 { moved } else { self.status_pipe };
        let errno = match self.prepare_and_exec(first_free) {
            Ok(never) => match never {},
            Err(errno) => errno,
        };
        let bytes = errno.to_ne_bytes();
        // SAFETY: writes 4 bytes from a stack buffer, then leaves without running any destructor
        // or atexit handler of the parent's copy of the process.
        unsafe {
            libc::write(status_pipe, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        }
    }

    /// Sets up the fd table and the environment, then execs; returns the errno of the step
    /// that failed.
    fn prepare_and_exec(&self, first_free: RawFd) -> Result<std::convert::Infallible, i32> {
        let check = |ret: libc::c_int| if ret < 0 { Err(errno()) } else { Ok(ret) };
        // SAFETY: plain system calls on fd numbers, on local structs, and on memory that was
        // prepared before fork and stays valid in the child's copy of the address space (argv,
        // envp, the LISTEN_PID buffer, which has room for 21 more bytes after its prefix).
        unsafe {
            // Every signal is blocked (the parent did so before fork). Dispositions first, so
            // no handler of the parent's can run here once signals are let through; then the
            // mask the helper starts with. sigaction fails for SIGKILL, SIGSTOP and glibc's
            // internal signals, which need no reset.
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            for signal in 1..=KERNEL_LAST_SIGNAL {
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
            check(libc::pthread_sigmask(
                libc::SIG_SETMASK,
                &self.signal_mask,
                std::ptr::null_mut(),
            ))?;
            check(libc::setsid())?;

            // Move every fd we still need above the target range first, so no dup2 below can
            // clobber a source (or the executable).
            let dev_null = check(libc::fcntl(
                self.dev_null,
                libc::F_DUPFD_CLOEXEC,
                first_free,
            ))?;
            let executable = check(libc::fcntl(
                self.executable,
                libc::F_DUPFD_CLOEXEC,
                first_free,
            ))?;
            let mut high = [0 as RawFd; 64];
            if self.fds.len() > high.len() {
                return Err(libc::EMFILE);
            }
            for (slot, fd) in high.iter_mut().zip(self.fds) {
                *slot = check(libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, first_free))?;
            }
            check(libc::dup2(dev_null, 0))?;
            check(libc::dup2(dev_null, 1))?;
            // dup2 clears FD_CLOEXEC on the target: exactly these fds survive exec.
            for (target, fd) in (LISTEN_FDS_START..).zip(&high[..self.fds.len()]) {
                check(libc::dup2(*fd, target))?;
            }
            // Everything above them is closed by exec: fds this process inherited without
            // close-on-exec (`vmd run ... 9</etc/shadow`) never reach the helper. Marked rather
            // than closed, as the executable and the status pipe are needed until execveat.
            check(libc::syscall(
                libc::SYS_close_range,
                first_free as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) as libc::c_int)?;

            write_decimal(
                self.listen_pid.add(LISTEN_PID_PREFIX.len()),
                libc::getpid() as u64,
            );
            libc::syscall(
                libc::SYS_execveat,
                executable,
                c"".as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            Err(errno())
        }
    }
}

/// The highest signal number on Linux (`_NSIG - 1`, SIGRTMAX as the kernel counts).
const KERNEL_LAST_SIGNAL: libc::c_int = 64;

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

/// Writes `value` in decimal followed by NUL at `dst` (which has room for 21 bytes), without
/// allocating.
///
/// # Safety
/// `dst` must be valid for 21 bytes of writes.
unsafe fn write_decimal(dst: *mut u8, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (value % 10) as u8;
        len += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: i < 20 < 21, within the caller's guarantee.
        unsafe { *dst.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: len <= 20 < 21.
    unsafe { *dst.add(len) = 0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_writer_matches_format() {
        for value in [0u64, 7, 42, 4_194_304, u64::MAX] {
            let mut buf = [0xffu8; 21];
            // SAFETY: the buffer has 21 bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), value) };
            let end = buf.iter().position(|&b| b == 0).expect("NUL");
            assert_eq!(std::str::from_utf8(&buf[..end]).unwrap(), value.to_string());
        }
    }
}
