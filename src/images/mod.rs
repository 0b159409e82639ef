//! Disk images as the launchers (the daemon and `vmd run`) see them before a VM starts: what
//! format an image is, which files its qcow2 backing chain needs, opening all of them through
//! a caller's `open` (so each is opened with the rights of whoever answers for the start), and
//! locking them against a second writer.
//!
//! - [`qcow2_header`] parses the hostile header bytes;
//! - [`chain`] follows a backing chain to its end;
//! - [`lock`] takes the OFD locks.

pub mod chain;
pub mod lock;
pub mod qcow2_header;

use std::fmt;
use std::str::FromStr;

pub use chain::{ChainError, DiskImage, FileId, OpenImage, ResolvedDisk, resolve};

use crate::protocol::ImageFormat;

/// A disk's format as a user gives it: `auto` means "qcow2 if the image starts with the qcow2
/// magic, else raw".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskFormat {
    Raw,
    Qcow2,
    #[default]
    Auto,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Auto => "auto",
        }
    }

    /// The fixed format, or `None` for auto.
    pub fn fixed(self) -> Option<ImageFormat> {
        match self {
            DiskFormat::Raw => Some(ImageFormat::Raw),
            DiskFormat::Qcow2 => Some(ImageFormat::Qcow2),
            DiskFormat::Auto => None,
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format name that is none of raw, qcow2 and auto.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown disk format {0:?} (known: raw, qcow2, auto)")]
pub struct UnknownFormat(pub String);

impl FromStr for DiskFormat {
    type Err = UnknownFormat;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            "auto" => Ok(DiskFormat::Auto),
            other => Err(UnknownFormat(other.to_string())),
        }
    }
}
