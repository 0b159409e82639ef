//! One VM as the daemon sees it: its definition, its state, its console, and the supervisor
//! task that runs a helper for it (and a fresh one after each guest reboot). Every change of its
//! state goes through [`lifecycle::transition`], under the runtime lock, and is announced with
//! the other properties it changed in one PropertiesChanged ([`Vm::change`]).

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use super::console::Console;
use super::console_relay::ConsoleClient;
use super::definition::VmDefinition;
use super::disks::{self, DiskOpenError};
use super::host_files::{self, Rights};
use super::lifecycle::{self, Event as Lifecycle, Refused};
use super::manager::Manager;
use super::scope::{self, ScopeRequest};
use super::store::Origin;
use super::{machined, network, notify};
use crate::helper::{EXIT_POWER_OFF, EXIT_REBOOT, error_chain};
use crate::images::FileId;
use crate::launch::{HelperProcess, HelperSpawn};
use crate::protocol::{ControlChannel, Event, HelperFds, Request, RunState, VmConfig};

/// How long a guest gets to power off after `Shutdown` before the helper stops it.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);
/// How long the helper may take from `Start` to `Created`.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// More than this many restarts, each within RESTART_WINDOW of the previous start, stop the VM
/// (OpenBSD vmd's rule).
pub const MAX_QUICK_RESTARTS: u32 = 3;
pub const RESTART_WINDOW: Duration = Duration::from_secs(6);

pub use super::lifecycle::VmState;
/// How long the events a helper sent before it exited may take to arrive after its exit.
const LAST_EVENTS_TIMEOUT: Duration = Duration::from_secs(5);

/// D-Bus properties of a VM, for change notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Property {
    State,
    Unit,
    LeaderPid,
    Restarts,
    FailureReason,
    Autostart,
    /// Everything the definition shows (VCPUs, MemoryBytes, Kernel... Definition).
    Definition,
}

/// What the bus shows of a VM's lifecycle at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub state: VmState,
    pub unit: String,
    pub leader_pid: u32,
    pub restarts: u32,
    pub failure_reason: String,
}

impl Shown {
    /// The properties in which `after` differs from `self`.
    fn changed(&self, after: &Shown) -> Vec<Property> {
        let mut changed = Vec::new();
        if self.state != after.state {
            changed.push(Property::State);
        }
        if self.unit != after.unit {
            changed.push(Property::Unit);
        }
        if self.leader_pid != after.leader_pid {
            changed.push(Property::LeaderPid);
        }
        if self.restarts != after.restarts {
            changed.push(Property::Restarts);
        }
        if self.failure_reason != after.failure_reason {
            changed.push(Property::FailureReason);
        }
        changed
    }
}

/// A change the D-Bus side must announce: `properties` with their values in `shown` (and the
/// definition's Autostart), in one PropertiesChanged.
pub struct Change {
    pub vm: Arc<Vm>,
    pub properties: Vec<Property>,
    pub shown: Shown,
}

/// How a stop was asked for, which decides what a helper's death means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopRequest {
    Shutdown,
    /// A graceful reboot: the guest was asked to power off, and the VM starts again once its
    /// helper ends (whether the guest powered off or was stopped at the deadline).
    Reboot,
    Kill,
}

/// What changes while a VM runs.
#[derive(Default)]
struct Runtime {
    unit: String,
    leader_pid: u32,
    restarts: u32,
    failure_reason: String,
    control: Option<Arc<ControlChannel>>,
    pidfd: Option<Arc<OwnedFd>>,
    stop_request: Option<StopRequest>,
    /// With whose rights the host paths are opened, for this start and its reboots; `None`
    /// when nobody started it just now (an adopted helper's reboot): see `Rights::unattended`.
    file_rights: Option<Rights>,
    /// Claimed by Remove (or by the end of a transient VM): no Start gets through any more.
    removed: bool,
    /// Every file of every disk chain the current helper holds (or is about to), so that a
    /// start refused for a busy image can name the VM that holds it.
    disk_claims: Vec<disks::Claim>,
    /// The last start failed because a disk image was busy.
    disk_busy: bool,
    /// The console, from Start until the VM ends (kept across guest reboots and daemon
    /// restarts).
    console: Option<Arc<Console>>,
    /// The one client the console is relayed to (OpenConsole).
    console_client: Option<ConsoleClient>,
    /// What the guest wrote on its console that nobody read, when the VM ended (its last
    /// words, for `vmctl console` after the fact).
    last_output: Option<Arc<[u8]>>,
}

pub struct Vm {
    pub name: String,
    /// A number the daemon gave the VM when it loaded or created it: stable while the daemon
    /// runs, never given to another VM in that run (vmctl's status table shows it).
    pub id: u32,
    pub origin: Origin,
    definition: Mutex<VmDefinition>,
    runtime: Mutex<Runtime>,
    /// Written only under the runtime lock (see [`Vm::change`]).
    state: watch::Sender<VmState>,
}

/// Errors of lifecycle requests, mapped to D-Bus errors by the caller.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("cannot {what} VM {name}: it is {state} (it must be {needs})")]
    InvalidState {
        name: String,
        state: &'static str,
        what: &'static str,
        needs: &'static str,
    },
    #[error("VM {name} is being removed")]
    Removed { name: String },
    #[error("{0}")]
    ConsoleBusy(String),
    #[error("{0}")]
    DiskBusy(String),
    #[error("{0}")]
    Failed(String),
}

impl Vm {
    pub fn new(definition: VmDefinition, origin: Origin, id: u32) -> Arc<Vm> {
        Arc::new(Vm {
            name: definition.name.clone(),
            id,
            origin,
            definition: Mutex::new(definition),
            runtime: Mutex::new(Runtime::default()),
            state: watch::Sender::new(VmState::Defined),
        })
    }

    /// Shows the VM as its previous daemon last recorded it (stopped or failed, with the
    /// reason), before it is served.
    pub fn restore(&self, state: VmState, failure_reason: &str, restarts: u32) {
        let mut runtime = self.runtime();
        runtime.failure_reason = failure_reason.to_string();
        runtime.restarts = restarts;
        self.state.send_replace(state);
    }

    fn shown(&self, runtime: &Runtime) -> Shown {
        Shown {
            state: *self.state.borrow(),
            unit: runtime.unit.clone(),
            leader_pid: runtime.leader_pid,
            restarts: runtime.restarts,
            failure_reason: runtime.failure_reason.clone(),
        }
    }

    /// What the bus shows of the VM now.
    pub fn snapshot(&self) -> Shown {
        self.shown(&self.runtime())
    }

    /// The one way a VM's lifecycle changes: under the runtime lock, `event` (if any) moves the
    /// state as [`lifecycle::transition`] says, or is refused and nothing changes; `update`
    /// changes the rest. Everything that changed is announced in one PropertiesChanged, and
    /// a new state is recorded for the next daemon.
    fn change(
        self: &Arc<Self>,
        manager: &Manager,
        event: Option<Lifecycle>,
        update: impl FnOnce(&mut Runtime),
    ) -> Result<VmState, Refused> {
        let (before, after) = {
            let mut runtime = self.runtime();
            let before = self.shown(&runtime);
            let state = match event {
                Some(event) => lifecycle::transition(before.state, event)?,
                None => before.state,
            };
            update(&mut runtime);
            self.state.send_replace(state);
            (before, self.shown(&runtime))
        };
        let properties = before.changed(&after);
        if properties.contains(&Property::State) {
            manager.record_state(self, &after);
        }
        if !properties.is_empty() {
            manager.announce(self, properties, after.clone());
        }
        Ok(after.state)
    }

    fn runtime(&self) -> MutexGuard<'_, Runtime> {
        self.runtime.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn definition(&self) -> VmDefinition {
        self.definition
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Gives passed disks their fds back after a daemon restart (from systemd's fd store).
    pub fn attach_passed_disks(&self, fds: std::collections::BTreeMap<usize, OwnedFd>) {
        let mut definition = self.definition.lock().unwrap_or_else(|e| e.into_inner());
        for (index, fd) in fds {
            match definition.disks.get_mut(index).map(|disk| &mut disk.source) {
                Some(disks::DiskSource::Passed(passed)) if passed.fd.is_none() => {
                    passed.fd = Some(Arc::new(fd));
                }
                _ => tracing::warn!(
                    "VM {}: a stored fd for disk {index}, which was not passed: dropped",
                    self.name
                ),
            }
        }
    }

    /// Replaces the definition (Update, Reload): the next start uses it.
    pub fn replace_definition(&self, definition: VmDefinition) {
        *self.definition.lock().unwrap_or_else(|e| e.into_inner()) = definition;
    }

    pub fn set_autostart(&self, autostart: bool) -> VmDefinition {
        let mut definition = self.definition.lock().unwrap_or_else(|e| e.into_inner());
        definition.autostart = autostart;
        definition.clone()
    }

    pub fn state(&self) -> VmState {
        *self.state.borrow()
    }

    pub fn unit(&self) -> String {
        self.runtime().unit.clone()
    }

    pub fn leader_pid(&self) -> u32 {
        self.runtime().leader_pid
    }

    pub fn restarts(&self) -> u32 {
        self.runtime().restarts
    }

    pub fn failure_reason(&self) -> String {
        self.runtime().failure_reason.clone()
    }

    /// The terminal side of the console while the VM has one (from Start until it ends);
    /// once it ended, a pipe with what its guest wrote last that nobody read.
    /// One client at a time (`holder` says who, for the refusal of the next one): another
    /// gets ConsoleBusy, unless it `force`s, which takes the console from the previous client
    /// (whose fd reads end of file from then on).
    pub async fn open_console(
        &self,
        holder: String,
        force: bool,
    ) -> Result<OwnedFd, LifecycleError> {
        let previous = if force {
            self.runtime().console_client.take()
        } else {
            None
        };
        if let Some(previous) = previous {
            tracing::info!(
                "VM {}: the console is taken from {} for {holder}",
                self.name,
                previous.holder
            );
            previous.take_away().await;
        }
        let mut runtime = self.runtime();
        let (console, last_output) = (runtime.console.clone(), runtime.last_output.clone());
        if let (Some(_), Some(client)) = (&console, &runtime.console_client)
            && client.holds()
            && !force
        {
            return Err(LifecycleError::ConsoleBusy(format!(
                "the console of VM {} is in use by {}; take it over with --force",
                self.name, client.holder
            )));
        }
        match (console, last_output) {
            (Some(console), _) => {
                let terminal = console
                    .client_end()
                    .map_err(|e| LifecycleError::Failed(error_chain(&e)))?;
                let (client, fd) = ConsoleClient::start(terminal, holder).map_err(|e| {
                    LifecycleError::Failed(format!("cannot relay the console: {e}"))
                })?;
                if runtime.control.is_some() {
                    notify::store_console_client(&self.name, client.socket());
                }
                // A client that got in during a takeover loses it as well.
                runtime.console_client = Some(client);
                Ok(fd)
            }
            (None, Some(output)) => last_words(&output)
                .map_err(|e| LifecycleError::Failed(format!("cannot open the console: {e}"))),
            (None, None) => Err(self.invalid(
                "open the console of",
                "starting, running, paused or stopping (or to have run)",
            )),
        }
    }

    fn invalid(&self, what: &'static str, needs: &'static str) -> LifecycleError {
        LifecycleError::InvalidState {
            name: self.name.clone(),
            state: self.state().as_str(),
            what,
            needs,
        }
    }

    /// Waits (bounded) until the state satisfies `done`; returns the state then.
    pub async fn wait_for_state(
        &self,
        timeout: Duration,
        done: impl Fn(VmState) -> bool,
    ) -> VmState {
        let mut receiver = self.state.subscribe();
        let _ = tokio::time::timeout(timeout, receiver.wait_for(|s| done(*s))).await;
        self.state()
    }

    /// Claims the VM for a Start, with a console of its own: refused while a helper exists
    /// or once it is being removed. Check and claim happen under the runtime lock, the one
    /// claim_removal decides under, so two Starts cannot both launch and a Remove cannot slip
    /// in between. Returns what the bus showed before.
    fn claim_start(&self, file_rights: Rights) -> Result<Shown, LifecycleError> {
        let mut runtime = self.runtime();
        if runtime.removed {
            return Err(LifecycleError::Removed {
                name: self.name.clone(),
            });
        }
        let before = self.shown(&runtime);
        let state = lifecycle::transition(before.state, Lifecycle::Start)
            .map_err(|_| self.invalid("start", "defined, stopped or failed"))?;
        let console = Console::new().map_err(|e| {
            LifecycleError::Failed(format!("cannot create the console: {}", error_chain(&e)))
        })?;
        runtime.console = Some(Arc::new(console));
        runtime.last_output = None;
        runtime.failure_reason.clear();
        runtime.restarts = 0;
        runtime.stop_request = None;
        runtime.file_rights = Some(file_rights);
        runtime.disk_busy = false;
        self.state.send_replace(state);
        Ok(before)
    }

    /// Claims the VM for removal: refused while a helper exists; once claimed, every Start is
    /// refused (see claim_start), so no helper can run for a VM that is gone.
    pub fn claim_removal(&self) -> Result<(), LifecycleError> {
        let mut runtime = self.runtime();
        if runtime.removed {
            return Err(LifecycleError::Removed {
                name: self.name.clone(),
            });
        }
        if self.state().is_active() {
            return Err(self.invalid("remove", "defined, stopped or failed"));
        }
        runtime.removed = true;
        Ok(())
    }

    /// Gives a removal claim back: the removal failed and the VM stays.
    pub fn release_removal(&self) {
        self.runtime().removed = false;
    }

    /// Starts the VM and returns once it runs (or failed to start). Its host paths are opened
    /// with `file_rights`.
    pub async fn start(
        self: &Arc<Self>,
        manager: &Arc<Manager>,
        file_rights: Rights,
    ) -> Result<(), LifecycleError> {
        let before = self.claim_start(file_rights)?;
        let after = self.snapshot();
        manager.record_state(self, &after);
        manager.announce(self, before.changed(&after), after);
        tokio::spawn(supervise(manager.clone(), self.clone(), None));
        let state = self
            .wait_for_state(CREATE_TIMEOUT * 2, |s| s != VmState::Starting)
            .await;
        match state {
            VmState::Stopped if self.runtime().stop_request == Some(StopRequest::Kill) => Err(
                LifecycleError::Failed(format!("VM {} was killed while it started", self.name)),
            ),
            VmState::Failed if self.runtime().disk_busy => Err(LifecycleError::DiskBusy(format!(
                "VM {} cannot start: {}",
                self.name,
                self.failure_reason()
            ))),
            VmState::Failed => Err(LifecycleError::Failed(format!(
                "VM {} failed to start: {}",
                self.name,
                self.failure_reason()
            ))),
            _ => Ok(()),
        }
    }

    fn send(&self, request: Request) -> Result<(), LifecycleError> {
        let control = self.runtime().control.clone();
        let control = control.ok_or_else(|| self.invalid("reach", "running"))?;
        control.send_request(&request).map_err(|e| {
            LifecycleError::Failed(format!("cannot reach the VM's helper: {}", error_chain(&e)))
        })
    }

    pub async fn pause(&self) -> Result<(), LifecycleError> {
        if self.state() != VmState::Running {
            return Err(self.invalid("pause", "running"));
        }
        self.send(Request::Pause)?;
        self.wait_for_state(Duration::from_secs(10), |s| s != VmState::Running)
            .await;
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), LifecycleError> {
        if self.state() != VmState::Paused {
            return Err(self.invalid("resume", "paused"));
        }
        self.send(Request::Resume)?;
        self.wait_for_state(Duration::from_secs(10), |s| s != VmState::Paused)
            .await;
        Ok(())
    }

    /// Asks the guest to power off; the helper stops it at the deadline, and the daemon kills
    /// the helper if even that does not happen. A VM that is not running (defined, stopped or
    /// failed) is already where Shutdown leads: that succeeds, as `systemctl stop` does.
    pub fn shutdown(self: &Arc<Self>, manager: &Arc<Manager>) -> Result<(), LifecycleError> {
        if !self.state().is_active() {
            return Ok(());
        }
        self.request_shutdown(StopRequest::Shutdown)?;
        // Refused only if the VM ended meanwhile: then there is nothing left to stop.
        let _ = self.change(manager, Some(Lifecycle::Shutdown), |_| {});
        self.kill_if_not_stopped_in_time();
        Ok(())
    }

    /// A graceful reboot: the guest is asked to power off as by Shutdown (the ACPI power
    /// button), and once its helper has ended (the guest powered off, or the helper stopped it
    /// at the deadline because it ignored the button) the VM starts again with the same
    /// console, as after a guest reboot. The VM stays running meanwhile.
    pub fn reboot(self: &Arc<Self>) -> Result<(), LifecycleError> {
        if !matches!(self.state(), VmState::Running | VmState::Paused) {
            return Err(self.invalid("reboot", "running or paused"));
        }
        self.request_shutdown(StopRequest::Reboot)?;
        self.kill_if_not_stopped_in_time();
        Ok(())
    }

    /// A hard reset: the helper resets the VM at once (SIGINT, as `machinectl reboot`); it
    /// ends as after a guest reboot and the VM starts again with the same console.
    pub fn reset(&self) -> Result<(), LifecycleError> {
        let runtime = self.runtime();
        if !matches!(self.state(), VmState::Running | VmState::Paused) {
            return Err(self.invalid("reset", "running or paused"));
        }
        let pidfd = runtime
            .pidfd
            .clone()
            .ok_or_else(|| self.invalid("reset", "running or paused"))?;
        send_signal(&pidfd, libc::SIGINT)
            .map_err(|e| LifecycleError::Failed(format!("cannot reset the VM: {e}")))
    }

    /// Kills the current helper if it still runs well after the shutdown deadline.
    fn kill_if_not_stopped_in_time(self: &Arc<Self>) {
        let vm = self.clone();
        let pidfd = self.runtime().pidfd.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_DEADLINE + Duration::from_secs(10)).await;
            let Some(pidfd) = pidfd else { return };
            let mut runtime = vm.runtime();
            // Only the helper that was asked to shut down, not one started since.
            if runtime
                .pidfd
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, &pidfd))
            {
                tracing::warn!(
                    "VM {}: the guest did not stop within {} s of being asked to; killing it",
                    vm.name,
                    (SHUTDOWN_DEADLINE + Duration::from_secs(10)).as_secs()
                );
                let _ = vm.kill_helper(&mut runtime, &pidfd);
            }
        });
    }

    /// Sends Shutdown to the helper and records that the VM is being stopped (so a guest
    /// reboot now means stopped). A refused or failed request leaves the record as it was.
    fn request_shutdown(&self, request: StopRequest) -> Result<(), LifecycleError> {
        if !matches!(self.state(), VmState::Running | VmState::Paused) {
            return Err(self.invalid("shut down", "running or paused"));
        }
        let (control, previous) = {
            let mut runtime = self.runtime();
            let control = runtime
                .control
                .clone()
                .ok_or_else(|| self.invalid("shut down", "running or paused"))?;
            // Recorded before sending: the helper may exit before send_request returns.
            (control, runtime.stop_request.replace(request))
        };
        let sent = control.send_request(&Request::Shutdown {
            deadline_ms: SHUTDOWN_DEADLINE.as_millis() as u64,
        });
        if let Err(err) = sent {
            let mut runtime = self.runtime();
            // Unless a Kill was recorded meanwhile, which stands.
            if runtime.stop_request == Some(request) {
                runtime.stop_request = previous;
            }
            return Err(LifecycleError::Failed(format!(
                "cannot reach the VM's helper: {}",
                error_chain(&err)
            )));
        }
        Ok(())
    }

    /// SIGKILLs the helper behind `pidfd`, recording the Kill first (its death must not count
    /// as a failure) and taking the record back if the signal cannot be sent. Runs under the
    /// runtime lock, so the supervisor never sees a record that is about to be taken back.
    fn kill_helper(&self, runtime: &mut Runtime, pidfd: &OwnedFd) -> Result<(), LifecycleError> {
        let previous = runtime.stop_request.replace(StopRequest::Kill);
        send_signal(pidfd, libc::SIGKILL).map_err(|e| {
            runtime.stop_request = previous;
            LifecycleError::Failed(format!("cannot kill the VM's helper: {e}"))
        })
    }

    /// Relays again to the console client that was attached when the previous daemon ended:
    /// the one whose socket the client has not hung up.
    fn resume_console_client(
        &self,
        console: &Console,
        sockets: Vec<OwnedFd>,
    ) -> Option<ConsoleClient> {
        let socket = sockets.into_iter().rev().find(|socket| !hung_up(socket))?;
        let resumed = console
            .client_end()
            .map_err(|e| error_chain(&e))
            .and_then(|terminal| {
                ConsoleClient::resume(
                    terminal,
                    socket,
                    "a client attached before vmd restarted".into(),
                )
                .map_err(|e| e.to_string())
            });
        match resumed {
            Ok(client) => Some(client),
            Err(err) => {
                tracing::warn!(
                    "VM {}: cannot relay to its console client again: {err}",
                    self.name
                );
                None
            }
        }
    }

    /// Takes over a helper that a previous daemon started (its control socket, pidfd and
    /// console come back from systemd's fd store).
    pub fn adopt(
        self: &Arc<Self>,
        manager: &Arc<Manager>,
        control: OwnedFd,
        pidfd: OwnedFd,
        console: Option<OwnedFd>,
        console_clients: Vec<OwnedFd>,
    ) -> Result<(), String> {
        let pid = pid_of(&pidfd).ok_or("its helper has already exited")?;
        let console = match console.map(Console::from_master) {
            Some(Ok(console)) => Some(Arc::new(console)),
            Some(Err(err)) => {
                tracing::warn!(
                    "VM {}: cannot take its console back: {}",
                    self.name,
                    error_chain(&err)
                );
                None
            }
            None => {
                tracing::warn!("VM {}: no console was kept for it", self.name);
                None
            }
        };
        let helper = Helper {
            control: Arc::new(ControlChannel::from_fd(control)),
            pidfd: Arc::new(pidfd),
            pid: nix::unistd::Pid::from_raw(pid),
            child: false,
        };
        let console_client = console
            .as_ref()
            .and_then(|console| self.resume_console_client(console, console_clients));
        self.change(manager, Some(Lifecycle::Adopt), |runtime| {
            runtime.control = Some(helper.control.clone());
            runtime.pidfd = Some(helper.pidfd.clone());
            runtime.leader_pid = pid as u32;
            runtime.unit = scope::unit_name(&self.name);
            runtime.console = console;
            runtime.console_client = console_client;
            runtime.stop_request = None;
            runtime.file_rights = None;
        })
        .map_err(|_| format!("VM {} is already {}", self.name, self.state().as_str()))?;
        // Which files it holds, to name it to a start that collides with it: following the
        // chains reads files, so off the runtime's thread.
        let (vm, pidfd) = (self.clone(), helper.pidfd.clone());
        tokio::task::spawn_blocking(move || {
            let definition = vm.definition();
            let claims = disks::claims_of(&definition.disks, &Rights::unattended(&definition));
            let mut runtime = vm.runtime();
            // Unless that helper has ended meanwhile.
            if runtime
                .pidfd
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, &pidfd))
            {
                runtime.disk_claims = claims;
            }
        });
        tokio::spawn(supervise(manager.clone(), self.clone(), Some(helper)));
        Ok(())
    }

    /// Whether this VM's helper holds (or is about to hold) the file `id` in a disk chain.
    pub fn holds_disk_file(&self, id: FileId) -> bool {
        self.runtime()
            .disk_claims
            .iter()
            .any(|claim| claim.id == id)
    }

    /// The first of `wanted` this VM's helper holds in a conflicting way.
    fn conflicting_claim(&self, wanted: &[disks::Claim]) -> Option<FileId> {
        let runtime = self.runtime();
        wanted
            .iter()
            .find(|want| {
                runtime
                    .disk_claims
                    .iter()
                    .any(|held| held.conflicts_with(want))
            })
            .map(|want| want.id)
    }

    /// Kills the helper. Without one yet (starting, or between a guest reboot and the next
    /// helper) the Kill is recorded, and the supervisor kills what it launches, or launches
    /// nothing: the VM ends stopped either way. Under the runtime lock, where the supervisor
    /// records a launched helper, so no helper slips between the two.
    pub fn kill(&self) -> Result<(), LifecycleError> {
        let mut runtime = self.runtime();
        if !self.state().is_active() {
            return Err(self.invalid("kill", "starting, running, paused or stopping"));
        }
        match runtime.pidfd.clone() {
            Some(pidfd) => self.kill_helper(&mut runtime, &pidfd),
            None => {
                runtime.stop_request = Some(StopRequest::Kill);
                Ok(())
            }
        }
    }
}

/// How much of a VM's unread console output is kept when it ends: what a pipe takes without
/// blocking.
const LAST_OUTPUT_BYTES: usize = 60 * 1024;

/// A pipe to read `output` from, then end of file.
fn last_words(output: &[u8]) -> nix::Result<OwnedFd> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // At most LAST_OUTPUT_BYTES: fits in the pipe's buffer, so this never blocks.
    let mut rest = output;
    while !rest.is_empty() {
        let written = nix::unistd::write(&write, rest)?;
        rest = &rest[written..];
    }
    Ok(read)
}

/// The pid behind a pidfd (`Pid:` in its fdinfo; -1 once the process is gone).
fn pid_of(pidfd: &OwnedFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|pid| pid.trim().parse().ok())
        .filter(|&pid: &i32| pid > 0)
}

fn send_signal(pidfd: &OwnedFd, signal: i32) -> nix::Result<()> {
    super::signal::send_signal(pidfd, signal)
}

/// How one helper ended.
#[derive(Debug)]
enum HelperOutcome {
    PowerOff,
    Reboot,
    Stopped,
    Failed(String),
    /// A disk image was busy, so no helper was started.
    DiskBusy(String),
}

/// Runs helpers for `vm` until it stops or fails: a reboot means a fresh helper, unless the
/// guest reboots too quickly too often.
async fn supervise(manager: Arc<Manager>, vm: Arc<Vm>, mut adopted: Option<Helper>) {
    let mut quick_restarts = 0;
    loop {
        let started = Instant::now();
        let killed = vm.runtime().stop_request == Some(StopRequest::Kill);
        let outcome = match adopted.take() {
            Some(helper) => {
                let events = read_events(helper.control.clone());
                // The VM may be paused: ask (an older helper may not know the question).
                let _ = helper.control.send_request(&Request::Query);
                follow_helper(&manager, &vm, &helper, events, true).await
            }
            // Killed between two helpers: no next one.
            None if killed => HelperOutcome::Stopped,
            None => run_helper(&manager, &vm).await,
        };
        notify::forget_vm_fds(&vm.name);
        tracing::debug!("VM {}: helper ended: {outcome:?}", vm.name);
        // A scope whose helper died before systemd moved it there stays active with no task
        // (and would refuse the next start with UnitExists): make sure it goes.
        if let Err(err) = manager.scopes().stop(&vm.name).await {
            tracing::warn!("VM {}: {}", vm.name, error_chain(&err));
        }
        if machined::available(manager.bus()).await {
            machined::wait_until_forgotten(manager.bus(), &vm.name).await;
        }
        // The helper is gone: so must be its locks on passed images, which the daemon's own
        // copies of their descriptions would otherwise keep.
        disks::release_passed(&vm.definition().disks);
        let helper_gone = |runtime: &mut Runtime| {
            runtime.control = None;
            runtime.pidfd = None;
            runtime.leader_pid = 0;
            runtime.unit.clear();
            runtime.disk_claims.clear();
        };
        let stop_request = vm.runtime().stop_request;
        let (state, reason) = match outcome {
            // A Reboot asked the guest to power off: whether it did or was stopped at the
            // deadline, the VM starts again (not counted as a quick restart: it was asked for).
            HelperOutcome::PowerOff | HelperOutcome::Reboot | HelperOutcome::Stopped
                if stop_request == Some(StopRequest::Reboot) =>
            {
                quick_restarts = 0;
                let restarted = vm.change(&manager, Some(Lifecycle::Restart), |runtime| {
                    helper_gone(runtime);
                    runtime.restarts += 1;
                    runtime.stop_request = None;
                });
                if restarted.is_ok() {
                    continue;
                }
                (VmState::Stopped, String::new())
            }
            HelperOutcome::Reboot if stop_request.is_none() => {
                quick_restarts = if started.elapsed() < RESTART_WINDOW {
                    quick_restarts + 1
                } else {
                    0
                };
                if quick_restarts > MAX_QUICK_RESTARTS {
                    (
                        VmState::Stopped,
                        format!(
                            "the guest rebooted more than {MAX_QUICK_RESTARTS} times within {} s of starting; stopped",
                            RESTART_WINDOW.as_secs()
                        ),
                    )
                } else {
                    let restarted = vm.change(&manager, Some(Lifecycle::Restart), |runtime| {
                        helper_gone(runtime);
                        runtime.restarts += 1;
                    });
                    // Refused only while stopping: then the reboot ends the VM.
                    if restarted.is_ok() {
                        continue;
                    }
                    (VmState::Stopped, String::new())
                }
            }
            // Whatever the helper died of, a Kill asked for its death.
            _ if stop_request == Some(StopRequest::Kill)
                && !matches!(outcome, HelperOutcome::DiskBusy(_)) =>
            {
                (VmState::Stopped, String::new())
            }
            HelperOutcome::PowerOff | HelperOutcome::Reboot | HelperOutcome::Stopped => {
                (VmState::Stopped, String::new())
            }
            HelperOutcome::Failed(reason) => (VmState::Failed, reason),
            HelperOutcome::DiskBusy(reason) => {
                vm.runtime().disk_busy = true;
                (VmState::Failed, reason)
            }
        };
        // The one line a failure leaves in vmd's journal.
        if !reason.is_empty() {
            let ended = if state == VmState::Failed {
                "failed"
            } else {
                "stopped"
            };
            tracing::warn!("VM {} {ended}: {reason}", vm.name);
        }
        let failed = state == VmState::Failed;
        let last_output = vm
            .runtime()
            .console
            .as_ref()
            .map(|console| Arc::from(console.take_unread_output(LAST_OUTPUT_BYTES)));
        let ended = vm.change(&manager, Some(Lifecycle::Ended { failed }), |runtime| {
            helper_gone(runtime);
            runtime.failure_reason = reason;
            // The pty goes with the VM (the host's ptys are few); clients holding its
            // terminal see it hang up.
            runtime.console = None;
            runtime.console_client = None;
            runtime.last_output = last_output;
        });
        if let Err(refused) = ended {
            tracing::error!("VM {}: {refused}", vm.name);
        }
        manager.vm_ended(&vm).await;
        return;
    }
}

/// Launches one helper, puts it in its scope, configures it and follows it until it exits.
async fn run_helper(manager: &Arc<Manager>, vm: &Arc<Vm>) -> HelperOutcome {
    let definition = vm.definition();
    // Opening host paths may block on a slow filesystem: off the runtime's thread.
    let launched = {
        let (manager, vm, definition) = (manager.clone(), vm.clone(), definition.clone());
        tokio::task::spawn_blocking(move || launch(&manager, &vm, &definition)).await
    };
    let (launched, config) = match launched {
        Ok(Ok(launched)) => launched,
        Ok(Err(LaunchFailure::DiskBusy(reason))) => return HelperOutcome::DiskBusy(reason),
        Ok(Err(LaunchFailure::Other(reason))) => return HelperOutcome::Failed(reason),
        Err(err) => return HelperOutcome::Failed(format!("the launch failed: {err}")),
    };
    let control = Arc::new(launched.control);
    let pidfd = Arc::new(launched.pidfd);
    let pid = launched.pid;
    // Under the lock Kill decides under: a Kill recorded before is seen here, and one after
    // finds the pidfd.
    let mut killed = false;
    let _ = vm.change(manager, None, |runtime| {
        runtime.control = Some(control.clone());
        runtime.pidfd = Some(pidfd.clone());
        runtime.leader_pid = pid.as_raw() as u32;
        killed = runtime.stop_request == Some(StopRequest::Kill);
    });
    if killed {
        let _ = send_signal(&pidfd, libc::SIGKILL);
        let helper = Helper {
            control,
            pidfd,
            pid,
            child: true,
        };
        let _ = wait_for_exit(&helper).await;
        return HelperOutcome::Stopped;
    }

    let request = ScopeRequest {
        vm_name: &vm.name,
        pid: pid.as_raw() as u32,
        memory_bytes: definition.memory_bytes,
        vcpus: definition.vcpus,
    };
    match manager.scopes().start(&request).await {
        Ok(unit) => {
            let _ = vm.change(manager, None, |runtime| runtime.unit = unit);
        }
        Err(err) => {
            let _ = send_signal(&pidfd, libc::SIGKILL);
            let helper = Helper {
                control,
                pidfd,
                pid,
                child: true,
            };
            let _ = wait_for_exit(&helper).await;
            return HelperOutcome::Failed(format!(
                "cannot create the VM's scope: {}",
                error_chain(&err)
            ));
        }
    }

    // The helper is in its scope: now it may build and run the guest.
    let events = read_events(control.clone());
    let helper = Helper {
        control,
        pidfd,
        pid,
        child: true,
    };
    if let Err(err) = helper.control.send_request(&Request::Start { config }) {
        let _ = send_signal(&helper.pidfd, libc::SIGKILL);
        let _ = wait_for_exit(&helper).await;
        return HelperOutcome::Failed(format!(
            "cannot configure the helper: {}",
            error_chain(&err)
        ));
    }
    follow_helper(manager, vm, &helper, events, false).await
}

/// A helper being followed: launched by this daemon (`child`), or adopted from the fd store
/// after a daemon restart (then its exit status is not ours to read).
struct Helper {
    control: Arc<ControlChannel>,
    pidfd: Arc<OwnedFd>,
    pid: nix::unistd::Pid,
    child: bool,
}

/// Follows a helper's events until it exits; says how it ended.
async fn follow_helper(
    manager: &Arc<Manager>,
    vm: &Arc<Vm>,
    helper: &Helper,
    mut events: mpsc::UnboundedReceiver<Event>,
    mut created: bool,
) -> HelperOutcome {
    let exit = wait_for_exit(helper);
    tokio::pin!(exit);
    let mut last = LastWords::default();
    let create_deadline = tokio::time::sleep(CREATE_TIMEOUT);
    tokio::pin!(create_deadline);
    let status = loop {
        tokio::select! {
            status = &mut exit => break status,
            event = events.recv() => match event {
                Some(event) => handle_event(manager, vm, helper, event, &mut created, &mut last).await,
                // The helper closed its end; its exit follows.
                None => break (&mut exit).await,
            },
            () = &mut create_deadline, if !created => {
                let _ = send_signal(&helper.pidfd, libc::SIGKILL);
                last.error = Some(format!("the helper did not create the VM within {CREATE_TIMEOUT:?}"));
            }
        }
    };
    // Events sent just before the exit (its reason, above all) may still be on their way
    // from the reader thread: take every one, until the helper's end of the socket is closed.
    let until = tokio::time::Instant::now() + LAST_EVENTS_TIMEOUT;
    while let Ok(Some(event)) = tokio::time::timeout_at(until, events.recv()).await {
        handle_event(manager, vm, helper, event, &mut created, &mut last).await;
    }
    let stop_request = vm.runtime().stop_request;
    match status {
        Ok(Some(WaitStatus::Exited(_, EXIT_POWER_OFF))) => HelperOutcome::PowerOff,
        Ok(Some(WaitStatus::Exited(_, EXIT_REBOOT))) => HelperOutcome::Reboot,
        Ok(Some(WaitStatus::Exited(_, code))) => HelperOutcome::Failed(
            last.error.unwrap_or_else(|| format!("the VM helper failed (exit status {code})")),
        ),
        Ok(Some(WaitStatus::Signaled(..))) if stop_request == Some(StopRequest::Kill) => HelperOutcome::Stopped,
        Ok(Some(WaitStatus::Signaled(_, signal, _))) => {
            HelperOutcome::Failed(format!("the VM helper was killed by signal {}", signal.as_str()))
        }
        Ok(Some(other)) => HelperOutcome::Failed(format!("the VM helper ended unexpectedly: {other:?}")),
        // An adopted helper: what it said last is all there is to go by.
        Ok(None) => match (last.error, last.guest, stop_request) {
            (Some(reason), _, _) => HelperOutcome::Failed(reason),
            (None, Some(Event::GuestPowerOff), _) => HelperOutcome::PowerOff,
            (None, Some(Event::GuestReboot), _) => HelperOutcome::Reboot,
            (None, _, Some(StopRequest::Kill)) => HelperOutcome::Stopped,
            _ => HelperOutcome::Failed(
                "the VM helper ended without saying why (it was adopted after a vmd restart, so its exit status is unknown)".into(),
            ),
        },
        Err(err) => HelperOutcome::Failed(format!("cannot follow the VM helper: {err}")),
    }
}

/// What a helper said before it exited.
#[derive(Default)]
struct LastWords {
    error: Option<String>,
    /// GuestPowerOff or GuestReboot.
    guest: Option<Event>,
}

async fn handle_event(
    manager: &Arc<Manager>,
    vm: &Arc<Vm>,
    helper: &Helper,
    event: Event,
    created: &mut bool,
    last: &mut LastWords,
) {
    match event {
        Event::Created => {
            *created = true;
            let (definition, leader) = (vm.definition(), vm.leader_pid());
            let transient_toml = definition
                .transient
                .then(|| definition.to_toml().ok())
                .flatten();
            let console = vm.runtime().console.clone();
            let client_socket = vm
                .runtime()
                .console_client
                .as_ref()
                .and_then(|client| client.socket().try_clone_to_owned().ok());
            notify::store_vm_fds(
                &vm.name,
                helper.control.as_fd(),
                helper.pidfd.as_fd(),
                console.as_ref().map(|c| c.master()),
                client_socket.as_ref().map(|s| s.as_fd()),
                transient_toml.as_deref(),
            );
            if let Err(err) = machined::register(
                manager.bus(),
                &vm.name,
                definition.uuid,
                leader,
                network::ifindices(&vm.name, &definition.interfaces),
            )
            .await
            {
                tracing::warn!(
                    "VM {}: cannot register with systemd-machined: {err}",
                    vm.name
                );
            }
        }
        Event::State { state } => {
            let event = match state {
                RunState::Running => Lifecycle::HelperRunning,
                RunState::Paused => Lifecycle::HelperPaused,
            };
            // Refused (ignored) only in states no helper reports from.
            if vm.change(manager, Some(event), |_| {}).is_ok() {
                notify::status(manager);
            }
        }
        // Logged once, as the VM's failure reason, when the helper has ended (the helper's
        // own messages are in its scope's journal).
        Event::Failed { reason } | Event::Error { reason } => {
            tracing::debug!("VM {}: the helper reports: {reason}", vm.name);
            last.error = Some(reason);
        }
        Event::GuestPowerOff => {
            tracing::info!("VM {}: the guest powered off", vm.name);
            last.guest = Some(Event::GuestPowerOff);
        }
        Event::GuestReboot => {
            tracing::info!("VM {}: the guest asked to reboot", vm.name);
            last.guest = Some(Event::GuestReboot);
        }
    }
}

/// Why no helper was launched.
enum LaunchFailure {
    DiskBusy(String),
    Other(String),
}

impl From<String> for LaunchFailure {
    fn from(reason: String) -> Self {
        LaunchFailure::Other(reason)
    }
}

/// Opens what the helper needs (disks locked) and starts it; returns it with the config to
/// send it.
fn launch(
    manager: &Manager,
    vm: &Vm,
    definition: &VmDefinition,
) -> Result<(HelperProcess, VmConfig), LaunchFailure> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // The daemon's own copies of passed fds are its to open; host paths are opened with the
    // rights of whoever answers for this start.
    let file_rights = vm
        .runtime()
        .file_rights
        .clone()
        .unwrap_or_else(|| Rights::unattended(definition));
    let copies = manager.store().files_dir(&definition.uuid);
    let open = |what: &str, path: &std::path::Path| {
        let rights = if is_within(path, &copies) {
            &Rights::Daemon
        } else {
            &file_rights
        };
        host_files::open_regular(path, rights)
            .map_err(|e| format!("cannot open the {what} {}: {e}", path.display()))
    };
    let initrd = definition
        .initrd
        .as_deref()
        .map(|initrd| open("initrd", initrd).map(OwnedFd::from))
        .transpose()?;
    let kernel = open("kernel", &definition.kernel)?;
    let disks = open_disks(manager, vm, definition, &file_rights)?;
    let nets = network::open_all(&vm.name, &definition.interfaces).map_err(|e| error_chain(&e))?;
    let mut config = definition.vm_config();
    config.disks = disks.configs;
    let fds = HelperFds {
        kvm: kvm.into(),
        kernel: kernel.into(),
        initrd,
        disks: disks.fds,
        nets,
        console: Some(
            vm.runtime()
                .console
                .clone()
                .ok_or_else(|| "the VM has no console".to_string())?
                .helper_end()
                .map_err(|e| error_chain(&e))?,
        ),
    };
    // The helper inherits the locked open file descriptions: the locks last as long as it.
    let helper = manager
        .launcher()
        .spawn(HelperSpawn {
            fds: fds.into_spawn_list(),
            args: vec!["vm".into(), "--name".into(), vm.name.clone()],
        })
        .map_err(|e| format!("cannot start the VM helper: {}", error_chain(&e)))?;
    Ok((helper, config))
}

/// Opens and locks the VM's disks with `rights`. A busy image is named with the VM that holds
/// it, when it is one of the daemon's.
fn open_disks(
    manager: &Manager,
    vm: &Vm,
    definition: &VmDefinition,
    rights: &Rights,
) -> Result<disks::OpenedDisks, LaunchFailure> {
    let claim = &mut |wanted: &[disks::Claim]| {
        let others = manager
            .all()
            .into_iter()
            .filter(|other| other.name != vm.name);
        if let Some(busy) = others
            .filter_map(|other| other.conflicting_claim(wanted))
            .next()
        {
            return Some(busy);
        }
        vm.runtime().disk_claims = wanted.to_vec();
        None
    };
    let opened = disks::open_all(&definition.disks, rights, claim);
    opened.map_err(|error| {
        vm.runtime().disk_claims.clear();
        match error.busy() {
            Some((disk, path, id)) => {
                let holder = manager
                    .all()
                    .into_iter()
                    .find(|other| other.name != vm.name && other.holds_disk_file(id));
                let by = match holder {
                    Some(other) => format!("VM {}", other.name),
                    None => "another program, or a VM vmd does not manage".to_string(),
                };
                LaunchFailure::DiskBusy(format!(
                    "disk {disk}: {} is in use by {by}",
                    path.display()
                ))
            }
            None => LaunchFailure::Other(open_error_text(&error, rights)),
        }
    })
}

/// The error's chain, saying with whose rights files were opened when they were a user's.
fn open_error_text(error: &DiskOpenError, rights: &Rights) -> String {
    let text = error_chain(error);
    match rights {
        Rights::User(user) if !text.contains("as user") => {
            format!(
                "{text} (opened as user {}, who started the VM)",
                super::authority::user_name(user.uid)
            )
        }
        _ => text,
    }
}

/// `path` is inside `dir`, with no `..` to climb out again.
fn is_within(path: &std::path::Path, dir: &std::path::Path) -> bool {
    path.starts_with(dir)
        && !path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
}

/// Forwards the helper's events from a blocking reader thread (the control socket is a
/// blocking SOCK_SEQPACKET fd shared with request senders).
fn read_events(control: Arc<ControlChannel>) -> mpsc::UnboundedReceiver<Event> {
    let (sender, receiver) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        loop {
            match control.recv_event() {
                Ok(Some(event)) => {
                    if sender.send(event).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!("bad message from a VM helper: {}", error_chain(&err));
                    if matches!(err, crate::protocol::RecvError::Io(_)) {
                        return;
                    }
                }
            }
        }
    });
    receiver
}

/// Waits until the helper exits (its pidfd becomes readable) and reaps it; `None` for an
/// adopted helper, which is not this process's child.
async fn wait_for_exit(helper: &Helper) -> nix::Result<Option<WaitStatus>> {
    let io_error = |e: std::io::Error| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    let fd = helper.pidfd.try_clone().map_err(io_error)?;
    // SAFETY: `fd` is an open pidfd owned by the AsyncFd for its whole life.
    let async_fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io_error(e.into_parts().1))?;
    loop {
        let mut guard = async_fd.readable().await.map_err(io_error)?;
        if !helper.child {
            return Ok(None);
        }
        match waitpid(helper.pid, Some(WaitPidFlag::WNOHANG))? {
            WaitStatus::StillAlive => guard.clear_ready(),
            status => return Ok(Some(status)),
        }
    }
}

/// Whether the peer of a stored socket has gone (or was cut off by a takeover).
fn hung_up(socket: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::process::{Child, Command};

    fn vm_in(state: VmState) -> Arc<Vm> {
        let definition = VmDefinition::parse_dbus("t", &Default::default()).expect("defaults");
        let vm = Vm::new(definition, Origin::Api, 1);
        vm.state.send_replace(state);
        vm
    }

    /// A child process and a pidfd for it, standing in for a helper.
    fn helper_process(argv: &[&str]) -> (Child, Arc<OwnedFd>) {
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .spawn()
            .expect("spawn");
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; the child is
        // not reaped before this, so the pid is still its own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: pidfd_open returned a new fd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        (child, Arc::new(pidfd))
    }

    #[test]
    fn a_vm_claimed_for_removal_cannot_start() {
        let vm = vm_in(VmState::Stopped);
        vm.claim_removal().expect("claim");
        assert!(matches!(
            vm.claim_start(Rights::Daemon),
            Err(LifecycleError::Removed { .. })
        ));
        assert_eq!(vm.state(), VmState::Stopped);
        // Only one removal.
        assert!(matches!(
            vm.claim_removal(),
            Err(LifecycleError::Removed { .. })
        ));
        // A removal that failed gives the VM back.
        vm.release_removal();
        vm.claim_start(Rights::Daemon).expect("start");
        assert_eq!(vm.state(), VmState::Starting);
    }

    #[test]
    fn a_vm_claimed_for_start_cannot_be_removed() {
        let vm = vm_in(VmState::Defined);
        vm.claim_start(Rights::Daemon).expect("start");
        assert!(matches!(
            vm.claim_removal(),
            Err(LifecycleError::InvalidState { .. })
        ));
        assert!(!vm.runtime().removed);
        assert!(matches!(
            vm.claim_start(Rights::Daemon),
            Err(LifecycleError::InvalidState { .. })
        ));
    }

    #[test]
    fn a_kill_before_the_helper_exists_is_recorded_for_the_supervisor() {
        // Starting, before the helper is launched (also between a guest reboot and the next
        // helper): the supervisor kills what it launches, or launches nothing.
        let vm = vm_in(VmState::Starting);
        vm.kill().expect("kill while starting");
        assert_eq!(vm.runtime().stop_request, Some(StopRequest::Kill));
    }

    #[test]
    fn kill_without_a_vm_running_is_refused_and_records_nothing() {
        for state in [VmState::Defined, VmState::Stopped, VmState::Failed] {
            let vm = vm_in(state);
            assert!(matches!(
                vm.kill(),
                Err(LifecycleError::InvalidState { .. })
            ));
            assert_eq!(vm.runtime().stop_request, None);
        }
    }

    #[tokio::test]
    async fn a_console_exists_from_start_on_only_and_has_one_client_at_a_time() {
        let vm = vm_in(VmState::Stopped);
        assert!(vm.runtime().console.is_none());
        assert!(matches!(
            vm.open_console("first".into(), false).await,
            Err(LifecycleError::InvalidState { .. })
        ));
        vm.claim_start(Rights::Daemon).expect("start");
        let first = vm
            .open_console("first".into(), false)
            .await
            .expect("a console while starting");
        match vm.open_console("second".into(), false).await {
            Err(LifecycleError::ConsoleBusy(text)) => assert!(text.contains("first"), "{text}"),
            other => panic!("a second client got {other:?}"),
        }
        vm.open_console("second".into(), true)
            .await
            .expect("taken over");
        let mut buf = [0u8; 8];
        let read = tokio::task::spawn_blocking(move || nix::unistd::read(first.as_fd(), &mut buf))
            .await
            .expect("read");
        assert_eq!(read, Ok(0), "the first client's fd still works");
    }

    #[tokio::test]
    async fn an_ended_vms_console_reads_its_last_output() {
        let vm = vm_in(VmState::Stopped);
        vm.runtime().last_output = Some(Arc::from(&b"bye\n"[..]));
        let console = vm
            .open_console("reader".into(), false)
            .await
            .expect("last words");
        let mut buf = [0u8; 16];
        let n = nix::unistd::read(console.as_fd(), &mut buf).expect("read");
        assert_eq!(&buf[..n], b"bye\n");
        assert_eq!(nix::unistd::read(console.as_fd(), &mut buf), Ok(0));
    }

    #[test]
    fn a_kill_that_cannot_be_sent_takes_its_record_back() {
        let vm = vm_in(VmState::Stopping);
        let (mut child, pidfd) = helper_process(&["true"]);
        child.wait().expect("wait");
        {
            let mut runtime = vm.runtime();
            runtime.pidfd = Some(pidfd);
            runtime.stop_request = Some(StopRequest::Shutdown);
        }
        // Reaped: the signal cannot be sent (ESRCH).
        assert!(matches!(vm.kill(), Err(LifecycleError::Failed(_))));
        assert_eq!(vm.runtime().stop_request, Some(StopRequest::Shutdown));
    }

    #[test]
    fn a_kill_that_is_sent_is_recorded() {
        let vm = vm_in(VmState::Running);
        let (mut child, pidfd) = helper_process(&["sleep", "600"]);
        vm.runtime().pidfd = Some(pidfd);
        let killed = vm.kill();
        let status = child.wait().expect("wait");
        killed.expect("kill");
        assert_eq!(vm.runtime().stop_request, Some(StopRequest::Kill));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn a_refused_or_failed_shutdown_records_nothing() {
        let vm = vm_in(VmState::Defined);
        assert!(matches!(
            vm.request_shutdown(StopRequest::Shutdown),
            Err(LifecycleError::InvalidState { .. })
        ));
        assert_eq!(vm.runtime().stop_request, None);

        // The helper's end of the control socket is gone: sending fails.
        let vm = vm_in(VmState::Running);
        let (daemon_end, helper_end) = ControlChannel::pair().expect("socketpair");
        drop(helper_end);
        vm.runtime().control = Some(Arc::new(daemon_end));
        assert!(matches!(
            vm.request_shutdown(StopRequest::Shutdown),
            Err(LifecycleError::Failed(_))
        ));
        assert_eq!(vm.runtime().stop_request, None);
    }

    #[test]
    fn a_sent_shutdown_is_recorded() {
        let vm = vm_in(VmState::Paused);
        let (daemon_end, helper_end) = ControlChannel::pair().expect("socketpair");
        vm.runtime().control = Some(Arc::new(daemon_end));
        vm.request_shutdown(StopRequest::Shutdown).expect("sent");
        assert_eq!(vm.runtime().stop_request, Some(StopRequest::Shutdown));
        assert!(matches!(
            helper_end.recv_request(),
            Ok(Some(Request::Shutdown { .. }))
        ));
    }
}
