//! Files a caller passes as fds (`CreateVMWithFiles`): the daemon checks what they are and
//! copies them into its own state, so it never opens a path for a caller who could not open it
//! and a VM can still start after the caller is gone.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::stat::{SFlag, fstat};

use super::definition::DefinitionError;

/// Kernels and initrds larger than this are refused (a guard against filling the disk).
pub const MAX_PASSED_FILE_BYTES: u64 = 2 << 30;

/// What a file of this `st_mode` is when it is not a regular file ("a directory"), for
/// messages; `None` for a regular file.
pub fn non_regular_kind(mode: libc::mode_t) -> Option<&'static str> {
    match SFlag::from_bits_truncate(mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => None,
        SFlag::S_IFDIR => Some("a directory"),
        SFlag::S_IFSOCK => Some("a socket"),
        SFlag::S_IFCHR | SFlag::S_IFBLK => Some("a device"),
        SFlag::S_IFIFO => Some("a pipe or FIFO"),
        _ => Some("of an unknown kind"),
    }
}

/// Checks that `fd` is a readable regular file (no directory, socket, device, pipe or
/// write-only fd) and returns its size.
pub fn check_passed_file(what: &'static str, fd: BorrowedFd<'_>) -> Result<u64, DefinitionError> {
    let unusable = |reason: String| DefinitionError::PassedFile { what, reason };
    let stat = fstat(fd).map_err(|e| unusable(e.to_string()))?;
    if let Some(kind) = non_regular_kind(stat.st_mode) {
        return Err(unusable(format!("it is {kind}, not a regular file")));
    }
    let flags = OFlag::from_bits_truncate(
        fcntl(fd, FcntlArg::F_GETFL).map_err(|e| unusable(e.to_string()))?,
    );
    if flags.contains(OFlag::O_PATH) {
        return Err(unusable(
            "it was opened with O_PATH and cannot be read".into(),
        ));
    }
    if flags & OFlag::O_ACCMODE == OFlag::O_WRONLY {
        return Err(unusable("it is open for writing only".into()));
    }
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    if size == 0 {
        return Err(unusable("the file is empty".into()));
    }
    if size > MAX_PASSED_FILE_BYTES {
        return Err(unusable(format!(
            "it is larger than {MAX_PASSED_FILE_BYTES} bytes"
        )));
    }
    Ok(size)
}

/// Copies a checked fd's content to `destination` (mode 0600), reading with pread so the
/// caller's file offset is left alone.
pub fn copy_passed_file(
    what: &'static str,
    fd: BorrowedFd<'_>,
    size: u64,
    destination: &Path,
) -> Result<PathBuf, DefinitionError> {
    let failed = |reason: String| DefinitionError::PassedFile { what, reason };
    if let Some(parent) = destination.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| failed(format!("cannot create {}: {e}", parent.display())))?;
    }
    let mut out: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(destination)
        .map_err(|e| failed(format!("cannot create {}: {e}", destination.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < size {
        let read = nix::sys::uio::pread(fd.as_fd(), &mut buf, offset as i64)
            .map_err(|e| failed(format!("cannot read it: {e}")))?;
        if read == 0 {
            break;
        }
        out.write_all(&buf[..read])
            .map_err(|e| failed(format!("cannot write {}: {e}", destination.display())))?;
        offset += read as u64;
    }
    out.sync_all()
        .map_err(|e| failed(format!("cannot write {}: {e}", destination.display())))?;
    Ok(destination.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn only_readable_regular_files_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kernel");
        fs::write(&path, b"\x7fELF kernel").expect("write");
        let readable = File::open(&path).expect("open");
        assert_eq!(check_passed_file("kernel", readable.as_fd()), Ok(11));

        let write_only = OpenOptions::new().write(true).open(&path).expect("open");
        assert!(
            check_passed_file("kernel", write_only.as_fd())
                .unwrap_err()
                .to_string()
                .contains("writing only")
        );
        let directory = File::open(dir.path()).expect("open dir");
        assert!(
            check_passed_file("kernel", directory.as_fd())
                .unwrap_err()
                .to_string()
                .contains("directory")
        );
        let (socket, _) = UnixStream::pair().expect("socketpair");
        assert!(
            check_passed_file("kernel", socket.as_fd())
                .unwrap_err()
                .to_string()
                .contains("socket")
        );
        let null = File::open("/dev/null").expect("open");
        assert!(
            check_passed_file("kernel", null.as_fd())
                .unwrap_err()
                .to_string()
                .contains("device")
        );
        let empty = tempfile::tempfile().expect("tempfile");
        assert!(
            check_passed_file("kernel", empty.as_fd())
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
    }

    #[test]
    fn copies_keep_the_content_and_the_callers_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("in");
        fs::write(&source, vec![7u8; 3 << 20]).expect("write");
        let file = File::open(&source).expect("open");
        let size = check_passed_file("initrd", file.as_fd()).expect("ok");
        let copy = copy_passed_file("initrd", file.as_fd(), size, &dir.path().join("out/initrd"))
            .expect("copy");
        assert_eq!(fs::read(copy).expect("read"), vec![7u8; 3 << 20]);
    }
}
