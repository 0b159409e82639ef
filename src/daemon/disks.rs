//! A VM's disks as the daemon keeps them: from the `Disks` config key (`aa{sv}`), from
//! `[[disk]]` tables in definitions, and from `disk<i>` fds passed to CreateVMWithFiles; shown
//! in the `Disks` property; and opened, with their backing chains, and locked when the VM
//! starts.
//!
//! A disk given by path is opened, with its backing files, with the rights of whoever answers
//! for the start (`host_files::Rights`), like kernels. A disk passed as an fd was opened by its
//! caller, and the daemon passes that same open file description on at each start (it cannot
//! open the file again itself: the daemon has no CAP_DAC_OVERRIDE, and a user's image is the
//! user's). So the lock on a passed image is held by the description the daemon keeps too, and
//! the daemon lets go of it when the helper has exited ([`release_passed`]); and since a lock
//! never excludes its own description, the daemon also refuses to start a VM on a file another
//! of its VMs uses in a conflicting way ([`Claim`]). A passed qcow2 image's backing files are
//! still host paths, resolved relative to the directory the passed file lies in and opened with
//! the rights of whoever answers for the start: passing an image never lends the daemon's
//! rights to the files it names. Passed fds are kept in systemd's fd store as `vmdsk<i>-<name>`
//! for as long as the VM is defined, so a restarted daemon has them back; without the fd store
//! (a daemon not run by systemd) such a disk is gone after a restart, and starting the VM says
//! so.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use serde::{Deserialize, Serialize};
use zbus::{OwnedVariant, Variant};

use super::definition::DefinitionError;
use super::host_files::{self, Rights};
use crate::images::{self, ChainError, DiskFormat, DiskImage, FileId};
use crate::protocol::{DiskConfig, DiskFds, ImageFormat};

/// The keys of one `Disks` entry.
const DISK_KEYS: &str = "Path, Format, ReadOnly, Serial";

/// One disk of a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub source: DiskSource,
    pub format: DiskFormat,
    pub read_only: bool,
    /// What the guest reads as the disk's serial; empty for none.
    pub serial: String,
}

/// Where a disk's image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// A host path, absolute.
    Path(PathBuf),
    /// An fd a caller passed.
    Passed(PassedDisk),
}

/// A disk image a caller passed as an fd.
#[derive(Debug, Clone)]
pub struct PassedDisk {
    /// `None` once the daemon has restarted since it was passed.
    pub fd: Option<Arc<OwnedFd>>,
    /// Where the file was when it was passed (for people, and stored).
    pub location: PathBuf,
}

/// Passed disks are the same when they were passed from the same place: an fd cannot be
/// compared with what a stored definition remembers.
impl PartialEq for PassedDisk {
    fn eq(&self, other: &Self) -> bool {
        self.location == other.location
    }
}
impl Eq for PassedDisk {}

impl DiskSpec {
    /// The path shown for the disk: its path, or where its passed file was.
    pub fn shown_path(&self) -> &Path {
        match &self.source {
            DiskSource::Path(path) => path,
            DiskSource::Passed(passed) => &passed.location,
        }
    }

    /// The helper's view, before the image is inspected: the format is a placeholder for
    /// `auto` and there is no backing chain yet. Used to check the serial and the count.
    pub fn unresolved_config(&self) -> DiskConfig {
        DiskConfig {
            format: self.format.fixed().unwrap_or(ImageFormat::Raw),
            read_only: self.read_only,
            serial: self.serial.clone(),
            backing: Vec::new(),
        }
    }
}

/// One `[[disk]]` table of a definition file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskTable {
    path: PathBuf,
    #[serde(default = "auto", skip_serializing_if = "is_auto")]
    format: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    read_only: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    serial: String,
    /// The image was passed as an fd (from `path`); written by the daemon only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    passed: bool,
}

fn auto() -> String {
    DiskFormat::Auto.as_str().to_string()
}
fn is_auto(format: &str) -> bool {
    format == DiskFormat::Auto.as_str()
}

impl DiskTable {
    pub fn from_spec(spec: &DiskSpec) -> DiskTable {
        DiskTable {
            path: spec.shown_path().to_path_buf(),
            format: spec.format.as_str().to_string(),
            read_only: spec.read_only,
            serial: spec.serial.clone(),
            passed: matches!(spec.source, DiskSource::Passed(_)),
        }
    }

    pub fn into_spec(self, index: usize) -> Result<DiskSpec, DefinitionError> {
        let format = self
            .format
            .parse()
            .map_err(|source| DefinitionError::DiskFormat {
                disk: index,
                source,
            })?;
        let source = if self.passed {
            DiskSource::Passed(PassedDisk {
                fd: None,
                location: self.path,
            })
        } else {
            if !self.path.is_absolute() {
                return Err(DefinitionError::RelativePath {
                    what: "disk",
                    path: self.path,
                });
            }
            DiskSource::Path(self.path)
        };
        Ok(DiskSpec {
            source,
            format,
            read_only: self.read_only,
            serial: self.serial,
        })
    }
}

/// Reads the `Disks` config key (`aa{sv}`). Entries without `Path` are kept with an empty path:
/// CreateVMWithFiles fills them from its `disk<i>` files, CreateVM refuses them.
pub fn parse_dbus(value: &OwnedVariant) -> Result<Vec<DiskSpec>, DefinitionError> {
    crate::daemon::definition::dict_list(value, "Disks")?
        .iter()
        .enumerate()
        .map(|(index, entry)| parse_entry(index, entry))
        .collect()
}

fn parse_entry(
    index: usize,
    entry: &HashMap<String, OwnedVariant>,
) -> Result<DiskSpec, DefinitionError> {
    let mut spec = DiskSpec {
        source: DiskSource::Path(PathBuf::new()),
        format: DiskFormat::Auto,
        read_only: false,
        serial: String::new(),
    };
    for (key, value) in entry {
        let Some(value) = unwrap_variant(value) else {
            return Err(DefinitionError::DiskWrongType {
                disk: index,
                key: "(value)",
                expected: "a plain value",
                found: value.value_signature().to_string(),
            });
        };
        match key.as_str() {
            "Path" => {
                spec.source =
                    DiskSource::Path(entry_value::<String>(index, "Path", "s", &value)?.into())
            }
            "Format" => {
                spec.format = entry_value::<String>(index, "Format", "s", &value)?
                    .parse()
                    .map_err(|source| DefinitionError::DiskFormat {
                        disk: index,
                        source,
                    })?;
            }
            "ReadOnly" => spec.read_only = entry_value::<bool>(index, "ReadOnly", "b", &value)?,
            "Serial" => spec.serial = entry_value::<String>(index, "Serial", "s", &value)?,
            other => {
                return Err(DefinitionError::UnknownDiskKey {
                    disk: index,
                    key: other.to_string(),
                    known: DISK_KEYS,
                });
            }
        }
    }
    Ok(spec)
}

/// A dict entry's value as sent: `a{sv}` values may arrive wrapped in one more variant.
fn unwrap_variant(value: &OwnedVariant) -> Option<OwnedVariant> {
    match Variant::try_from(value) {
        Ok(Variant::Variant(inner)) => OwnedVariant::try_from(*inner).ok(),
        _ => value.try_clone().ok(),
    }
}

fn entry_value<T>(
    index: usize,
    key: &'static str,
    expected: &'static str,
    value: &OwnedVariant,
) -> Result<T, DefinitionError>
where
    T: TryFrom<OwnedVariant>,
{
    let found = value.value_signature().to_string();
    let wrong = || DefinitionError::DiskWrongType {
        disk: index,
        key,
        expected,
        found: found.clone(),
    };
    if found != expected {
        return Err(wrong());
    }
    let cloned = value.try_clone().map_err(|_| wrong())?;
    T::try_from(cloned).map_err(|_| wrong())
}

/// The `Disks` property: one `a{sv}` per disk with the config's keys (Path is where a passed
/// file was), and `Passed` b.
pub fn to_dbus(disks: &[DiskSpec]) -> Vec<HashMap<String, OwnedVariant>> {
    disks
        .iter()
        .map(|disk| {
            let path = disk.shown_path().display().to_string();
            HashMap::from([
                (
                    "Path".to_string(),
                    OwnedVariant::from(zbus::Str::from(path)),
                ),
                (
                    "Format".to_string(),
                    OwnedVariant::from(zbus::Str::from(disk.format.as_str())),
                ),
                ("ReadOnly".to_string(), OwnedVariant::from(disk.read_only)),
                (
                    "Serial".to_string(),
                    OwnedVariant::from(zbus::Str::from(disk.serial.clone())),
                ),
                (
                    "Passed".to_string(),
                    OwnedVariant::from(matches!(disk.source, DiskSource::Passed(_))),
                ),
            ])
        })
        .collect()
}

/// Checks a `disk<i>` fd a caller passed: a readable regular file, open for writing too unless
/// the disk is read-only. Returns where it lies.
pub fn check_passed(
    index: usize,
    fd: &OwnedFd,
    read_only: bool,
) -> Result<PathBuf, DefinitionError> {
    let unusable = |reason: String| DefinitionError::PassedDisk {
        disk: index,
        reason,
    };
    let stat = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| unusable(e.to_string()))?;
    if let Some(kind) = super::files::non_regular_kind(stat.st_mode) {
        return Err(unusable(format!("it is {kind}, not a regular file")));
    }
    let flags = OFlag::from_bits_truncate(
        fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(|e| unusable(e.to_string()))?,
    );
    if flags.contains(OFlag::O_PATH) {
        return Err(unusable("it was opened with O_PATH".into()));
    }
    match flags & OFlag::O_ACCMODE {
        OFlag::O_WRONLY => return Err(unusable("it is open for writing only".into())),
        OFlag::O_RDONLY if !read_only => {
            return Err(unusable(
                "it is open read-only, and the disk is not ReadOnly".into(),
            ));
        }
        _ => {}
    }
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| unusable(format!("cannot tell where it lies: {e}")))
}

/// A VM's disks, open, locked and ready to pass.
#[derive(Debug, Default)]
pub struct OpenedDisks {
    pub fds: Vec<DiskFds>,
    pub configs: Vec<DiskConfig>,
    /// Every file of every chain, and how it is locked.
    pub claims: Vec<Claim>,
}

/// A file a VM's helper holds, and whether it may write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub id: FileId,
    pub writes: bool,
}

impl Claim {
    /// Whether the two may not be held at once: the same file, and someone writes it.
    pub fn conflicts_with(&self, other: &Claim) -> bool {
        self.id == other.id && (self.writes || other.writes)
    }
}

/// Why a VM's disks cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskOpenError {
    #[error("disk {disk}")]
    Chain {
        disk: usize,
        #[source]
        source: ChainError,
    },
    #[error(
        "disk {disk} was passed as an fd, which the daemon lost when it restarted (systemd's fd store did not keep it); remove the VM and define it again"
    )]
    PassedGone { disk: usize },
    #[error(
        "disks {disk} and {other} both use {path}, and one of them writes it",
        path = path.display()
    )]
    SameFile {
        disk: usize,
        other: usize,
        path: PathBuf,
    },
    #[error("disk {disk}: cannot use the passed file")]
    Passed {
        disk: usize,
        #[source]
        source: io::Error,
    },
}

impl DiskOpenError {
    /// The busy file's identity, when another open file description holds a lock on it.
    pub fn busy(&self) -> Option<(usize, &Path, FileId)> {
        match self {
            DiskOpenError::Chain {
                disk,
                source: ChainError::Busy { path, id },
            } => Some((*disk, path, *id)),
            _ => None,
        }
    }
}

/// Opens every disk and its backing chain with `rights`, then locks them all. Before the locks
/// are taken, `claim` is told every file and answers the first that one of the daemon's other
/// VMs holds in a conflicting way (which the locks cannot see when it is the same passed
/// description), or records them, so that a concurrent start that loses the race for a lock
/// can name this VM. On failure, the locks taken on passed descriptions are released.
pub fn open_all(
    disks: &[DiskSpec],
    rights: &Rights,
    claim: &mut dyn FnMut(&[Claim]) -> Option<FileId>,
) -> Result<OpenedDisks, DiskOpenError> {
    let opened = open_and_lock(disks, rights, claim);
    if opened.is_err() {
        release_passed(disks);
    }
    opened
}

fn open_and_lock(
    disks: &[DiskSpec],
    rights: &Rights,
    claim: &mut dyn FnMut(&[Claim]) -> Option<FileId>,
) -> Result<OpenedDisks, DiskOpenError> {
    let resolved = disks
        .iter()
        .enumerate()
        .map(|(disk, spec)| resolve_disk(disk, spec, rights, spec.read_only))
        .collect::<Result<Vec<_>, _>>()?;
    // Every file of every chain, with its disk and path, in claim order.
    let mut files: Vec<(usize, &Path)> = Vec::new();
    let mut claims: Vec<Claim> = Vec::new();
    for (disk, (chain, spec)) in resolved.iter().zip(disks).enumerate() {
        for (layer, image) in std::iter::once(&chain.image)
            .chain(&chain.bases)
            .enumerate()
        {
            files.push((disk, &image.path));
            claims.push(Claim {
                id: image.id,
                writes: layer == 0 && !spec.read_only,
            });
        }
    }
    // One VM writing a file through two disks: the locks would blame someone else.
    for (index, first) in claims.iter().enumerate() {
        if let Some(offset) = claims[index + 1..]
            .iter()
            .position(|c| c.conflicts_with(first))
        {
            let ((disk, path), (other, _)) = (files[index], files[index + 1 + offset]);
            if disk != other {
                return Err(DiskOpenError::SameFile {
                    disk,
                    other,
                    path: path.to_path_buf(),
                });
            }
        }
    }
    if let Some(busy) = claim(&claims)
        && let Some(index) = claims.iter().position(|c| c.id == busy)
    {
        let (disk, path) = files[index];
        return Err(DiskOpenError::Chain {
            disk,
            source: ChainError::Busy {
                path: path.to_path_buf(),
                id: busy,
            },
        });
    }
    for (disk, (chain, spec)) in resolved.iter().zip(disks).enumerate() {
        chain
            .lock(spec.read_only)
            .map_err(|source| DiskOpenError::Chain { disk, source })?;
    }
    let mut opened = OpenedDisks {
        claims,
        ..Default::default()
    };
    for (chain, spec) in resolved.into_iter().zip(disks) {
        opened.configs.push(DiskConfig {
            format: chain.image.format,
            read_only: spec.read_only,
            serial: spec.serial.clone(),
            backing: chain.backing_formats(),
        });
        opened.fds.push(chain.into_fds());
    }
    Ok(opened)
}

/// Opens disk `disk` and its backing chain with `rights`; the image read-write unless
/// `read_only`.
fn resolve_disk(
    disk: usize,
    spec: &DiskSpec,
    rights: &Rights,
    read_only: bool,
) -> Result<images::ResolvedDisk, DiskOpenError> {
    let mut open = |path: &Path, writable: bool| host_files::open_image(path, rights, writable);
    let image = match &spec.source {
        DiskSource::Path(path) => DiskImage::Path(path.clone()),
        DiskSource::Passed(passed) => {
            let fd = passed
                .fd
                .as_ref()
                .ok_or(DiskOpenError::PassedGone { disk })?;
            let (file, location) =
                share(fd).map_err(|source| DiskOpenError::Passed { disk, source })?;
            let dir = location
                .parent()
                .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
            DiskImage::Opened {
                file,
                name: location,
                dir,
            }
        }
    };
    images::resolve(image, spec.format, read_only, &mut open)
        .map_err(|source| DiskOpenError::Chain { disk, source })
}

/// What a helper started by an earlier daemon holds, as far as its definition tells: each
/// disk's chain is followed again (read-only, with `rights`, nothing locked). A disk that
/// cannot be followed any more is left out: the locks still guard it, only the message for a
/// start that collides with it cannot name this VM.
pub fn claims_of(disks: &[DiskSpec], rights: &Rights) -> Vec<Claim> {
    disks
        .iter()
        .enumerate()
        .filter_map(|(disk, spec)| {
            let chain = resolve_disk(disk, spec, rights, true).ok()?;
            let claims: Vec<Claim> = chain
                .ids()
                .into_iter()
                .enumerate()
                .map(|(layer, id)| Claim {
                    id,
                    writes: layer == 0 && !spec.read_only,
                })
                .collect();
            Some(claims)
        })
        .flatten()
        .collect()
}

/// The passed description itself (a new fd for it), and where its file lies now.
fn share(fd: &OwnedFd) -> io::Result<(File, PathBuf)> {
    let location = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok((File::from(fd.try_clone()?), location))
}

/// Lets go of the locks on the passed images' descriptions, which the daemon keeps after their
/// helper has exited (or when a start failed). Only for a VM whose helper is gone.
pub fn release_passed(disks: &[DiskSpec]) {
    for disk in disks {
        if let DiskSource::Passed(PassedDisk { fd: Some(fd), .. }) = &disk.source
            && let Err(error) = images::lock::unlock(fd.as_fd())
        {
            tracing::warn!("cannot unlock a passed disk image: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pairs: Vec<(&str, Variant<'static>)>) -> HashMap<String, Variant<'static>> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    fn disks_value(entries: Vec<HashMap<String, Variant<'static>>>) -> OwnedVariant {
        let entries: Vec<HashMap<String, OwnedVariant>> = entries
            .into_iter()
            .map(|e| {
                e.into_iter()
                    .map(|(k, v)| (k, OwnedVariant::try_from(v).expect("owned")))
                    .collect()
            })
            .collect();
        OwnedVariant::try_from(Variant::from(entries)).expect("owned")
    }

    #[test]
    fn disks_are_read_from_dbus_with_defaults() {
        let value = disks_value(vec![
            entry(vec![
                ("Path", Variant::from("/srv/a.qcow2")),
                ("Format", Variant::from("qcow2")),
                ("ReadOnly", Variant::from(true)),
                ("Serial", Variant::from("vd-1")),
            ]),
            entry(vec![("Path", Variant::from("/srv/b.img"))]),
        ]);
        let disks = parse_dbus(&value).expect("valid");
        assert_eq!(
            disks,
            [
                DiskSpec {
                    source: DiskSource::Path("/srv/a.qcow2".into()),
                    format: DiskFormat::Qcow2,
                    read_only: true,
                    serial: "vd-1".into(),
                },
                DiskSpec {
                    source: DiskSource::Path("/srv/b.img".into()),
                    format: DiskFormat::Auto,
                    read_only: false,
                    serial: String::new(),
                },
            ]
        );
        let shown = to_dbus(&disks);
        assert_eq!(shown.len(), 2);
        assert_eq!(
            String::try_from(shown[0]["Format"].try_clone().expect("clone")).expect("s"),
            "qcow2"
        );
    }

    #[test]
    fn bad_disk_entries_are_named_errors() {
        let err = |entries| parse_dbus(&disks_value(entries)).unwrap_err();
        assert!(matches!(
            err(vec![entry(vec![("Size", Variant::from(1u64))])]),
            DefinitionError::UnknownDiskKey { disk: 0, .. }
        ));
        assert!(matches!(
            err(vec![
                entry(vec![("Path", Variant::from("/a"))]),
                entry(vec![("ReadOnly", Variant::from("yes"))])
            ]),
            DefinitionError::DiskWrongType {
                disk: 1,
                key: "ReadOnly",
                ..
            }
        ));
        assert!(matches!(
            err(vec![entry(vec![("Format", Variant::from("vmdk"))])]),
            DefinitionError::DiskFormat { disk: 0, .. }
        ));
        let not_an_array = OwnedVariant::try_from(Variant::from("disk.img")).expect("owned");
        assert!(matches!(
            parse_dbus(&not_an_array),
            Err(DefinitionError::WrongType { key: "Disks", .. })
        ));
    }

    #[test]
    fn one_vm_cannot_write_a_file_through_two_disks() {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(file.path(), [0u8; 512]).expect("write");
        let disk = |read_only: bool| DiskSpec {
            source: DiskSource::Path(file.path().into()),
            format: DiskFormat::Raw,
            read_only,
            serial: String::new(),
        };
        let error = open_all(&[disk(true), disk(false)], &Rights::Daemon, &mut |_| None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("disks 0 and 1 both use"), "{error}");
        // Read by both, it is shared.
        let opened =
            open_all(&[disk(true), disk(true)], &Rights::Daemon, &mut |_| None).expect("shared");
        assert_eq!(opened.configs.len(), 2);
        // Held by another VM (as the claim answers), it is busy, with the file named.
        let id = opened.claims[0].id;
        let error = open_all(&[disk(true)], &Rights::Daemon, &mut |_| Some(id)).unwrap_err();
        assert!(matches!(error.busy(), Some((0, path, _)) if path == file.path()));
    }

    #[test]
    fn passed_fds_must_allow_what_the_disk_needs() {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        let read_only: OwnedFd = File::open(file.path()).expect("open").into();
        std::fs::write(file.path(), [0u8; 512]).expect("write");
        let read_write: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file.path())
            .expect("open")
            .into();
        assert_eq!(
            check_passed(0, &read_write, false).expect("rw"),
            file.path()
        );
        assert!(check_passed(0, &read_only, true).is_ok());
        let error = check_passed(1, &read_only, false).unwrap_err().to_string();
        assert!(
            error.contains("disk1 fd") && error.contains("read-only"),
            "{error}"
        );
        let dir: OwnedFd = File::open("/").expect("open").into();
        assert!(check_passed(0, &dir, true).is_err());

        // Shared, the passed description keeps its access, and a lock on it is let go of.
        let (shared, location) = share(&read_only).expect("share");
        assert_eq!(location, file.path());
        assert!(std::io::Write::write(&mut &shared, b"x").is_err());
        let spec = DiskSpec {
            source: DiskSource::Passed(PassedDisk {
                fd: Some(Arc::new(read_write)),
                location: file.path().into(),
            }),
            format: DiskFormat::Raw,
            read_only: false,
            serial: String::new(),
        };
        let opened =
            open_all(std::slice::from_ref(&spec), &Rights::Daemon, &mut |_| None).expect("open");
        assert!(opened.claims[0].writes);
        let other = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file.path())
            .expect("open");
        assert!(!images::lock::try_lock(&other, images::lock::LockKind::Shared).expect("lock"));
        drop(opened);
        release_passed(std::slice::from_ref(&spec));
        assert!(images::lock::try_lock(&other, images::lock::LockKind::Exclusive).expect("lock"));
    }
}
