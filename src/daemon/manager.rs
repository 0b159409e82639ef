//! The set of VMs and everything they share: the bus connections they are served on, the
//! definition store and the helper launcher. Property changes of VMs are announced on every
//! connection from one task, so lifecycle code never waits on D-Bus.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use zbus::fdo::ObjectManager;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath};

/// The VM objects' interface, as PropertiesChanged names it.
pub(crate) const VM_INTERFACE: InterfaceName<'static> =
    InterfaceName::from_static_str_unchecked("org.vmd.vmd1.VM");

mod announce;
mod reload;
pub use reload::ReloadReport;

use super::dbus::{MANAGER_PATH, ManagerObject, VmObject, vm_object_path};
use super::definition::VmDefinition;
use super::errors::VmdError;
use super::host_files::Rights;
use super::notify;
use super::read_only::ReadOnlyChecked;
use super::scope::Scopes;
use super::state_file::{StateFiles, StateRecord};
use super::store::{Origin, Store};
use super::vm::{Change, LifecycleError, Property, Shown, Vm, VmState};
use crate::helper::error_chain;
use crate::launch::Launcher;

pub struct Manager {
    /// The system bus: systemd, machined, and the service name.
    bus: Connection,
    /// The VMs' scopes, through systemd on `bus`.
    scopes: Scopes,
    /// Connections the objects are served on: the system bus and peer-to-peer clients of
    /// vmd.sock.
    servers: Mutex<Vec<Connection>>,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    store: Store,
    /// Each VM's last state, for the next daemon.
    states: StateFiles,
    launcher: Launcher,
    changes: mpsc::UnboundedSender<Change>,
    /// Held by a reload, so that two never interleave.
    reloading: tokio::sync::Mutex<()>,
    /// The ID the next VM gets (IDs are never reused while the daemon runs).
    next_id: AtomicU32,
}

impl Manager {
    pub fn new(
        bus: Connection,
        scopes: Scopes,
        store: Store,
        states: StateFiles,
        launcher: Launcher,
    ) -> Arc<Manager> {
        let (changes, receiver) = mpsc::unbounded_channel();
        let manager = Arc::new(Manager {
            bus,
            scopes,
            servers: Mutex::new(Vec::new()),
            vms: Mutex::new(BTreeMap::new()),
            store,
            states,
            launcher,
            changes,
            reloading: tokio::sync::Mutex::new(()),
            next_id: AtomicU32::new(1),
        });
        tokio::spawn(announce::announce_changes(
            Arc::downgrade(&manager),
            receiver,
        ));
        manager
    }

    pub fn bus(&self) -> &Connection {
        &self.bus
    }

    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }

    pub fn launcher(&self) -> &Launcher {
        &self.launcher
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn vms(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Vm>>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn servers(&self) -> Vec<Connection> {
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn get(&self, name: &str) -> Result<Arc<Vm>, VmdError> {
        self.vms()
            .get(name)
            .cloned()
            .ok_or_else(|| VmdError::no_such_vm(name))
    }

    pub fn all(&self) -> Vec<Arc<Vm>> {
        self.vms().values().cloned().collect()
    }

    /// (VMs, of which running or paused), for the service status.
    pub fn counts(&self) -> (usize, usize) {
        let vms = self.vms();
        let running = vms
            .values()
            .filter(|vm| matches!(vm.state(), VmState::Running | VmState::Paused))
            .count();
        (vms.len(), running)
    }

    /// A connection builder that serves the manager and every current VM from the start. No
    /// ObjectManager yet: it would announce every VM with InterfacesAdded as the connection
    /// starts, before a bus-minded client (busctl, gdbus) has its answer to Hello, which such a
    /// client takes for a broken connection (see `serve_object_manager`).
    pub fn serving<'a>(
        self: &Arc<Self>,
        builder: zbus::connection::Builder<'a>,
    ) -> zbus::connection::Builder<'a> {
        let mut builder = builder.serve_at(
            MANAGER_PATH,
            ReadOnlyChecked(ManagerObject::new(self.clone())),
        );
        for vm in self.all() {
            builder = builder.serve_at(
                vm_object_path(&vm.name),
                ReadOnlyChecked(VmObject::new(vm, self.clone())),
            );
        }
        builder
    }

    /// Serves the manager and every VM on `connection` from now on (what it serves already
    /// stays as it is), and announces changes there.
    pub async fn serve_on(self: &Arc<Self>, connection: Connection) -> zbus::Result<()> {
        {
            let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
            servers.retain(|c| !c.is_closed());
            servers.push(connection.clone());
        }
        // Includes VMs added while the connection was being set up.
        let server = connection.object_server();
        server
            .at(
                MANAGER_PATH,
                ReadOnlyChecked(ManagerObject::new(self.clone())),
            )
            .await?;

        for vm in self.all() {
            server
                .at(
                    vm_object_path(&vm.name),
                    ReadOnlyChecked(VmObject::new(vm, self.clone())),
                )
                .await?;
        }
        Ok(())
    }

    /// Serves org.freedesktop.DBus.ObjectManager at /org/vmd/vmd1 on `connection`: every VM
    /// object is below it, so zbus answers GetManagedObjects and sends InterfacesAdded and
    /// InterfacesRemoved as VM objects come and go.
    pub async fn serve_object_manager(connection: &Connection) -> zbus::Result<()> {
        connection
            .object_server()
            .at(MANAGER_PATH, ObjectManager)
            .await
            .map(|_| ())
    }

    /// Adds a VM: stored (unless transient or the administrator's), served, announced.
    pub async fn add(
        self: &Arc<Self>,
        definition: VmDefinition,
        origin: Origin,
    ) -> Result<Arc<Vm>, VmdError> {
        let name = definition.name.clone();
        let vm = {
            let mut vms = self.vms();
            if vms.contains_key(&name) {
                return Err(VmdError::VMExists(format!(
                    "a VM named {name:?} exists already"
                )));
            }
            // Everything that can fail comes before the definition is stored, and storing is
            // the last step that can: a failed creation must leave no file that the next
            // daemon would load.
            let store = origin == Origin::Api && !definition.transient;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let vm = Vm::new(definition, origin, id);
            if store {
                self.store.save(&vm.definition()).map_err(|e| {
                    VmdError::Failed(format!("cannot store the definition: {}", error_chain(&e)))
                })?;
            }
            vms.insert(name.clone(), vm.clone());
            vm
        };
        let path = vm_object_path(&name);
        for connection in self.servers() {
            let served = connection
                .object_server()
                .at(
                    path.clone(),
                    ReadOnlyChecked(VmObject::new(vm.clone(), self.clone())),
                )
                .await;
            if let Err(err) = served {
                tracing::warn!("cannot serve VM {name}: {err}");
            }
            if let Ok(emitter) = SignalEmitter::new(&connection, MANAGER_PATH) {
                let _ = ManagerObject::vm_added(&emitter, &name, path.as_ref()).await;
            }
        }
        notify::status(self);
        Ok(vm)
    }

    /// Forgets a VM that is not running.
    pub async fn remove(&self, vm: &Arc<Vm>) -> Result<(), VmdError> {
        if vm.origin == Origin::Admin {
            return Err(VmdError::NotPermitted(format!(
                "VM {} is defined by the administrator in /etc/vmd/vms; remove it there",
                vm.name
            )));
        }
        // From here on no Start gets through: the helper could not run without a bus object,
        // nor with its copied files deleted under it.
        vm.claim_removal().map_err(|e| match e {
            LifecycleError::InvalidState { .. } => VmdError::InvalidState(format!(
                "VM {} is {}; stop it before removing it",
                vm.name,
                vm.state().as_str()
            )),
            other => other.into(),
        })?;
        if let Err(e) = self.store.remove(&vm.name) {
            vm.release_removal();
            return Err(VmdError::Failed(format!(
                "cannot remove the stored definition: {}",
                error_chain(&e)
            )));
        }
        self.forget(vm).await;
        Ok(())
    }

    /// Takes a VM claimed for removal off the bus, then out of the registry: until then its
    /// name stays taken, so a new VM of the same name cannot be served at the path that is
    /// being removed.
    async fn forget(&self, vm: &Arc<Vm>) {
        let path = vm_object_path(&vm.name);
        for connection in self.servers() {
            let _ = connection
                .object_server()
                .remove::<VmObject, _>(path.clone())
                .await;
            if let Ok(emitter) = SignalEmitter::new(&connection, MANAGER_PATH) {
                let _ = ManagerObject::vm_removed(&emitter, &vm.name, path.as_ref()).await;
            }
        }
        self.vms().remove(&vm.name);
        self.states.remove(&vm.name);
        notify::forget_passed_disks(&vm.name);
        if vm.origin == Origin::Api {
            self.store.remove_files(&vm.definition().uuid);
        }
        notify::status(self);
    }

    /// Gives a VM a changed definition (Update): stored atomically (unless transient), used
    /// from its next start, and announced. Refused for the administrator's VMs.
    pub fn redefine(&self, vm: &Arc<Vm>, definition: VmDefinition) -> Result<(), VmdError> {
        self.save(vm, &definition)?;
        vm.replace_definition(definition);
        self.announce(vm, vec![Property::Definition], vm.snapshot());
        Ok(())
    }

    /// Stores a changed definition (Autostart).
    pub fn save(&self, vm: &Vm, definition: &VmDefinition) -> Result<(), VmdError> {
        if vm.origin == Origin::Admin {
            return Err(VmdError::NotPermitted(format!(
                "VM {} is defined by the administrator in /etc/vmd/vms; change it there",
                vm.name
            )));
        }
        if definition.transient {
            return Ok(());
        }
        self.store.save(definition).map_err(|e| {
            VmdError::Failed(format!("cannot store the definition: {}", error_chain(&e)))
        })
    }

    /// A VM's last helper has ended: transient VMs go away, unless a Start came first.
    pub async fn vm_ended(&self, vm: &Arc<Vm>) {
        if vm.definition().transient && vm.claim_removal().is_ok() {
            self.forget(vm).await;
        }
        notify::status(self);
    }

    /// Queues one PropertiesChanged for `properties` of `vm`, with their values in `shown`,
    /// on every connection.
    pub fn announce(&self, vm: &Arc<Vm>, properties: Vec<Property>, shown: Shown) {
        let _ = self.changes.send(Change {
            vm: vm.clone(),
            properties,
            shown,
        });
    }

    /// Records a VM's new state for the next daemon (transient VMs end with their helper:
    /// nothing to record).
    pub fn record_state(&self, vm: &Vm, shown: &Shown) {
        if vm.definition().transient {
            return;
        }
        self.states.save(
            &vm.name,
            StateRecord::new(shown.state, &shown.failure_reason, shown.restarts),
        );
    }

    /// Loads stored and administrator definitions, each in the state its previous daemon
    /// recorded last when that was stopped or failed (a VM that was running is adopted, or
    /// settled by [`Manager::settle_unadopted`]).
    pub async fn load_definitions(self: &Arc<Self>) {
        for (definition, origin) in self.store.load_all() {
            let name = definition.name.clone();
            match self.add(definition, origin).await {
                Ok(vm) => {
                    let record = self.states.load(&name);
                    if let Some(state) = record.as_ref().and_then(StateRecord::state)
                        && matches!(state, VmState::Stopped | VmState::Failed)
                        && let Some(record) = &record
                    {
                        vm.restore(state, record.failure_reason(), record.restarts());
                    }
                }
                Err(err) => tracing::warn!("cannot load VM {name}: {err}"),
            }
        }
    }

    /// After adoption: a VM recorded as having a helper that did not come back ended while no
    /// daemon watched it. It is shown failed, since how it ended is unknown, and announced.
    pub fn settle_unadopted(self: &Arc<Self>) {
        for vm in self.all() {
            if vm.state().is_active() {
                continue;
            }
            let Some(state) = self.states.load(&vm.name).and_then(|r| r.state()) else {
                continue;
            };
            if !state.is_active() {
                continue;
            }
            tracing::warn!("VM {}: its helper ended while vmd was not running", vm.name);
            vm.restore(
                VmState::Failed,
                "its helper ended while vmd was not running (how is unknown)",
                0,
            );
            let shown = vm.snapshot();
            self.record_state(&vm, &shown);
            self.announce(
                &vm,
                vec![Property::State, Property::FailureReason, Property::Restarts],
                shown,
            );
        }
    }

    /// Starts the Autostart VMs, `parallel` at a time with `delay` between groups (vmd's
    /// staggered start), so a host boot does not start every guest at once.
    pub async fn autostart(self: &Arc<Self>, parallel: usize, delay: Duration) {
        let autostart: Vec<Arc<Vm>> = self
            .all()
            .into_iter()
            .filter(|vm| vm.definition().autostart)
            .collect();
        for (index, group) in autostart.chunks(parallel.max(1)).enumerate() {
            if index > 0 {
                tokio::time::sleep(delay).await;
            }
            let starts = group.iter().map(|vm| {
                let (vm, manager) = (vm.clone(), self.clone());
                tokio::spawn(async move {
                    tracing::info!("autostarting VM {}", vm.name);
                    let rights = Rights::unattended(&vm.definition());
                    if let Err(err) = vm.start(&manager, rights).await {
                        tracing::warn!("cannot autostart VM {}: {err}", vm.name);
                    }
                })
            });
            for start in starts.collect::<Vec<_>>() {
                let _ = start.await;
            }
        }
    }

    pub fn object_path(&self, vm: &Vm) -> OwnedObjectPath {
        vm_object_path(&vm.name)
    }
}
