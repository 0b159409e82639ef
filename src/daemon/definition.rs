//! A VM's definition: what it boots and with how much, as stored in TOML files and as given
//! to `CreateVM` in an `a{sv}`. Everything is checked here, before anything is created.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zbus::OwnedVariant;

use crate::protocol::{self, VmConfig};

/// Defaults for keys a definition leaves out.
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

/// One VM's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmDefinition {
    #[serde(skip)]
    pub name: String,
    pub uuid: uuid::Uuid,
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_bytes: u64,
    #[serde(default)]
    pub autostart: bool,
    /// The owner (and owner group), who may run the VM without polkit; root when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_gid: Option<u32>,
    /// Not stored; forgotten when it stops.
    #[serde(skip)]
    pub transient: bool,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}
fn default_memory() -> u64 {
    DEFAULT_MEMORY_BYTES
}

/// Why a definition was refused; the text is shown to the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DefinitionError {
    #[error("invalid VM name: {0}")]
    Name(#[from] protocol::NameError),
    #[error(
        "unknown configuration key {0:?} (known: Kernel, Initrd, Cmdline, VCPUs, MemoryBytes, Autostart, Transient)"
    )]
    UnknownKey(String),
    #[error("configuration key {key} must be of D-Bus type {expected}, not {found}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("the configuration has no Kernel")]
    NoKernel,
    #[error("{what} path {path:?} must be absolute")]
    RelativePath { what: &'static str, path: PathBuf },
    #[error("cannot use {path:?} as the {what}: {reason}")]
    UnusableFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Config(#[from] protocol::ConfigError),
    #[error("cannot parse the definition: {0}")]
    Toml(String),
    #[error("Owner {0:?} is not \"user\" or \"user:group\" with an existing user and group")]
    Owner(String),
    #[error(
        "CreateVMWithFiles takes the kernel and initrd as fds in its files argument, not as {0} paths"
    )]
    PathWithFiles(&'static str),
    #[error("unknown file {0:?} (known: kernel, initrd)")]
    UnknownFile(String),
    #[error("the {what} fd is unusable: {reason}")]
    PassedFile { what: &'static str, reason: String },
}

impl VmDefinition {
    /// The helper's view of it.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            name: self.name.clone(),
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            cmdline: self.cmdline.clone(),
        }
    }

    /// Checks the name, sizes and command line, and that the files are readable regular files.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        self.vm_config().validate()?;
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        Ok(())
    }

    /// Builds a definition from `CreateVM`'s arguments.
    pub fn from_dbus(
        name: &str,
        config: &HashMap<String, OwnedVariant>,
    ) -> Result<VmDefinition, DefinitionError> {
        let definition = Self::parse_dbus(name, config)?;
        if definition.kernel.as_os_str().is_empty() {
            return Err(DefinitionError::NoKernel);
        }
        definition.validate()?;
        Ok(definition)
    }

    /// Reads `CreateVM`'s arguments without checking files (the kernel may come as an fd).
    pub fn parse_dbus(
        name: &str,
        config: &HashMap<String, OwnedVariant>,
    ) -> Result<VmDefinition, DefinitionError> {
        protocol::validate_vm_name(name)?;
        let mut definition = VmDefinition {
            name: name.to_string(),
            uuid: uuid::Uuid::new_v4(),
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: DEFAULT_VCPUS,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            autostart: false,
            owner_uid: None,
            owner_gid: None,
            transient: false,
        };
        for (key, value) in config {
            match key.as_str() {
                "Kernel" => definition.kernel = PathBuf::from(string(value, "Kernel")?),
                "Initrd" => definition.initrd = Some(PathBuf::from(string(value, "Initrd")?)),
                "Cmdline" => definition.cmdline = string(value, "Cmdline")?,
                "VCPUs" => definition.vcpus = typed::<u32>(value, "VCPUs", "u")?,
                "MemoryBytes" => definition.memory_bytes = typed::<u64>(value, "MemoryBytes", "t")?,
                "Autostart" => definition.autostart = typed::<bool>(value, "Autostart", "b")?,
                "Transient" => definition.transient = typed::<bool>(value, "Transient", "b")?,
                "Owner" => {
                    let owner = string(value, "Owner")?;
                    let (uid, gid) = resolve_owner(&owner)?;
                    definition.owner_uid = Some(uid);
                    definition.owner_gid = gid;
                }
                other => return Err(DefinitionError::UnknownKey(other.to_string())),
            }
        }
        definition.vm_config().validate()?;
        Ok(definition)
    }

    /// Whether uid (with these groups) owns the VM.
    pub fn owned_by(&self, uid: u32, groups: &[u32]) -> bool {
        self.owner_uid == Some(uid) || self.owner_gid.is_some_and(|gid| groups.contains(&gid))
    }

    /// "user" or "user:group", or "" for root.
    pub fn owner(&self) -> String {
        let Some(uid) = self.owner_uid else {
            return String::new();
        };
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map_or_else(|| uid.to_string(), |u| u.name);
        match self.owner_gid {
            None => user,
            Some(gid) => {
                let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map_or_else(|| gid.to_string(), |g| g.name);
                format!("{user}:{group}")
            }
        }
    }

    /// Parses a stored definition; the name comes from the file name.
    pub fn from_toml(name: &str, text: &str) -> Result<VmDefinition, DefinitionError> {
        protocol::validate_vm_name(name)?;
        let mut definition: VmDefinition =
            toml::from_str(text).map_err(|e| DefinitionError::Toml(e.to_string()))?;
        definition.name = name.to_string();
        definition.vm_config().validate()?;
        for (what, path) in [
            ("kernel", Some(&definition.kernel)),
            ("initrd", definition.initrd.as_ref()),
        ] {
            if let Some(path) = path
                && !path.is_absolute()
            {
                return Err(DefinitionError::RelativePath {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(definition)
    }

    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

/// "user" or "user:group" to ids.
fn resolve_owner(owner: &str) -> Result<(u32, Option<u32>), DefinitionError> {
    let bad = || DefinitionError::Owner(owner.to_string());
    let (user, group) = match owner.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (owner, None),
    };
    let user = nix::unistd::User::from_name(user)
        .ok()
        .flatten()
        .ok_or_else(bad)?;
    let gid = match group {
        Some(group) => Some(
            nix::unistd::Group::from_name(group)
                .ok()
                .flatten()
                .ok_or_else(bad)?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    Ok((user.uid.as_raw(), gid))
}

fn string(value: &OwnedVariant, key: &'static str) -> Result<String, DefinitionError> {
    typed::<String>(value, key, "s")
}

fn typed<T>(
    value: &OwnedVariant,
    key: &'static str,
    expected: &'static str,
) -> Result<T, DefinitionError>
where
    T: TryFrom<OwnedVariant>,
{
    let signature = value.value_signature().to_string();
    if signature != expected {
        return Err(DefinitionError::WrongType {
            key,
            expected,
            found: signature,
        });
    }
    let cloned = value.try_clone().map_err(|_| DefinitionError::WrongType {
        key,
        expected,
        found: signature.clone(),
    })?;
    T::try_from(cloned).map_err(|_| DefinitionError::WrongType {
        key,
        expected,
        found: signature,
    })
}

/// The file must be an absolute path to a readable, non-empty regular file. It is opened with
/// O_NONBLOCK, so that a FIFO without a writer cannot hang the open, and O_NOCTTY, so that a
/// terminal never becomes the daemon's controlling terminal; fstat of what was opened decides
/// what it is. A slow filesystem can still block: callers run this off the async runtime.
fn check_file(what: &'static str, path: &Path) -> Result<(), DefinitionError> {
    if !path.is_absolute() {
        return Err(DefinitionError::RelativePath {
            what,
            path: path.to_path_buf(),
        });
    }
    let unusable = |reason: String| DefinitionError::UnusableFile {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| unusable(e.to_string()))?;
    let metadata = file.metadata().map_err(|e| unusable(e.to_string()))?;
    if let Some(kind) = super::files::non_regular_kind(metadata.mode()) {
        return Err(unusable(format!("it is {kind}, not a regular file")));
    }
    if metadata.len() == 0 {
        return Err(unusable("the file is empty".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::Variant;

    fn kernel_file() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(file.path(), b"\x7fELF").expect("write");
        file
    }

    fn config(pairs: Vec<(&str, Variant<'_>)>) -> HashMap<String, OwnedVariant> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), OwnedVariant::try_from(v).expect("owned")))
            .collect()
    }

    #[test]
    fn a_full_config_is_accepted() {
        let kernel = kernel_file();
        let path = kernel.path().to_str().unwrap();
        let definition = VmDefinition::from_dbus(
            "web-1",
            &config(vec![
                ("Kernel", Variant::from(path)),
                ("VCPUs", Variant::from(2u32)),
                ("MemoryBytes", Variant::from(64u64 << 20)),
                ("Cmdline", Variant::from("testguest=hello")),
                ("Autostart", Variant::from(true)),
            ]),
        )
        .expect("valid");
        assert_eq!((definition.vcpus, definition.memory_bytes), (2, 64 << 20));
        assert!(definition.autostart && !definition.transient);
        let text = definition.to_toml().expect("serializes");
        assert_eq!(VmDefinition::from_toml("web-1", &text), Ok(definition));
    }

    #[test]
    fn bad_configs_are_named_errors() {
        let kernel = kernel_file();
        let path = kernel.path().to_str().unwrap();
        let err = |name: &str, pairs| VmDefinition::from_dbus(name, &config(pairs)).unwrap_err();
        assert!(matches!(
            err("-x", vec![("Kernel", Variant::from(path))]),
            DefinitionError::Name(_)
        ));
        assert_eq!(
            err(
                "a",
                vec![
                    ("Kernel", Variant::from(path)),
                    ("Disk", Variant::from("x"))
                ]
            ),
            DefinitionError::UnknownKey("Disk".into())
        );
        assert!(matches!(
            err(
                "a",
                vec![
                    ("Kernel", Variant::from(path)),
                    ("VCPUs", Variant::from(2i32))
                ]
            ),
            DefinitionError::WrongType { key: "VCPUs", .. }
        ));
        assert_eq!(err("a", vec![]), DefinitionError::NoKernel);
        assert!(matches!(
            err(
                "a",
                vec![
                    ("Kernel", Variant::from(path)),
                    ("MemoryBytes", Variant::from(0u64))
                ]
            ),
            DefinitionError::Config(_)
        ));
        assert!(matches!(
            err(
                "a",
                vec![
                    ("Kernel", Variant::from(path)),
                    ("VCPUs", Variant::from(100_000u32))
                ]
            ),
            DefinitionError::Config(_)
        ));
        assert!(matches!(
            err("a", vec![("Kernel", Variant::from("relative/vmlinuz"))]),
            DefinitionError::RelativePath { .. }
        ));
        assert!(matches!(
            err("a", vec![("Kernel", Variant::from("/nonexistent/vmlinuz"))]),
            DefinitionError::UnusableFile { .. }
        ));
        assert!(matches!(
            err("a", vec![("Kernel", Variant::from("/etc"))]),
            DefinitionError::UnusableFile { .. }
        ));
    }

    #[test]
    fn special_files_are_refused_without_hanging() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A FIFO nobody writes to: a blocking open would wait for a writer forever.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let error = check_file("kernel", &fifo).unwrap_err().to_string();
        assert!(error.contains("FIFO, not a regular file"), "{error}");
        let error = check_file("kernel", dir.path()).unwrap_err().to_string();
        assert!(error.contains("a directory, not a regular file"), "{error}");
        let error = check_file("kernel", Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("a device, not a regular file"), "{error}");
    }

    #[test]
    fn stored_definitions_are_strict() {
        assert!(matches!(
            VmDefinition::from_toml(
                "a",
                "uuid = \"00000000-0000-0000-0000-000000000000\"\nkernel = \"/k\"\nbogus = 1\n"
            ),
            Err(DefinitionError::Toml(_))
        ));
        assert!(matches!(
            VmDefinition::from_toml(
                "a",
                "uuid = \"00000000-0000-0000-0000-000000000000\"\nkernel = \"k\"\n"
            ),
            Err(DefinitionError::RelativePath { .. })
        ));
    }
}
