//! Client proxies for the vmd D-Bus API (`dbus/org.vmd.vmd1.xml`).
//!
//! Only what vmctl calls is declared. Proxies are built without a properties cache (see
//! [`vm`]): vmctl reads a property once, and a cache would subscribe to signals it never uses.

use std::collections::HashMap;

use zbus::{
    Connection, Fd, OwnedFd, OwnedObjectPath, OwnedVariant, Variant, fdo::PropertiesProxy,
    names::InterfaceName, proxy, proxy::CacheProperties,
};

/// The daemon's bus name.
pub const SERVICE: &str = "org.vmd.vmd1";
/// The interface of each VM object.
pub const VM_INTERFACE: &str = "org.vmd.vmd1.VM";

/// `org.vmd.vmd1.Manager` at `/org/vmd/vmd1`.
#[proxy(
    interface = "org.vmd.vmd1.Manager",
    default_service = "org.vmd.vmd1",
    default_path = "/org/vmd/vmd1"
)]
pub trait Manager {
    /// Defines a VM; `config` keys: Kernel s, Initrd s, Cmdline s, VCPUs u, MemoryBytes t. The
    /// daemon opens the Kernel and Initrd paths itself, which it does only for root (or holders
    /// of org.vmd.vmd1.host-files).
    #[zbus(name = "CreateVM", allow_interactive_auth)]
    fn create_vm(
        &self,
        name: &str,
        config: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;

    /// Defines a VM from files the caller opened itself: `config` as for CreateVM but without
    /// Kernel and Initrd; `files` maps `kernel` (required) and `initrd` to read-only fds.
    #[zbus(name = "CreateVMWithFiles", allow_interactive_auth)]
    fn create_vm_with_files(
        &self,
        name: &str,
        config: HashMap<&str, Variant<'_>>,
        files: HashMap<String, Fd<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;

    /// The object path of the VM called `name`.
    #[zbus(name = "GetVM")]
    fn get_vm(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    /// (name, state, object path) of every VM, sorted by name.
    #[zbus(name = "ListVMs")]
    fn list_vms(&self) -> zbus::Result<Vec<(String, String, OwnedObjectPath)>>;

    /// Re-reads /etc/vmd/vms: the names added, changed and removed.
    #[zbus(allow_interactive_auth)]
    fn reload(&self) -> zbus::Result<(Vec<String>, Vec<String>, Vec<String>)>;

    /// Defines a VM from a whole definition (TOML, vmd.toml(5), with its `name`).
    #[zbus(name = "DefineVM", allow_interactive_auth)]
    fn define_vm(&self, toml: &str) -> zbus::Result<OwnedObjectPath>;
}

/// `org.vmd.vmd1.VM` at `/org/vmd/vmd1/vm/<escaped name>`.
#[proxy(interface = "org.vmd.vmd1.VM", default_service = "org.vmd.vmd1")]
pub trait Vm {
    /// Starts the VM.
    #[zbus(allow_interactive_auth)]
    fn start(&self) -> zbus::Result<()>;

    /// Asks the guest to power off.
    #[zbus(allow_interactive_auth)]
    fn shutdown(&self) -> zbus::Result<()>;

    /// Stops the VM at once.
    #[zbus(allow_interactive_auth)]
    fn kill(&self) -> zbus::Result<()>;

    /// Pauses the vCPUs.
    #[zbus(allow_interactive_auth)]
    fn pause(&self) -> zbus::Result<()>;

    /// Resumes the vCPUs.
    #[zbus(allow_interactive_auth)]
    fn resume(&self) -> zbus::Result<()>;

    /// Forgets the VM and its stored definition.
    #[zbus(allow_interactive_auth)]
    fn remove(&self) -> zbus::Result<()>;

    /// Asks the guest to reboot.
    #[zbus(allow_interactive_auth)]
    fn reboot(&self) -> zbus::Result<()>;

    /// Resets the VM at once.
    #[zbus(allow_interactive_auth)]
    fn reset(&self) -> zbus::Result<()>;

    /// A terminal fd on the guest's console; refused with ConsoleBusy while another client
    /// has it.
    #[zbus(allow_interactive_auth)]
    fn open_console(&self) -> zbus::Result<OwnedFd>;

    /// As OpenConsole, taking the console over from the client that has it.
    #[zbus(allow_interactive_auth)]
    fn open_console_force(&self) -> zbus::Result<OwnedFd>;

    /// Changes settings of the defined VM (config keys as for CreateVM).
    #[zbus(allow_interactive_auth)]
    fn update(&self, config: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    /// Whether vmd starts the VM when it starts.
    #[zbus(property)]
    fn autostart(&self) -> zbus::Result<bool>;

    /// Sets Autostart.
    #[zbus(property)]
    fn set_autostart(&self, on: bool) -> zbus::Result<()>;

    /// defined, starting, running, paused, stopping, stopped or failed.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;

    /// Why the VM failed, when `State` is `failed`.
    #[zbus(property)]
    fn failure_reason(&self) -> zbus::Result<String>;
}

/// The manager object.
pub async fn manager(conn: &Connection) -> zbus::Result<ManagerProxy<'static>> {
    ManagerProxy::builder(conn)
        .cache_properties(CacheProperties::No)
        .build()
        .await
}

/// The VM object at `path`.
pub async fn vm(conn: &Connection, path: OwnedObjectPath) -> zbus::Result<VmProxy<'static>> {
    VmProxy::builder(conn)
        .path(path)
        .cache_properties(CacheProperties::No)
        .build()
        .await
}

/// Every `org.vmd.vmd1.VM` property of the VM at `path`, in one call: this is also how vmctl
/// reads properties that a daemon may not have (`Owner`).
pub async fn vm_properties(conn: &Connection, path: OwnedObjectPath) -> zbus::Result<VmProperties> {
    let properties = PropertiesProxy::builder(conn)
        .destination(SERVICE)
        .path(path)
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    properties
        .get_all(InterfaceName::from_static_str_unchecked(VM_INTERFACE))
        .await
        .map(VmProperties)
        .map_err(zbus::Error::from)
}

/// One VM as [`list`] finds it.
#[derive(Debug)]
pub struct Listed {
    pub name: String,
    pub path: OwnedObjectPath,
    pub properties: VmProperties,
    /// The `ID` property; where the daemon has none, the position in name order (1-based).
    pub id: u32,
}

impl Listed {
    /// `State`.
    pub fn state(&self) -> &str {
        self.properties.str("State").unwrap_or("unknown")
    }
}

/// Every VM with its properties, sorted by name: one `GetManagedObjects` call where the daemon
/// is an ObjectManager, else `ListVMs` and a `GetAll` per VM (a VM removed meanwhile is left
/// out).
pub async fn list(conn: &Connection) -> zbus::Result<Vec<Listed>> {
    let objects = zbus::fdo::ObjectManagerProxy::builder(conn)
        .destination(SERVICE)
        .path("/org/vmd/vmd1")
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    let mut vms: Vec<(String, OwnedObjectPath, VmProperties)> =
        match objects.get_managed_objects().await {
            Ok(objects) => objects
                .into_iter()
                .filter_map(|(path, mut interfaces)| {
                    let properties = interfaces.remove(VM_INTERFACE)?;
                    let properties = VmProperties(properties);
                    let name = properties.str("Name")?.to_owned();
                    Some((name, path, properties))
                })
                .collect(),
            Err(error) if crate::error::is_unknown_method(&error.clone().into()) => {
                let mut vms = Vec::new();
                for (name, _, path) in manager(conn).await?.list_vms().await? {
                    match vm_properties(conn, path.clone()).await {
                        Ok(properties) => vms.push((name, path, properties)),
                        Err(error) if crate::error::is_gone(&error) => {}
                        Err(error) => return Err(error),
                    }
                }
                vms
            }
            Err(error) => return Err(error.into()),
        };
    vms.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vms
        .into_iter()
        .enumerate()
        .map(|(index, (name, path, properties))| Listed {
            id: properties
                .u32("ID")
                .unwrap_or(u32::try_from(index + 1).unwrap_or(u32::MAX)),
            name,
            path,
            properties,
        })
        .collect())
}

/// A VM's properties by name, as `GetAll` gave them.
#[derive(Debug, Default)]
pub struct VmProperties(pub HashMap<String, OwnedVariant>);

impl VmProperties {
    /// A string property; `None` if missing or of another type.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .and_then(|value| <&str>::try_from(value).ok())
    }

    /// A `u` property; `None` if missing or of another type.
    pub fn u32(&self, name: &str) -> Option<u32> {
        self.0.get(name).and_then(|value| u32::try_from(value).ok())
    }

    /// The `Disks` property (`aa{sv}`), one map per disk; `None` if missing or of another
    /// type.
    pub fn disks(&self) -> Option<Vec<HashMap<String, OwnedVariant>>> {
        self.maps("Disks")
    }

    /// The `Interfaces` property (`aa{sv}`), one map per interface; `None` if missing or of
    /// another type.
    pub fn interfaces(&self) -> Option<Vec<HashMap<String, OwnedVariant>>> {
        self.maps("Interfaces")
    }

    fn maps(&self, name: &str) -> Option<Vec<HashMap<String, OwnedVariant>>> {
        let value = self.0.get(name)?.try_clone().ok()?;
        Vec::<HashMap<String, OwnedVariant>>::try_from(value).ok()
    }

    /// A `t` property; `None` if missing or of another type.
    pub fn u64(&self, name: &str) -> Option<u64> {
        self.0.get(name).and_then(|value| u64::try_from(value).ok())
    }

    /// A `b` property; `None` if missing or of another type.
    pub fn bool(&self, name: &str) -> Option<bool> {
        self.0
            .get(name)
            .and_then(|value| bool::try_from(value).ok())
    }
}
