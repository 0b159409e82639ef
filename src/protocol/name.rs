//! The VM name rule, shared by the control protocol and the D-Bus daemon.
//!
//! A VM name is 1 to [`MAX_VM_NAME_LEN`] characters from `[A-Za-z0-9._-]` and does not start
//! with `.`, `-` or `_`. That keeps names safe as file names, unit-name fragments and D-Bus object
//! path components (after escaping), and rules out `.`, `..` and option-like names such as `-f`.

use thiserror::Error;

/// The longest VM name allowed, in characters (all allowed characters are ASCII, so also bytes).
pub const MAX_VM_NAME_LEN: usize = 64;

/// Why a string is not a valid VM name. Each message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("VM name is empty; it must be 1 to 64 characters from [A-Za-z0-9._-]")]
    Empty,
    /// The name has more than [`MAX_VM_NAME_LEN`] characters.
    #[error("VM name is {len} characters long; at most 64 are allowed")]
    TooLong {
        /// The length of the rejected name, in characters.
        len: usize,
    },
    /// The name contains a character outside `[A-Za-z0-9._-]`.
    #[error(
        "VM name {name:?} contains {ch:?} at position {position}; only ASCII letters, digits, '.', '_' and '-' are allowed"
    )]
    InvalidChar {
        /// The rejected name.
        name: String,
        /// The first offending character.
        ch: char,
        /// Its position, counted in characters from 0.
        position: usize,
    },
    /// The name starts with `.`, `-` or `_`.
    #[error("VM name {name:?} starts with {ch:?}; it must start with an ASCII letter or digit")]
    BadFirstChar {
        /// The rejected name.
        name: String,
        /// Its first character.
        ch: char,
    },
}

/// Checks `name` against the VM name rule (see the [module documentation](self)).
///
/// The checks run in this order, and the first failure is returned: empty, too long, a character
/// outside the allowed set, a bad first character.
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
    match name.chars().next() {
        Some(ch @ ('.' | '-' | '_')) => Err(NameError::BadFirstChar {
            name: name.to_owned(),
            ch,
        }),
        _ => Ok(()),
    }
}

fn is_name_char(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in [
            "a",
            "Z",
            "0",
            "web-1",
            "db_2.prod",
            "a.",
            "9-_.",
            &"x".repeat(64),
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
    fn rejects_bad_first_character() {
        for name in [".", "..", ".hidden", "-f", "_x"] {
            let ch = name.chars().next().unwrap();
            assert_eq!(
                validate_vm_name(name),
                Err(NameError::BadFirstChar {
                    name: name.to_owned(),
                    ch
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
    }
}
