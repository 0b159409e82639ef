//! A VM's network interfaces as the daemon keeps them: from the `Interfaces` config key
//! (`aa{sv}`: Switch s, MAC s, LockedLladdr b), from `[[interface]]` tables in definitions, and
//! from `net<i>` tap fds passed to CreateVMWithFiles; shown in the `Interfaces` property; and
//! made into taps when the VM starts.
//!
//! For an interface without a passed tap, each start creates a tap named after the VM
//! ([`tap::vm_tap_name`]: `vt-<name>`, `vt-<name>-1`...), owned by nobody, brings it up and,
//! with a switch, attaches it to the switch's bridge. The tap is not persistent and the daemon
//! keeps no fd of it: it disappears when the helper, which holds its only fd, exits. A passed
//! tap is the caller's: it is passed on as it is (its fd kept while the VM is defined, in
//! memory only: after a daemon restart the VM must be defined again).
//!
//! A VM's default MAC is derived from its UUID and the interface's index, so a guest keeps its
//! address, and its DHCP lease, across restarts.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zbus::{OwnedVariant, Variant};

use super::definition::DefinitionError;
use super::switches;
use crate::protocol::{InterfaceConfig, MacAddress};
use crate::tap;

/// The keys of one `Interfaces` entry.
const INTERFACE_KEYS: &str = "Switch, MAC, LockedLladdr";
/// Who owns the taps the daemon makes: nobody (only CAP_NET_ADMIN may attach to them).
const TAP_OWNER: u32 = 65534;

/// One network interface of a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSpec {
    /// The switch whose bridge the tap joins; none for a tap of its own.
    pub switch: Option<String>,
    /// `None`: derived from the VM's UUID and the index.
    pub mac: Option<MacAddress>,
    pub locked_lladdr: bool,
    /// A tap the caller passed, used instead of one the daemon makes.
    pub passed: Option<PassedTap>,
}

impl Default for InterfaceSpec {
    fn default() -> Self {
        InterfaceSpec {
            switch: None,
            mac: None,
            locked_lladdr: true,
            passed: None,
        }
    }
}

/// A tap a caller passed as an fd.
#[derive(Debug, Clone)]
pub struct PassedTap {
    /// `None` once the daemon has restarted since it was passed.
    pub fd: Option<Arc<OwnedFd>>,
    /// Its interface name when it was passed.
    pub name: String,
}

/// Passed taps are the same when they had the same name: an fd cannot be compared with what a
/// stored definition remembers.
impl PartialEq for PassedTap {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for PassedTap {}

/// The MAC interface `index` of the VM `uuid` has.
pub fn mac_of(uuid: &uuid::Uuid, index: usize, spec: &InterfaceSpec) -> MacAddress {
    spec.mac
        .unwrap_or_else(|| MacAddress::derived(format!("{uuid}/{index}").as_bytes()))
}

/// The name of interface `index`'s tap on the host.
pub fn tap_name(vm: &str, index: usize, spec: &InterfaceSpec) -> String {
    match &spec.passed {
        Some(passed) => passed.name.clone(),
        None => tap::vm_tap_name(vm, index),
    }
}

/// The helper's view of the interfaces.
pub fn configs(uuid: &uuid::Uuid, interfaces: &[InterfaceSpec]) -> Vec<InterfaceConfig> {
    interfaces
        .iter()
        .enumerate()
        .map(|(index, spec)| InterfaceConfig {
            mac: mac_of(uuid, index, spec),
            locked_lladdr: spec.locked_lladdr,
        })
        .collect()
}

/// Checks what a definition's interfaces can be checked for without the host: unicast MACs,
/// switch names, and no switch for a passed tap.
pub fn validate(interfaces: &[InterfaceSpec]) -> Result<(), DefinitionError> {
    for (interface, spec) in interfaces.iter().enumerate() {
        if let Some(mac) = spec.mac
            && !mac.is_unicast()
        {
            return Err(DefinitionError::Interface {
                interface,
                reason: format!("{mac} is not a unicast MAC address"),
            });
        }
        if let Some(switch) = &spec.switch {
            switches::validate_name(switch).map_err(|e| DefinitionError::Interface {
                interface,
                reason: e.to_string(),
            })?;
            if spec.passed.is_some() {
                return Err(DefinitionError::Interface {
                    interface,
                    reason: "a passed tap is used as it is; it cannot also have a Switch".into(),
                });
            }
        }
    }
    Ok(())
}

/// One `[[interface]]` table of a definition file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InterfaceTable {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    switch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<MacAddress>,
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    locked_lladdr: bool,
    /// The tap was passed as an fd (this was its name); written by the daemon only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    passed_tap: Option<String>,
}

fn yes() -> bool {
    true
}
fn is_yes(value: &bool) -> bool {
    *value
}

impl InterfaceTable {
    pub fn from_spec(spec: &InterfaceSpec) -> InterfaceTable {
        InterfaceTable {
            switch: spec.switch.clone(),
            mac: spec.mac,
            locked_lladdr: spec.locked_lladdr,
            passed_tap: spec.passed.as_ref().map(|passed| passed.name.clone()),
        }
    }

    pub fn into_spec(self) -> InterfaceSpec {
        InterfaceSpec {
            switch: self.switch,
            mac: self.mac,
            locked_lladdr: self.locked_lladdr,
            passed: self.passed_tap.map(|name| PassedTap { fd: None, name }),
        }
    }
}

/// Reads the `Interfaces` config key (`aa{sv}`).
pub fn parse_dbus(value: &OwnedVariant) -> Result<Vec<InterfaceSpec>, DefinitionError> {
    crate::daemon::definition::dict_list(value, "Interfaces")?
        .iter()
        .enumerate()
        .map(|(index, entry)| parse_entry(index, entry))
        .collect()
}

fn parse_entry(
    interface: usize,
    entry: &HashMap<String, OwnedVariant>,
) -> Result<InterfaceSpec, DefinitionError> {
    let mut spec = InterfaceSpec::default();
    for (key, value) in entry {
        let value = unwrap_variant(value);
        let found = value.value_signature().to_string();
        let wrong =
            |key: &'static str, expected: &'static str| DefinitionError::InterfaceWrongType {
                interface,
                key,
                expected,
                found: found.clone(),
            };
        match key.as_str() {
            "Switch" => {
                let switch = String::try_from(value).map_err(|_| wrong("Switch", "s"))?;
                spec.switch = (!switch.is_empty()).then_some(switch);
            }
            "MAC" => {
                let mac = String::try_from(value).map_err(|_| wrong("MAC", "s"))?;
                let mac = mac
                    .parse()
                    .map_err(|reason| DefinitionError::Interface { interface, reason })?;
                spec.mac = Some(mac);
            }
            "LockedLladdr" => {
                spec.locked_lladdr =
                    bool::try_from(value).map_err(|_| wrong("LockedLladdr", "b"))?
            }
            other => {
                return Err(DefinitionError::UnknownInterfaceKey {
                    interface,
                    key: other.to_string(),
                    known: INTERFACE_KEYS,
                });
            }
        }
    }
    Ok(spec)
}

/// A dict entry's value as sent: `a{sv}` values may arrive wrapped in one more variant.
fn unwrap_variant(value: &OwnedVariant) -> OwnedVariant {
    match Variant::try_from(value) {
        Ok(Variant::Variant(inner)) => OwnedVariant::try_from(*inner).ok(),
        _ => None,
    }
    .or_else(|| value.try_clone().ok())
    .unwrap_or_else(|| OwnedVariant::from(false))
}

/// The `Interfaces` property: one `a{sv}` per interface with the config's keys (MAC as the
/// guest has it, derived or not; Switch empty for none), plus `Tap` s (the host's interface
/// name) and `Passed` b.
pub fn to_dbus(
    vm: &str,
    uuid: &uuid::Uuid,
    interfaces: &[InterfaceSpec],
) -> Vec<HashMap<String, OwnedVariant>> {
    let text = |value: String| OwnedVariant::from(zbus::Str::from(value));
    interfaces
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            HashMap::from([
                (
                    "Switch".to_string(),
                    text(spec.switch.clone().unwrap_or_default()),
                ),
                (
                    "MAC".to_string(),
                    text(mac_of(uuid, index, spec).to_string()),
                ),
                (
                    "LockedLladdr".to_string(),
                    OwnedVariant::from(spec.locked_lladdr),
                ),
                ("Tap".to_string(), text(tap_name(vm, index, spec))),
                (
                    "Passed".to_string(),
                    OwnedVariant::from(spec.passed.is_some()),
                ),
            ])
        })
        .collect()
}

/// Takes CreateVMWithFiles' `net<i>` files: interface `i` (added with defaults when the
/// config has fewer) uses the passed tap, which must be a tap with a vnet header.
pub fn take_passed(
    interfaces: &mut Vec<InterfaceSpec>,
    files: &mut HashMap<String, zbus::OwnedFd>,
) -> Result<(), DefinitionError> {
    for interface in 0..crate::protocol::MAX_NETS {
        let Some(fd) = files.remove(&crate::protocol::FdName::Net(interface as u8).to_string())
        else {
            continue;
        };
        let fd = OwnedFd::from(fd);
        let name =
            tap::check(&fd).map_err(|reason| DefinitionError::PassedTap { interface, reason })?;
        if interfaces.len() <= interface {
            interfaces.resize_with(interface + 1, InterfaceSpec::default);
        }
        interfaces[interface].passed = Some(PassedTap {
            fd: Some(Arc::new(fd)),
            name,
        });
    }
    Ok(())
}

/// Why a VM's interfaces cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("interface {interface}: cannot create the tap {tap}")]
    Create {
        interface: usize,
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {interface}: cannot bring the tap {tap} up")]
    Up {
        interface: usize,
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {interface}")]
    Switch {
        interface: usize,
        #[source]
        source: switches::SwitchError,
    },
    #[error(
        "interface {interface}: cannot attach the tap {tap} to bridge {bridge} of switch {switch}"
    )]
    Attach {
        interface: usize,
        tap: String,
        bridge: String,
        switch: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "interface {interface}: its tap was passed as an fd, which the daemon lost when it restarted; remove the VM and define it again"
    )]
    PassedGone { interface: usize },
    #[error("interface {interface}: cannot use the passed tap")]
    Passed {
        interface: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Makes (or takes) every interface's tap for a start: created, up, on its switch's bridge.
/// Returns one fd per interface, in order; dropping them before the helper has them removes
/// the taps the daemon made.
pub fn open_all(vm: &str, interfaces: &[InterfaceSpec]) -> Result<Vec<OwnedFd>, NetworkError> {
    let mut fds = Vec::with_capacity(interfaces.len());
    for (interface, spec) in interfaces.iter().enumerate() {
        if let Some(passed) = &spec.passed {
            let fd = passed
                .fd
                .as_ref()
                .ok_or(NetworkError::PassedGone { interface })?;
            fds.push(
                fd.try_clone()
                    .map_err(|source| NetworkError::Passed { interface, source })?,
            );
            continue;
        }
        let name = tap::vm_tap_name(vm, interface);
        let fd = tap::create(&name, TAP_OWNER).map_err(|source| NetworkError::Create {
            interface,
            tap: name.clone(),
            source,
        })?;
        if let Some(switch) = &spec.switch {
            let switch = switches::load(switch)
                .map_err(|source| NetworkError::Switch { interface, source })?;
            tap::attach_to_bridge(&switch.bridge, &name).map_err(|source| {
                NetworkError::Attach {
                    interface,
                    tap: name.clone(),
                    bridge: switch.bridge.clone(),
                    switch: switch.name.clone(),
                    source,
                }
            })?;
        }
        tap::set_up(&name).map_err(|source| NetworkError::Up {
            interface,
            tap: name.clone(),
            source,
        })?;
        fds.push(fd);
    }
    Ok(fds)
}

/// The interface indices of a running VM's taps, for machined (those that cannot be found are
/// left out).
pub fn ifindices(vm: &str, interfaces: &[InterfaceSpec]) -> Vec<i32> {
    interfaces
        .iter()
        .enumerate()
        .filter_map(|(index, spec)| tap::ifindex(&tap_name(vm, index, spec)).ok())
        .filter_map(|ifindex| i32::try_from(ifindex).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pairs: Vec<(&str, Variant<'_>)>) -> HashMap<String, OwnedVariant> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), OwnedVariant::try_from(v).expect("owned")))
            .collect()
    }

    fn parse(
        entries: Vec<HashMap<String, OwnedVariant>>,
    ) -> Result<Vec<InterfaceSpec>, DefinitionError> {
        parse_dbus(&OwnedVariant::try_from(Variant::from(entries)).expect("owned"))
    }

    #[test]
    fn interfaces_parse_from_dbus() {
        let specs = parse(vec![
            entry(vec![
                ("Switch", Variant::from("uplink")),
                ("MAC", Variant::from("52:54:00:00:00:01")),
                ("LockedLladdr", Variant::from(false)),
            ]),
            entry(vec![]),
        ])
        .expect("valid");
        assert_eq!(specs[0].switch.as_deref(), Some("uplink"));
        assert_eq!(specs[0].mac, Some("52:54:00:00:00:01".parse().unwrap()));
        assert!(!specs[0].locked_lladdr);
        assert_eq!(specs[1], InterfaceSpec::default());

        assert!(matches!(
            parse(vec![entry(vec![("Bridge", Variant::from("br0"))])]),
            Err(DefinitionError::UnknownInterfaceKey { interface: 0, .. })
        ));
        assert!(matches!(
            parse(vec![
                entry(vec![]),
                entry(vec![("LockedLladdr", Variant::from("no"))])
            ]),
            Err(DefinitionError::InterfaceWrongType {
                interface: 1,
                key: "LockedLladdr",
                ..
            })
        ));
        assert!(matches!(
            parse(vec![entry(vec![("MAC", Variant::from("52:54"))])]),
            Err(DefinitionError::Interface { interface: 0, .. })
        ));
        let multicast = parse(vec![entry(vec![(
            "MAC",
            Variant::from("01:00:5e:00:00:01"),
        )])])
        .expect("parses");
        assert!(validate(&multicast).is_err());
        let bad_switch =
            parse(vec![entry(vec![("Switch", Variant::from("../x"))])]).expect("parses");
        assert!(validate(&bad_switch).is_err());
    }

    #[test]
    fn default_macs_follow_the_uuid_and_index() {
        let uuid = uuid::Uuid::new_v4();
        let other = uuid::Uuid::new_v4();
        let spec = InterfaceSpec::default();
        let mac = mac_of(&uuid, 0, &spec);
        assert_eq!(mac, mac_of(&uuid, 0, &spec));
        assert_ne!(mac, mac_of(&uuid, 1, &spec));
        assert_ne!(mac, mac_of(&other, 0, &spec));
        assert!(mac.is_unicast() && mac.0[0] & 2 == 2);
        let given = InterfaceSpec {
            mac: Some("52:54:00:00:00:07".parse().unwrap()),
            ..InterfaceSpec::default()
        };
        assert_eq!(mac_of(&uuid, 0, &given).to_string(), "52:54:00:00:00:07");
        let shown = to_dbus("web", &uuid, &[spec, given]);
        let text =
            |i: usize, key: &str| String::try_from(shown[i][key].try_clone().unwrap()).unwrap();
        assert_eq!(text(0, "MAC"), mac.to_string());
        assert_eq!(text(0, "Tap"), "vt-web");
        assert_eq!(text(1, "Tap"), "vt-web-1");
    }

    #[test]
    fn interface_tables_round_trip() {
        for spec in [
            InterfaceSpec::default(),
            InterfaceSpec {
                switch: Some("uplink".into()),
                mac: Some("52:54:00:00:00:02".parse().unwrap()),
                locked_lladdr: false,
                passed: None,
            },
            InterfaceSpec {
                passed: Some(PassedTap {
                    fd: None,
                    name: "mytap".into(),
                }),
                ..InterfaceSpec::default()
            },
        ] {
            let text = toml::to_string(&InterfaceTable::from_spec(&spec)).expect("serializes");
            let table: InterfaceTable = toml::from_str(&text).expect("parses");
            assert_eq!(table.into_spec(), spec, "{text}");
        }
    }
}
