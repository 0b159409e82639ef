//! Credentials, capabilities, no_new_privs and the dumpable flag.
//!
//! Every change is checked by reading the state back: a sandbox step that silently did not
//! happen is worse than an error.

use std::fmt;
use std::io;

use caps::{CapSet, errors::CapsError};
use nix::errno::Errno;
use nix::sys::prctl;
use nix::unistd::{Gid, Uid, User};

/// The user a root helper switches to.
pub const SANDBOX_USER: &str = "vmd-vm";
/// The user a root helper switches to when [`SANDBOX_USER`] does not exist.
pub const FALLBACK_USER: &str = "nobody";

/// An account from the passwd database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user {} (uid {}, gid {})", self.name, self.uid, self.gid)
    }
}

impl Account {
    /// The account as `vmd vm --account` takes it: `NAME:UID:GID` (a passwd name has no `:`).
    pub fn to_argument(&self) -> String {
        format!("{}:{}:{}", self.name, self.uid, self.gid)
    }

    /// Parses [`Account::to_argument`]'s form.
    pub fn from_argument(text: &str) -> Result<Account, String> {
        let bad = || format!("{text:?} is not NAME:UID:GID");
        let mut parts = text.split(':');
        let (Some(name), Some(uid), Some(gid), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if name.is_empty() {
            return Err(bad());
        }
        Ok(Account {
            name: name.to_string(),
            uid: uid.parse().map_err(|_| bad())?,
            gid: gid.parse().map_err(|_| bad())?,
        })
    }
}

/// Errors from choosing the account a root helper switches to.
#[derive(Debug, thiserror::Error)]
pub enum ResolveUserError {
    #[error("cannot read the current user and group ids")]
    GetIds(#[source] Errno),
    #[error("cannot look up user {name} in the passwd database")]
    LookUp {
        name: &'static str,
        #[source]
        source: Errno,
    },
    #[error("neither user {SANDBOX_USER} nor user {FALLBACK_USER} exists")]
    NoUser,
    #[error("{0} is privileged: the sandbox user must not have uid 0 or gid 0")]
    Privileged(Account),
}

/// Errors from dropping privileges; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum DropPrivilegesError {
    #[error("cannot set no_new_privs")]
    SetNoNewPrivs(#[source] Errno),
    #[error("no_new_privs is still unset after setting it")]
    NoNewPrivsUnset,
    #[error("cannot read the capability bounding set")]
    ReadBoundingSet(#[source] io::Error),
    #[error("cannot drop capability {cap} from the bounding set")]
    DropBoundingSet {
        cap: u32,
        #[source]
        source: io::Error,
    },
    #[error("capability {0} is still in the bounding set after dropping it")]
    BoundingSetKept(u32),
    #[error("cannot read the effective capabilities")]
    ReadCapabilities(#[source] CapsError),
    #[error("cannot clear the supplementary groups")]
    SetGroups(#[source] Errno),
    #[error("cannot set the group ids to {0}")]
    SetGid(u32, #[source] Errno),
    #[error("cannot set the user ids to {0}")]
    SetUid(u32, #[source] Errno),
    #[error("cannot read back the user, group and supplementary group ids")]
    GetIds(#[source] Errno),
    #[error(
        "ids are not what was set: uids {uids:?}, gids {gids:?}, {groups} supplementary groups, \
         wanted uid {want_uid} gid {want_gid} and no supplementary group"
    )]
    IdsMismatch {
        uids: [u32; 3],
        gids: [u32; 3],
        groups: usize,
        want_uid: u32,
        want_gid: u32,
    },
    #[error("the process could become root again after the switch")]
    RegainedRoot,
    #[error("cannot clear the {0:?} capability set")]
    ClearCapabilities(CapSet, #[source] CapsError),
    #[error("the {0:?} capability set is not empty after clearing it")]
    CapabilitiesKept(CapSet),
    #[error("cannot make the process not dumpable")]
    SetDumpable(#[source] Errno),
    #[error("the process is still dumpable after clearing the flag")]
    StillDumpable,
    #[error("cannot read the parent death signal")]
    GetParentDeathSignal(#[source] io::Error),
    #[error("cannot restore parent death signal {0}")]
    SetParentDeathSignal(i32, #[source] io::Error),
}

/// The account to switch to if the process runs as root (any of its real, effective or saved
/// uids is 0), else `None` (an unprivileged helper keeps its ids: it cannot change them).
///
/// Reads the passwd database. A launcher resolves it once and hands it to each helper
/// (`vmd vm --account`), which then only checks it with [`target_account`]: the lookup goes
/// through NSS, which loads modules and probes userdb directories at every call.
pub fn resolve_target_account() -> Result<Option<Account>, ResolveUserError> {
    if !runs_as_root()? {
        return Ok(None);
    }
    let user = match look_up(SANDBOX_USER)? {
        Some(user) => user,
        None => look_up(FALLBACK_USER)?.ok_or(ResolveUserError::NoUser)?,
    };
    let account = Account {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    };
    unprivileged(account).map(Some)
}

/// The account to switch to, as [`resolve_target_account`] says, or `given` by the launcher
/// (which resolved it with the same rules): `None` unless the process runs as root, and never an
/// account with uid or gid 0.
///
/// Must run before landlock when nothing is given: the lookup reads the passwd database.
pub fn target_account(given: Option<Account>) -> Result<Option<Account>, ResolveUserError> {
    match given {
        None => resolve_target_account(),
        Some(_) if !runs_as_root()? => Ok(None),
        Some(account) => unprivileged(account).map(Some),
    }
}

/// Whether any of the process's real, effective or saved uids is 0.
fn runs_as_root() -> Result<bool, ResolveUserError> {
    let uids = nix::unistd::getresuid().map_err(ResolveUserError::GetIds)?;
    Ok([uids.real, uids.effective, uids.saved]
        .iter()
        .any(|uid| uid.is_root()))
}

fn unprivileged(account: Account) -> Result<Account, ResolveUserError> {
    if account.uid == 0 || account.gid == 0 {
        return Err(ResolveUserError::Privileged(account));
    }
    Ok(account)
}

fn look_up(name: &'static str) -> Result<Option<User>, ResolveUserError> {
    User::from_name(name).map_err(|source| ResolveUserError::LookUp { name, source })
}

/// Sets no_new_privs and checks it is set.
pub(super) fn set_no_new_privs() -> Result<(), DropPrivilegesError> {
    prctl::set_no_new_privs().map_err(DropPrivilegesError::SetNoNewPrivs)?;
    match prctl::get_no_new_privs() {
        Ok(true) => Ok(()),
        Ok(false) => Err(DropPrivilegesError::NoNewPrivsUnset),
        Err(errno) => Err(DropPrivilegesError::SetNoNewPrivs(errno)),
    }
}

/// Empties the capability bounding set if the process has `CAP_SETPCAP` (root has); returns
/// whether it did.
///
/// Walks capability numbers with `PR_CAPBSET_READ` until the kernel says `EINVAL` instead of
/// using the `caps` crate's list, so capabilities newer than the crate are dropped too.
pub(super) fn drop_bounding_set() -> Result<bool, DropPrivilegesError> {
    let can_drop = caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP)
        .map_err(DropPrivilegesError::ReadCapabilities)?;
    if !can_drop {
        return Ok(false);
    }
    // Capability numbers fit in 64 bits of capability sets (`_LINUX_CAPABILITY_U32S_3`).
    for cap in 0..64 {
        if !in_bounding_set(cap)? {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointer.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if ret != 0 {
            let source = io::Error::last_os_error();
            return Err(DropPrivilegesError::DropBoundingSet { cap, source });
        }
        if in_bounding_set(cap)? {
            return Err(DropPrivilegesError::BoundingSetKept(cap));
        }
    }
    Ok(true)
}

/// Whether capability `cap` is in the bounding set; `false` past the kernel's last capability.
fn in_bounding_set(cap: u32) -> Result<bool, DropPrivilegesError> {
    // SAFETY: PR_CAPBSET_READ takes a capability number and no pointer.
    let ret = unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), 0, 0, 0) };
    match ret {
        0 => Ok(false),
        1 => Ok(true),
        _ => {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                // Not a capability of this kernel.
                Ok(false)
            } else {
                Err(DropPrivilegesError::ReadBoundingSet(err))
            }
        }
    }
}

/// Switches every user and group id to `account`'s, with no supplementary groups, and checks
/// that root cannot be regained.
pub(super) fn switch_to(account: &Account) -> Result<(), DropPrivilegesError> {
    let (uid, gid) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
    nix::unistd::setgroups(&[]).map_err(DropPrivilegesError::SetGroups)?;
    nix::unistd::setresgid(gid, gid, gid)
        .map_err(|errno| DropPrivilegesError::SetGid(account.gid, errno))?;
    nix::unistd::setresuid(uid, uid, uid)
        .map_err(|errno| DropPrivilegesError::SetUid(account.uid, errno))?;
    check_ids(account.uid, account.gid)?;
    // With all three uids non-zero and no capabilities left, this must fail.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(DropPrivilegesError::RegainedRoot);
    }
    Ok(())
}

/// Checks the final ids: all `target`'s when the process switched, otherwise none is root.
/// Returns the (uid, gid) the process runs as.
pub(super) fn check_final_ids(target: Option<&Account>) -> Result<(u32, u32), DropPrivilegesError> {
    if let Some(account) = target {
        check_ids(account.uid, account.gid)?;
        return Ok((account.uid, account.gid));
    }
    let uids = nix::unistd::getresuid().map_err(DropPrivilegesError::GetIds)?;
    let gids = nix::unistd::getresgid().map_err(DropPrivilegesError::GetIds)?;
    let uid = uids.real.as_raw();
    if [uids.real, uids.effective, uids.saved]
        .iter()
        .any(|uid| uid.is_root())
    {
        // resolve_target_account() chose no account, so no uid was 0 then.
        return Err(DropPrivilegesError::RegainedRoot);
    }
    Ok((uid, gids.real.as_raw()))
}

fn check_ids(want_uid: u32, want_gid: u32) -> Result<(), DropPrivilegesError> {
    let uids = nix::unistd::getresuid().map_err(DropPrivilegesError::GetIds)?;
    let gids = nix::unistd::getresgid().map_err(DropPrivilegesError::GetIds)?;
    let groups = nix::unistd::getgroups().map_err(DropPrivilegesError::GetIds)?;
    let uids = [uids.real, uids.effective, uids.saved].map(Uid::as_raw);
    let gids = [gids.real, gids.effective, gids.saved].map(Gid::as_raw);
    if uids != [want_uid; 3] || gids != [want_gid; 3] || !groups.is_empty() {
        return Err(DropPrivilegesError::IdsMismatch {
            uids,
            gids,
            groups: groups.len(),
            want_uid,
            want_gid,
        });
    }
    Ok(())
}

/// Empties the ambient, effective, inheritable and permitted sets (in an order `capset`
/// accepts: effective must stay a subset of permitted), then checks every set, including the
/// bounding set when it was dropped.
pub(super) fn clear_capabilities(bounding_set_cleared: bool) -> Result<(), DropPrivilegesError> {
    for set in [
        CapSet::Ambient,
        CapSet::Effective,
        CapSet::Inheritable,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|err| DropPrivilegesError::ClearCapabilities(set, err))?;
    }
    for set in [
        CapSet::Ambient,
        CapSet::Effective,
        CapSet::Inheritable,
        CapSet::Permitted,
    ] {
        let left = caps::read(None, set).map_err(DropPrivilegesError::ReadCapabilities)?;
        if !left.is_empty() {
            return Err(DropPrivilegesError::CapabilitiesKept(set));
        }
    }
    if bounding_set_cleared {
        for cap in 0..64 {
            if in_bounding_set(cap)? {
                return Err(DropPrivilegesError::BoundingSetKept(cap));
            }
        }
    }
    Ok(())
}

/// Clears the dumpable flag and checks it.
pub(super) fn set_not_dumpable() -> Result<(), DropPrivilegesError> {
    prctl::set_dumpable(false).map_err(DropPrivilegesError::SetDumpable)?;
    match prctl::get_dumpable() {
        Ok(false) => Ok(()),
        Ok(true) => Err(DropPrivilegesError::StillDumpable),
        Err(errno) => Err(DropPrivilegesError::SetDumpable(errno)),
    }
}

/// The parent death signal (0 for none). Read raw: nix's `Signal` cannot hold real-time signals.
pub(super) fn parent_death_signal() -> Result<i32, DropPrivilegesError> {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one c_int through the pointer, which points to a live
    // local c_int.
    let ret = unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &raw mut signal, 0, 0, 0) };
    if ret != 0 {
        return Err(DropPrivilegesError::GetParentDeathSignal(
            io::Error::last_os_error(),
        ));
    }
    Ok(signal)
}

/// Sets the parent death signal again: a credential change clears it.
///
/// If the parent died between the change and now, the signal will not come; callers that
/// depend on it should compare `getppid()` with the parent they expect afterwards.
pub(super) fn restore_parent_death_signal(signal: i32) -> Result<(), DropPrivilegesError> {
    if signal == 0 {
        return Ok(());
    }
    let arg = libc::c_ulong::try_from(signal).map_err(|_| {
        DropPrivilegesError::SetParentDeathSignal(signal, io::ErrorKind::InvalidInput.into())
    })?;
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointer.
    let ret = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, arg, 0, 0, 0) };
    if ret != 0 {
        return Err(DropPrivilegesError::SetParentDeathSignal(
            signal,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}
