//! Opening a definition's host paths (kernel, initrd) with the rights of whoever answers for the
//! start (DESIGN.md, "Authorization": the daemon never opens a file on behalf of a caller who
//! could not open it).
//!
//! A path was vetted when the VM was defined, but anyone who can write to a directory on it can
//! later swap the file for a symlink to /etc/shadow. So the daemon opens with its own rights only
//! for root and holders of org.vmd.vmd1.host-files; for anyone else (an owner starting their own
//! VM, say) a short-lived thread takes that user's filesystem uid, gid and groups, opens, and
//! ends. setfsuid, setfsgid and the raw setgroups syscall change only the calling thread.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User};

use super::authority::Caller;
use super::definition::VmDefinition;

/// `nobody`'s ids: the rights of a group owner with no user, and of users without a passwd entry.
const NOBODY: u32 = 65534;

/// With whose rights a definition's host paths are opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rights {
    /// The daemon's own: root started it, or a holder of org.vmd.vmd1.host-files.
    Daemon,
    /// A user's filesystem identity.
    User(UserRights),
}

/// A filesystem identity: uid, primary gid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRights {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl UserRights {
    /// The caller's identity: its uid and the groups the bus saw (its primary group from the
    /// user database).
    pub fn of_caller(caller: &Caller) -> Self {
        let user = User::from_uid(Uid::from_raw(caller.uid)).ok().flatten();
        let gid = user
            .as_ref()
            .map(|user| user.gid.as_raw())
            .or_else(|| caller.groups.first().copied())
            .unwrap_or(NOBODY);
        let groups = if caller.groups.is_empty() {
            user.map(|user| groups_of(&user)).unwrap_or_default()
        } else {
            caller.groups.clone()
        };
        UserRights {
            uid: caller.uid,
            gid,
            groups,
        }
    }

    /// A user's identity from the user database.
    fn of_uid(uid: u32) -> Self {
        match User::from_uid(Uid::from_raw(uid)).ok().flatten() {
            Some(user) => UserRights {
                uid,
                gid: user.gid.as_raw(),
                groups: groups_of(&user),
            },
            None => UserRights {
                uid,
                gid: NOBODY,
                groups: Vec::new(),
            },
        }
    }
}

fn groups_of(user: &User) -> Vec<u32> {
    let Ok(name) = std::ffi::CString::new(user.name.as_str()) else {
        return vec![user.gid.as_raw()];
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .map(|groups| groups.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_else(|_| vec![user.gid.as_raw()])
}

impl Rights {
    /// The rights of a start nobody asked for right now (autostart, or a reboot after the
    /// daemon restarted): the VM's owner's when it has one, else the daemon's (only root and
    /// holders of org.vmd.vmd1.manage can start an unowned VM, and its paths came from root or
    /// a holder of org.vmd.vmd1.host-files).
    pub fn unattended(definition: &VmDefinition) -> Self {
        match (definition.owner_uid, definition.owner_gid) {
            (Some(0), _) | (None, None) => Rights::Daemon,
            (Some(uid), _) => Rights::User(UserRights::of_uid(uid)),
            (None, Some(gid)) => {
                let gid = Group::from_gid(Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map_or(gid, |group| group.gid.as_raw());
                Rights::User(UserRights {
                    uid: NOBODY,
                    gid,
                    groups: vec![gid],
                })
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Rights::Daemon => "the daemon".into(),
            Rights::User(user) => format!("user {}", super::authority::user_name(user.uid)),
        }
    }
}

/// Opens `path` read-only with `rights`, and only if it is a regular file. Never blocks on a
/// FIFO and never makes a terminal the daemon's.
pub fn open_regular(path: &Path, rights: &Rights) -> io::Result<File> {
    open_image(path, rights, false)
}

/// [`open_regular`], read-write when `writable` (a disk image the guest may write).
pub fn open_image(path: &Path, rights: &Rights, writable: bool) -> io::Result<File> {
    let file = match rights {
        Rights::Daemon => open_nonblocking(path, writable)?,
        Rights::User(user) => std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    become_for_files(user)?;
                    open_nonblocking(path, writable)
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the opening thread panicked")))
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("as {} (the one who started the VM): {e}", rights.describe()),
            )
        })?,
    };
    if let Some(kind) = super::files::non_regular_kind(file.metadata()?.mode()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {kind}, not a regular file"),
        ));
    }
    Ok(file)
}

fn open_nonblocking(path: &Path, writable: bool) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// Gives the calling thread `user`'s filesystem identity. Only for a thread that ends right
/// after: nothing changes it back.
fn become_for_files(user: &UserRights) -> io::Result<()> {
    // SAFETY: the raw syscall (glibc's setgroups would change every thread of the process)
    // reads `groups.len()` gids from a live slice.
    let result =
        unsafe { libc::syscall(libc::SYS_setgroups, user.groups.len(), user.groups.as_ptr()) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // setfsgid/setfsuid report no errors: they return the previous id, and an invalid id
    // (u32::MAX) changes nothing, so asking again tells whether the change took.
    // SAFETY: plain syscalls on this thread's credentials.
    let (gid_now, uid_now) = unsafe {
        libc::setfsgid(user.gid);
        let gid_now = libc::setfsgid(u32::MAX);
        libc::setfsuid(user.uid);
        (gid_now, libc::setfsuid(u32::MAX))
    };
    if gid_now as u32 != user.gid || uid_now as u32 != user.uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "cannot take uid {} and gid {} to open files",
                user.uid, user.gid
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn nobody() -> Rights {
        Rights::User(UserRights {
            uid: NOBODY,
            gid: NOBODY,
            groups: vec![NOBODY],
        })
    }

    fn running_as_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_user_cannot_open_what_only_root_reads_but_the_daemon_can() {
        if !running_as_root() {
            eprintln!("skipped: needs root to take another uid");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"root only").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = open_regular(&secret, &nobody()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        // Named as a user (nobody), not by number.
        assert!(err.to_string().contains("as user nobody"), "{err}");
        assert!(open_regular(&secret, &Rights::Daemon).is_ok());

        // A symlink the user may follow still leads to a file the user cannot read.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(open_regular(&link, &nobody()).is_err());

        // What the user may read, the user opens; and the daemon's thread is untouched.
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open_regular(&secret, &nobody()).is_ok());
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(open_regular(&secret, &Rights::Daemon).is_ok());
    }

    #[test]
    fn only_regular_files_are_opened_and_a_fifo_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_regular(dir.path(), &Rights::Daemon).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let err = open_regular(&fifo, &Rights::Daemon).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        let err = open_regular(Path::new("/dev/null"), &Rights::Daemon).unwrap_err();
        assert!(err.to_string().contains("a device"), "{err}");
    }

    #[test]
    fn unattended_starts_of_owned_vms_take_the_owners_rights() {
        let mut definition = VmDefinition::parse_dbus("owned", &Default::default()).unwrap();
        assert_eq!(Rights::unattended(&definition), Rights::Daemon);
        definition.owner_uid = Some(0);
        assert_eq!(Rights::unattended(&definition), Rights::Daemon);
        definition.owner_uid = Some(4242);
        assert!(matches!(
            Rights::unattended(&definition),
            Rights::User(UserRights { uid: 4242, .. })
        ));
        definition.owner_uid = None;
        definition.owner_gid = Some(4243);
        assert_eq!(
            Rights::unattended(&definition),
            Rights::User(UserRights {
                uid: NOBODY,
                gid: 4243,
                groups: vec![4243]
            })
        );
    }
}
