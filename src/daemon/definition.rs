//! A VM's definition: what it boots and with how much, as stored in TOML files and as given
//! to `CreateVM` in an `a{sv}`. Everything is checked here, before anything is created.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zbus::OwnedVariant;

use super::disks::{self, DiskSource, DiskSpec, DiskTable};
use super::network::{self, InterfaceSpec, InterfaceTable};
use crate::images::UnknownFormat;
use crate::protocol::{self, VmConfig};

/// Defaults for keys a definition leaves out.
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

/// One VM's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDefinition {
    pub name: String,
    pub uuid: uuid::Uuid,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub autostart: bool,
    /// The owner (and owner group), who may run the VM without polkit; root when unset.
    pub owner_uid: Option<u32>,
    pub owner_gid: Option<u32>,
    /// Not stored; forgotten when it stops.
    pub transient: bool,
    /// In guest order.
    pub disks: Vec<DiskSpec>,
    /// A virtio-rng entropy source.
    pub entropy: bool,
    /// Network interfaces, in guest order.
    pub interfaces: Vec<InterfaceSpec>,
}

/// A definition as its TOML file spells it (the name is the file's).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct DefinitionFile {
    uuid: uuid::Uuid,
    kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    cmdline: String,
    #[serde(default = "default_vcpus")]
    vcpus: u32,
    #[serde(default = "default_memory")]
    memory_bytes: u64,
    #[serde(default)]
    autostart: bool,
    /// `"user"` or `"user:group"`, names or numeric ids, resolved when the file is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    /// What earlier versions wrote instead of `owner`: still read, written only for an owner
    /// group without an owner (which `owner` cannot express).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner_uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner_gid: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    entropy: bool,
    /// `[[disk]]` tables; last, as TOML wants tables after plain keys.
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    disks: Vec<DiskTable>,
    /// `[[interface]]` tables.
    #[serde(default, rename = "interface", skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<InterfaceTable>,
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
        "unknown configuration key {0:?} (known: Kernel, Initrd, Cmdline, VCPUs, MemoryBytes, Autostart, Transient, Owner, Disks, Entropy, Interfaces)"
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
    #[error(
        "owner {owner:?} (\"user\" or \"user:group\", names or numeric ids) is unusable: {reason}"
    )]
    Owner { owner: String, reason: String },
    #[error("the definition gives both owner and owner-uid/owner-gid; keep only owner")]
    OwnerTwice,
    #[error(
        "CreateVMWithFiles takes the kernel and initrd as fds in its files argument, not as {0} paths"
    )]
    PathWithFiles(&'static str),
    #[error("unknown file {0:?} (known: kernel, initrd, disk0 to disk7, net0 to net3)")]
    UnknownFile(String),
    #[error("the {what} fd is unusable: {reason}")]
    PassedFile { what: &'static str, reason: String },
    #[error("unknown key {key:?} in disk {disk} (known: {known})")]
    UnknownDiskKey {
        disk: usize,
        key: String,
        known: &'static str,
    },
    #[error("key {key} of disk {disk} must be of D-Bus type {expected}, not {found}")]
    DiskWrongType {
        disk: usize,
        key: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("disk {disk}: {source}")]
    DiskFormat {
        disk: usize,
        #[source]
        source: UnknownFormat,
    },
    #[error("disk {disk} has no Path")]
    DiskNoPath { disk: usize },
    #[error("disk {disk} has no file disk{disk}: CreateVMWithFiles takes every disk as an fd")]
    DiskNoFile { disk: usize },
    #[error(
        "CreateVMWithFiles takes disks as fds (files disk0, disk1...), not as paths (disk {disk} has a Path)"
    )]
    DiskPathWithFiles { disk: usize },
    #[error("the disk{disk} fd is unusable: {reason}")]
    PassedDisk { disk: usize, reason: String },
    #[error("cannot use disk {disk}: {reason}")]
    UnusableDisk { disk: usize, reason: String },
    #[error("unknown key {key:?} in interface {interface} (known: {known})")]
    UnknownInterfaceKey {
        interface: usize,
        key: String,
        known: &'static str,
    },
    #[error("key {key} of interface {interface} must be of D-Bus type {expected}, not {found}")]
    InterfaceWrongType {
        interface: usize,
        key: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("interface {interface}: {reason}")]
    Interface { interface: usize, reason: String },
    #[error("the net{interface} fd is unusable: {reason}")]
    PassedTap { interface: usize, reason: String },
}

impl VmDefinition {
    /// The helper's view of it.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            name: self.name.clone(),
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            cmdline: self.cmdline.clone(),
            disks: self.disks.iter().map(DiskSpec::unresolved_config).collect(),
            entropy: self.entropy,
            interfaces: network::configs(&self.uuid, &self.interfaces),
        }
    }

    /// Checks the name, sizes and command line, and that the files are readable regular files.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        self.vm_config().validate()?;
        network::validate(&self.interfaces)?;
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        for (disk, spec) in self.disks.iter().enumerate() {
            match &spec.source {
                DiskSource::Path(path) if path.as_os_str().is_empty() => {
                    return Err(DefinitionError::DiskNoPath { disk });
                }
                DiskSource::Path(path) => check_disk(disk, path, spec)?,
                DiskSource::Passed(_) => {}
            }
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
            disks: Vec::new(),
            entropy: false,
            interfaces: Vec::new(),
        };
        definition.apply_dbus(config)?;
        Ok(definition)
    }

    /// Changes the keys `config` gives (CreateVM's keys but Transient, which a defined VM
    /// cannot change), and checks sizes and names as CreateVM does; files are checked by
    /// [`VmDefinition::validate`]. On an error the definition may be half changed: callers
    /// change a copy.
    pub fn apply_dbus(
        &mut self,
        config: &HashMap<String, OwnedVariant>,
    ) -> Result<(), DefinitionError> {
        for (key, value) in config {
            match key.as_str() {
                "Kernel" => self.kernel = PathBuf::from(string(value, "Kernel")?),
                "Initrd" => {
                    let initrd = string(value, "Initrd")?;
                    // An empty Initrd (in an Update) means none.
                    self.initrd = (!initrd.is_empty()).then(|| PathBuf::from(initrd));
                }
                "Cmdline" => self.cmdline = string(value, "Cmdline")?,
                "VCPUs" => self.vcpus = typed::<u32>(value, "VCPUs", "u")?,
                "MemoryBytes" => self.memory_bytes = typed::<u64>(value, "MemoryBytes", "t")?,
                "Autostart" => self.autostart = typed::<bool>(value, "Autostart", "b")?,
                "Transient" => self.transient = typed::<bool>(value, "Transient", "b")?,
                "Disks" => self.disks = disks::parse_dbus(value)?,
                "Entropy" => self.entropy = typed::<bool>(value, "Entropy", "b")?,
                "Interfaces" => self.interfaces = network::parse_dbus(value)?,
                "Owner" => {
                    let owner = string(value, "Owner")?;
                    let (uid, gid) = resolve_owner(&owner)?;
                    self.owner_uid = Some(uid);
                    self.owner_gid = gid;
                }
                other => return Err(DefinitionError::UnknownKey(other.to_string())),
            }
        }
        self.vm_config().validate()?;
        network::validate(&self.interfaces)?;
        Ok(())
    }

    /// A whole definition as DefineVM takes it and the Definition property shows it: the TOML
    /// of a definition file with the VM's `name` in it (and `uuid` optional: a new one when it
    /// is left out).
    pub fn from_named_toml(text: &str) -> Result<VmDefinition, DefinitionError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| DefinitionError::Toml(e.to_string()))?;
        let name = match table.remove("name") {
            Some(toml::Value::String(name)) => name,
            Some(_) => return Err(DefinitionError::Toml("name must be a string".into())),
            None => return Err(DefinitionError::Toml("the definition has no name".into())),
        };
        if !table.contains_key("uuid") {
            table.insert(
                "uuid".into(),
                toml::Value::String(uuid::Uuid::new_v4().to_string()),
            );
        }
        let text = toml::to_string(&table).map_err(|e| DefinitionError::Toml(e.to_string()))?;
        Self::from_toml(&name, &text)
    }

    /// The definition file's TOML with the VM's name first (what DefineVM takes).
    pub fn to_named_toml(&self) -> Result<String, toml::ser::Error> {
        let name = toml::Value::String(self.name.clone());
        Ok(format!("name = {name}\n{}", self.to_toml()?))
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

    /// Parses a stored definition; the name comes from the file name. An `owner` is resolved
    /// to ids here, so an unknown user or group is an error at load.
    pub fn from_toml(name: &str, text: &str) -> Result<VmDefinition, DefinitionError> {
        protocol::validate_vm_name(name)?;
        let file: DefinitionFile =
            toml::from_str(text).map_err(|e| DefinitionError::Toml(e.to_string()))?;
        let (owner_uid, owner_gid) = match file.owner {
            Some(_) if file.owner_uid.is_some() || file.owner_gid.is_some() => {
                return Err(DefinitionError::OwnerTwice);
            }
            Some(owner) => {
                let (uid, gid) = resolve_owner(&owner)?;
                (Some(uid), gid)
            }
            None => (file.owner_uid, file.owner_gid),
        };
        let definition = VmDefinition {
            name: name.to_string(),
            uuid: file.uuid,
            kernel: file.kernel,
            initrd: file.initrd,
            cmdline: file.cmdline,
            vcpus: file.vcpus,
            memory_bytes: file.memory_bytes,
            autostart: file.autostart,
            owner_uid,
            owner_gid,
            transient: false,
            disks: file
                .disks
                .into_iter()
                .enumerate()
                .map(|(index, table)| table.into_spec(index))
                .collect::<Result<_, _>>()?,
            entropy: file.entropy,
            interfaces: file
                .interfaces
                .into_iter()
                .map(InterfaceTable::into_spec)
                .collect(),
        };
        definition.vm_config().validate()?;
        network::validate(&definition.interfaces)?;
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

    /// The TOML file of a definition. The owner is written as numeric ids (`owner = "uid"` or
    /// `"uid:gid"`), so that renaming a user does not lose the VM at the next load.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let (owner, owner_gid) = match (self.owner_uid, self.owner_gid) {
            (Some(uid), Some(gid)) => (Some(format!("{uid}:{gid}")), None),
            (Some(uid), None) => (Some(uid.to_string()), None),
            (None, gid) => (None, gid),
        };
        toml::to_string(&DefinitionFile {
            uuid: self.uuid,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
            autostart: self.autostart,
            owner,
            owner_uid: None,
            owner_gid,
            entropy: self.entropy,
            disks: self.disks.iter().map(DiskTable::from_spec).collect(),
            interfaces: self
                .interfaces
                .iter()
                .map(InterfaceTable::from_spec)
                .collect(),
        })
    }
}

/// `"user"` or `"user:group"` to ids. Each part is a name or a numeric id; a name is looked
/// up first, as chown(1) does, so that a user whose name is all digits is still found.
pub fn resolve_owner(owner: &str) -> Result<(u32, Option<u32>), DefinitionError> {
    let unusable = |reason: String| DefinitionError::Owner {
        owner: owner.to_string(),
        reason,
    };
    let (user, group) = match owner.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (owner, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(unusable(
            "a user (and after ':' a group) must be named".into(),
        ));
    }
    let uid = numeric_or_named("user", user, |name| {
        nix::unistd::User::from_name(name).map(|found| found.map(|user| user.uid.as_raw()))
    })
    .map_err(unusable)?;
    let gid = group
        .map(|group| {
            numeric_or_named("group", group, |name| {
                nix::unistd::Group::from_name(name)
                    .map(|found| found.map(|group| group.gid.as_raw()))
            })
        })
        .transpose()
        .map_err(unusable)?;
    Ok((uid, gid))
}

/// The id of the user or group `name` (`kind` says which), or `name` read as a numeric id when
/// no such name exists.
fn numeric_or_named(
    kind: &str,
    name: &str,
    lookup: impl Fn(&str) -> nix::Result<Option<u32>>,
) -> Result<u32, String> {
    match lookup(name) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => name
            .parse::<u32>()
            .map_err(|_| format!("there is no {kind} {name:?}")),
        Err(e) => Err(format!("cannot look up the {kind} {name:?}: {e}")),
    }
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

/// The file must be an absolute path to a readable, non-empty regular file (opened as
/// `host_files::open_regular` does: never hanging on a FIFO). A slow filesystem can still
/// block: callers run this off the async runtime.
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
    let file = super::host_files::open_regular(path, &super::host_files::Rights::Daemon)
        .map_err(|e| unusable(e.to_string()))?;
    let metadata = file.metadata().map_err(|e| unusable(e.to_string()))?;
    if metadata.len() == 0 {
        return Err(unusable("the file is empty".into()));
    }
    Ok(())
}

/// A disk path must be absolute, and its chain must open (read-only, with the daemon's
/// rights: only callers trusted with those may name host paths).
fn check_disk(disk: usize, path: &Path, spec: &DiskSpec) -> Result<(), DefinitionError> {
    if !path.is_absolute() {
        return Err(DefinitionError::RelativePath {
            what: "disk",
            path: path.to_path_buf(),
        });
    }
    let mut open = |path: &Path, _writable: bool| {
        super::host_files::open_regular(path, &super::host_files::Rights::Daemon)
    };
    crate::images::resolve(
        crate::images::DiskImage::Path(path.to_path_buf()),
        spec.format,
        true,
        &mut open,
    )
    .map(drop)
    .map_err(|e| DefinitionError::UnusableDisk {
        disk,
        reason: crate::helper::error_chain(&e),
    })
}

/// A D-Bus config value of type `aa{sv}` (Disks, Interfaces) as its dictionaries; any other
/// type is a [`DefinitionError::WrongType`] naming `key`.
pub fn dict_list(
    value: &zbus::OwnedVariant,
    key: &'static str,
) -> Result<Vec<std::collections::HashMap<String, zbus::OwnedVariant>>, DefinitionError> {
    let wrong_type = |found: String| DefinitionError::WrongType {
        key,
        expected: "aa{sv}",
        found,
    };
    let signature = value.value_signature().to_string();
    if signature != "aa{sv}" {
        return Err(wrong_type(signature));
    }
    let cloned = value
        .try_clone()
        .map_err(|_| wrong_type(signature.clone()))?;
    Vec::<std::collections::HashMap<String, zbus::OwnedVariant>>::try_from(cloned)
        .map_err(|_| wrong_type(signature))
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

    fn stored(extra: &str) -> Result<VmDefinition, DefinitionError> {
        VmDefinition::from_toml(
            "a",
            &format!("uuid = \"00000000-0000-0000-0000-000000000000\"\nkernel = \"/k\"\n{extra}"),
        )
    }

    fn owner_of(extra: &str) -> (Option<u32>, Option<u32>) {
        let definition = stored(extra).expect("valid");
        (definition.owner_uid, definition.owner_gid)
    }

    #[test]
    fn owners_are_names_or_numeric_ids() {
        assert_eq!(owner_of(""), (None, None));
        assert_eq!(owner_of("owner = \"root\"\n"), (Some(0), None));
        let daemon = nix::unistd::Group::from_name("daemon")
            .expect("lookup")
            .expect("the daemon group")
            .gid
            .as_raw();
        assert_eq!(
            owner_of("owner = \"nobody:daemon\"\n"),
            (Some(65534), Some(daemon))
        );
        assert_eq!(
            owner_of("owner = \"4321:8765\"\n"),
            (Some(4321), Some(8765))
        );
        // What earlier versions wrote.
        assert_eq!(
            owner_of("owner-uid = 1000\nowner-gid = 100\n"),
            (Some(1000), Some(100))
        );
        assert_eq!(owner_of("owner-gid = 100\n"), (None, Some(100)));
    }

    #[test]
    fn unknown_owners_are_clear_errors() {
        for (owner, expected) in [
            (
                "no-such-user-here",
                "there is no user \"no-such-user-here\"",
            ),
            ("root:no-such-group", "there is no group \"no-such-group\""),
            ("", "must be named"),
            ("root:", "must be named"),
        ] {
            let error = stored(&format!("owner = \"{owner}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{owner:?}: {error}");
        }
        assert_eq!(
            stored("owner = \"root\"\nowner-uid = 0\n"),
            Err(DefinitionError::OwnerTwice)
        );
    }

    #[test]
    fn owners_are_stored_as_ids_and_load_back() {
        let mut definition = stored("").expect("valid");
        for (uid, gid, line) in [
            (Some(1000), Some(100), Some("owner = \"1000:100\"")),
            (Some(1000), None, Some("owner = \"1000\"")),
            (None, Some(100), Some("owner-gid = 100")),
            (None, None, None),
        ] {
            definition.owner_uid = uid;
            definition.owner_gid = gid;
            let text = definition.to_toml().expect("serializes");
            match line {
                Some(line) => assert!(text.contains(line), "{text}"),
                None => assert!(!text.contains("owner"), "{text}"),
            }
            assert_eq!(
                VmDefinition::from_toml("a", &text).as_ref(),
                Ok(&definition)
            );
        }
    }

    #[test]
    fn disk_tables_and_entropy_load_and_store() {
        let definition = stored(
            "entropy = true\n[[disk]]\npath = \"/srv/a.qcow2\"\nformat = \"qcow2\"\nread-only = true\nserial = \"a-1\"\n[[disk]]\npath = \"/srv/b.img\"\n",
        )
        .expect("valid");
        assert!(definition.entropy);
        assert_eq!(definition.disks.len(), 2);
        assert_eq!(definition.disks[0].format, crate::images::DiskFormat::Qcow2);
        assert!(definition.disks[0].read_only && !definition.disks[1].read_only);
        assert_eq!(definition.disks[1].format, crate::images::DiskFormat::Auto);
        let text = definition.to_toml().expect("serializes");
        assert!(text.contains("[[disk]]"), "{text}");
        assert_eq!(VmDefinition::from_toml("a", &text), Ok(definition));

        for (bad, expected) in [
            ("[[disk]]\npath = \"rel.img\"\n", "must be absolute"),
            (
                "[[disk]]\npath = \"/a\"\nformat = \"vmdk\"\n",
                "unknown disk format",
            ),
            ("[[disk]]\npath = \"/a\"\nsize = 3\n", "unknown field"),
            (
                "[[disk]]\npath = \"/a\"\nserial = \"a serial much too long\"\n",
                "serial",
            ),
        ] {
            let error = stored(bad).unwrap_err().to_string();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn interface_tables_load_and_store() {
        let definition = stored(
            "[[interface]]\nswitch = \"uplink\"\n[[interface]]\nmac = \"52:54:00:00:00:09\"\nlocked-lladdr = false\n",
        )
        .expect("valid");
        assert_eq!(definition.interfaces.len(), 2);
        assert_eq!(definition.interfaces[0].switch.as_deref(), Some("uplink"));
        assert!(definition.interfaces[0].locked_lladdr && !definition.interfaces[1].locked_lladdr);
        let config = definition.vm_config();
        assert_eq!(config.interfaces[1].mac.to_string(), "52:54:00:00:00:09");
        // The default MAC follows the UUID.
        assert_eq!(
            config.interfaces[0].mac,
            network::mac_of(&definition.uuid, 0, &definition.interfaces[0])
        );
        let text = definition.to_toml().expect("serializes");
        assert!(text.contains("[[interface]]"), "{text}");
        assert_eq!(VmDefinition::from_toml("a", &text), Ok(definition));
        for (bad, expected) in [
            ("[[interface]]\nbridge = \"br0\"\n", "unknown field"),
            ("[[interface]]\nmac = \"ff:ff:ff:ff:ff:ff\"\n", "unicast"),
            ("[[interface]]\nswitch = \"../x\"\n", "switch name"),
            (&"[[interface]]\n".repeat(5), "at most 4"),
        ] {
            let error = stored(bad).unwrap_err().to_string();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn disk_paths_are_checked_when_defined() {
        let kernel = kernel_file();
        let path = kernel.path().to_str().unwrap();
        let disks = |entries: Vec<HashMap<String, OwnedVariant>>| {
            OwnedVariant::try_from(Variant::from(entries)).expect("owned")
        };
        let entry = |key: &str, value: &str| {
            HashMap::from([(
                key.to_string(),
                OwnedVariant::try_from(Variant::from(value.to_string())).expect("owned"),
            )])
        };
        let create = |value: OwnedVariant| {
            let mut config = config(vec![("Kernel", Variant::from(path))]);
            config.insert("Disks".into(), value);
            VmDefinition::from_dbus("d", &config)
        };
        assert_eq!(
            create(disks(vec![entry("Format", "raw")])),
            Err(DefinitionError::DiskNoPath { disk: 0 })
        );
        assert!(matches!(
            create(disks(vec![entry("Path", "/nonexistent/disk.img")])),
            Err(DefinitionError::UnusableDisk { disk: 0, .. })
        ));
        assert!(matches!(
            create(disks(vec![entry("Path", "disk.img")])),
            Err(DefinitionError::RelativePath { .. })
        ));
        let defined = create(disks(vec![entry("Path", path)])).expect("a raw disk");
        assert_eq!(defined.disks.len(), 1);
        let nine = disks((0..9).map(|_| entry("Path", path)).collect());
        assert!(matches!(create(nine), Err(DefinitionError::Config(_))));
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
