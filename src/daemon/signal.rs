//! Signalling helpers. Once a helper has locked itself down it runs as vmd-vm (or nobody), and
//! the kernel lets a process signal one of another uid only with CAP_KILL, which vmd.service
//! does without (it has CAP_NET_ADMIN for taps instead, and its `systemd-analyze security`
//! exposure stays at most 2.0). When the direct signal is refused, a forked child of the daemon
//! takes the helper's uid (with CAP_SETUID, which the daemon has to launch helpers) and sends
//! the signal from there: a user may signal its own processes. The child loses every
//! capability with its root uids, so it can signal nothing else.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::wait::{WaitStatus, waitpid};

/// Sends `signal` to the process behind `pidfd`.
pub fn send_signal(pidfd: &OwnedFd, signal: i32) -> nix::Result<()> {
    match pidfd_send_signal(pidfd, signal) {
        Err(Errno::EPERM) => as_helper_user(pidfd, signal),
        other => other,
    }
}

fn pidfd_send_signal(pidfd: &OwnedFd, signal: i32) -> nix::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo and no flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Sends `signal` from a child that has switched to the helpers' user.
fn as_helper_user(pidfd: &OwnedFd, signal: i32) -> nix::Result<()> {
    let account = crate::sandbox::resolve_target_account()
        .ok()
        .flatten()
        .ok_or(Errno::EPERM)?;
    let uid = account.uid as libc::c_long;
    let fd = pidfd.as_raw_fd();
    // SAFETY: fork in a multi-threaded process: the child only makes raw system calls
    // (setresuid, pidfd_send_signal), reads its own errno and calls _exit, all of which are
    // async-signal-safe; it touches no lock and allocates nothing.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(Errno::last());
    }
    if child == 0 {
        // SAFETY: see above; `fd` stays open in the child (fork copies the fd table).
        unsafe {
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            let ret = libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
            libc::_exit(if ret == 0 {
                0
            } else {
                *libc::__errno_location()
            });
        }
    }
    let child = nix::unistd::Pid::from_raw(child);
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => return Ok(()),
            Ok(WaitStatus::Exited(_, errno)) => return Err(Errno::from_raw(errno)),
            Ok(_) => return Err(Errno::EIO),
            Err(Errno::EINTR) => continue,
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::os::unix::process::{CommandExt, ExitStatusExt};

    #[test]
    fn a_helper_of_another_uid_is_signalled_as_that_uid() {
        let Ok(Some(account)) = crate::sandbox::resolve_target_account() else {
            eprintln!("SKIPPED: not root");
            return;
        };
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .uid(account.uid)
            .gid(account.gid)
            .spawn()
            .expect("spawn");
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; the child is
        // not reaped before this, so the pid is still its own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: pidfd_open returned a new fd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // The path taken when the direct signal is refused.
        as_helper_user(&pidfd, libc::SIGKILL).expect("signal as the helper's user");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // A process of another uid (this test's own, root) is out of that user's reach.
        let own = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn");
        // SAFETY: as above.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, own.id() as libc::pid_t, 0) };
        // SAFETY: as above.
        let own_pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        assert_eq!(as_helper_user(&own_pidfd, libc::SIGKILL), Err(Errno::EPERM));
        let mut own = own;
        let _ = own.kill();
        let _ = own.wait();
    }
}
