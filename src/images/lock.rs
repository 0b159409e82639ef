//! Image locks, as QEMU's image locking: an open file description (OFD) lock over the whole
//! file, a write lock on an image a VM may write, a shared read lock on one it only reads (a
//! read-only disk, every backing file). OFD locks belong to the open file description, not to
//! the process: the helper inherits the description the daemon (or `vmd run`) opened and
//! locked, so the lock lasts exactly as long as some process holds that description, and it
//! goes away by itself when the helper exits, however it exits.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Which lock an image needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// No one else may read or write the image.
    Exclusive,
    /// Others may read it too, but no one may write it.
    Shared,
}

/// Takes `kind` of lock on the whole of `file` without waiting. `Ok(false)` when another open
/// file description holds a conflicting lock.
pub fn try_lock(file: &File, kind: LockKind) -> io::Result<bool> {
    let lock = libc::flock {
        l_type: match kind {
            LockKind::Exclusive => libc::F_WRLCK,
            LockKind::Shared => libc::F_RDLCK,
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        // 0: to the end of the file, however large it grows.
        l_len: 0,
        // Must be 0 for OFD locks.
        l_pid: 0,
    };
    // SAFETY: fcntl(F_OFD_SETLK) on an fd `file` keeps open, with a pointer to a live,
    // initialized `flock` that the kernel only reads.
    let result = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if result == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        _ => Err(error),
    }
}

/// Releases whatever lock the open file description behind `fd` holds on its file.
pub fn unlock(fd: BorrowedFd<'_>) -> io::Result<()> {
    let lock = libc::flock {
        l_type: libc::F_UNLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: as in try_lock: a live fd and a pointer to an initialized `flock`.
    let result = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path, write: bool) -> File {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .expect("open")
    }

    #[test]
    fn a_writer_excludes_everyone_and_readers_share() {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        let writer = open(file.path(), true);
        assert!(try_lock(&writer, LockKind::Exclusive).expect("lock"));
        // Another description, even in the same process, is refused either lock.
        let second = open(file.path(), true);
        assert!(!try_lock(&second, LockKind::Exclusive).expect("lock"));
        assert!(!try_lock(&second, LockKind::Shared).expect("lock"));
        // A dup shares the description, and so the lock.
        let dup = writer.try_clone().expect("dup");
        drop(writer);
        assert!(!try_lock(&second, LockKind::Shared).expect("lock"));
        // The last fd of the description gone, the lock is gone.
        drop(dup);
        let reader = open(file.path(), false);
        let other_reader = open(file.path(), false);
        assert!(try_lock(&reader, LockKind::Shared).expect("lock"));
        assert!(try_lock(&other_reader, LockKind::Shared).expect("lock"));
        assert!(!try_lock(&second, LockKind::Exclusive).expect("lock"));
    }

    #[test]
    fn a_locked_description_survives_a_fork_and_exec() {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        let writer = open(file.path(), true);
        assert!(try_lock(&writer, LockKind::Exclusive).expect("lock"));
        // A child that inherits the fd keeps the lock after the parent closes its copy.
        let fd = writer.as_raw_fd();
        // SAFETY: clears FD_CLOEXEC on an fd `writer` keeps open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let mut child = std::process::Command::new("sleep")
            .arg("1")
            .spawn()
            .expect("spawn");
        drop(writer);
        let second = open(file.path(), true);
        assert!(!try_lock(&second, LockKind::Shared).expect("lock"));
        child.wait().expect("wait");
        assert!(try_lock(&second, LockKind::Exclusive).expect("lock"));
    }
}
