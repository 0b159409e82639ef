//! The parts of a qcow2 header that decide which files a disk needs: the version, the virtual
//! size, the backing file name and format, and the features that would name yet another file.
//!
//! A header is hostile data (a guest can write one into a raw disk that later becomes a base,
//! and a user can craft one): every offset and length is checked against the bytes read, and
//! nothing is read outside the first cluster, where QEMU keeps all of it too
//! (docs/interop/qcow2.txt, "Header").

use crate::protocol::ImageFormat;

/// `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// The length of a version 2 header (and of the fields version 3 shares with it).
const V2_HEADER_BYTES: usize = 72;
/// The shortest version 3 header (up to and including `header_length`).
const V3_MIN_HEADER_BYTES: usize = 104;
/// Cluster sizes QEMU accepts: 512 bytes to 2 MiB.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// QEMU's limit on a backing file name (`PATH_MAX`-like; `qcow2.c` refuses more than 1023).
pub const MAX_BACKING_NAME_BYTES: u32 = 1023;
/// Header extension types (docs/interop/qcow2.txt, "Header extensions").
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Incompatible feature bits.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Dirty (0), corrupt (1), external data file (2), compression type (3), extended L2 (4).
const INCOMPAT_KNOWN: u64 = 0b1_1111;

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// The backing file, if the image has one.
    pub backing: Option<BackingRef>,
}

/// A backing file as a header names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The name as stored: no NUL, 1 to [`MAX_BACKING_NAME_BYTES`] bytes.
    pub name: Vec<u8>,
    /// From the backing-format header extension; `None` when the image does not say.
    pub format: Option<ImageFormat>,
}

/// Why a qcow2 header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the header is cut short: {needed} bytes are needed, {available} are there")]
    Truncated { needed: usize, available: usize },
    #[error("not a qcow2 image (no QFI\\xfb magic)")]
    NoMagic,
    #[error("qcow2 version {0} is not supported (only 2 and 3)")]
    Version(u32),
    #[error("cluster_bits {0} is outside 9..=21")]
    ClusterBits(u32),
    #[error("header_length {0} is not a multiple of 8 between 104 and the cluster size")]
    HeaderLength(u32),
    #[error("encrypted qcow2 images are not supported (crypt_method {0})")]
    Encrypted(u32),
    #[error("the image is marked corrupt; repair it with qemu-img check -r")]
    Corrupt,
    #[error("images with an external data file are not supported")]
    ExternalDataFile,
    #[error("unknown incompatible features {0:#x}")]
    UnknownFeatures(u64),
    #[error(
        "the backing file name ({size} bytes at offset {offset}) is empty, longer than {MAX_BACKING_NAME_BYTES} bytes or outside the first cluster"
    )]
    BackingNameBounds { offset: u64, size: u32 },
    #[error("the backing file name contains a NUL byte")]
    BackingNameNul,
    #[error("a header extension at offset {offset} runs past the first cluster")]
    ExtensionBounds { offset: usize },
    #[error("backing format {0:?} is not supported (only raw and qcow2)")]
    BackingFormat(String),
}

/// Whether `bytes` (the start of a file) begin with the qcow2 magic.
pub fn has_qcow2_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(&QCOW2_MAGIC)
}

/// How many bytes from the start of the file [`parse`] may need, given the first
/// [`V3_MIN_HEADER_BYTES`] (or fewer): the first cluster when its size is sane.
pub fn bytes_needed(start: &[u8]) -> usize {
    let cluster_bits = be_u32(start, 20).filter(|bits| CLUSTER_BITS.contains(bits));
    cluster_bits.map_or(V3_MIN_HEADER_BYTES, |bits| 1 << bits)
}

/// Parses a header from the first bytes of a file (at most its first cluster is looked at).
pub fn parse(bytes: &[u8]) -> Result<Qcow2Header, HeaderError> {
    let field = |offset: usize| {
        be_u32(bytes, offset).ok_or(HeaderError::Truncated {
            needed: offset + 4,
            available: bytes.len(),
        })
    };
    let field64 = |offset: usize| {
        be_u64(bytes, offset).ok_or(HeaderError::Truncated {
            needed: offset + 8,
            available: bytes.len(),
        })
    };
    if bytes.len() < 4 {
        return Err(HeaderError::Truncated {
            needed: 4,
            available: bytes.len(),
        });
    }
    if !has_qcow2_magic(bytes) {
        return Err(HeaderError::NoMagic);
    }
    let version = field(4)?;
    if !(2..=3).contains(&version) {
        return Err(HeaderError::Version(version));
    }
    let backing_offset = field64(8)?;
    let backing_size = field(16)?;
    let cluster_bits = field(20)?;
    if !CLUSTER_BITS.contains(&cluster_bits) {
        return Err(HeaderError::ClusterBits(cluster_bits));
    }
    let virtual_size = field64(24)?;
    let crypt_method = field(32)?;
    if crypt_method != 0 {
        return Err(HeaderError::Encrypted(crypt_method));
    }
    // Everything below lies in the first cluster, and only what was read can be looked at.
    let cluster_bytes = 1usize << cluster_bits;
    let header = &bytes[..bytes.len().min(cluster_bytes)];
    let header_length = if version == 2 {
        V2_HEADER_BYTES
    } else {
        let incompatible = field64(72)?;
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(HeaderError::Corrupt);
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(HeaderError::ExternalDataFile);
        }
        if incompatible & !INCOMPAT_KNOWN != 0 {
            return Err(HeaderError::UnknownFeatures(incompatible & !INCOMPAT_KNOWN));
        }
        let length = field(100)?;
        let usable = usize::try_from(length)
            .ok()
            .filter(|&l| l >= V3_MIN_HEADER_BYTES && l % 8 == 0 && l <= cluster_bytes);
        usable.ok_or(HeaderError::HeaderLength(length))?
    };
    let backing_format = backing_format_extension(header, header_length)?;
    let backing = if backing_offset == 0 {
        None
    } else {
        let bounds = HeaderError::BackingNameBounds {
            offset: backing_offset,
            size: backing_size,
        };
        if backing_size == 0 || backing_size > MAX_BACKING_NAME_BYTES {
            return Err(bounds);
        }
        let start = usize::try_from(backing_offset).map_err(|_| bounds.clone())?;
        let end = start
            .checked_add(backing_size as usize)
            .filter(|&end| end <= cluster_bytes)
            .ok_or(bounds)?;
        let name = header.get(start..end).ok_or(HeaderError::Truncated {
            needed: end,
            available: header.len(),
        })?;
        if name.contains(&0) {
            return Err(HeaderError::BackingNameNul);
        }
        Some(BackingRef {
            name: name.to_vec(),
            format: backing_format,
        })
    };
    Ok(Qcow2Header {
        version,
        cluster_bits,
        virtual_size,
        backing,
    })
}

/// Walks the header extensions from `start` to the end marker and returns the backing format
/// one, if present. Every extension must end inside `header` (the first cluster).
fn backing_format_extension(
    header: &[u8],
    start: usize,
) -> Result<Option<ImageFormat>, HeaderError> {
    let mut offset = start;
    let mut format = None;
    loop {
        let bounds = HeaderError::ExtensionBounds { offset };
        let (Some(kind), Some(length)) = (be_u32(header, offset), be_u32(header, offset + 4))
        else {
            return Err(bounds);
        };
        if kind == EXT_END {
            return Ok(format);
        }
        let data_start = offset + 8;
        let data_end = data_start
            .checked_add(length as usize)
            .filter(|&end| end <= header.len())
            .ok_or(bounds.clone())?;
        if kind == EXT_BACKING_FORMAT {
            let name = &header[data_start..data_end];
            format = Some(match name {
                b"raw" => ImageFormat::Raw,
                b"qcow2" => ImageFormat::Qcow2,
                other => {
                    let shown: Vec<u8> = other.iter().copied().take(32).collect();
                    return Err(HeaderError::BackingFormat(
                        String::from_utf8_lossy(&shown).into_owned(),
                    ));
                }
            });
        }
        // Data is padded to a multiple of 8 bytes.
        offset = data_end.checked_next_multiple_of(8).ok_or(bounds)?;
    }
}

fn be_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let raw = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_be_bytes(raw.try_into().ok()?))
}

fn be_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    let raw = bytes.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A version 3 header of `cluster_bits` with room for a backing name and extensions.
    fn v3_header(cluster_bits: u32) -> Vec<u8> {
        let mut bytes = vec![0u8; 1 << cluster_bits];
        bytes[..4].copy_from_slice(&QCOW2_MAGIC);
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        bytes[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
        bytes[96..100].copy_from_slice(&4u32.to_be_bytes());
        bytes[100..104].copy_from_slice(&112u32.to_be_bytes());
        bytes
    }

    fn with_backing(mut bytes: Vec<u8>, name: &[u8], offset: u64) -> Vec<u8> {
        bytes[8..16].copy_from_slice(&offset.to_be_bytes());
        bytes[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        let start = offset as usize;
        bytes[start..start + name.len()].copy_from_slice(name);
        bytes
    }

    fn with_extension(mut bytes: Vec<u8>, at: usize, kind: u32, data: &[u8]) -> Vec<u8> {
        bytes[at..at + 4].copy_from_slice(&kind.to_be_bytes());
        bytes[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        bytes[at + 8..at + 8 + data.len()].copy_from_slice(data);
        bytes
    }

    #[test]
    fn a_plain_header_has_no_backing() {
        let header = parse(&v3_header(16)).expect("valid");
        assert_eq!(header.version, 3);
        assert_eq!(header.virtual_size, 64 << 20);
        assert_eq!(header.backing, None);
    }

    #[test]
    fn backing_name_and_format_are_read() {
        let bytes = with_backing(v3_header(16), b"../base.img", 512);
        let bytes = with_extension(bytes, 112, EXT_BACKING_FORMAT, b"raw");
        let header = parse(&bytes).expect("valid");
        assert_eq!(
            header.backing,
            Some(BackingRef {
                name: b"../base.img".to_vec(),
                format: Some(ImageFormat::Raw)
            })
        );
    }

    #[test]
    fn hostile_headers_are_named_errors() {
        let base = v3_header(16);
        let mut version = base.clone();
        version[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(parse(&version), Err(HeaderError::Version(4)));
        let mut clusters = base.clone();
        clusters[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert_eq!(parse(&clusters), Err(HeaderError::ClusterBits(40)));
        // A name past the first cluster, one too long, one of zero length, one with a NUL.
        for (offset, size) in [(65530u64, 10u32), (512, 5000), (512, 0), (u64::MAX - 2, 8)] {
            let mut bytes = base.clone();
            bytes[8..16].copy_from_slice(&offset.to_be_bytes());
            bytes[16..20].copy_from_slice(&size.to_be_bytes());
            assert!(
                matches!(parse(&bytes), Err(HeaderError::BackingNameBounds { .. })),
                "{offset} {size}"
            );
        }
        let nul = with_backing(base.clone(), b"a\0b", 512);
        assert_eq!(parse(&nul), Err(HeaderError::BackingNameNul));
        // An extension whose length runs past the cluster.
        let mut long = base.clone();
        long[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        long[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse(&long),
            Err(HeaderError::ExtensionBounds { .. })
        ));
        let odd = with_extension(base.clone(), 112, EXT_BACKING_FORMAT, b"vmdk");
        assert_eq!(parse(&odd), Err(HeaderError::BackingFormat("vmdk".into())));
        let mut data_file = base.clone();
        data_file[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes());
        assert_eq!(parse(&data_file), Err(HeaderError::ExternalDataFile));
        let mut encrypted = base.clone();
        encrypted[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(parse(&encrypted), Err(HeaderError::Encrypted(2)));
        let mut header_length = base.clone();
        header_length[100..104].copy_from_slice(&(1u32 << 20).to_be_bytes());
        assert_eq!(
            parse(&header_length),
            Err(HeaderError::HeaderLength(1 << 20))
        );
        assert_eq!(
            parse(b"QFI"),
            Err(HeaderError::Truncated {
                needed: 4,
                available: 3
            })
        );
        assert_eq!(parse(&[0u8; 512]), Err(HeaderError::NoMagic));
    }

    #[test]
    fn extensions_without_an_end_marker_stop_at_the_cluster_end() {
        // Every extension is an unknown 0-byte one: the walk must end at the cluster's end.
        let mut bytes = v3_header(9);
        for at in (112..512).step_by(8) {
            bytes[at..at + 4].copy_from_slice(&0x1234u32.to_be_bytes());
        }
        assert!(matches!(
            parse(&bytes),
            Err(HeaderError::ExtensionBounds { offset: 512 })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                                       magic in any::<bool>(), version in 2u32..=3, bits in 9u32..=10) {
            if magic && bytes.len() >= 24 {
                bytes[..4].copy_from_slice(&QCOW2_MAGIC);
                bytes[4..8].copy_from_slice(&version.to_be_bytes());
                bytes[20..24].copy_from_slice(&bits.to_be_bytes());
            }
            if let Ok(Qcow2Header { backing: Some(backing), .. }) = parse(&bytes) {
                prop_assert!(!backing.name.is_empty() && !backing.name.contains(&0));
                prop_assert!(backing.name.len() <= MAX_BACKING_NAME_BYTES as usize);
            }
        }
    }
}
