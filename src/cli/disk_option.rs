//! `vmd run --disk PATH[,ro][,format=raw|qcow2|auto][,serial=S]`, and opening such a disk
//! with its backing chain and locks, with the invoking user's own rights.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::helper::error_chain;
use crate::images::{self, ChainError, DiskFormat, DiskImage};
use crate::protocol::{DiskConfig, DiskFds};

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOption {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
    pub serial: String,
}

/// Parses `PATH[,ro][,format=F][,serial=S]` (a path cannot contain a comma).
pub fn parse_disk_option(text: &str) -> Result<DiskOption, String> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(format!(
            "{text:?}: a disk is PATH[,ro][,format=raw|qcow2|auto][,serial=S]"
        ));
    }
    let mut disk = DiskOption {
        path: PathBuf::from(path),
        format: DiskFormat::Auto,
        read_only: false,
        serial: String::new(),
    };
    for part in parts {
        match part.split_once('=') {
            None if part == "ro" => disk.read_only = true,
            Some(("format", format)) => disk.format = format.parse().map_err(|e| format!("{e}"))?,
            Some(("serial", serial)) => disk.serial = serial.to_string(),
            _ => {
                return Err(format!(
                    "{text:?}: unknown disk option {part:?} (known: ro, format=raw|qcow2|auto, serial=S)"
                ));
            }
        }
    }
    Ok(disk)
}

/// Opens every disk and its backing chain as the invoking user, and locks them; returns the
/// fds and the helper's view of each disk.
pub fn open_disks(disks: &[DiskOption]) -> Result<(Vec<DiskFds>, Vec<DiskConfig>), String> {
    let mut open = |path: &Path, writable: bool| open_image(path, writable);
    let mut resolved = Vec::with_capacity(disks.len());
    for (index, disk) in disks.iter().enumerate() {
        let chain = images::resolve(
            DiskImage::Path(disk.path.clone()),
            disk.format,
            disk.read_only,
            &mut open,
        )
        .map_err(|e| format!("disk {index}: {}", error_chain(&e)))?;
        resolved.push(chain);
    }
    for (index, (chain, disk)) in resolved.iter().zip(disks).enumerate() {
        chain.lock(disk.read_only).map_err(|e| match e {
            ChainError::Busy { path, .. } => format!(
                "disk {index}: {} is in use by another VM or program",
                path.display()
            ),
            other => format!("disk {index}: {}", error_chain(&other)),
        })?;
    }
    Ok(resolved
        .into_iter()
        .zip(disks)
        .map(|(chain, disk)| {
            let config = DiskConfig {
                format: chain.image.format,
                read_only: disk.read_only,
                serial: disk.serial.clone(),
                backing: chain.backing_formats(),
            };
            (chain.into_fds(), config)
        })
        .unzip())
}

/// Never blocks on a FIFO, never makes a terminal ours; the chain refuses what is not a
/// regular file.
fn open_image(path: &Path, writable: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse() {
        assert_eq!(
            parse_disk_option("/srv/a.qcow2,ro,format=qcow2,serial=abc").expect("valid"),
            DiskOption {
                path: "/srv/a.qcow2".into(),
                format: DiskFormat::Qcow2,
                read_only: true,
                serial: "abc".into(),
            }
        );
        assert_eq!(
            parse_disk_option("disk.img").expect("valid"),
            DiskOption {
                path: "disk.img".into(),
                format: DiskFormat::Auto,
                read_only: false,
                serial: String::new(),
            }
        );
        for bad in ["", ",ro", "a,rw", "a,format=vmdk", "a,size=1G"] {
            assert!(parse_disk_option(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_disk_in_use_is_refused() {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(file.path(), vec![0u8; 4096]).expect("write");
        let disk = DiskOption {
            path: file.path().into(),
            format: DiskFormat::Raw,
            read_only: false,
            serial: "s".into(),
        };
        let (fds, configs) = open_disks(std::slice::from_ref(&disk)).expect("first");
        assert_eq!(configs[0].serial, "s");
        let error = open_disks(&[disk]).unwrap_err();
        assert!(error.contains("in use"), "{error}");
        drop(fds);
    }
}
