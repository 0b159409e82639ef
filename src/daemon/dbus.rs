//! The org.vmd.vmd1 objects: the manager at /org/vmd/vmd1 here, and one object per VM in
//! [`super::dbus_vm`]. These are thin: they check the caller, translate arguments and errors,
//! and call the manager or VM.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectPath, OwnedObjectPath, OwnedVariant, interface};

use super::authority::{self, Action, Caller};
pub use super::dbus_vm::VmObject;
use super::definition::{DefinitionError, VmDefinition};
use super::disks::{self, DiskSource, DiskSpec, PassedDisk};
use super::errors::VmdError;
use super::files::{check_passed_file, copy_passed_file};
use super::manager::Manager;
use super::store::Origin;
use super::vm::LifecycleError;
use super::{network, switches};
use crate::images::DiskFormat;
use crate::protocol::FdName;

pub const MANAGER_PATH: &str = "/org/vmd/vmd1";
/// How long Kill waits for the VM to have stopped.
pub(super) const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
const VM_PATH_PREFIX: &str = "/org/vmd/vmd1/vm";

/// `/org/vmd/vmd1/vm/<name, bus-label escaped>`.
pub fn vm_object_path(name: &str) -> OwnedObjectPath {
    let escaped = zbus_systemd::bus_label_escape(name);
    // A valid VM name always escapes to a valid path element.
    OwnedObjectPath::try_from(format!("{VM_PATH_PREFIX}/{escaped}")).unwrap_or_else(|_| {
        OwnedObjectPath::from(ObjectPath::from_static_str_unchecked(VM_PATH_PREFIX))
    })
}

impl From<LifecycleError> for VmdError {
    fn from(error: LifecycleError) -> Self {
        match error {
            LifecycleError::InvalidState { .. } => VmdError::InvalidState(error.to_string()),
            // Gone as far as callers can tell.
            LifecycleError::Removed { .. } => VmdError::NoSuchVM(error.to_string()),
            LifecycleError::DiskBusy(reason) => VmdError::DiskBusy(reason),
            LifecycleError::ConsoleBusy(reason) => VmdError::ConsoleBusy(reason),
            LifecycleError::Failed(reason) => VmdError::Failed(reason),
        }
    }
}

/// Runs file work that can block (opening host paths, reading and copying passed fds) on
/// tokio's blocking pool: a file that never answers (a stalled FUSE or network mount) then
/// holds a thread of that pool, not the runtime's thread, which the other calls and the
/// watchdog need.
pub(super) async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, VmdError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| VmdError::Failed(format!("a file operation did not complete: {e}")))
}

pub(super) fn invalid(error: DefinitionError) -> VmdError {
    VmdError::InvalidArgument(error.to_string())
}

/// A VM created by someone other than root belongs to them; only root may give a VM to
/// someone else, and an owner group must be one of the caller's.
fn set_owner(caller: &Caller, definition: &mut VmDefinition) -> Result<(), VmdError> {
    if caller.is_root() {
        return Ok(());
    }
    if definition.owner_uid.is_some_and(|uid| uid != caller.uid) {
        return Err(VmdError::NotPermitted(
            "only root may create a VM owned by another user".into(),
        ));
    }
    if let Some(gid) = definition.owner_gid
        && !caller.groups.contains(&gid)
    {
        return Err(VmdError::NotPermitted(format!(
            "the owner group ({}) must be one of your groups",
            authority::group_name(gid)
        )));
    }
    definition.owner_uid = Some(caller.uid);
    Ok(())
}

/// Pairs CreateVMWithFiles' `disk<i>` files with the `Disks` entries: disk `i` is entry `i`
/// (defaults when there are fewer entries) with file `disk<i>`. Every disk needs its file, and
/// no entry may name a path. Returns each disk's fd and whether it is read-only.
fn take_passed_disks(
    definition: &mut VmDefinition,
    files: &mut HashMap<String, zbus::OwnedFd>,
) -> Result<Vec<(OwnedFd, bool)>, DefinitionError> {
    if let Some(disk) = definition
        .disks
        .iter()
        .position(|d| !d.shown_path().as_os_str().is_empty())
    {
        return Err(DefinitionError::DiskPathWithFiles { disk });
    }
    let highest_file = files
        .keys()
        .filter_map(|name| match FdName::parse(name) {
            Some(FdName::Disk(index)) => Some(usize::from(index) + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    while definition.disks.len() < highest_file {
        definition.disks.push(DiskSpec {
            source: DiskSource::Path(Default::default()),
            format: DiskFormat::Auto,
            read_only: false,
            serial: String::new(),
        });
    }
    definition.vm_config().validate()?;
    definition
        .disks
        .iter()
        .enumerate()
        .map(|(disk, spec)| {
            let fd = files
                .remove(&FdName::Disk(disk as u8).to_string())
                .ok_or(DefinitionError::DiskNoFile { disk })?;
            Ok((OwnedFd::from(fd), spec.read_only))
        })
        .collect()
}

/// The daemon opens host paths only for callers who could be trusted with its rights.
pub(super) async fn authorize_host_paths(
    manager: &Manager,
    caller: &Caller,
    name: &str,
) -> Result<(), VmdError> {
    authority::authorize(manager.bus(), caller, Action::HostFiles, Some(name))
        .await
        .map_err(|_| {
            VmdError::NotPermitted(format!(
                "vmd opens kernel, initrd and disk paths only for root or holders of {}; \
                 pass your own fds with CreateVMWithFiles instead",
                Action::HostFiles.id()
            ))
        })
}

/// A non-root caller may name only themselves as the owner, and only a group of their own.
pub(super) fn check_owner_change(
    caller: &Caller,
    definition: &VmDefinition,
) -> Result<(), VmdError> {
    if caller.is_root() {
        return Ok(());
    }
    if definition.owner_uid != Some(caller.uid) {
        return Err(VmdError::NotPermitted(
            "only root may give a VM to another user".into(),
        ));
    }
    set_owner(caller, &mut definition.clone())
}

pub struct ManagerObject {
    manager: Arc<Manager>,
}

impl ManagerObject {
    pub fn new(manager: Arc<Manager>) -> Self {
        ManagerObject { manager }
    }
}

#[interface(name = "org.vmd.vmd1.Manager")]
impl ManagerObject {
    /// Defines a VM from a{sv} config keys.
    /// Polkit: org.vmd.vmd1.create, and org.vmd.vmd1.host-files for its paths (root passes);
    /// org.vmd.vmd1.network for a switch outside the caller's groups.
    #[zbus(name = "CreateVM", out_args("vm"))]
    async fn create_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        name: String,
        config: HashMap<String, OwnedVariant>,
    ) -> Result<OwnedObjectPath, VmdError> {
        let caller = authority::identify(&header, connection).await?;
        authority::authorize(self.manager.bus(), &caller, Action::Create, Some(&name)).await?;
        let definition = VmDefinition::parse_dbus(&name, &config).map_err(invalid)?;
        switches::authorize_all(self.manager.bus(), &caller, &name, &definition.interfaces).await?;
        authorize_host_paths(&self.manager, &caller, &name).await?;
        if definition.kernel.as_os_str().is_empty() {
            return Err(invalid(DefinitionError::NoKernel));
        }
        let mut definition = off_runtime(move || definition.validate().map(|()| definition))
            .await?
            .map_err(invalid)?;
        set_owner(&caller, &mut definition)?;
        let vm = self.manager.add(definition, Origin::Api).await?;
        Ok(self.manager.object_path(&vm))
    }

    /// As CreateVM, with the kernel and initrd as fds the caller opened itself.
    /// Polkit: org.vmd.vmd1.create (root passes); org.vmd.vmd1.network for a switch outside
    /// the caller's groups.
    #[zbus(name = "CreateVMWithFiles", out_args("vm"))]
    async fn create_vm_with_files(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        name: String,
        config: HashMap<String, OwnedVariant>,
        mut files: HashMap<String, zbus::OwnedFd>,
    ) -> Result<OwnedObjectPath, VmdError> {
        let caller = authority::identify(&header, connection).await?;
        authority::authorize(self.manager.bus(), &caller, Action::Create, Some(&name)).await?;
        let mut definition = VmDefinition::parse_dbus(&name, &config).map_err(invalid)?;
        for (key, what) in [("Kernel", "kernel"), ("Initrd", "initrd")] {
            if config.contains_key(key) {
                return Err(invalid(DefinitionError::PathWithFiles(what)));
            }
        }
        if let Some(unknown) = files.keys().find(|k| {
            !matches!(
                FdName::parse(k),
                Some(FdName::Kernel | FdName::Initrd | FdName::Disk(_) | FdName::Net(_))
            )
        }) {
            return Err(invalid(DefinitionError::UnknownFile(unknown.clone())));
        }
        let passed_disks = take_passed_disks(&mut definition, &mut files).map_err(invalid)?;
        network::take_passed(&mut definition.interfaces, &mut files).map_err(invalid)?;
        network::validate(&definition.interfaces).map_err(invalid)?;
        switches::authorize_all(self.manager.bus(), &caller, &name, &definition.interfaces).await?;
        let kernel = OwnedFd::from(
            files
                .remove("kernel")
                .ok_or_else(|| invalid(DefinitionError::NoKernel))?,
        );
        let initrd = files.remove("initrd").map(OwnedFd::from);
        // Check every fd before anything is written.
        let (kernel, initrd, passed_disks) = off_runtime(move || {
            let passed_disks = passed_disks
                .into_iter()
                .enumerate()
                .map(|(index, (fd, read_only))| {
                    disks::check_passed(index, &fd, read_only).map(|location| PassedDisk {
                        fd: Some(Arc::new(fd)),
                        location,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let kernel_size = check_passed_file("kernel", kernel.as_fd())?;
            let initrd = initrd
                .map(|fd| check_passed_file("initrd", fd.as_fd()).map(|size| (fd, size)))
                .transpose()?;
            Ok(((kernel, kernel_size), initrd, passed_disks))
        })
        .await?
        .map_err(invalid)?;
        for (spec, passed) in definition.disks.iter_mut().zip(passed_disks) {
            spec.source = DiskSource::Passed(passed);
        }
        // Fails early without copying; Manager::add decides for good, under its lock.
        if self.manager.get(&name).is_ok() {
            return Err(VmdError::VMExists(format!(
                "a VM named {name:?} exists already"
            )));
        }
        set_owner(&caller, &mut definition)?;
        let uuid = definition.uuid;
        let dir = self.manager.store().files_dir(&uuid);
        let copied = off_runtime(move || {
            let (kernel, kernel_size) = kernel;
            definition.kernel =
                copy_passed_file("kernel", kernel.as_fd(), kernel_size, &dir.join("kernel"))?;
            definition.initrd = initrd
                .map(|(fd, size)| copy_passed_file("initrd", fd.as_fd(), size, &dir.join("initrd")))
                .transpose()?;
            definition.validate().map(|()| definition)
        })
        .await
        .and_then(|copied| copied.map_err(invalid));
        let definition = match copied {
            Ok(definition) => definition,
            Err(err) => {
                self.manager.store().remove_files(&uuid);
                return Err(err);
            }
        };
        match self.manager.add(definition, Origin::Api).await {
            Ok(vm) => {
                super::notify::store_passed_disks(&vm.name, &vm.definition().disks);
                Ok(self.manager.object_path(&vm))
            }
            Err(err) => {
                self.manager.store().remove_files(&uuid);
                Err(err)
            }
        }
    }

    /// Defines a VM from a whole definition: the TOML of a definition file, with the VM's
    /// `name` (and `uuid` optional). Stored as vmd's own (/var/lib/vmd/vms); refused if the name
    /// exists. Paths need what CreateVM's need.
    /// Polkit: org.vmd.vmd1.create, and org.vmd.vmd1.host-files for its paths (root passes);
    /// org.vmd.vmd1.network for a switch outside the caller's groups.
    #[zbus(name = "DefineVM", out_args("vm"))]
    async fn define_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        definition: String,
    ) -> Result<OwnedObjectPath, VmdError> {
        let caller = authority::identify(&header, connection).await?;
        let mut definition = VmDefinition::from_named_toml(&definition).map_err(invalid)?;
        let name = definition.name.clone();
        authority::authorize(self.manager.bus(), &caller, Action::Create, Some(&name)).await?;
        switches::authorize_all(self.manager.bus(), &caller, &name, &definition.interfaces).await?;
        authorize_host_paths(&self.manager, &caller, &name).await?;
        if self.manager.get(&name).is_ok() {
            return Err(VmdError::VMExists(format!(
                "a VM named {name:?} exists already"
            )));
        }
        // A definition copied from another VM must not share its UUID.
        if self
            .manager
            .all()
            .iter()
            .any(|vm| vm.definition().uuid == definition.uuid)
        {
            definition.uuid = uuid::Uuid::new_v4();
        }
        let mut definition = off_runtime(move || definition.validate().map(|()| definition))
            .await?
            .map_err(invalid)?;
        set_owner(&caller, &mut definition)?;
        let vm = self.manager.add(definition, Origin::Api).await?;
        Ok(self.manager.object_path(&vm))
    }

    /// Reads the administrator's definitions (/etc/vmd/vms) again and applies them: new files
    /// define VMs, changed files change their VMs' definitions (used from their next start),
    /// and VMs whose files are gone are removed (a running one stays until it has stopped and
    /// vmd is reloaded again). A file that cannot be used changes nothing and is logged.
    /// Returns the names of the VMs added, changed and removed. `systemctl reload vmd` calls it.
    /// Polkit: org.vmd.vmd1.manage (root passes).
    #[zbus(name = "Reload", out_args("added", "changed", "removed"))]
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(Vec<String>, Vec<String>, Vec<String>), VmdError> {
        let caller = authority::identify(&header, connection).await?;
        authority::authorize(self.manager.bus(), &caller, Action::Manage, None).await?;
        super::notify::reloading();
        let report = self.manager.reload().await;
        super::notify::ready(&self.manager);
        Ok((report.added, report.changed, report.removed))
    }

    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "const"), name = "Version")]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// The least MemoryBytes a VM may have.
    #[zbus(property(emits_changed_signal = "const"), name = "MemoryBytesMin")]
    async fn memory_bytes_min(&self) -> u64 {
        crate::protocol::MIN_MEMORY_BYTES
    }

    /// The most MemoryBytes a VM may have.
    #[zbus(property(emits_changed_signal = "const"), name = "MemoryBytesMax")]
    async fn memory_bytes_max(&self) -> u64 {
        crate::protocol::MAX_MEMORY_BYTES
    }

    /// MemoryBytes must be a multiple of this.
    #[zbus(property(emits_changed_signal = "const"), name = "MemoryBytesAlign")]
    async fn memory_bytes_align(&self) -> u64 {
        crate::protocol::MEMORY_ALIGN_BYTES
    }

    /// The most VCPUs a VM may have (the least is 1).
    #[zbus(property(emits_changed_signal = "const"), name = "VCPUsMax")]
    async fn vcpus_max(&self) -> u32 {
        crate::protocol::MAX_VCPUS
    }

    /// MemoryBytes of a VM whose definition leaves it out.
    #[zbus(property(emits_changed_signal = "const"), name = "DefaultMemoryBytes")]
    async fn default_memory_bytes(&self) -> u64 {
        super::definition::DEFAULT_MEMORY_BYTES
    }

    /// VCPUs of a VM whose definition leaves it out.
    #[zbus(property(emits_changed_signal = "const"), name = "DefaultVCPUs")]
    async fn default_vcpus(&self) -> u32 {
        super::definition::DEFAULT_VCPUS
    }

    /// The object path of the VM with this name.
    /// Polkit: none (anyone may read).
    #[zbus(name = "GetVM", out_args("vm"))]
    async fn get_vm(&self, name: String) -> Result<OwnedObjectPath, VmdError> {
        let vm = self.manager.get(&name)?;
        Ok(self.manager.object_path(&vm))
    }

    /// (name, state, object path) of every VM, sorted by name.
    /// Polkit: none (anyone may read).
    #[zbus(name = "ListVMs", out_args("vms"))]
    async fn list_vms(
        &self,
        // zbus checks a call's signature only for methods with parameters: asking for the
        // header makes it refuse ListVMs with arguments (InvalidArgs), as every other method.
        #[zbus(header)] _header: Header<'_>,
    ) -> Vec<(String, String, OwnedObjectPath)> {
        self.manager
            .all()
            .iter()
            .map(|vm| {
                (
                    vm.name.clone(),
                    vm.state().as_str().to_string(),
                    self.manager.object_path(vm),
                )
            })
            .collect()
    }

    #[zbus(signal, name = "VMAdded")]
    pub async fn vm_added(
        emitter: &SignalEmitter<'_>,
        name: &str,
        vm: ObjectPath<'_>,
    ) -> zbus::Result<()>;

    #[zbus(signal, name = "VMRemoved")]
    pub async fn vm_removed(
        emitter: &SignalEmitter<'_>,
        name: &str,
        vm: ObjectPath<'_>,
    ) -> zbus::Result<()>;
}
