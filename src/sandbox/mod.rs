//! The sandbox of the per-VM helper: the Linux counterpart of OpenBSD vmd's `pledge` +
//! `unveil("/var/empty")`.
//!
//! # Model
//!
//! The helper is re-executed by the front end and receives every file descriptor it will ever
//! need (control socket, `/dev/kvm`, kernel image, console) through `LISTEN_FDS`. Once it has
//! them it gives up every way of reaching anything else:
//!
//! 1. [`lock_down_process`] (once, process-wide, while single-threaded):
//!    - **landlock** with a ruleset that handles every filesystem right, the TCP rights and the
//!      abstract-unix-socket and signal scopes, and grants nothing: no path can be opened any
//!      more, no TCP port bound or connected, no abstract socket outside the sandbox connected,
//!      no process outside the sandbox signalled. File descriptors opened before keep working
//!      (landlock checks rights when a file is opened, not when it is used), and so do the fds
//!      KVM creates later (`KVM_CREATE_VM`, `KVM_CREATE_VCPU`: anonymous inodes get all rights).
//!    - **no_new_privs**: `execve` can never grant privileges again.
//!    - **credentials**: a root helper becomes `vmd-vm` (or `nobody` when that user does not
//!      exist) for real, effective and saved ids, with no supplementary groups.
//!    - **capabilities**: bounding, ambient, effective, permitted and inheritable sets emptied.
//!    - **not dumpable**: no core dumps, no ptrace by same-uid processes (other VMs' helpers
//!      run as the same user), `/proc/<pid>` owned by root.
//! 2. [`apply_seccomp`] (per thread, in each thread once it exists): an allow-list of system
//!    calls for that kind of thread ([`ThreadKind`]); anything else kills the whole process
//!    with `SIGSYS`, so a violation is loud.
//!
//! # Ordering constraints
//!
//! * `landlock_restrict_self`, `capset`, `PR_SET_NO_NEW_PRIVS` and `PR_CAPBSET_DROP` act on the
//!   calling **thread** only; threads created later inherit them. So [`lock_down_process`] must
//!   run while the process has a single thread (it checks `/proc/self/task` and refuses
//!   otherwise), and every vCPU thread must be spawned after it.
//! * The target user is looked up in the passwd database **before** landlock is applied:
//!   afterwards `/etc/passwd` (and NSS in general) is unreachable.
//! * The bounding set is dropped **before** the uid change, since `PR_CAPBSET_DROP` needs
//!   `CAP_SETPCAP`, which the process loses when it stops being root.
//! * `PR_SET_DUMPABLE 0` comes **after** the uid change: changing credentials resets the
//!   dumpable flag (to `fs.suid_dumpable`). A credential change also clears the parent-death
//!   signal; [`lock_down_process`] restores it, so `PR_SET_PDEATHSIG` may be set before it.
//! * Seccomp filters are installed per thread, without `TSYNC`: the main (VMM) thread installs
//!   its filter after it has spawned the vCPU threads (its list has no `clone`), and each vCPU
//!   thread installs its own at its start, after any thread-local setup that needs more
//!   (e.g. mapping the `kvm_run` area, installing the kick signal handler: `rt_sigaction` is in
//!   neither list).
//!
//! [`SandboxMode::Disabled`] (the user's explicit `--no-sandbox`) skips all of this.

mod landlock;
mod privileges;
mod seccomp;

use std::fmt;

pub use self::landlock::{LANDLOCK_ABI, LandlockError, LandlockReport};
pub use self::privileges::{
    Account, DropPrivilegesError, FALLBACK_USER, ResolveUserError, SANDBOX_USER,
    resolve_target_account, target_account,
};
pub use self::seccomp::{SeccompError, ThreadKind, apply_seccomp};

/// Whether the sandbox is required.
///
/// `Enforce` refuses to run when the kernel cannot enforce a part of it (e.g. landlock not
/// available / only partially enforced); `Disabled` (the user's explicit `--no-sandbox`) skips
/// everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// Lock down completely, or fail.
    Enforce,
    /// Do nothing (explicit `--no-sandbox`).
    Disabled,
}

/// What [`lock_down_process`] did, for logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockDownReport {
    /// The mode it ran in; with [`SandboxMode::Disabled`] nothing was changed.
    pub mode: SandboxMode,
    /// The landlock ABIs involved; `None` when disabled.
    pub landlock: Option<LandlockReport>,
    /// The account the process switched to; `None` when it did not start as root (it keeps its
    /// ids) or when disabled.
    pub account: Option<Account>,
    /// The user id the process runs as afterwards (real, effective and saved).
    pub uid: u32,
    /// The group id the process runs as afterwards (real, effective and saved).
    pub gid: u32,
    /// Whether the capability bounding set was emptied. An unprivileged process cannot do it
    /// (it lacks `CAP_SETPCAP`); with no_new_privs set the bounding set has no effect anyway.
    pub bounding_set_cleared: bool,
}

impl fmt::Display for LockDownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mode == SandboxMode::Disabled {
            return write!(
                f,
                "sandbox disabled, running as uid {} gid {}",
                self.uid, self.gid
            );
        }
        write!(f, "sandbox enforced: ")?;
        if let Some(landlock) = &self.landlock {
            write!(f, "{landlock}, ")?;
        }
        match &self.account {
            Some(account) => write!(f, "switched to {account}, ")?,
            None => write!(f, "kept uid {} gid {}, ", self.uid, self.gid)?,
        }
        write!(
            f,
            "capabilities dropped{}, no_new_privs, not dumpable",
            if self.bounding_set_cleared {
                ""
            } else {
                " (bounding set kept: no CAP_SETPCAP)"
            }
        )
    }
}

/// Errors from [`lock_down_process`].
#[derive(Debug, thiserror::Error)]
pub enum LockDownError {
    #[error("cannot count the threads of the process in /proc/self/task")]
    CountThreads(#[source] std::io::Error),
    #[error("the process has {0} threads: the lock-down must happen while it has only one")]
    NotSingleThreaded(usize),
    #[error("cannot choose the user to run as")]
    ResolveUser(#[source] ResolveUserError),
    #[error("cannot restrict the process with landlock")]
    Landlock(#[source] LandlockError),
    #[error("cannot drop privileges")]
    DropPrivileges(#[source] DropPrivilegesError),
}

/// Process-wide lock-down: landlock deny-all, no_new_privs, switch away from root, drop every
/// capability, not dumpable (see the [module documentation](self) for the model and the order).
///
/// MUST be called while the process is single-threaded (it checks, and fails otherwise):
/// landlock, capabilities and prctl act per thread, threads spawned later inherit.
///
/// Irreversible. On error the process is left partly locked down and should exit.
///
/// `account` is the account a launcher resolved for the helper ([`resolve_target_account`]);
/// without one it is looked up here.
pub fn lock_down_process(
    mode: SandboxMode,
    account: Option<Account>,
) -> Result<LockDownReport, LockDownError> {
    if mode == SandboxMode::Disabled {
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        tracing::warn!("sandbox disabled: not restricting the VM helper");
        return Ok(LockDownReport {
            mode,
            landlock: None,
            account: None,
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            bounding_set_cleared: false,
        });
    }

    // Everything that needs the filesystem (procfs, the passwd database) happens before
    // landlock.
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(LockDownError::CountThreads)?
        .count();
    if threads != 1 {
        return Err(LockDownError::NotSingleThreaded(threads));
    }
    let target = privileges::target_account(account).map_err(LockDownError::ResolveUser)?;
    let parent_death_signal =
        privileges::parent_death_signal().map_err(LockDownError::DropPrivileges)?;

    // 1. landlock: from now on no path can be opened.
    let landlock = landlock::restrict_everything().map_err(LockDownError::Landlock)?;

    // 2. no_new_privs (landlock already set it; set and check it explicitly anyway).
    privileges::set_no_new_privs().map_err(LockDownError::DropPrivileges)?;

    // 4a. Bounding set while we may still hold CAP_SETPCAP (i.e. before the uid change).
    let bounding_set_cleared =
        privileges::drop_bounding_set().map_err(LockDownError::DropPrivileges)?;

    // 3. Credentials.
    if let Some(account) = &target {
        privileges::switch_to(account).map_err(LockDownError::DropPrivileges)?;
    }

    // 4b. The other capability sets (the uid change already cleared most; make sure).
    privileges::clear_capabilities(bounding_set_cleared).map_err(LockDownError::DropPrivileges)?;

    // 5. Not dumpable, after the credential change (which resets it).
    privileges::set_not_dumpable().map_err(LockDownError::DropPrivileges)?;
    privileges::restore_parent_death_signal(parent_death_signal)
        .map_err(LockDownError::DropPrivileges)?;

    let (uid, gid) =
        privileges::check_final_ids(target.as_ref()).map_err(LockDownError::DropPrivileges)?;
    Ok(LockDownReport {
        mode,
        landlock: Some(landlock),
        account: target,
        uid,
        gid,
        bounding_set_cleared,
    })
}
