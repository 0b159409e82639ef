//! `vmctl create [-b base | -i input] [-s size] disk`, as in OpenBSD's vmctl(8): vmctl makes
//! the image itself, with imago, without the daemon.
//!
//! - The format comes from a `raw:` or `qcow2:` prefix, else from the name: `.qcow2` is qcow2,
//!   anything else raw.
//! - `-b base` makes a qcow2 overlay over `base`, recorded as given and, like every backing
//!   name, read relative to the new image's directory; the size is the base's.
//! - `-i input` copies `input` (raw or qcow2, backing chain and all) into the new image,
//!   converting as needed; all-zero stretches are left unallocated.
//! - An existing file is never overwritten.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    PermissiveImplicitOpenGate,
};
use vmd::images::qcow2_header;
use vmd::protocol::ImageFormat;

use crate::cli::CreateArgs;
use crate::error::VmctlError;

type Storage = imago::file::File;

/// How much is copied at a time with `-i`.
const COPY_CHUNK: usize = 1 << 20;
const MIB: u64 = 1 << 20;

/// `vmctl create`.
pub async fn create(args: CreateArgs) -> Result<String, VmctlError> {
    let (format, path) = image_name(&args.disk)?;
    if args.base.is_some() && format != ImageFormat::Qcow2 {
        return Err(VmctlError::Message(format!(
            "{}: only a qcow2 image can have a base (-b); name it *.qcow2 or qcow2:{}",
            path.display(),
            path.display()
        )));
    }
    let plan = Plan::new(&args, &path).await?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|error| match error.kind() {
            io::ErrorKind::AlreadyExists => VmctlError::Message(format!(
                "{} exists already; vmctl create does not overwrite",
                path.display()
            )),
            _ => VmctlError::io(format!("cannot create {}", path.display()), error),
        })?;
    // A failure leaves no half-made image behind (only the file this call created).
    let made = write_image(file, format, &plan).await;
    if let Err(error) = made {
        let _ = std::fs::remove_file(&path);
        return Err(VmctlError::io(
            format!("cannot make {}", path.display()),
            error,
        ));
    }
    Ok(format!(
        "vmctl: created {format} disk {} of {} bytes",
        path.display(),
        plan.size
    ))
}

/// The format and path of `[raw:|qcow2:]PATH`.
pub fn image_name(disk: &str) -> Result<(ImageFormat, PathBuf), VmctlError> {
    let (format, path) = match disk.split_once(':') {
        Some(("raw", path)) => (Some(ImageFormat::Raw), path),
        Some(("qcow2", path)) => (Some(ImageFormat::Qcow2), path),
        _ => (None, disk),
    };
    if path.is_empty() {
        return Err(VmctlError::Message(format!("{disk:?} names no file")));
    }
    let path = PathBuf::from(path);
    let format = format.unwrap_or_else(|| {
        if path.extension().is_some_and(|ext| ext == "qcow2") {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        }
    });
    Ok((format, path))
}

/// What the new image will be.
struct Plan {
    size: u64,
    /// `-b`: the name recorded, and the base's format.
    backing: Option<(String, ImageFormat)>,
    /// `-i`: the input, opened.
    input: Option<FormatAccess<Storage>>,
}

impl Plan {
    async fn new(args: &CreateArgs, path: &Path) -> Result<Plan, VmctlError> {
        if let Some(base) = &args.base {
            let name = base.to_str().ok_or_else(|| {
                VmctlError::Message(format!("base path {base:?} is not valid UTF-8"))
            })?;
            // The name is recorded as given, and read, as QEMU and vmd read it, relative to the
            // new image's directory: so it is opened that way here too.
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
            let located = dir.map_or_else(|| base.clone(), |dir| dir.join(base));
            let (access, format) = open_image(&located).await?;
            if let Some(size) = args.size
                && size != access.size()
            {
                return Err(VmctlError::Message(format!(
                    "the size of a disk over a base is the base's ({} bytes), not {size}",
                    access.size()
                )));
            }
            return Ok(Plan {
                size: access.size(),
                backing: Some((name.to_owned(), format)),
                input: None,
            });
        }
        if let Some(input) = &args.input {
            let (access, _) = open_image(input).await?;
            let size = match args.size {
                Some(size) if size < access.size() => {
                    return Err(VmctlError::Message(format!(
                        "{} is {} bytes; the new disk cannot be smaller ({size})",
                        input.display(),
                        access.size()
                    )));
                }
                Some(size) => size,
                None => access.size(),
            };
            return Ok(Plan {
                size,
                backing: None,
                input: Some(access),
            });
        }
        let size = args.size.ok_or_else(|| {
            VmctlError::Message("give the new disk's size with -s (or -b or -i)".to_owned())
        })?;
        Ok(Plan {
            size,
            backing: None,
            input: None,
        })
    }
}

/// Opens an existing image (qcow2 if it has the magic, else raw) with its backing chain.
async fn open_image(path: &Path) -> Result<(FormatAccess<Storage>, ImageFormat), VmctlError> {
    let failed =
        |error: io::Error| VmctlError::io(format!("cannot open {}", path.display()), error);
    let mut magic = [0u8; 4];
    let file = File::open(path).map_err(failed)?;
    let read = file.read_at(&mut magic, 0).map_err(failed)?;
    if qcow2_header::has_qcow2_magic(&magic[..read]) {
        let qcow2 = Qcow2::<Storage>::builder_path(path)
            .open(PermissiveImplicitOpenGate::default())
            .await
            .map_err(failed)?;
        Ok((FormatAccess::new(qcow2), ImageFormat::Qcow2))
    } else {
        let raw = Raw::<Storage>::builder_path(path)
            .open(PermissiveImplicitOpenGate::default())
            .await
            .map_err(failed)?;
        Ok((FormatAccess::new(raw), ImageFormat::Raw))
    }
}

async fn write_image(file: File, format: ImageFormat, plan: &Plan) -> io::Result<()> {
    match format {
        ImageFormat::Raw => {
            file.set_len(plan.size)?;
            if let Some(input) = &plan.input {
                copy(input, &Output::Raw(&file)).await?;
            }
            file.sync_all()
        }
        ImageFormat::Qcow2 => {
            let mut builder =
                Qcow2::<Storage>::create_builder(Storage::try_from(file)?).size(plan.size);
            if let Some((name, base_format)) = &plan.backing {
                builder = builder.backing(name.clone(), base_format.to_string());
            }
            let Some(input) = &plan.input else {
                return builder.create().await;
            };
            let qcow2 = builder
                .create_open(DenyImplicitOpenGate::default(), |image| {
                    Ok(Qcow2::<Storage>::builder(image).backing(None).write(true))
                })
                .await?;
            let output = FormatAccess::new(qcow2);
            copy(input, &Output::Image(&output)).await?;
            output.flush().await
        }
    }
}

/// Where `-i` copies to.
enum Output<'a> {
    Raw(&'a File),
    Image(&'a FormatAccess<Storage>),
}

/// Reads `input` a chunk at a time and writes every chunk that is not all zeroes to `output`
/// (which reads as zeroes where nothing was written).
async fn copy(input: &FormatAccess<Storage>, output: &Output<'_>) -> io::Result<()> {
    let mut buffer = vec![0u8; COPY_CHUNK];
    let mut offset = 0u64;
    while offset < input.size() {
        let len = (input.size() - offset).min(COPY_CHUNK as u64) as usize;
        let chunk = &mut buffer[..len];
        let mut vector = IoVectorMut::with_capacity(1);
        vector.push(&mut *chunk);
        input.read(vector, offset).await?;
        if chunk.iter().any(|&byte| byte != 0) {
            match output {
                Output::Raw(file) => file.write_all_at(chunk, offset)?,
                Output::Image(image) => {
                    let mut vector = IoVector::with_capacity(1);
                    vector.push(chunk);
                    image.write(vector, offset).await?;
                }
            }
        }
        offset += len as u64;
    }
    Ok(())
}

/// A disk size as vmctl(8) takes it: a number, maybe with a fraction, and a K, M, G or T
/// suffix; a bare number is megabytes. Rounded up to whole megabytes; zero is refused.
pub fn parse_disk_size(text: &str) -> Result<u64, String> {
    let bad =
        || format!("{text:?} is not a disk size (e.g. 64M, 1.5G, 10G; a bare number is megabytes)");
    let trimmed = text.trim();
    let (number, unit) = match trimmed.char_indices().last() {
        Some((i, suffix)) if suffix.is_ascii_alphabetic() => {
            let shift = match suffix.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&trimmed[..i], 1u128 << shift)
        }
        _ => (trimmed, u128::from(MIB)),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 9 {
        return Err(bad());
    }
    let whole: u128 = whole.parse().map_err(|_| bad())?;
    let fraction_value: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| bad())?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let bytes = whole
        .checked_mul(unit)
        .and_then(|b| b.checked_add((fraction_value * unit).div_ceil(scale)))
        .ok_or_else(|| format!("{text:?} is too large"))?;
    let rounded = bytes.div_ceil(u128::from(MIB)) * u128::from(MIB);
    match u64::try_from(rounded) {
        Ok(0) => Err("the disk size must not be zero".to_owned()),
        Ok(size) => Ok(size),
        Err(_) => Err(format!("{text:?} is too large")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes_fractions_and_default_to_megabytes() {
        assert_eq!(parse_disk_size("64M"), Ok(64 * MIB));
        assert_eq!(parse_disk_size("64"), Ok(64 * MIB));
        assert_eq!(parse_disk_size("1.5G"), Ok(1536 * MIB));
        assert_eq!(parse_disk_size("2g"), Ok(2048 * MIB));
        assert_eq!(parse_disk_size("1T"), Ok(1 << 40));
        // Rounded up to whole megabytes.
        assert_eq!(parse_disk_size("1K"), Ok(MIB));
        assert_eq!(parse_disk_size("1.0001M"), Ok(2 * MIB));
        for bad in [
            "",
            "0",
            "0.0M",
            "M",
            "1.5.5G",
            "-1G",
            "1X",
            "1 G",
            "99999999999T",
        ] {
            assert!(parse_disk_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_format_comes_from_the_prefix_or_the_extension() {
        let name = |disk: &str| image_name(disk).expect("valid");
        assert_eq!(
            name("disk.qcow2"),
            (ImageFormat::Qcow2, "disk.qcow2".into())
        );
        assert_eq!(name("disk.img"), (ImageFormat::Raw, "disk.img".into()));
        assert_eq!(
            name("raw:disk.qcow2"),
            (ImageFormat::Raw, "disk.qcow2".into())
        );
        assert_eq!(
            name("qcow2:/srv/disk"),
            (ImageFormat::Qcow2, "/srv/disk".into())
        );
        assert_eq!(name("other:disk"), (ImageFormat::Raw, "other:disk".into()));
        assert!(image_name("qcow2:").is_err());
    }
}
