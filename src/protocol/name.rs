//! The VM name rule, shared by the control protocol and the D-Bus daemon.
//!
//! A VM name is what systemd-machined accepts as a machine name (systemd's `hostname_is_valid()`,
//! as in systemd 252): 1 to [`MAX_VM_NAME_LEN`] characters from `[A-Za-z0-9.-]`, made of
//! non-empty labels separated by single dots (so no leading or trailing `.` and no `..`), and no
//! label starts or ends with `-`. A name machined refused would make RegisterMachine fail for a
//! VM that vmd had accepted. The rule also keeps names safe as file names, unit-name fragments
//! and D-Bus object path components (after escaping), and rules out `.`, `..` and option-like
//! names such as `-f`.

use thiserror::Error;

/// The longest VM name allowed, in characters (all allowed characters are ASCII, so also bytes;
/// Linux's HOST_NAME_MAX, which machined applies).
pub const MAX_VM_NAME_LEN: usize = 64;

/// Why a string is not a valid VM name. Each message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("VM name is empty; it must be 1 to 64 characters from [A-Za-z0-9.-]")]
    Empty,
    /// The name has more than [`MAX_VM_NAME_LEN`] characters.
    #[error("VM name is {len} characters long; at most 64 are allowed")]
    TooLong {
        /// The length of the rejected name, in characters.
        len: usize,
    },
    /// The name contains a character outside `[A-Za-z0-9.-]`.
    #[error(
        "VM name {name:?} contains {ch:?} at position {position}; only ASCII letters, digits, '.' and '-' are allowed"
    )]
    InvalidChar {
        /// The rejected name.
        name: String,
        /// The first offending character.
        ch: char,
        /// Its position, counted in characters from 0.
        position: usize,
    },
    /// A `.` at the start or the end, or two in a row.
    #[error(
        "VM name {name:?} has a '.' at position {position} that does not stand between letters, digits or '-' (no '.' at the start or end, none twice in a row)"
    )]
    MisplacedDot {
        /// The rejected name.
        name: String,
        /// The position of the offending dot, in characters from 0.
        position: usize,
    },
    /// A `-` at the start or end of the name or of a dot-separated part of it.
    #[error(
        "VM name {name:?} has a '-' at position {position} at the start or end of the name or of a '.'-separated part; it must start and end with a letter or digit"
    )]
    MisplacedHyphen {
        /// The rejected name.
        name: String,
        /// The position of the offending hyphen, in characters from 0.
        position: usize,
    },
}

/// Checks `name` against the VM name rule (see the [module documentation](self)).
///
/// The checks run in this order, and the first failure is returned: empty, too long, a character
/// outside the allowed set, then a misplaced `.` or `-`, from left to right.
pub fn validate_vm_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    // Count at most one character past the limit: the name may be arbitrarily long.
    let len = name.chars().take(MAX_VM_NAME_LEN + 1).count();
    if len > MAX_VM_NAME_LEN {
        return Err(NameError::TooLong {
            len: name.chars().count(),
        });
    }
    if let Some((position, ch)) = name.chars().enumerate().find(|&(_, ch)| !is_name_char(ch)) {
        return Err(NameError::InvalidChar {
            name: name.to_owned(),
            ch,
            position,
        });
    }
    // All ASCII from here on: byte positions are character positions.
    let bytes = name.as_bytes();
    let last = bytes.len() - 1;
    for (position, &byte) in bytes.iter().enumerate() {
        let before = position.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(position + 1).copied();
        match byte {
            b'.' if position == 0 || position == last || after == Some(b'.') => {
                // For "a..b", name the second dot: the first one ended a label correctly.
                let position = if position > 0 && after == Some(b'.') {
                    position + 1
                } else {
                    position
                };
                return Err(NameError::MisplacedDot {
                    name: name.to_owned(),
                    position,
                });
            }
            b'-' if before.is_none_or(|b| b == b'.') || after.is_none_or(|b| b == b'.') => {
                return Err(NameError::MisplacedHyphen {
                    name: name.to_owned(),
                    position,
                });
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_name_char(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_valid_names() {
        for name in [
            "a",
            "Z",
            "0",
            "9a",
            "web-1",
            "db-2.prod",
            "a.b.c",
            "a--b",
            "x-y.0-9",
            &"x".repeat(64),
            &format!("{}.b", "a".repeat(62)),
        ] {
            assert_eq!(validate_vm_name(name), Ok(()), "{name:?}");
        }
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(validate_vm_name(""), Err(NameError::Empty));
    }

    #[test]
    fn rejects_too_long() {
        assert_eq!(
            validate_vm_name(&"x".repeat(65)),
            Err(NameError::TooLong { len: 65 })
        );
        // Length is in characters, checked before the character set.
        assert_eq!(
            validate_vm_name(&"é".repeat(65)),
            Err(NameError::TooLong { len: 65 })
        );
    }

    #[test]
    fn rejects_bad_characters() {
        for (name, ch, position) in [
            ("a/b", '/', 1),
            ("a b", ' ', 1),
            ("café", 'é', 3),
            ("x\0", '\0', 1),
            ("/x", '/', 0),
            ("..\n", '\n', 2),
            // machined refuses underscores (systemd's hostname_is_valid).
            ("db_2", '_', 2),
            ("_x", '_', 0),
        ] {
            assert_eq!(
                validate_vm_name(name),
                Err(NameError::InvalidChar {
                    name: name.to_owned(),
                    ch,
                    position
                }),
                "{name:?}"
            );
        }
    }

    #[test]
    fn rejects_misplaced_dots() {
        for (name, position) in [
            (".", 0),
            ("..", 0),
            (".hidden", 0),
            ("a.", 1),
            ("a.b.", 3),
            ("a..b", 2),
            ("a...b", 2),
        ] {
            assert_eq!(
                validate_vm_name(name),
                Err(NameError::MisplacedDot {
                    name: name.to_owned(),
                    position
                }),
                "{name:?}"
            );
        }
    }

    #[test]
    fn rejects_misplaced_hyphens() {
        for (name, position) in [("-f", 0), ("a-", 1), ("a-.b", 1), ("a.-b", 2), ("-", 0)] {
            assert_eq!(
                validate_vm_name(name),
                Err(NameError::MisplacedHyphen {
                    name: name.to_owned(),
                    position
                }),
                "{name:?}"
            );
        }
    }

    #[test]
    fn messages_say_what_is_allowed() {
        let err = validate_vm_name("a/b").unwrap_err().to_string();
        assert!(err.contains("\"a/b\"") && err.contains("'/'"), "{err}");
        assert!(err.contains("letters, digits"), "{err}");
        let err = validate_vm_name(&"x".repeat(70)).unwrap_err().to_string();
        assert!(err.contains("70") && err.contains("64"), "{err}");
        let err = validate_vm_name("a..b").unwrap_err().to_string();
        assert!(err.contains("twice in a row"), "{err}");
    }

    /// A label of machined's grammar: letters and digits at both ends, '-' only inside.
    fn label() -> impl Strategy<Value = String> {
        "[A-Za-z0-9]([A-Za-z0-9-]{0,6}[A-Za-z0-9])?"
    }

    proptest! {
        #[test]
        fn dot_separated_labels_are_valid(labels in proptest::collection::vec(label(), 1..6)) {
            let name = labels.join(".");
            prop_assume!(name.len() <= MAX_VM_NAME_LEN);
            prop_assert_eq!(validate_vm_name(&name), Ok(()));
        }

        /// Whatever is accepted has machined's shape (hostname_is_valid without flags).
        #[test]
        fn accepted_names_have_machineds_shape(name in "[A-Za-z0-9._-]{0,70}") {
            if validate_vm_name(&name).is_ok() {
                prop_assert!((1..=MAX_VM_NAME_LEN).contains(&name.len()));
                prop_assert!(!name.contains('_'));
                for label in name.split('.') {
                    prop_assert!(!label.is_empty(), "{name:?}");
                    prop_assert!(!label.starts_with('-') && !label.ends_with('-'), "{name:?}");
                }
            }
        }
    }
}
