//! The vmd daemon (`vmd daemon`): the org.vmd.vmd1 D-Bus service on the system bus, and
//! peer-to-peer on vmd.sock when socket-activated. It starts each VM as a helper process in a
//! transient scope of its own (DESIGN.md, "Processes").
//!
//! - [`manager`] holds the VMs; [`vm`] is one VM's lifecycle and its helper supervisor, whose
//!   states and their transitions are [`lifecycle`]'s, and [`state_file`] keeps them across
//!   daemon restarts;
//! - [`dbus`] (the manager) and [`dbus_vm`] (each VM) are the D-Bus face of both,
//!   [`read_only`] makes Set of a read-only property say so, [`peer_bus`] answers busctl's
//!   and gdbus's Hello on vmd.sock, and [`errors`] are the named errors;
//! - [`definition`] and [`store`] are VM definitions and their TOML files, [`disks`] their
//!   disks (parsed, shown, and opened with their backing chains and locked at start),
//!   [`network`] their interfaces (made into taps at start) and [`switches`] the bridges
//!   those may join;
//! - [`authority`] decides who may do what; [`files`] checks and copies callers' fds, and
//!   [`host_files`] opens definitions' paths with the rights of whoever starts the VM;
//! - [`scope`], [`machined`] and [`notify`] talk to systemd; [`console`] owns the ptys;
//!   [`console_relay`] hands the console to one client at a time; [`signal`] signals helpers.

pub mod authority;
pub mod console;
pub mod console_relay;
pub mod dbus;
pub mod dbus_vm;
pub mod definition;
pub mod disks;
pub mod errors;
pub mod files;
pub mod host_files;
pub mod lifecycle;
pub mod machined;
pub mod manager;
pub mod network;
pub mod notify;
pub mod peer_bus;
pub mod read_only;
pub mod scope;
pub mod signal;
pub mod state_file;
pub mod store;
pub mod switches;
pub mod vm;

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use zbus::Connection;

use crate::launch::Launcher;
use manager::Manager;
use notify::StoredFd;
use store::Store;

pub const BUS_NAME: &str = "org.vmd.vmd1";

/// Options of `vmd daemon`.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonOptions {
    /// Administrator's VM definitions (read-only).
    #[arg(long, default_value = "/etc/vmd/vms")]
    pub config_dir: PathBuf,
    /// Where VMs created over D-Bus are stored.
    #[arg(long, default_value = "/var/lib/vmd/vms")]
    pub state_dir: PathBuf,
    /// Where each VM's last state (and failure reason) is recorded.
    #[arg(long, default_value = "/var/lib/vmd/state")]
    pub vm_state_dir: PathBuf,
    /// How many Autostart VMs start at once.
    #[arg(long, default_value_t = 2)]
    pub autostart_parallel: usize,
    /// Seconds between two groups of Autostart VMs.
    #[arg(long, default_value_t = 1.0)]
    pub autostart_delay: f64,
}

/// Runs the daemon until SIGTERM; returns the exit status.
pub fn main(options: DaemonOptions) -> i32 {
    // Socket activation and stored VMs: take the fds while the process is single-threaded.
    let activation = take_activation_fds();
    // One thread, like machined's and systemd's event loops: every call is short, and what can
    // block (file work, reading a helper's first bytes) goes to tokio's blocking pool. (A
    // multi-thread runtime would also load libm into every vmd process, helpers and `vmd run`
    // included, for the one `pow` of its scheduler statistics.)
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the async runtime: {err}");
            return 1;
        }
    };
    match runtime.block_on(run(options, activation)) {
        Ok(()) => 0,
        Err(err) => {
            tracing::error!("{err:#}");
            1
        }
    }
}

/// The name vmd.socket gives its listening socket (FileDescriptorName=).
const SOCKET_FD_NAME: &str = "vmd";

/// What systemd passed at start: vmd.socket's listener, and the fds of running VMs a previous
/// daemon kept in the fd store.
#[derive(Default)]
struct Activation {
    listeners: Vec<std::os::unix::net::UnixListener>,
    /// VM name → what the fd store kept of it.
    stored_vms: BTreeMap<String, StoredVm>,
}

/// A running VM's fds from the fd store (notify::store_vm_fds).
#[derive(Default)]
struct StoredVm {
    control: Option<OwnedFd>,
    pidfd: Option<OwnedFd>,
    /// Transient VMs only: their definition, which no file holds.
    definition: Option<OwnedFd>,
    /// The console's pty master.
    console: Option<OwnedFd>,
    /// The daemon's ends of console clients' sockets (more than one only if systemd had not
    /// yet dropped a client that hung up).
    console_clients: Vec<OwnedFd>,
    /// Disk index → the fd a caller passed for it.
    disks: BTreeMap<usize, OwnedFd>,
}

fn take_activation_fds() -> Activation {
    let mut activation = Activation::default();
    let Ok(fds) = sd_notify::listen_fds_with_names() else {
        return activation;
    };
    for (fd, name) in fds {
        let fd: RawFd = fd;
        // SAFETY: systemd passed this fd for us to own (LISTEN_PID matched).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if name == SOCKET_FD_NAME {
            activation
                .listeners
                .push(std::os::unix::net::UnixListener::from(owned));
        } else if let Some((index, vm)) = notify::parse_disk_fd_name(&name) {
            let stored = activation.stored_vms.entry(vm.to_string()).or_default();
            stored.disks.insert(index, owned);
        } else if let Some((kind, vm)) = notify::parse_stored_fd_name(&name) {
            let stored = activation.stored_vms.entry(vm.to_string()).or_default();
            let slot = match kind {
                StoredFd::Control => &mut stored.control,
                StoredFd::Pidfd => &mut stored.pidfd,
                StoredFd::Definition => &mut stored.definition,
                StoredFd::Console => &mut stored.console,
                StoredFd::ConsoleClient => {
                    stored.console_clients.push(owned);
                    continue;
                }
            };
            *slot = Some(owned);
        } else {
            tracing::warn!("ignoring passed fd {fd} named {name:?}");
        }
    }
    activation
}

/// Takes over the VMs whose helpers outlived the previous daemon; transient ones are defined
/// again from the definition they left in the fd store.
async fn adopt_stored_vms(manager: &Arc<Manager>, stored: BTreeMap<String, StoredVm>) {
    let mut pending_disks = BTreeMap::new();
    for (name, fds) in stored {
        if !fds.disks.is_empty() {
            // A transient VM's definition is back only once it is adopted: attach after.
            let vm = match manager.get(&name) {
                Ok(vm) => Some(vm),
                Err(_) if fds.definition.is_some() => None,
                Err(_) => {
                    tracing::warn!("passed disks of VM {name}, which is gone: dropped");
                    notify::forget_passed_disks(&name);
                    None
                }
            };
            if let Some(vm) = vm {
                vm.attach_passed_disks(fds.disks);
            } else if fds.definition.is_some() {
                pending_disks.insert(name.clone(), fds.disks);
            }
        }
        if fds.control.is_none()
            && fds.pidfd.is_none()
            && fds.definition.is_none()
            && fds.console.is_none()
        {
            continue;
        }
        let adopted = match (fds.control, fds.pidfd) {
            (Some(control), Some(pidfd)) => vm_to_adopt(manager, &name, fds.definition)
                .await
                .and_then(|vm| vm.adopt(manager, control, pidfd, fds.console, fds.console_clients)),
            _ => Err("the fd store holds only part of it".to_string()),
        };
        match adopted {
            Ok(()) => {
                tracing::info!("adopted the running VM {name}");
                if let (Some(disks), Ok(vm)) = (pending_disks.remove(&name), manager.get(&name)) {
                    vm.attach_passed_disks(disks);
                }
            }
            Err(reason) => {
                // Dropping its control socket makes the helper power the guest off.
                tracing::warn!("cannot adopt VM {name}: {reason}; letting it shut down");
                notify::forget_vm_fds(&name);
                if pending_disks.remove(&name).is_some() {
                    notify::forget_passed_disks(&name);
                }
            }
        }
    }
}

/// The loaded VM `name`, or the transient VM defined again from `definition`.
async fn vm_to_adopt(
    manager: &Arc<Manager>,
    name: &str,
    definition: Option<OwnedFd>,
) -> Result<Arc<vm::Vm>, String> {
    if let Ok(vm) = manager.get(name) {
        return Ok(vm);
    }
    let Some(memfd) = definition else {
        return Err("it has no definition any more".to_string());
    };
    let toml = notify::read_stored_definition(memfd)
        .map_err(|e| format!("cannot read its stored definition: {e}"))?;
    let mut definition = definition::VmDefinition::from_toml(name, &toml)
        .map_err(|e| format!("its stored definition is bad: {e}"))?;
    definition.transient = true;
    manager
        .add(definition, store::Origin::Api)
        .await
        .map_err(|e| e.to_string())
}

async fn run(options: DaemonOptions, activation: Activation) -> anyhow::Result<()> {
    let launcher = Launcher::current_executable()
        .context("cannot open the vmd executable")?
        .resolve_account();
    let bus = zbus::connection::Builder::system()
        .build()
        .await
        .context("cannot connect to the system bus")?;
    let scopes = scope::Scopes::follow(&bus)
        .await
        .context("cannot subscribe to systemd's job signals")?;
    let store = Store::new(options.config_dir.clone(), options.state_dir.clone());
    let states = state_file::StateFiles::new(options.vm_state_dir.clone());
    let manager = Manager::new(bus.clone(), scopes, store, states, launcher);
    manager.load_definitions().await;
    adopt_stored_vms(&manager, activation.stored_vms).await;
    manager.settle_unadopted();
    manager
        .serve_on(bus.clone())
        .await
        .context("cannot serve on the system bus")?;
    Manager::serve_object_manager(&bus)
        .await
        .context("cannot serve the object manager on the system bus")?;
    bus.request_name(BUS_NAME)
        .await
        .with_context(|| format!("cannot own {BUS_NAME} on the system bus"))?;
    for listener in activation.listeners {
        tokio::spawn(serve_peers(manager.clone(), listener));
    }
    notify::ready(&manager);
    notify::spawn_watchdog();
    tracing::info!("vmd is ready");

    let autostart = {
        let manager = manager.clone();
        let delay = Duration::from_secs_f64(options.autostart_delay.max(0.0));
        tokio::spawn(async move { manager.autostart(options.autostart_parallel, delay).await })
    };

    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            // As Manager.Reload, with sd_notify's RELOADING=1 ... READY=1 around it.
            _ = hangup.recv() => {
                notify::reloading();
                let reload = {
                    let manager = manager.clone();
                    tokio::spawn(async move { manager.reload().await })
                };
                let _ = reload.await;
                notify::ready(&manager);
            }
        }
    }
    notify::stopping();
    autostart.abort();
    tracing::info!("vmd is stopping");
    Ok(())
}

/// Accepts peer-to-peer D-Bus clients on vmd.sock.
async fn serve_peers(manager: Arc<Manager>, listener: std::os::unix::net::UnixListener) {
    // systemd may pass the socket in blocking mode; the runtime needs it non-blocking.
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
    {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!("cannot use the activation socket: {err}");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("cannot accept a client on vmd.sock: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let manager = manager.clone();
        tokio::spawn(async move {
            if let Err(err) = serve_peer(manager, stream).await {
                tracing::info!("peer-to-peer client: {err:#}");
            }
        });
    }
}

async fn serve_peer(manager: Arc<Manager>, stream: tokio::net::UnixStream) -> anyhow::Result<()> {
    let stream = stream.into_std().context("cannot take the client socket")?;
    // The objects must be served before the connection starts: a peer may call the moment the
    // handshake ends, and a call that arrives before the object server exists is lost.
    let builder = zbus::connection::Builder::unix_stream(stream)
        .server(zbus::Guid::generate())
        .p2p();
    let (peer_bus, said_hello) = peer_bus::PeerBus::new();
    let connection: Connection = manager
        .serving(builder.serve_at(peer_bus::PATH, peer_bus))
        .build()
        .await
        .context("D-Bus handshake failed")?;
    manager
        .serve_on(connection.clone())
        .await
        .context("cannot serve objects")?;
    // The object manager comes once a bus-minded client has had its answer to Hello (which
    // such clients send first), or soon for one that says no Hello (zbus peer-to-peer).
    if tokio::time::timeout(peer_bus::HELLO_WAIT, said_hello)
        .await
        .is_ok()
    {
        tokio::time::sleep(peer_bus::AFTER_HELLO).await;
    }
    Manager::serve_object_manager(&connection)
        .await
        .context("cannot serve the object manager")?;
    connection.closed().await;
    Ok(())
}
