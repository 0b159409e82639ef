//! Sizes as vmctl(8) reads them (its `parse_size`, over scan_scaled(3)): a number, maybe with a
//! fraction, and maybe a unit B, K, M, G, T, P or E (powers of 1024, either case); a bare number
//! is bytes. At least one megabyte; rounded down to whole megabytes, with a warning when that
//! changed the value.

use crate::table::format_size;

const MIB: u64 = 1 << 20;

/// A size in bytes, whole megabytes, and what the user typed if it was rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// The size, a multiple of one megabyte.
    pub bytes: u64,
    /// The size asked for, when rounding changed it.
    pub asked: Option<u64>,
    /// What the size is of ("memory", "disk"), for the warning.
    pub what: &'static str,
}

impl Size {
    /// Parses `text` as the size of `what`.
    pub fn parse(text: &str, what: &'static str) -> Result<Self, String> {
        let asked = scan_scaled(text).ok_or_else(|| {
            format!("invalid {what} size {text:?} (e.g. 512M, 1.5G, 10G; a bare number is bytes)")
        })?;
        if asked < MIB {
            let hint = if text.bytes().all(|b| b.is_ascii_digit()) {
                format!(" (a bare number is bytes: did you mean {text}M?)")
            } else {
                String::new()
            };
            return Err(format!("{what} size must be at least 1M{hint}"));
        }
        let bytes = asked / MIB * MIB;
        Ok(Self {
            bytes,
            asked: (bytes != asked).then_some(asked),
            what,
        })
    }

    /// vmctl(8)'s warning when the size was rounded: "memory size rounded to 1.5G".
    pub fn warning(&self) -> Option<String> {
        self.asked
            .map(|_| format!("{} size rounded to {}", self.what, format_size(self.bytes)))
    }
}

/// scan_scaled(3): `None` if `text` is not a size or does not fit in 64 bits.
fn scan_scaled(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, shift) = match text.char_indices().last()? {
        (i, unit) if unit.is_ascii_alphabetic() => {
            let shift = match unit.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                'E' => 60,
                _ => return None,
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 18 {
        return None;
    }
    let unit = 1u128 << shift;
    let whole: u128 = whole.parse().ok()?;
    let fraction_value: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    let scale = 10u128.pow(u32::try_from(fraction.len()).ok()?);
    let bytes = whole
        .checked_mul(unit)?
        .checked_add(fraction_value.checked_mul(unit)? / scale)?;
    u64::try_from(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(text: &str) -> Result<Size, String> {
        Size::parse(text, "memory")
    }

    #[test]
    fn units_and_fractions_as_scan_scaled() {
        for (text, bytes) in [
            ("1M", MIB),
            ("512m", 512 * MIB),
            ("1.5G", 1536 * MIB),
            ("2g", 2048 * MIB),
            ("1T", 1 << 40),
            ("1048576", MIB),
            ("1048576B", MIB),
            ("0.5G", 512 * MIB),
        ] {
            let size = memory(text).expect(text);
            assert_eq!((size.bytes, size.asked), (bytes, None), "{text}");
            assert_eq!(size.warning(), None, "{text}");
        }
    }

    #[test]
    fn rounded_down_to_megabytes_with_a_warning() {
        let size = memory("1.3M").expect("size");
        assert_eq!(size.bytes, MIB);
        assert_eq!(
            size.warning().as_deref(),
            Some("memory size rounded to 1.0M")
        );
        let size = Size::parse("1500000", "disk").expect("size");
        assert_eq!(size.bytes, MIB);
        assert_eq!(size.warning().as_deref(), Some("disk size rounded to 1.0M"));
    }

    #[test]
    fn too_small_bad_and_huge_sizes_are_refused() {
        assert_eq!(
            memory("512").expect_err("bytes"),
            "memory size must be at least 1M (a bare number is bytes: did you mean 512M?)"
        );
        assert_eq!(
            memory("100K").expect_err("small"),
            "memory size must be at least 1M"
        );
        for bad in [
            "",
            "M",
            "lots",
            "1.2.3G",
            "-1G",
            "1Q",
            "16E",
            "99999999999999999999",
        ] {
            let error = memory(bad).expect_err(bad);
            assert!(error.starts_with("invalid memory size"), "{bad}: {error}");
        }
    }
}
