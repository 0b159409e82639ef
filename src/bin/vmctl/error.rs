//! vmctl's errors, and how a D-Bus error becomes one sentence for people.
//!
//! vmd answers with named errors (`org.vmd.vmd1.Error.NoSuchVM`, ...) that carry a sentence;
//! vmctl prints that sentence, never the error name or a debug dump. Errors of the bus itself
//! (no such service, access denied) and of the connection get a sentence here.

use std::io;

use thiserror::Error;
use zbus::{DBusError, fdo};

/// The error name vmd answers with when no VM has the given name.
pub const NO_SUCH_VM: &str = "org.vmd.vmd1.Error.NoSuchVM";

/// Why a vmctl command failed; the message is printed after `vmctl: `.
#[derive(Debug, Error)]
pub enum VmctlError {
    /// A call to the daemon failed.
    #[error("{}", describe(.0))]
    Bus(#[from] zbus::Error),
    /// The daemon's socket (`--socket`) could not be connected to.
    #[error("cannot connect to {}: {}", .path.display(), io_reason(.source))]
    Socket {
        /// The socket path.
        path: std::path::PathBuf,
        /// What connect(2) said.
        source: io::Error,
    },
    /// A local operation (terminal, console relay, file) failed.
    #[error("{what}: {}", io_reason(.source))]
    Io {
        /// What vmctl was doing.
        what: String,
        /// The cause.
        source: io::Error,
    },
    /// Anything else, already phrased for people.
    #[error("{0}")]
    Message(String),
}

impl VmctlError {
    /// An [`VmctlError::Io`] error while doing `what`.
    pub fn io(what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Self::Io {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// The D-Bus error name of a failed call, if the daemon or the bus answered with one.
pub fn error_name(error: &zbus::Error) -> Option<String> {
    match error {
        zbus::Error::MethodError(name, _, _) => Some(name.to_string()),
        zbus::Error::FDO(fdo) => match fdo.as_ref() {
            fdo::Error::ZBus(inner) => error_name(inner),
            other => Some(other.name().to_string()),
        },
        _ => None,
    }
}

/// Whether the daemon said that no VM has the name asked for.
pub fn is_no_such_vm(error: &zbus::Error) -> bool {
    error_name(error).as_deref() == Some(NO_SUCH_VM)
}

/// Whether the daemon does not know the method (an older vmd).
pub fn is_unknown_method(error: &zbus::Error) -> bool {
    matches!(
        error_name(error).as_deref(),
        Some(
            "org.freedesktop.DBus.Error.UnknownMethod"
                | "org.freedesktop.DBus.Error.UnknownInterface"
                | "org.freedesktop.DBus.Error.UnknownObject"
        )
    )
}

/// Whether the daemon refused because the VM is not in a state for it.
pub fn is_invalid_state(error: &zbus::Error) -> bool {
    error_name(error).as_deref() == Some("org.vmd.vmd1.Error.InvalidState")
}

/// Whether another client has the console.
pub fn is_console_busy(error: &zbus::Error) -> bool {
    error_name(error).as_deref() == Some("org.vmd.vmd1.Error.ConsoleBusy")
}

/// Whether a call failed because the VM object is gone (removed meanwhile).
pub fn is_gone(error: &zbus::Error) -> bool {
    matches!(
        error_name(error).as_deref(),
        Some(
            NO_SUCH_VM
                | "org.freedesktop.DBus.Error.UnknownObject"
                | "org.freedesktop.DBus.Error.UnknownInterface"
        )
    )
}

/// One sentence for a failed D-Bus call or connection.
pub fn describe(error: &zbus::Error) -> String {
    match error {
        zbus::Error::MethodError(name, detail, _) => match detail.as_deref() {
            Some(sentence) if !sentence.trim().is_empty() => sentence.trim().to_owned(),
            _ => format!("the call failed with {name}"),
        },
        zbus::Error::FDO(fdo) => describe_fdo(fdo),
        zbus::Error::Connection(source, address) => {
            format!(
                "cannot connect to the D-Bus bus at {address}: {}",
                io_reason(source)
            )
        }
        zbus::Error::InputOutput(source) => {
            format!("lost the connection to vmd: {}", io_reason(source))
        }
        zbus::Error::Handshake(reason) => format!("D-Bus authentication failed: {reason}"),
        zbus::Error::Address(reason) => format!("bad D-Bus address: {reason}"),
        other => other.to_string(),
    }
}

fn describe_fdo(error: &fdo::Error) -> String {
    match error {
        fdo::Error::ZBus(inner) => describe(inner),
        fdo::Error::ServiceUnknown(detail) | fdo::Error::NameHasNoOwner(detail) => {
            format!("vmd is not running ({})", detail.trim())
        }
        other => match other.description() {
            Some(sentence) if !sentence.trim().is_empty() => sentence.trim().to_owned(),
            _ => format!("the call failed with {}", other.name()),
        },
    }
}

/// An I/O error's reason without Rust's "(os error N)" suffix.
pub fn io_reason(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a caller sees when the daemon answers with `name` and `sentence`.
    fn reply(name: &str, sentence: &str) -> zbus::Error {
        let call = zbus::Message::method_call("/org/vmd/vmd1", "GetVM")
            .serial(1.try_into().expect("non-zero"))
            .build(&("web",))
            .expect("call");
        zbus::Message::error(&call.header(), name)
            .build(&(sentence,))
            .expect("error reply")
            .into()
    }

    #[test]
    fn vmd_errors_give_their_sentence_and_name() {
        let error = reply(NO_SUCH_VM, "No VM named 'web'.");
        assert_eq!(describe(&error), "No VM named 'web'.");
        assert!(is_no_such_vm(&error));
        assert!(is_gone(&error));
        let error = reply(
            "org.vmd.vmd1.Error.InvalidState",
            "VM 'web' is not running.",
        );
        assert_eq!(
            VmctlError::from(error).to_string(),
            "VM 'web' is not running."
        );
    }

    #[test]
    fn errors_without_a_sentence_give_their_name() {
        let error = reply("org.vmd.vmd1.Error.Failed", "  ");
        assert_eq!(
            describe(&error),
            "the call failed with org.vmd.vmd1.Error.Failed"
        );
        assert!(!is_no_such_vm(&error));
        let error = reply("org.freedesktop.DBus.Error.UnknownObject", "");
        assert!(is_gone(&error));
    }

    #[test]
    fn fdo_errors_give_their_sentence() {
        let error = zbus::Error::from(fdo::Error::AccessDenied("Not allowed.".into()));
        assert_eq!(describe(&error), "Not allowed.");
        assert_eq!(
            error_name(&error).as_deref(),
            Some("org.freedesktop.DBus.Error.AccessDenied")
        );
        assert!(!is_no_such_vm(&error));
    }

    #[test]
    fn missing_service_says_vmd_is_not_running() {
        let error = zbus::Error::from(fdo::Error::ServiceUnknown(
            "The name org.vmd.vmd1 was not provided by any .service files".into(),
        ));
        assert!(describe(&error).starts_with("vmd is not running ("));
    }

    #[test]
    fn io_reasons_drop_the_os_error_suffix() {
        let error = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(io_reason(&error), "No such file or directory");
        let error = VmctlError::Socket {
            path: "/run/vmd/vmd.sock".into(),
            source: io::Error::from_raw_os_error(libc::ECONNREFUSED),
        };
        assert_eq!(
            error.to_string(),
            "cannot connect to /run/vmd/vmd.sock: Connection refused"
        );
    }
}
