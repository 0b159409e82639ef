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

use super::fds::{MAX_BACKING_DEPTH, MAX_DISKS, MAX_NETS};
use super::name::{NameError, validate_vm_name};

/// The most vCPUs a VM may have: their APIC IDs 0 to 253 stay clear of 255, the xAPIC broadcast ID.
pub const MAX_VCPUS: u32 = 254;
/// Guest memory comes in multiples of this many bytes (2 MiB, one huge page).
pub const MEMORY_ALIGN_BYTES: u64 = 2 << 20;
/// The least guest memory allowed (16 MiB).
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// The most guest memory allowed (1 TiB).
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// The longest kernel command line a user may give, in bytes. Linux's x86 `COMMAND_LINE_SIZE`
/// is 2048 including the NUL; the rest is kept for the `virtio_mmio.device=` entries the VMM
/// appends for its devices (at most [`MAX_DEVICE_CMDLINE_BYTES`]).
pub const MAX_CMDLINE_BYTES: usize = 1536;
/// Room for the devices' command-line entries: up to 13 devices (8 disks, 4 interfaces, an
/// entropy source) of at most 36 bytes each (" virtio_mmio.device=4K@0xd000c000:17").
pub const MAX_DEVICE_CMDLINE_BYTES: usize = 2047 - MAX_CMDLINE_BYTES;
/// The longest disk serial (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_DISK_SERIAL_BYTES: usize = 20;

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
    /// The disks, in guest order; disk `i`'s files arrive as the fds `disk<i>` and
    /// `disk<i>.base<j>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// Whether the guest gets a virtio-rng entropy source.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub entropy: bool,
    /// The network interfaces, in guest order; interface `i`'s tap arrives as the fd `net<i>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceConfig>,
}

/// One network interface as the helper sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// The guest's MAC address: unicast.
    pub mac: MacAddress,
    /// Drop frames from the guest whose source MAC is not `mac` (vm.conf's `locked lladdr`).
    #[serde(default = "default_true")]
    pub locked_lladdr: bool,
}

fn default_true() -> bool {
    true
}

/// An Ethernet address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// A locally administered unicast address derived from `seed` (a VM's UUID and the
    /// interface's index), so a VM keeps its address, and its DHCP lease, across restarts.
    pub fn derived(seed: &[u8]) -> MacAddress {
        // FNV-1a: stable across releases and platforms, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &byte in seed {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        let bytes = hash.to_le_bytes();
        // Locally administered (bit 1), unicast (bit 0 clear).
        MacAddress([
            (bytes[0] & 0xfc) | 0x02,
            bytes[1],
            bytes[2],
            bytes[3],
            bytes[4],
            bytes[5],
        ])
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{text:?} is not a MAC address like 52:54:00:12:34:56");
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddress(bytes))
    }
}

impl Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The format of a disk image (or of one layer of its backing chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    /// The guest's bytes as they are.
    Raw,
    /// QEMU's copy-on-write format, possibly over a backing chain.
    Qcow2,
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// One disk as the helper sees it (the daemon has resolved paths and `auto` formats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The format of the image (`disk<i>`).
    pub format: ImageFormat,
    /// The guest may not write: the device offers `VIRTIO_BLK_F_RO`.
    #[serde(default)]
    pub read_only: bool,
    /// What `VIRTIO_BLK_T_GET_ID` answers: printable ASCII, at most [`MAX_DISK_SERIAL_BYTES`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub serial: String,
    /// The formats of the backing chain, nearest first: layer `j` arrives as `disk<i>.base<j>`.
    /// Only a qcow2 image has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing: Vec<ImageFormat>,
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
    /// More interfaces than [`MAX_NETS`].
    #[error("{count} network interfaces given; at most {MAX_NETS} are allowed")]
    TooManyInterfaces {
        /// The number of interfaces given.
        count: usize,
    },
    /// An interface's MAC address is multicast or all zero.
    #[error("interface {index}'s MAC address {mac} is not a unicast address")]
    InterfaceMac {
        /// The interface's index.
        index: usize,
        /// The rejected address.
        mac: MacAddress,
    },
    /// More disks than [`MAX_DISKS`].
    #[error("{count} disks given; at most {MAX_DISKS} are allowed")]
    TooManyDisks {
        /// The number of disks given.
        count: usize,
    },
    /// A disk's serial is too long or not printable ASCII.
    #[error(
        "disk {disk}'s serial {serial:?} is not at most {MAX_DISK_SERIAL_BYTES} printable ASCII characters"
    )]
    DiskSerial {
        /// The disk's index.
        disk: usize,
        /// The rejected serial.
        serial: String,
    },
    /// A disk's backing chain is too deep, or a raw image claims one.
    #[error(
        "disk {disk} has a backing chain of {depth} images; only a qcow2 image has one, at most {MAX_BACKING_DEPTH} deep"
    )]
    DiskBacking {
        /// The disk's index.
        disk: usize,
        /// The length of the rejected chain.
        depth: usize,
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
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks {
                count: self.disks.len(),
            });
        }
        for (index, disk) in self.disks.iter().enumerate() {
            disk.validate(index)?;
        }
        if self.interfaces.len() > MAX_NETS {
            return Err(ConfigError::TooManyInterfaces {
                count: self.interfaces.len(),
            });
        }
        for (index, interface) in self.interfaces.iter().enumerate() {
            if !interface.mac.is_unicast() {
                return Err(ConfigError::InterfaceMac {
                    index,
                    mac: interface.mac,
                });
            }
        }
        Ok(())
    }
}

impl DiskConfig {
    /// Checks the serial and the backing chain of disk `index`.
    pub fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let printable = self.serial.bytes().all(|b| (0x20..0x7f).contains(&b));
        if self.serial.len() > MAX_DISK_SERIAL_BYTES || !printable {
            return Err(ConfigError::DiskSerial {
                disk: index,
                serial: self.serial.clone(),
            });
        }
        let depth = self.backing.len();
        if depth > MAX_BACKING_DEPTH || (depth > 0 && self.format != ImageFormat::Qcow2) {
            return Err(ConfigError::DiskBacking { disk: index, depth });
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
            disks: Vec::new(),
            entropy: false,
            interfaces: Vec::new(),
        }
    }

    #[test]
    fn mac_addresses_parse_print_and_derive() {
        let mac: MacAddress = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5254:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad:?}");
        }
        let derived = MacAddress::derived(b"some-uuid/0");
        assert_eq!(derived, MacAddress::derived(b"some-uuid/0"));
        assert_ne!(derived, MacAddress::derived(b"some-uuid/1"));
        assert!(derived.is_unicast());
        assert_eq!(derived.0[0] & 2, 2, "locally administered");
        let config = VmConfig {
            interfaces: vec![InterfaceConfig {
                mac: "01:00:5e:00:00:01".parse().unwrap(),
                locked_lladdr: true,
            }],
            ..base()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::InterfaceMac { index: 0, .. })
        ));
        let json = serde_json::to_string(&InterfaceConfig {
            mac,
            locked_lladdr: false,
        })
        .unwrap();
        assert_eq!(json, r#"{"mac":"52:54:00:ab:cd:0f","locked_lladdr":false}"#);
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
            Err(ConfigError::CmdlineTooLong { len: 1537 })
        );
        // The limit is in bytes, not characters.
        let config = VmConfig {
            cmdline: "é".repeat(769),
            ..base()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::CmdlineTooLong { len: 1538 })
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
    fn checks_disks() {
        let disk = DiskConfig {
            format: ImageFormat::Qcow2,
            read_only: false,
            serial: "vmd-disk-0".into(),
            backing: vec![ImageFormat::Qcow2, ImageFormat::Raw],
        };
        let config = VmConfig {
            disks: vec![disk.clone(); MAX_DISKS],
            ..base()
        };
        assert_eq!(config.validate(), Ok(()));
        let config = VmConfig {
            disks: vec![disk.clone(); MAX_DISKS + 1],
            ..base()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::TooManyDisks { count: 9 })
        );
        for serial in ["x".repeat(21), "tab\t".into(), "é".into()] {
            let bad = DiskConfig {
                serial: serial.clone(),
                ..disk.clone()
            };
            assert_eq!(
                bad.validate(3),
                Err(ConfigError::DiskSerial { disk: 3, serial })
            );
        }
        let raw_with_backing = DiskConfig {
            format: ImageFormat::Raw,
            ..disk.clone()
        };
        assert_eq!(
            raw_with_backing.validate(0),
            Err(ConfigError::DiskBacking { disk: 0, depth: 2 })
        );
        let too_deep = DiskConfig {
            backing: vec![ImageFormat::Qcow2; MAX_BACKING_DEPTH + 1],
            ..disk
        };
        assert_eq!(
            too_deep.validate(1),
            Err(ConfigError::DiskBacking { disk: 1, depth: 17 })
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
