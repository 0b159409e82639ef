//! The org.vmd.vmd1.VM object of each VM: thin, as the manager's ([`super::dbus`]): it checks
//! the caller, translates arguments and errors, and calls the VM.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::{Connection, OwnedVariant, interface};

use super::authority::{self, Action, Caller};
use super::dbus::{KILL_WAIT, authorize_host_paths, check_owner_change, invalid, off_runtime};
use super::errors::VmdError;
use super::host_files::{Rights, UserRights};
use super::manager::Manager;
use super::store::Origin;
use super::vm::{Property, Vm};
use super::{disks, network, switches};

pub struct VmObject {
    vm: Arc<Vm>,
    manager: Arc<Manager>,
}

impl VmObject {
    pub fn new(vm: Arc<Vm>, manager: Arc<Manager>) -> Self {
        VmObject { vm, manager }
    }

    /// Root passes; the owner (or a member of the owner group) passes for what is theirs to do
    /// (`owner_may`: every VM method and Autostart); everyone else needs org.vmd.vmd1.manage.
    async fn permit(
        &self,
        header: &Header<'_>,
        connection: &Connection,
        owner_may: bool,
    ) -> Result<Caller, VmdError> {
        let caller = authority::identify(header, connection).await?;
        if owner_may && self.vm.definition().owned_by(caller.uid, &caller.groups) {
            return Ok(caller);
        }
        authority::authorize(
            self.manager.bus(),
            &caller,
            Action::Manage,
            Some(&self.vm.name),
        )
        .await?;
        Ok(caller)
    }

    /// With whose rights a start by `caller` opens the VM's host paths: the daemon's for root
    /// and holders of org.vmd.vmd1.host-files, the caller's own otherwise (no confused deputy:
    /// a path may have been swapped for a symlink since the VM was defined).
    async fn file_rights(&self, caller: &Caller) -> Rights {
        let may_use_host_files = authority::authorize(
            self.manager.bus(),
            &caller.without_interaction(),
            Action::HostFiles,
            Some(&self.vm.name),
        )
        .await
        .is_ok();
        if may_use_host_files {
            Rights::Daemon
        } else {
            Rights::User(UserRights::of_caller(caller))
        }
    }
}

#[interface(name = "org.vmd.vmd1.VM")]
impl VmObject {
    /// Starts the VM; returns once it runs (or failed to start).
    /// Polkit: none for the owner, else org.vmd.vmd1.manage (root passes); its paths are
    /// opened with the caller's own rights unless they hold org.vmd.vmd1.host-files.
    async fn start(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        let caller = self.permit(&header, connection, true).await?;
        let rights = self.file_rights(&caller).await;
        Ok(self.vm.start(&self.manager, rights).await?)
    }

    /// Asks the guest to power off (the ACPI power button); the helper stops it after 30 s if
    /// it has not. Succeeds at once for a VM that is not running.
    /// Polkit: none for the owner, else org.vmd.vmd1.manage (root passes).
    async fn shutdown(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        self.permit(&header, connection, true).await?;
        Ok(self.vm.shutdown(&self.manager)?)
    }

    /// Stops the VM at once; returns when it is stopped. Succeeds at once for a VM that is not
    /// running.
    /// Polkit: none for the owner, else org.vmd.vmd1.manage (root passes).
    async fn kill(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        self.permit(&header, connection, true).await?;
        if !self.vm.state().is_active() {
            return Ok(());
        }
        self.vm.kill()?;
        let state = self
            .vm
            .wait_for_state(KILL_WAIT, |state| !state.is_active())
            .await;
        if state.is_active() {
            return Err(VmdError::Failed(format!(
                "VM {} was killed but is still {} after {} s",
                self.vm.name,
                state.as_str(),
                KILL_WAIT.as_secs()
            )));
        }
        Ok(())
    }

    /// A graceful reboot: presses the ACPI power button, as Shutdown does (the guest sees a
    /// power-button event); once the guest has powered off, or once the helper has stopped it
    /// at the 30 s deadline because it ignored the button, the VM starts again with the same
    /// console (Restarts counts it). The VM stays running meanwhile.
    /// Polkit: none for the owner, else org.vmd.vmd1.manage (root passes).
    async fn reboot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        self.permit(&header, connection, true).await?;
        Ok(self.vm.reboot()?)
    }

    /// A hard reset: the helper resets the VM now (as `machinectl reboot`, SIGINT), without
    /// asking the guest; the VM starts again with the same console (Restarts counts it).
    /// Polkit: none for the owner, else org.vmd.vmd1.manage (root passes).
    async fn reset(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        self.permit(&header, connection, true).await?;
        Ok(self.vm.reset()?)
    }

    /// Stops the guest's vCPUs.
    /// Polkit: none for the owner, else org.vmd.vmd1.manage (root passes).
    async fn pause(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        self.permit(&header, connection, true).await?;
        Ok(self.vm.pause().await?)
    }

    /// Runs the guest's vCPUs again after Pause.
    /// Polkit: none for the owner, else org.vmd.vmd1.manage (root passes).
    async fn resume(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        self.permit(&header, connection, true).await?;
        Ok(self.vm.resume().await?)
    }

    /// Forgets the VM (and its stored definition); it must not be running.
    /// Polkit: none for the owner, else org.vmd.vmd1.manage (root passes).
    async fn remove(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<(), VmdError> {
        self.permit(&header, connection, true).await?;
        self.manager.remove(&self.vm).await
    }

    /// Changes the given keys of the VM's definition (CreateVM's keys but Transient; an empty
    /// Initrd removes it), checked as CreateVM checks them and stored atomically; used from
    /// the VM's next start. Refused (NotPermitted) for the administrator's VMs, and
    /// (InvalidArgument) for bad values; a refusal changes nothing.
    /// Polkit: none for the owner, else org.vmd.vmd1.manage; and org.vmd.vmd1.host-files to
    /// name paths (Kernel, Initrd, Disks) (root passes).
    async fn update(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        config: HashMap<String, OwnedVariant>,
    ) -> Result<(), VmdError> {
        let caller = self.permit(&header, connection, true).await?;
        if self.vm.origin == Origin::Admin {
            return Err(VmdError::NotPermitted(format!(
                "VM {} is defined by the administrator in /etc/vmd/vms; change it there",
                self.vm.name
            )));
        }
        if config.contains_key("Transient") {
            return Err(VmdError::InvalidArgument(
                "Transient cannot be changed; define the VM anew".into(),
            ));
        }
        let mut definition = self.vm.definition();
        definition.apply_dbus(&config).map_err(invalid)?;
        if ["Kernel", "Initrd", "Disks"]
            .iter()
            .any(|key| config.contains_key(*key))
        {
            authorize_host_paths(&self.manager, &caller, &self.vm.name).await?;
        }
        if config.contains_key("Interfaces") {
            switches::authorize_all(
                self.manager.bus(),
                &caller,
                &self.vm.name,
                &definition.interfaces,
            )
            .await?;
        }
        if config.contains_key("Owner") {
            check_owner_change(&caller, &definition)?;
        }
        let definition = off_runtime(move || definition.validate().map(|()| definition))
            .await?
            .map_err(invalid)?;
        self.manager.redefine(&self.vm, definition)
    }

    /// A socket fd relayed to the console: reads the guest's output, writes its input. One
    /// client at a time: ConsoleBusy, naming who holds it, while another client's fd is open.
    /// Polkit: none for the owner, else org.vmd.vmd1.manage (root passes).
    #[zbus(out_args("console"))]
    async fn open_console(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<zbus::OwnedFd, VmdError> {
        let caller = self.permit(&header, connection, true).await?;
        let fd = self.vm.open_console(caller.describe(), false).await?;
        Ok(zbus::OwnedFd::from(fd))
    }

    /// As OpenConsole, taking the console from the client that holds it: that client's fd
    /// reads end of file from then on.
    /// Polkit: none for the owner, else org.vmd.vmd1.manage (root passes).
    #[zbus(name = "OpenConsoleForce", out_args("console"))]
    async fn open_console_force(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<zbus::OwnedFd, VmdError> {
        let caller = self.permit(&header, connection, true).await?;
        let fd = self.vm.open_console(caller.describe(), true).await?;
        Ok(zbus::OwnedFd::from(fd))
    }

    #[zbus(property(emits_changed_signal = "const"), name = "Name")]
    async fn name(&self) -> String {
        self.vm.name.clone()
    }

    /// A number given when the daemon loaded or created the VM: stable while the daemon runs,
    /// never reused in that run (a daemon restart numbers VMs anew).
    #[zbus(property(emits_changed_signal = "const"), name = "ID")]
    async fn id(&self) -> u32 {
        self.vm.id
    }

    #[zbus(property(emits_changed_signal = "const"), name = "UUID")]
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

    /// One `a{sv}` per disk: Path s, Format s, ReadOnly b, Serial s, Passed b.
    #[zbus(property, name = "Disks")]
    async fn disks(&self) -> Vec<HashMap<String, OwnedVariant>> {
        disks::to_dbus(&self.vm.definition().disks)
    }

    /// One `a{sv}` per interface: Switch s, MAC s, LockedLladdr b, Tap s, Passed b.
    #[zbus(property, name = "Interfaces")]
    async fn interfaces(&self) -> Vec<HashMap<String, OwnedVariant>> {
        let definition = self.vm.definition();
        network::to_dbus(&self.vm.name, &definition.uuid, &definition.interfaces)
    }

    #[zbus(property, name = "Entropy")]
    async fn entropy(&self) -> bool {
        self.vm.definition().entropy
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
        self.permit(&header, connection, true).await?;
        let mut changed = self.vm.definition();
        changed.autostart = value;
        self.manager.save(&self.vm, &changed)?;
        self.vm.set_autostart(value);
        self.manager
            .announce(&self.vm, vec![Property::Autostart], self.vm.snapshot());
        Ok(())
    }

    /// The whole definition, as DefineVM takes it: a definition file's TOML with `name`.
    #[zbus(property, name = "Definition")]
    async fn definition(&self) -> String {
        self.vm.definition().to_named_toml().unwrap_or_default()
    }

    /// `admin` (a file in /etc/vmd/vms: read-only over D-Bus), `vmd` (defined over D-Bus,
    /// stored by vmd: Update changes it) or `transient` (kept in memory until it stops).
    #[zbus(property(emits_changed_signal = "const"), name = "DefinitionSource")]
    async fn definition_source(&self) -> String {
        match self.vm.origin {
            Origin::Admin => "admin",
            Origin::Api if self.vm.definition().transient => "transient",
            Origin::Api => "vmd",
        }
        .to_string()
    }

    #[zbus(property, name = "Owner")]
    async fn owner(&self) -> String {
        self.vm.definition().owner()
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
