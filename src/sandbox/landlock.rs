//! Landlock deny-all: the `unveil("/var/empty")` part of the sandbox.
//!
//! The ruleset handles every access right of [`LANDLOCK_ABI`] (filesystem, TCP, scopes) and has
//! no rules, so nothing handled is granted. Rights are checked when a file is opened: fds opened
//! before keep working.

use std::fmt;

use ::landlock::{
    ABI, Access, AccessFs, AccessNet, LandlockStatus, Ruleset, RulesetAttr, RulesetError,
    RulesetStatus, Scope,
};

/// The landlock ABI whose access rights the ruleset handles: V6 (Linux 6.12) has every
/// filesystem right, TCP bind/connect and the abstract-unix-socket and signal scopes.
///
/// The crate's compatibility handling drops what the running kernel lacks, and
/// [`lock_down_process`](super::lock_down_process) refuses anything but a fully enforced
/// ruleset, so the sandbox needs a kernel with at least this ABI. Raise it (after testing on a
/// kernel that has the new ABI) to handle newer rights: V7 only adds audit-log flags, V9/V10
/// (per landlock 0.4.8) add pathname-unix-socket and UDP rights, which a kernel with ABI 7 (Linux
/// 6.18) cannot enforce, so raising it today would make `Enforce` fail there.
pub const LANDLOCK_ABI: ABI = ABI::V6;

/// The landlock part of a [`LockDownReport`](super::LockDownReport).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandlockReport {
    /// The ABI whose rights the ruleset handles ([`LANDLOCK_ABI`]).
    pub ruleset_abi: u32,
    /// The landlock ABI of the running kernel.
    pub kernel_abi: u32,
}

impl fmt::Display for LandlockReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "landlock ABI {} fully enforced (kernel ABI {})",
            self.ruleset_abi, self.kernel_abi
        )
    }
}

/// Errors from restricting the process with landlock.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("cannot build or apply the landlock ruleset")]
    Ruleset(#[source] RulesetError),
    #[error(
        "landlock is not available: the kernel is not built with it, or it is not enabled at \
         boot (add landlock to the lsm= kernel parameter)"
    )]
    Unavailable,
    #[error(
        "landlock is only partially enforced: the kernel has landlock ABI {kernel_abi}, the \
         sandbox needs ABI {ruleset_abi} (Linux 6.12 or later)"
    )]
    PartiallyEnforced { ruleset_abi: u32, kernel_abi: u32 },
    #[error("landlock did not set no_new_privs")]
    NoNewPrivs,
}

/// Restricts the calling thread (and the threads it will create) with a deny-all ruleset.
///
/// Also sets no_new_privs (the crate does it first; the kernel requires it or
/// `CAP_SYS_ADMIN`). Fails unless the ruleset is fully enforced.
pub(super) fn restrict_everything() -> Result<LandlockReport, LandlockError> {
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .and_then(|ruleset| ruleset.handle_access(AccessNet::from_all(LANDLOCK_ABI)))
        .and_then(|ruleset| ruleset.scope(Scope::from_all(LANDLOCK_ABI)))
        .and_then(Ruleset::create)
        // No add_rule(): nothing handled is allowed.
        .and_then(|created| created.restrict_self())
        .map_err(LandlockError::Ruleset)?;

    let kernel_abi = match status.landlock {
        LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => kernel_abi
            .and_then(|abi| u32::try_from(abi).ok())
            .unwrap_or_else(|| abi_number(effective_abi)),
        // NotEnabled, NotImplemented and any future "unavailable" state.
        _ => return Err(LandlockError::Unavailable),
    };
    let report = LandlockReport {
        ruleset_abi: abi_number(LANDLOCK_ABI),
        kernel_abi,
    };
    match status.ruleset {
        RulesetStatus::FullyEnforced => {}
        RulesetStatus::PartiallyEnforced => {
            return Err(LandlockError::PartiallyEnforced {
                ruleset_abi: report.ruleset_abi,
                kernel_abi: report.kernel_abi,
            });
        }
        RulesetStatus::NotEnforced => return Err(LandlockError::Unavailable),
    }
    if !status.no_new_privs {
        return Err(LandlockError::NoNewPrivs);
    }
    tracing::debug!("{report}");
    Ok(report)
}

/// The number of a landlock ABI (`ABI` is `#[non_exhaustive]`, so it cannot be cast; its
/// `Display` prints the number, or "unsupported").
fn abi_number(abi: ABI) -> u32 {
    abi.to_string().parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_numbers() {
        assert_eq!(abi_number(ABI::Unsupported), 0);
        assert_eq!(abi_number(ABI::V1), 1);
        assert_eq!(abi_number(LANDLOCK_ABI), 6);
    }

    #[test]
    fn ruleset_handles_fs_net_and_scopes() {
        // The deny-all depends on V6 covering these; a landlock upgrade must keep them.
        assert!(AccessFs::from_all(LANDLOCK_ABI).contains(AccessFs::ReadFile | AccessFs::Execute));
        assert!(AccessFs::from_all(LANDLOCK_ABI).contains(AccessFs::IoctlDev | AccessFs::Truncate));
        assert_eq!(
            AccessNet::from_all(LANDLOCK_ABI),
            AccessNet::BindTcp | AccessNet::ConnectTcp
        );
        assert_eq!(
            Scope::from_all(LANDLOCK_ABI),
            Scope::AbstractUnixSocket | Scope::Signal
        );
    }
}
