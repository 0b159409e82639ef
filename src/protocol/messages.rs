//! The messages of the control protocol and the validation of a VM's configuration.
//!
//! # JSON shape
//!
//! Enums are externally tagged with `snake_case` variant names: a variant without fields is a
//! bare string, a variant with fields is an object with exactly one key, the variant name, whose
//! value holds the fields. Unknown fields are rejected everywhere.
//!
//! ```json
//! {"start":{"config":{"name":"web","vcpus":2,"memory_bytes":536870912,"cmdline":"console=ttyS0"}}}
//! "pause"
//! "resume"
//! {"shutdown":{"deadline_ms":5000}}
//!
//! "created"
//! {"failed":{"reason":"cannot open /dev/kvm: Permission denied"}}
//! {"state":{"state":"running"}}
//! {"state":{"state":"paused"}}
//! "guest_power_off"
//! "guest_reboot"
//! {"error":{"reason":"vCPU 0 exited: internal error"}}
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::name::{NameError, validate_vm_name};

/// The most vCPUs a VM may have: their APIC IDs 0 to 253 stay clear of 255, the xAPIC broadcast ID.
pub const MAX_VCPUS: u32 = 254;
/// Guest memory comes in multiples of this many bytes (2 MiB, one huge page).
pub const MEMORY_ALIGN_BYTES: u64 = 2 << 20;
/// The least guest memory allowed (16 MiB).
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// The most guest memory allowed (1 TiB).
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// The longest kernel command line allowed, in bytes, not counting the NUL that the VMM appends
/// (Linux's x86 `COMMAND_LINE_SIZE` is 2048 including it).
pub const MAX_CMDLINE_BYTES: usize = 2047;

/// What the helper needs to build a VM besides its fds (kernel, initrd, console arrive as fds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The VM's name; see [`validate_vm_name`].
    pub name: String,
    /// The number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: u32,
    /// Guest memory in bytes: a multiple of [`MEMORY_ALIGN_BYTES`] from [`MIN_MEMORY_BYTES`] to
    /// [`MAX_MEMORY_BYTES`].
    pub memory_bytes: u64,
    /// The kernel command line: at most [`MAX_CMDLINE_BYTES`] bytes, no NUL.
    pub cmdline: String,
}

/// Why a [`VmConfig`] is invalid. Each message names the field and says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// The name breaks the VM name rule.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `vcpus` is 0 or above [`MAX_VCPUS`].
    #[error("vcpus is {vcpus}; it must be between 1 and {MAX_VCPUS}")]
    Vcpus {
        /// The rejected value.
        vcpus: u32,
    },
    /// `memory_bytes` is below [`MIN_MEMORY_BYTES`] or above [`MAX_MEMORY_BYTES`].
    #[error(
        "memory_bytes is {memory_bytes}; it must be between 16 MiB ({MIN_MEMORY_BYTES}) and 1 TiB ({MAX_MEMORY_BYTES})"
    )]
    MemoryOutOfRange {
        /// The rejected value.
        memory_bytes: u64,
    },
    /// `memory_bytes` is not a multiple of [`MEMORY_ALIGN_BYTES`].
    #[error(
        "memory_bytes is {memory_bytes}; it must be a multiple of 2 MiB ({MEMORY_ALIGN_BYTES})"
    )]
    MemoryNotAligned {
        /// The rejected value.
        memory_bytes: u64,
    },
    /// `cmdline` is longer than [`MAX_CMDLINE_BYTES`].
    #[error("cmdline is {len} bytes long; at most {MAX_CMDLINE_BYTES} are allowed")]
    CmdlineTooLong {
        /// The length of the rejected command line, in bytes.
        len: usize,
    },
    /// `cmdline` contains a NUL byte.
    #[error("cmdline contains a NUL byte at byte offset {offset}; NUL is not allowed")]
    CmdlineNul {
        /// The byte offset of the first NUL.
        offset: usize,
    },
}

impl VmConfig {
    /// Checks every field against its limit; returns the first failure, checking fields in the
    /// order name, vcpus, memory_bytes, cmdline.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_vm_name(&self.name)?;
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus { vcpus: self.vcpus });
        }
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&self.memory_bytes) {
            return Err(ConfigError::MemoryOutOfRange {
                memory_bytes: self.memory_bytes,
            });
        }
        if !self.memory_bytes.is_multiple_of(MEMORY_ALIGN_BYTES) {
            return Err(ConfigError::MemoryNotAligned {
                memory_bytes: self.memory_bytes,
            });
        }
        if self.cmdline.len() > MAX_CMDLINE_BYTES {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
            });
        }
        if let Some(offset) = self.cmdline.bytes().position(|b| b == 0) {
            return Err(ConfigError::CmdlineNul { offset });
        }
        Ok(())
    }
}

/// A request from the launcher to the helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Build the VM from `config` and the fds passed alongside, then run it.
    Start {
        /// The VM's configuration.
        config: VmConfig,
    },
    /// Stop running the vCPUs.
    Pause,
    /// Run the vCPUs again after [`Request::Pause`].
    Resume,
    /// Ask the guest to power off, and stop the VM when `deadline_ms` milliseconds have passed.
    Shutdown {
        /// How long the guest gets to power off, in milliseconds.
        deadline_ms: u64,
    },
    /// Report the current [`Event::State`] (a daemon that re-adopts a running helper asks).
    Query,
}

/// Whether the VM's vCPUs are running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are stopped.
    Paused,
}

/// An event from the helper to the launcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The VM was built; it runs next.
    Created,
    /// The VM could not be built; the helper exits.
    Failed {
        /// What went wrong, for people.
        reason: String,
    },
    /// The VM's run state changed.
    State {
        /// The new run state.
        state: RunState,
    },
    /// The guest powered off.
    GuestPowerOff,
    /// The guest asked to reboot.
    GuestReboot,
    /// The running VM hit an error it cannot go on from.
    Error {
        /// What went wrong, for people.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig {
            name: "web".into(),
            vcpus: 2,
            memory_bytes: 512 << 20,
            cmdline: "console=ttyS0".into(),
        }
    }

    #[test]
    fn accepts_limits() {
        for (vcpus, memory_bytes, cmdline) in [
            (1, MIN_MEMORY_BYTES, String::new()),
            (MAX_VCPUS, MAX_MEMORY_BYTES, "x".repeat(MAX_CMDLINE_BYTES)),
        ] {
            let config = VmConfig {
                vcpus,
                memory_bytes,
                cmdline,
                ..base()
            };
            assert_eq!(config.validate(), Ok(()));
        }
    }

    #[test]
    fn rejects_bad_name() {
        let config = VmConfig {
            name: "-x".into(),
            ..base()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Name(NameError::MisplacedHyphen { .. }))
        ));
    }

    #[test]
    fn rejects_bad_vcpus() {
        for vcpus in [0, MAX_VCPUS + 1, u32::MAX] {
            let config = VmConfig { vcpus, ..base() };
            assert_eq!(config.validate(), Err(ConfigError::Vcpus { vcpus }));
        }
    }

    #[test]
    fn rejects_bad_memory() {
        for memory_bytes in [
            0,
            MIN_MEMORY_BYTES - MEMORY_ALIGN_BYTES,
            MAX_MEMORY_BYTES + MEMORY_ALIGN_BYTES,
            u64::MAX,
        ] {
            let config = VmConfig {
                memory_bytes,
                ..base()
            };
            assert_eq!(
                config.validate(),
                Err(ConfigError::MemoryOutOfRange { memory_bytes })
            );
        }
        for memory_bytes in [MIN_MEMORY_BYTES + 1, (64 << 20) + 4096] {
            let config = VmConfig {
                memory_bytes,
                ..base()
            };
            assert_eq!(
                config.validate(),
                Err(ConfigError::MemoryNotAligned { memory_bytes })
            );
        }
    }

    #[test]
    fn rejects_bad_cmdline() {
        let config = VmConfig {
            cmdline: "x".repeat(MAX_CMDLINE_BYTES + 1),
            ..base()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::CmdlineTooLong { len: 2048 })
        );
        // The limit is in bytes, not characters.
        let config = VmConfig {
            cmdline: "é".repeat(1024),
            ..base()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::CmdlineTooLong { len: 2048 })
        );
        let config = VmConfig {
            cmdline: "quiet\0init=/bin/sh".into(),
            ..base()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::CmdlineNul { offset: 5 })
        );
    }

    #[test]
    fn error_messages_name_value_and_limit() {
        let err = VmConfig { vcpus: 0, ..base() }.validate().unwrap_err();
        assert_eq!(err.to_string(), "vcpus is 0; it must be between 1 and 254");
        let err = VmConfig {
            memory_bytes: 1,
            ..base()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "memory_bytes is 1; it must be between 16 MiB (16777216) and 1 TiB (1099511627776)"
        );
        let err = VmConfig {
            name: String::new(),
            ..base()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().starts_with("VM name is empty"), "{err}");
    }

    #[test]
    fn json_shape() {
        let start = Request::Start { config: base() };
        assert_eq!(
            serde_json::to_string(&start).unwrap(),
            r#"{"start":{"config":{"name":"web","vcpus":2,"memory_bytes":536870912,"cmdline":"console=ttyS0"}}}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Pause).unwrap(),
            r#""pause""#
        );
        assert_eq!(
            serde_json::to_string(&Request::Resume).unwrap(),
            r#""resume""#
        );
        assert_eq!(
            serde_json::to_string(&Request::Shutdown { deadline_ms: 5000 }).unwrap(),
            r#"{"shutdown":{"deadline_ms":5000}}"#
        );
        assert_eq!(
            serde_json::to_string(&Event::Created).unwrap(),
            r#""created""#
        );
        assert_eq!(
            serde_json::to_string(&Event::Failed {
                reason: "no".into()
            })
            .unwrap(),
            r#"{"failed":{"reason":"no"}}"#
        );
        assert_eq!(
            serde_json::to_string(&Event::State {
                state: RunState::Paused
            })
            .unwrap(),
            r#"{"state":{"state":"paused"}}"#
        );
        assert_eq!(
            serde_json::to_string(&Event::GuestPowerOff).unwrap(),
            r#""guest_power_off""#
        );
        assert_eq!(
            serde_json::to_string(&Event::GuestReboot).unwrap(),
            r#""guest_reboot""#
        );
        assert_eq!(
            serde_json::to_string(&Event::Error { reason: "x".into() }).unwrap(),
            r#"{"error":{"reason":"x"}}"#
        );
    }
}
