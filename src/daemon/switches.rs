//! Switches: the administrator's bridges that VMs' interfaces may be attached to, one TOML file
//! each in `/etc/vmd/switches` (vm.conf's `switch` blocks). The file `uplink.toml` defines the
//! switch `uplink`:
//!
//! ```toml
//! bridge = "br0"      # an existing bridge; vmd never creates or configures it
//! group = "vmnet"     # optional: its members may attach VMs to the switch
//! ```
//!
//! Files are read when they are used (defining a VM on a switch, starting it), so a change
//! needs no reload. Attaching a VM to a switch needs root, membership of its group, or the
//! polkit action `org.vmd.vmd1.network`, with the switch's name in the details.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::authority::{self, Action, Caller};
use super::errors::VmdError;
use crate::tap;

/// Where the administrator defines switches.
pub const SWITCH_DIR: &str = "/etc/vmd/switches";

/// One switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    pub name: String,
    /// The bridge's interface name.
    pub bridge: String,
    /// Members of this group may attach VMs to it.
    pub group: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchFile {
    bridge: String,
    #[serde(default)]
    group: Option<String>,
}

/// Why a switch cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("{name:?} is not a switch name (letters, digits, '.', '-' and '_', at most 64)")]
    BadName { name: String },
    #[error("there is no switch {name:?} (no {path})", path = path.display())]
    NoSuchSwitch { name: String, path: PathBuf },
    #[error("cannot read the switch {name:?} from {path}", path = path.display())]
    Unreadable {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the switch {name:?} is misdefined in {path}: {reason}", path = path.display())]
    Invalid {
        name: String,
        path: PathBuf,
        reason: String,
    },
}

/// A switch name: also a file name, so no '/' and no leading '.'.
pub fn validate_name(name: &str) -> Result<(), SwitchError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(SwitchError::BadName { name: name.into() })
    }
}

/// Reads the switch `name` from [`SWITCH_DIR`].
pub fn load(name: &str) -> Result<Switch, SwitchError> {
    load_from(Path::new(SWITCH_DIR), name)
}

/// Reads the switch `name` from `dir`.
pub fn load_from(dir: &Path, name: &str) -> Result<Switch, SwitchError> {
    validate_name(name)?;
    let path = dir.join(format!("{name}.toml"));
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(SwitchError::NoSuchSwitch {
                name: name.into(),
                path,
            });
        }
        Err(source) => {
            return Err(SwitchError::Unreadable {
                name: name.into(),
                path,
                source,
            });
        }
    };
    let invalid = |reason: String| SwitchError::Invalid {
        name: name.into(),
        path: path.clone(),
        reason,
    };
    let file: SwitchFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if file.bridge.is_empty()
        || file.bridge.len() > tap::MAX_IFNAME
        || file.bridge.contains(['/', ':'])
        || file.bridge.contains(char::is_whitespace)
    {
        return Err(invalid(format!(
            "bridge {:?} is not an interface name",
            file.bridge
        )));
    }
    let group = file
        .group
        .map(|group| {
            match nix::unistd::Group::from_name(&group) {
                Ok(Some(found)) => Ok(found.gid.as_raw()),
                Ok(None) => group
                    .parse::<u32>()
                    .map_err(|_| format!("there is no group {group:?}")),
                Err(e) => Err(format!("cannot look up the group {group:?}: {e}")),
            }
            .map_err(&invalid)
        })
        .transpose()?;
    Ok(Switch {
        name: name.into(),
        bridge: file.bridge,
        group,
    })
}

/// Whether `caller` may attach VMs to the switch `name`: root, a member of its group, or a
/// holder of org.vmd.vmd1.network. An unknown or broken switch is an invalid argument.
pub async fn authorize(
    bus: &zbus::Connection,
    caller: &Caller,
    name: &str,
    vm: &str,
) -> Result<Switch, VmdError> {
    let switch = load(name).map_err(|e| VmdError::InvalidArgument(e.to_string()))?;
    if caller.is_root()
        || switch
            .group
            .is_some_and(|group| caller.groups.contains(&group))
    {
        return Ok(switch);
    }
    authority::authorize(bus, caller, Action::Network, Some(vm))
        .await
        .map_err(|refusal| match refusal {
            VmdError::NotPermitted(reason) => VmdError::NotPermitted(format!(
                "attaching VM {vm} to switch {name} needs root, membership of the switch's group, or the polkit action {}: {reason}",
                Action::Network.id()
            )),
            other => other,
        })?;
    Ok(switch)
}

/// [`authorize`] for every switch the interfaces name.
pub async fn authorize_all(
    bus: &zbus::Connection,
    caller: &Caller,
    vm: &str,
    interfaces: &[super::network::InterfaceSpec],
) -> Result<(), VmdError> {
    for switch in interfaces.iter().filter_map(|spec| spec.switch.as_deref()) {
        authorize(bus, caller, switch, vm).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_load_with_their_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("uplink.toml"),
            "bridge = \"br0\"\ngroup = \"daemon\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("open.toml"), "bridge = \"br1\"\n").unwrap();
        let daemon = nix::unistd::Group::from_name("daemon")
            .unwrap()
            .unwrap()
            .gid
            .as_raw();
        assert_eq!(
            load_from(dir.path(), "uplink").expect("valid"),
            Switch {
                name: "uplink".into(),
                bridge: "br0".into(),
                group: Some(daemon),
            }
        );
        assert_eq!(load_from(dir.path(), "open").expect("valid").group, None);
    }

    #[test]
    fn bad_switches_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in [
            (
                "nogroup",
                "bridge = \"br0\"\ngroup = \"no-such-group-here\"\n",
            ),
            ("nobridge", "group = \"daemon\"\n"),
            ("longbridge", "bridge = \"a-bridge-name-too-long\"\n"),
            ("extra", "bridge = \"br0\"\nstp = true\n"),
        ] {
            std::fs::write(dir.path().join(format!("{name}.toml")), text).unwrap();
            assert!(
                matches!(
                    load_from(dir.path(), name),
                    Err(SwitchError::Invalid { .. })
                ),
                "{name}"
            );
        }
        assert!(matches!(
            load_from(dir.path(), "absent"),
            Err(SwitchError::NoSuchSwitch { .. })
        ));
        for bad in ["", "../etc", ".hidden", "a/b", "a b"] {
            assert!(
                matches!(load_from(dir.path(), bad), Err(SwitchError::BadName { .. })),
                "{bad:?}"
            );
        }
    }
}
