//! The helper's strict intake of the fds its launcher passed with the systemd convention
//! (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`; fds start at 3).
//!
//! Unlike a socket-activated service, the helper knows exactly what it may receive: an unknown,
//! missing or repeated name, a count that does not match, or a `LISTEN_PID` that is not ours is
//! an error, never something to skip over.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

pub use crate::protocol::FdName;
use crate::protocol::fds::REQUIRED_FDS;

/// The first passed fd (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// More fds than a helper could ever be given (control, kvm, kernel, initrd, console, 8 disks
/// with 16 backing files each, 4 nets): a larger count is a malformed environment, not
/// something to walk through.
const MAX_LISTEN_FDS: usize = 160;

/// Why the passed fds were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FdIntakeError {
    #[error("{0} is not set: this mode is started by vmd with its fds passed as LISTEN_FDS")]
    Missing(&'static str),
    #[error("{var}={value:?} is not a valid number")]
    NotANumber { var: &'static str, value: String },
    #[error(
        "LISTEN_PID={listen_pid} is not this process ({own_pid}): the fds are not meant for us"
    )]
    WrongPid { listen_pid: u32, own_pid: u32 },
    #[error("LISTEN_FDS={0} is out of range (1..={MAX_LISTEN_FDS})")]
    BadCount(usize),
    #[error("LISTEN_FDS={fds} but LISTEN_FDNAMES has {names} names")]
    CountMismatch { fds: usize, names: usize },
    #[error(
        "unexpected fd name {0:?} in LISTEN_FDNAMES (known: control, kvm, kernel, initrd, console, disk<i>, disk<i>.base<j>, net<i>)"
    )]
    UnknownName(String),
    #[error("fd name {0:?} appears more than once in LISTEN_FDNAMES")]
    DuplicateName(String),
    #[error("no {0:?} fd was passed")]
    MissingName(String),
    #[error("fd {fd} ({name:?}) is not open")]
    NotOpen { fd: RawFd, name: String },
}

/// Checks the three variables and returns the fd number of each name. Pure: the fds are not
/// touched.
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    own_pid: u32,
) -> Result<Vec<(FdName, RawFd)>, FdIntakeError> {
    let listen_pid = listen_pid.ok_or(FdIntakeError::Missing("LISTEN_PID"))?;
    let listen_pid: u32 = listen_pid.parse().map_err(|_| FdIntakeError::NotANumber {
        var: "LISTEN_PID",
        value: listen_pid.to_string(),
    })?;
    if listen_pid != own_pid {
        return Err(FdIntakeError::WrongPid {
            listen_pid,
            own_pid,
        });
    }
    let count_text = listen_fds.ok_or(FdIntakeError::Missing("LISTEN_FDS"))?;
    let count: usize = count_text.parse().map_err(|_| FdIntakeError::NotANumber {
        var: "LISTEN_FDS",
        value: count_text.to_string(),
    })?;
    if count == 0 || count > MAX_LISTEN_FDS {
        return Err(FdIntakeError::BadCount(count));
    }
    let names: Vec<&str> = listen_fdnames
        .ok_or(FdIntakeError::Missing("LISTEN_FDNAMES"))?
        .split(':')
        .collect();
    if names.len() != count {
        return Err(FdIntakeError::CountMismatch {
            fds: count,
            names: names.len(),
        });
    }
    let mut fds = Vec::with_capacity(count);
    for (fd, name) in (LISTEN_FDS_START..).zip(names) {
        let known =
            FdName::parse(name).ok_or_else(|| FdIntakeError::UnknownName(name.to_string()))?;
        if fds.iter().any(|(seen, _)| *seen == known) {
            return Err(FdIntakeError::DuplicateName(name.to_string()));
        }
        fds.push((known, fd));
    }
    for required in REQUIRED_FDS {
        if !fds.iter().any(|(name, _)| *name == required) {
            return Err(FdIntakeError::MissingName(required.to_string()));
        }
    }
    Ok(fds)
}

/// The fds the helper owns now.
#[derive(Debug, Default)]
pub struct ReceivedFds {
    fds: HashMap<FdName, OwnedFd>,
}

impl ReceivedFds {
    /// Takes the fd with this name out of the set.
    pub fn take(&mut self, name: FdName) -> Option<OwnedFd> {
        self.fds.remove(&name)
    }

    /// The names still in the set.
    pub fn names(&self) -> Vec<FdName> {
        let mut names: Vec<FdName> = self.fds.keys().copied().collect();
        names.sort();
        names
    }

    /// Puts an fd (back) under a name.
    pub fn insert(&mut self, name: FdName, fd: OwnedFd) {
        self.fds.insert(name, fd);
    }
}

/// A refusal, with the control socket when it could still be identified, so the reason can be
/// sent to the launcher too.
#[derive(Debug)]
pub struct FdIntakeFailure {
    pub error: FdIntakeError,
    pub control: Option<OwnedFd>,
}

/// Reads the environment, checks it, and takes ownership of the fds (marking them close-on-exec
/// and removing the variables, so nothing leaks further).
///
/// # Safety
/// Call it before the process opens any fd of its own that stays open (logging's journal
/// socket included): every open fd in the claimed range is then one the launcher passed, and
/// becomes an `OwnedFd` nothing else owns. And call it while the process is single-threaded
/// (it changes the environment).
pub unsafe fn take_listen_fds() -> Result<ReceivedFds, FdIntakeFailure> {
    let var = |name: &str| std::env::var(name).ok();
    let (pid, count, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: the caller guarantees no other thread exists to read the environment
        // concurrently.
        unsafe { std::env::remove_var(name) };
    }
    let own_pid = std::process::id();
    let parsed = parse_listen_env(pid.as_deref(), count.as_deref(), names.as_deref(), own_pid);
    let parsed = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            let control = control_fd_despite(&error, pid.as_deref(), names.as_deref(), own_pid);
            return Err(FdIntakeFailure { error, control });
        }
    };
    let mut received = ReceivedFds::default();
    for (name, fd) in parsed {
        // F_SETFD fails with EBADF when nothing is open at that number.
        if fcntl_setfd_cloexec(fd).is_err() {
            let control = received.take(FdName::Control);
            return Err(FdIntakeFailure {
                error: FdIntakeError::NotOpen {
                    fd,
                    name: name.to_string(),
                },
                control,
            });
        }
        // SAFETY: the fd is open (checked just above); since the process has opened no fd of
        // its own yet (the caller's obligation), it is one the launcher passed for us to own,
        // and it appears once in the list (duplicate names were refused).
        received
            .fds
            .insert(name, unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(received)
}

fn fcntl_setfd_cloexec(fd: RawFd) -> nix::Result<()> {
    // SAFETY: the fd number is only used for this fcntl, which is harmless on any number.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
}

/// When the names are wrong but the fds are ours, the one named `control` still lets the helper
/// tell its launcher why it refuses to run.
fn control_fd_despite(
    error: &FdIntakeError,
    pid: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Option<OwnedFd> {
    let fds_are_ours = !matches!(
        error,
        FdIntakeError::Missing("LISTEN_PID")
            | FdIntakeError::WrongPid { .. }
            | FdIntakeError::NotANumber {
                var: "LISTEN_PID",
                ..
            }
    ) && pid.and_then(|p| p.parse::<u32>().ok()) == Some(own_pid);
    if !fds_are_ours {
        return None;
    }
    let position = names?.split(':').position(|name| name == "control")?;
    let fd = LISTEN_FDS_START + RawFd::try_from(position).ok()?;
    fcntl_setfd_cloexec(fd).ok()?;
    // SAFETY: the fd is open (F_SETFD succeeded) and, as the process has opened no fd of its
    // own yet (take_listen_fds' caller guarantees it), was passed to us under the name
    // `control`; nothing else in the helper takes ownership of it on this failure path.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pid: &str, count: &str, names: &str) -> Result<Vec<(FdName, RawFd)>, FdIntakeError> {
        parse_listen_env(Some(pid), Some(count), Some(names), 42)
    }

    #[test]
    fn accepts_the_launcher_layout() {
        assert_eq!(
            parse("42", "4", "control:kvm:kernel:console"),
            Ok(vec![
                (FdName::Control, 3),
                (FdName::Kvm, 4),
                (FdName::Kernel, 5),
                (FdName::Console, 6)
            ])
        );
    }

    #[test]
    fn accepts_disks_and_their_backing_chains() {
        assert_eq!(
            parse("42", "5", "control:kvm:kernel:disk0:disk0.base1"),
            Ok(vec![
                (FdName::Control, 3),
                (FdName::Kvm, 4),
                (FdName::Kernel, 5),
                (FdName::Disk(0), 6),
                (FdName::DiskBase { disk: 0, layer: 1 }, 7),
            ])
        );
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(
            parse("41", "3", "control:kvm:kernel"),
            Err(FdIntakeError::WrongPid {
                listen_pid: 41,
                own_pid: 42
            })
        );
        assert!(matches!(
            parse("x", "3", "control:kvm:kernel"),
            Err(FdIntakeError::NotANumber { .. })
        ));
        assert_eq!(
            parse_listen_env(None, Some("3"), Some("control:kvm:kernel"), 42),
            Err(FdIntakeError::Missing("LISTEN_PID"))
        );
        assert_eq!(parse("42", "0", ""), Err(FdIntakeError::BadCount(0)));
        assert_eq!(
            parse("42", "161", "control"),
            Err(FdIntakeError::BadCount(161))
        );
        assert!(matches!(
            parse("42", "-1", "control"),
            Err(FdIntakeError::NotANumber { .. })
        ));
        assert_eq!(
            parse("42", "3", "control:kvm"),
            Err(FdIntakeError::CountMismatch { fds: 3, names: 2 })
        );
        assert_eq!(
            parse("42", "3", "control:kvm:disk8"),
            Err(FdIntakeError::UnknownName("disk8".into()))
        );
        assert_eq!(
            parse("42", "3", "control:kvm:kvm"),
            Err(FdIntakeError::DuplicateName("kvm".into()))
        );
        assert_eq!(
            parse("42", "2", "control:kvm"),
            Err(FdIntakeError::MissingName("kernel".into()))
        );
        assert_eq!(
            parse("42", "3", "control:kvm:"),
            Err(FdIntakeError::UnknownName(String::new()))
        );
    }
}
