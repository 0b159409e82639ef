//! Following a disk's qcow2 backing chain: the image, then the file its header names, then the
//! file that one names, and so on, each opened through the caller's `open` (the daemon opens
//! with the rights of whoever answers for the start, `vmd run` with its user's own), bases
//! read-only.
//!
//! A backing name resolves relative to the directory of the image that names it, as QEMU does.
//! What QEMU would treat as something other than a local file (`json:{...}`, `nbd:`, `http:`),
//! a chain deeper than [`MAX_BACKING_DEPTH`], a loop, a file that is not a regular file and a
//! raw image that claims a backing file are refused with an error that names the file.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::DiskFormat;
use super::lock::{self, LockKind};
use super::qcow2_header::{self, HeaderError, Qcow2Header};
use crate::protocol::{DiskFds, ImageFormat, MAX_BACKING_DEPTH};

/// A file's identity: device and inode, how a loop or a busy image is recognized whatever path
/// led to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(file: &File) -> io::Result<FileId> {
        let metadata = file.metadata()?;
        Ok(FileId {
            dev: metadata.dev(),
            ino: metadata.ino(),
        })
    }
}

/// Where a disk's image comes from.
#[derive(Debug)]
pub enum DiskImage {
    /// A path, opened through `open`.
    Path(PathBuf),
    /// A file opened already (passed by a client). `name` stands for it in messages, and `dir`
    /// is the directory its relative backing names resolve in.
    Opened {
        file: File,
        name: PathBuf,
        dir: PathBuf,
    },
}

/// One open image of a chain.
#[derive(Debug)]
pub struct OpenImage {
    pub file: File,
    pub format: ImageFormat,
    /// The path it was opened by (for messages).
    pub path: PathBuf,
    pub id: FileId,
}

/// A disk with its whole chain open.
#[derive(Debug)]
pub struct ResolvedDisk {
    pub image: OpenImage,
    /// The backing chain, nearest first.
    pub bases: Vec<OpenImage>,
}

/// Why a disk's chain cannot be used. Each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("cannot open {path}", path = path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}", path = path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular file", path = path.display())]
    NotRegular { path: PathBuf },
    #[error("{path} is not open for writing, and the disk is not read-only", path = path.display())]
    NotWritable { path: PathBuf },
    #[error("{path} has a bad qcow2 header", path = path.display())]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("{path} is not a qcow2 image (no qcow2 magic), but its format is given as qcow2", path = path.display())]
    NotQcow2 { path: PathBuf },
    #[error("{path} is used as a raw image, but it is a qcow2 image with a backing file", path = path.display())]
    RawWithBacking { path: PathBuf },
    #[error(
        "{path} names {name:?} as its backing file: only local file names are supported (no json: or protocol: names)",
        path = path.display()
    )]
    NotAFileName { path: PathBuf, name: String },
    #[error(
        "{path} has a backing chain deeper than {MAX_BACKING_DEPTH} images",
        path = path.display()
    )]
    TooDeep { path: PathBuf },
    #[error("the backing chain loops: {path} appears in it twice", path = path.display())]
    Loop { path: PathBuf },
    #[error("{path} is in use by another VM or program", path = path.display())]
    Busy { path: PathBuf, id: FileId },
    #[error("cannot lock {path}", path = path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Opens `image` and its whole backing chain. `open(path, writable)` opens one file; it is
/// asked for the image itself writable unless `read_only`, and for every base read-only.
pub fn resolve(
    image: DiskImage,
    format: DiskFormat,
    read_only: bool,
    open: &mut dyn FnMut(&Path, bool) -> io::Result<File>,
) -> Result<ResolvedDisk, ChainError> {
    let (file, path, dir) = match image {
        DiskImage::Path(path) => {
            let file = open(&path, !read_only).map_err(|source| ChainError::Open {
                path: path.clone(),
                source,
            })?;
            let dir = parent_dir(&path);
            (file, path, dir)
        }
        DiskImage::Opened { file, name, dir } => {
            if !read_only && !open_for_writing(&file) {
                return Err(ChainError::NotWritable { path: name });
            }
            (file, name, dir)
        }
    };
    let (top, mut header) = inspect(file, path, format.fixed())?;
    let mut seen = HashSet::from([top.id]);
    let mut bases: Vec<OpenImage> = Vec::new();
    let mut naming_dir = dir;
    while let Some(backing) = header.and_then(|h| h.backing) {
        let naming = bases.last().unwrap_or(&top).path.clone();
        if bases.len() == MAX_BACKING_DEPTH {
            return Err(ChainError::TooDeep { path: top.path });
        }
        let name = OsStr::from_bytes(&backing.name);
        if !is_file_name(&backing.name) {
            return Err(ChainError::NotAFileName {
                path: naming,
                name: name.to_string_lossy().into_owned(),
            });
        }
        let path = naming_dir.join(name);
        let file = open(&path, false).map_err(|source| ChainError::Open {
            path: path.clone(),
            source,
        })?;
        naming_dir = parent_dir(&path);
        let (base, next) = inspect(file, path, backing.format)?;
        if !seen.insert(base.id) {
            return Err(ChainError::Loop { path: base.path });
        }
        bases.push(base);
        header = next;
    }
    Ok(ResolvedDisk { image: top, bases })
}

/// Checks that `file` is a regular file, settles its format (`format`, or probed) and reads
/// its qcow2 header.
fn inspect(
    file: File,
    path: PathBuf,
    format: Option<ImageFormat>,
) -> Result<(OpenImage, Option<Qcow2Header>), ChainError> {
    let read_error = |source| ChainError::Read {
        path: path.clone(),
        source,
    };
    let metadata = file.metadata().map_err(read_error)?;
    if !metadata.file_type().is_file() {
        return Err(ChainError::NotRegular { path });
    }
    let id = FileId {
        dev: metadata.dev(),
        ino: metadata.ino(),
    };
    let start = read_start(&file, 104).map_err(read_error)?;
    let magic = qcow2_header::has_qcow2_magic(&start);
    let format = match format {
        Some(format) => format,
        None if magic => ImageFormat::Qcow2,
        None => ImageFormat::Raw,
    };
    let header = match (format, magic) {
        (ImageFormat::Qcow2, false) => return Err(ChainError::NotQcow2 { path }),
        (ImageFormat::Qcow2, true) => Some(read_header(&file, &path, &start)?),
        // A raw image may hold anything, a qcow2 header too, but it cannot have a backing
        // file: one that names one is most likely a mislabelled qcow2 image.
        (ImageFormat::Raw, true) => {
            if read_header(&file, &path, &start).is_ok_and(|h| h.backing.is_some()) {
                return Err(ChainError::RawWithBacking { path });
            }
            None
        }
        (ImageFormat::Raw, false) => None,
    };
    Ok((
        OpenImage {
            file,
            format,
            path,
            id,
        },
        header,
    ))
}

fn read_header(file: &File, path: &Path, start: &[u8]) -> Result<Qcow2Header, ChainError> {
    let bytes =
        read_start(file, qcow2_header::bytes_needed(start)).map_err(|source| ChainError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    qcow2_header::parse(&bytes).map_err(|source| ChainError::Header {
        path: path.to_path_buf(),
        source,
    })
}

/// Up to `len` bytes from the start of `file` (fewer at its end).
fn read_start(file: &File, len: usize) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut bytes[filled..], filled as u64) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    bytes.truncate(filled);
    Ok(bytes)
}

/// Whether QEMU would take `name` as a plain file name: not `json:{...}`, and no `protocol:`
/// prefix (a colon before the first slash).
fn is_file_name(name: &[u8]) -> bool {
    let before_slash = name.split(|&b| b == b'/').next().unwrap_or_default();
    !before_slash.contains(&b':')
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn open_for_writing(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL on an fd `file` keeps open; it reads flags and changes nothing.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_ACCMODE == libc::O_RDWR
}

impl ResolvedDisk {
    /// Locks the chain: the image exclusively unless `read_only`, everything else shared.
    /// [`ChainError::Busy`] names the first file another open file description holds.
    pub fn lock(&self, read_only: bool) -> Result<(), ChainError> {
        let top_kind = if read_only {
            LockKind::Shared
        } else {
            LockKind::Exclusive
        };
        let layers = std::iter::once((&self.image, top_kind))
            .chain(self.bases.iter().map(|base| (base, LockKind::Shared)));
        for (layer, kind) in layers {
            match lock::try_lock(&layer.file, kind) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(ChainError::Busy {
                        path: layer.path.clone(),
                        id: layer.id,
                    });
                }
                Err(source) => {
                    return Err(ChainError::Lock {
                        path: layer.path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// The identities of every file of the chain, the image first.
    pub fn ids(&self) -> Vec<FileId> {
        std::iter::once(&self.image)
            .chain(&self.bases)
            .map(|layer| layer.id)
            .collect()
    }

    /// The formats of the backing chain, nearest first ([`crate::protocol::DiskConfig`]'s
    /// `backing`).
    pub fn backing_formats(&self) -> Vec<ImageFormat> {
        self.bases.iter().map(|base| base.format).collect()
    }

    /// The fds to pass as `disk<i>` and `disk<i>.base<j>`.
    pub fn into_fds(self) -> DiskFds {
        DiskFds {
            image: self.image.file.into(),
            bases: self
                .bases
                .into_iter()
                .map(|base| base.file.into())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> bool {
        match Command::new("qemu-img").args(args).output() {
            Ok(output) if output.status.success() => true,
            Ok(output) => panic!(
                "qemu-img {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(_) => {
                eprintln!("skipped: qemu-img is not installed (apt install qemu-utils)");
                false
            }
        }
    }

    fn plain_open(path: &Path, writable: bool) -> io::Result<File> {
        OpenOptions::new().read(true).write(writable).open(path)
    }

    fn resolve_path(path: &Path, format: DiskFormat) -> Result<ResolvedDisk, ChainError> {
        resolve(DiskImage::Path(path.into()), format, false, &mut plain_open)
    }

    #[test]
    fn a_qemu_img_chain_is_followed_relative_to_each_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = |name: &str| dir.path().join(name).display().to_string();
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        if !qemu_img(&["create", "-q", "-f", "raw", &d("base.raw"), "1M"]) {
            return;
        }
        // mid names base relative to itself; top names mid relative to itself; the top names
        // no format, so mid's is probed.
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../base.raw",
            "-F",
            "raw",
            &d("sub/mid.qcow2"),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
            &d("top.qcow2"),
        ]);
        let disk = resolve_path(&dir.path().join("top.qcow2"), DiskFormat::Auto).expect("chain");
        assert_eq!(disk.image.format, ImageFormat::Qcow2);
        assert_eq!(
            disk.backing_formats(),
            [ImageFormat::Qcow2, ImageFormat::Raw]
        );
        assert_eq!(disk.bases[1].path, dir.path().join("sub/../base.raw"));
        assert_eq!(disk.ids().len(), 3);
        // The bases were opened read-only, the image read-write.
        assert!(open_for_writing(&disk.image.file));
        assert!(!open_for_writing(&disk.bases[0].file));

        let raw = resolve_path(&dir.path().join("base.raw"), DiskFormat::Auto).expect("raw");
        assert_eq!((raw.image.format, raw.bases.len()), (ImageFormat::Raw, 0));
        // Given as qcow2, a raw file is refused; given as raw, a qcow2 with a backing file is.
        assert!(matches!(
            resolve_path(&dir.path().join("base.raw"), DiskFormat::Qcow2),
            Err(ChainError::NotQcow2 { .. })
        ));
        assert!(matches!(
            resolve_path(&dir.path().join("top.qcow2"), DiskFormat::Raw),
            Err(ChainError::RawWithBacking { .. })
        ));
    }

    #[test]
    fn loops_depth_and_missing_files_are_named_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = |name: &str| dir.path().join(name).display().to_string();
        if !qemu_img(&["create", "-q", "-f", "qcow2", &d("a.qcow2"), "1M"]) {
            return;
        }
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            &d("b.qcow2"),
        ]);
        // Make a name b: a -> b -> a (rebase -u writes the header without checking).
        qemu_img(&[
            "rebase",
            "-u",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            &d("a.qcow2"),
        ]);
        assert!(matches!(
            resolve_path(&dir.path().join("b.qcow2"), DiskFormat::Auto),
            Err(ChainError::Loop { .. })
        ));

        // 18 layers: the top and 17 bases, one too many.
        qemu_img(&["create", "-q", "-f", "qcow2", &d("l0.qcow2"), "1M"]);
        for layer in 1..=17 {
            let below = format!("l{}.qcow2", layer - 1);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &below,
                "-F",
                "qcow2",
                &d(&format!("l{layer}.qcow2")),
            ]);
        }
        assert!(matches!(
            resolve_path(&dir.path().join("l17.qcow2"), DiskFormat::Auto),
            Err(ChainError::TooDeep { .. })
        ));
        let sixteen = resolve_path(&dir.path().join("l16.qcow2"), DiskFormat::Auto).expect("16");
        assert_eq!(sixteen.bases.len(), MAX_BACKING_DEPTH);

        std::fs::remove_file(dir.path().join("l0.qcow2")).expect("rm");
        let error = resolve_path(&dir.path().join("l1.qcow2"), DiskFormat::Auto).unwrap_err();
        assert!(
            matches!(&error, ChainError::Open { path, .. } if path.ends_with("l0.qcow2")),
            "{error}"
        );
    }

    #[test]
    fn protocol_names_and_special_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = |name: &str| dir.path().join(name).display().to_string();
        for name in [
            "nbd:localhost:10809",
            "json:{\"driver\":\"file\"}",
            "http://example.com/x",
        ] {
            if !qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                name,
                "-F",
                "raw",
                &d("p.qcow2"),
                "1M",
            ]) {
                return;
            }
            let error = resolve_path(&dir.path().join("p.qcow2"), DiskFormat::Auto).unwrap_err();
            assert!(
                matches!(error, ChainError::NotAFileName { .. }),
                "{name}: {error}"
            );
            std::fs::remove_file(dir.path().join("p.qcow2")).expect("rm");
        }
        assert!(is_file_name(b"./nbd:x") && is_file_name(b"/srv/a:b") && is_file_name(b"plain"));

        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/dev/null",
            "-F",
            "raw",
            &d("dev.qcow2"),
            "1M",
        ]);
        assert!(matches!(
            resolve_path(&dir.path().join("dev.qcow2"), DiskFormat::Auto),
            Err(ChainError::NotRegular { .. })
        ));
        assert!(matches!(
            resolve_path(dir.path(), DiskFormat::Auto),
            Err(ChainError::NotRegular { .. }) | Err(ChainError::Open { .. })
        ));
    }

    #[test]
    fn a_passed_file_resolves_in_its_directory_and_must_be_writable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = |name: &str| dir.path().join(name).display().to_string();
        if !qemu_img(&["create", "-q", "-f", "raw", &d("base.raw"), "1M"]) {
            return;
        }
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            &d("top.qcow2"),
        ]);
        let passed = |write: bool| DiskImage::Opened {
            file: plain_open(&dir.path().join("top.qcow2"), write).expect("open"),
            name: "disk0".into(),
            dir: dir.path().to_path_buf(),
        };
        let disk = resolve(passed(true), DiskFormat::Auto, false, &mut plain_open).expect("ok");
        assert_eq!(disk.backing_formats(), [ImageFormat::Raw]);
        assert!(matches!(
            resolve(passed(false), DiskFormat::Auto, false, &mut plain_open),
            Err(ChainError::NotWritable { .. })
        ));
        resolve(passed(false), DiskFormat::Auto, true, &mut plain_open).expect("read-only");
    }

    #[test]
    fn a_second_writer_is_refused_and_readers_share_bases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = |name: &str| dir.path().join(name).display().to_string();
        if !qemu_img(&["create", "-q", "-f", "qcow2", &d("base.qcow2"), "1M"]) {
            return;
        }
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &d("one.qcow2"),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &d("two.qcow2"),
        ]);
        let one = resolve_path(&dir.path().join("one.qcow2"), DiskFormat::Auto).expect("one");
        one.lock(false).expect("lock one");
        // Two overlays of one base run side by side.
        let two = resolve_path(&dir.path().join("two.qcow2"), DiskFormat::Auto).expect("two");
        two.lock(false).expect("lock two");
        // A second writer of one is refused, with the file named.
        let again = resolve_path(&dir.path().join("one.qcow2"), DiskFormat::Auto).expect("again");
        match again.lock(false) {
            Err(ChainError::Busy { path, id }) => {
                assert_eq!((path, id), (dir.path().join("one.qcow2"), one.image.id));
            }
            other => panic!("{other:?}"),
        }
        // Nor may anyone write the base the overlays read.
        let base = resolve_path(&dir.path().join("base.qcow2"), DiskFormat::Auto).expect("base");
        assert!(matches!(base.lock(false), Err(ChainError::Busy { .. })));
        let read_only = resolve(
            DiskImage::Path(dir.path().join("base.qcow2")),
            DiskFormat::Auto,
            true,
            &mut plain_open,
        )
        .expect("base");
        read_only.lock(true).expect("readers share");
    }
}
