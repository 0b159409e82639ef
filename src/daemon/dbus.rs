//! The org.vmd.vmd1 objects: the manager at /org/vmd/vmd1 and one object per VM. These are
//! thin: they check the caller, translate arguments and errors, and call the manager or VM.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::fdo::DBusProxy;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectPath, OwnedObjectPath, OwnedVariant, interface};

use super::definition::VmDefinition;
use super::errors::VmdError;
use super::manager::Manager;
use super::store::Origin;
use super::vm::{LifecycleError, Property, Vm};

pub const MANAGER_PATH: &str = "/org/vmd/vmd1";
const VM_PATH_PREFIX: &str = "/org/vmd/vmd1/vm";

/// `/org/vmd/vmd1/vm/<name, bus-label escaped>`.
pub fn vm_object_path(name: &str) -> OwnedObjectPath {
    let escaped = zbus_systemd::bus_label_escape(name);
    // A valid VM name always escapes to a valid path element.
    OwnedObjectPath::try_from(format!("{VM_PATH_PREFIX}/{escaped}")).unwrap_or_else(|_| {
        OwnedObjectPath::from(ObjectPath::from_static_str_unchecked(VM_PATH_PREFIX))
    })
}

/// The caller's uid, from the bus (never from anything the caller says).
async fn caller_uid(header: &Header<'_>, connection: &Connection) -> Result<u32, VmdError> {
    match header.sender() {
        // On a bus, ask the bus daemon.
        Some(sender) if connection.unique_name().is_some() => {
            let dbus = DBusProxy::new(connection).await?;
            dbus.get_connection_unix_user(sender.clone().into())
                .await
                .map_err(|e| VmdError::NotPermitted(format!("cannot tell who is calling: {e}")))
        }
        // Peer to peer (vmd.sock): the socket's credentials.
        _ => connection
            .peer_creds()
            .await
            .ok()
            .and_then(|creds| creds.unix_user_id())
            .ok_or_else(|| VmdError::NotPermitted("cannot tell who is calling".into())),
    }
}

/// Until polkit authorization exists, only root may change anything.
async fn require_root(
    header: &Header<'_>,
    connection: &Connection,
    what: &str,
) -> Result<(), VmdError> {
    match caller_uid(header, connection).await? {
        0 => Ok(()),
        uid => Err(VmdError::NotPermitted(format!(
            "only root may {what} (the caller is uid {uid})"
        ))),
    }
}

impl From<LifecycleError> for VmdError {
    fn from(error: LifecycleError) -> Self {
        match error {
            LifecycleError::InvalidState { .. } => VmdError::InvalidState(error.to_string()),
            LifecycleError::Failed(reason) => VmdError::Failed(reason),
        }
    }
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
    #[zbus(name = "CreateVM", out_args("vm"))]
    async fn create_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        name: String,
        config: HashMap<String, OwnedVariant>,
    ) -> Result<OwnedObjectPath, VmdError> {
        require_root(&header, connection, "create VMs").await?;
        let definition = VmDefinition::from_dbus(&name, &config)
            .map_err(|e| VmdError::InvalidArgument(e.to_string()))?;
        let vm = self.manager.add(definition, Origin::Api).await?;
        Ok(self.manager.object_path(&vm))
    }

    #[zbus(name = "GetVM", out_args("vm"))]
    async fn get_vm(&self, name: String) -> Result<OwnedObjectPath, VmdError> {
        let vm = self.manager.get(&name)?;
        Ok(self.manager.object_path(&vm))
    }

    #[zbus(name = "ListVMs", out_args("vms"))]
    async fn list_vms(&self) -> Vec<(String, String, OwnedObjectPath)> {
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

pub struct VmObject {
    vm: Arc<Vm>,
    manager: Arc<Manager>,
}

impl VmObject {
    pub fn new(vm: Arc<Vm>, manager: Arc<Manager>) -> Self {
        VmObject { vm, manager }
    }
}

#[interface(name = "org.vmd.vmd1.VM")]
impl VmObject {
    async fn start(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        require_root(&header, connection, "start VMs").await?;
        Ok(self.vm.start(&self.manager).await?)
    }

    async fn shutdown(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        require_root(&header, connection, "stop VMs").await?;
        Ok(self.vm.shutdown(&self.manager)?)
    }

    async fn kill(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        require_root(&header, connection, "kill VMs").await?;
        Ok(self.vm.kill()?)
    }

    async fn pause(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        require_root(&header, connection, "pause VMs").await?;
        Ok(self.vm.pause().await?)
    }

    async fn resume(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        require_root(&header, connection, "resume VMs").await?;
        Ok(self.vm.resume().await?)
    }

    async fn remove(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        require_root(&header, connection, "remove VMs").await?;
        self.manager.remove(&self.vm).await
    }

    #[zbus(out_args("console"))]
    async fn open_console(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<zbus::OwnedFd, VmdError> {
        require_root(&header, connection, "open VM consoles").await?;
        Ok(zbus::OwnedFd::from(self.vm.open_console()?))
    }

    #[zbus(property, name = "Name")]
    async fn name(&self) -> String {
        self.vm.name.clone()
    }

    #[zbus(property, name = "UUID")]
    async fn uuid(&self) -> String {
        self.vm.definition().uuid.to_string()
    }

    #[zbus(property, name = "State")]
    async fn state(&self) -> String {
        self.vm.state().as_str().to_string()
    }

    #[zbus(property, name = "Unit")]
    async fn unit(&self) -> String {
        self.vm.unit()
    }

    #[zbus(property, name = "LeaderPID")]
    async fn leader_pid(&self) -> u32 {
        self.vm.leader_pid()
    }

    #[zbus(property, name = "VCPUs")]
    async fn vcpus(&self) -> u32 {
        self.vm.definition().vcpus
    }

    #[zbus(property, name = "MemoryBytes")]
    async fn memory_bytes(&self) -> u64 {
        self.vm.definition().memory_bytes
    }

    #[zbus(property, name = "Kernel")]
    async fn kernel(&self) -> String {
        self.vm.definition().kernel.display().to_string()
    }

    #[zbus(property, name = "Initrd")]
    async fn initrd(&self) -> String {
        self.vm
            .definition()
            .initrd
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    #[zbus(property, name = "Cmdline")]
    async fn cmdline(&self) -> String {
        self.vm.definition().cmdline
    }

    #[zbus(property, name = "Autostart")]
    async fn autostart(&self) -> bool {
        self.vm.definition().autostart
    }

    #[zbus(property, name = "Autostart")]
    async fn set_autostart(
        &mut self,
        value: bool,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        let header =
            header.ok_or_else(|| VmdError::NotPermitted("cannot tell who is calling".into()))?;
        require_root(&header, connection, "change VMs").await?;
        let mut changed = self.vm.definition();
        changed.autostart = value;
        self.manager.save(&self.vm, &changed)?;
        self.vm.set_autostart(value);
        self.manager.announce(&self.vm, vec![Property::Autostart]);
        Ok(())
    }

    #[zbus(property, name = "Restarts")]
    async fn restarts(&self) -> u32 {
        self.vm.restarts()
    }

    #[zbus(property, name = "FailureReason")]
    async fn failure_reason(&self) -> String {
        self.vm.failure_reason()
    }
}
