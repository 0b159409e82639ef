//! A disk image as the block device reads and writes it: raw, or qcow2 over a backing chain,
//! all through the `imago` crate, from files the launcher opened (the helper opens nothing).

use std::fs::File;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, StorageOpenOptions, SyncFormatAccess,
};
use vm_memory::VolatileSlice;

use crate::protocol::ImageFormat;

type Storage = imago::file::File;

/// Errors from [`DiskImage::open`].
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open layer {layer} ({format}) of the image")]
    Open {
        /// 0 is the image itself, 1 its backing file, and so on.
        layer: usize,
        format: ImageFormat,
        #[source]
        source: std::io::Error,
    },
    #[error("a raw image cannot have a backing file (layer {layer})")]
    RawWithBacking { layer: usize },
}

/// An open disk image.
pub struct DiskImage {
    access: SyncFormatAccess<Storage>,
}

impl DiskImage {
    /// Opens `image` (writable unless `read_only`) over `bases`, its backing chain nearest
    /// first, which is always read-only. Nothing named inside an image is ever opened: the
    /// chain is exactly the files given.
    pub fn open(
        image: File,
        format: ImageFormat,
        bases: Vec<(File, ImageFormat)>,
        read_only: bool,
    ) -> Result<DiskImage, ImageError> {
        // Build from the bottom of the chain up: each layer is the backing of the one above.
        let mut below: Option<FormatAccess<Storage>> = None;
        for (position, (file, format)) in bases.into_iter().enumerate().rev() {
            below = Some(open_layer(file, format, below, false, position + 1)?);
        }
        let top = open_layer(image, format, below, !read_only, 0)?;
        let access = SyncFormatAccess::try_from(top).map_err(|source| ImageError::Open {
            layer: 0,
            format,
            source,
        })?;
        Ok(DiskImage { access })
    }

    /// The guest-visible size in bytes.
    pub fn size(&self) -> u64 {
        self.access.size()
    }

    /// Reads `offset..` into `buffers`.
    pub fn read(&self, buffers: &[VolatileSlice<'_, ()>], offset: u64) -> std::io::Result<()> {
        let (vector, _guard) = IoVectorMut::from_volatile_slice(buffers.iter());
        self.access.readv(vector, offset)
    }

    /// Writes `buffers` at `offset..`.
    pub fn write(&self, buffers: &[VolatileSlice<'_, ()>], offset: u64) -> std::io::Result<()> {
        let (vector, _guard) = IoVector::from_volatile_slice(buffers.iter());
        self.access.writev(vector, offset)
    }

    /// Writes back cached metadata and makes everything written durable (fdatasync).
    pub fn flush(&self) -> std::io::Result<()> {
        self.access.flush()?;
        self.access.sync()
    }
}

fn open_layer(
    file: File,
    format: ImageFormat,
    backing: Option<FormatAccess<Storage>>,
    writable: bool,
    layer: usize,
) -> Result<FormatAccess<Storage>, ImageError> {
    let error = |source| ImageError::Open {
        layer,
        format,
        source,
    };
    let storage =
        Storage::from_open_file(file, StorageOpenOptions::new().write(writable)).map_err(error)?;
    match format {
        ImageFormat::Raw => {
            if backing.is_some() {
                return Err(ImageError::RawWithBacking { layer });
            }
            let raw = Raw::builder(storage)
                .write(writable)
                .open_sync(DenyImplicitOpenGate::default())
                .map_err(error)?;
            Ok(FormatAccess::new(raw))
        }
        ImageFormat::Qcow2 => {
            // The bottom layer gets "no backing" explicitly: a header that still names one is
            // the launcher's business (it resolved the chain), never a file to open here.
            let qcow2 = Qcow2::<Storage>::builder(storage)
                .write(writable)
                .backing(backing)
                .open_sync(DenyImplicitOpenGate::default())
                .map_err(error)?;
            Ok(FormatAccess::new(qcow2))
        }
    }
}
