//! Registering running VMs with systemd-machined, so `machinectl list/status/terminate` know
//! them. Optional: without machined on the bus, VMs simply are not registered.

use std::time::{Duration, Instant};

use zbus::Connection;
use zbus::fdo::DBusProxy;
use zbus_systemd::machine1::ManagerProxy;

const MACHINED: &str = "org.freedesktop.machine1";

/// Whether machined runs or can be started by the bus.
pub async fn available(bus: &Connection) -> bool {
    let Ok(dbus) = DBusProxy::new(bus).await else {
        return false;
    };
    let Ok(name) = zbus::names::BusName::try_from(MACHINED) else {
        return false;
    };
    if dbus.name_has_owner(name).await.unwrap_or(false) {
        return true;
    }
    dbus.list_activatable_names()
        .await
        .map(|names| names.iter().any(|n| n.as_str() == MACHINED))
        .unwrap_or(false)
}

/// Registers `leader` (the helper, already in its scope) as machine `name`, class `vm`, with
/// the host side of its network interfaces (`ifindices`, which `machinectl status` lists).
/// machined follows the leader's unit: stopping the scope ends the registration, and
/// `machinectl terminate` stops the scope. `Ok(false)`: there is no machined (it neither runs
/// nor can the bus start it), so the VM is not registered.
///
/// No [`available`] first: the call itself starts machined or finds it missing, and each
/// round trip on a VM's start path waits for the bus daemon, which every starting VM shares.
pub async fn register(
    bus: &Connection,
    name: &str,
    uuid: uuid::Uuid,
    leader: u32,
    ifindices: Vec<i32>,
) -> Result<bool, zbus::Error> {
    let machined = ManagerProxy::new(bus).await?;
    let registered = machined
        .register_machine_with_network(
            name.to_string(),
            uuid.as_bytes().to_vec(),
            "vmd".to_string(),
            "vm".to_string(),
            leader,
            String::new(),
            ifindices,
        )
        .await;
    match registered {
        Ok(_) => Ok(true),
        Err(err) if is_missing_service(&err) => Ok(false),
        Err(err) => Err(err),
    }
}

/// The bus's answer to a call for a name that nobody owns and no service file provides.
fn is_missing_service(error: &zbus::Error) -> bool {
    const MISSING: [&str; 2] = [
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
    ];
    match error {
        zbus::Error::MethodError(name, _, _) => MISSING.contains(&name.as_str()),
        zbus::Error::FDO(error) => matches!(
            **error,
            zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
        ),
        _ => false,
    }
}

/// How long [`wait_until_forgotten`] waits for machined to let go of a machine.
const FORGET_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until machined has dropped machine `name` after its scope ended.
///
/// machined notices a machine's end from its scope's unit signals and then stops that unit *by
/// name*. When a rebooting VM's next helper starts in a new scope of the same name before
/// machined has caught up, machined would stop the new scope. Once machined no longer knows the
/// machine, its stop request has already gone to systemd, ahead of the next scope's creation.
pub async fn wait_until_forgotten(bus: &Connection, name: &str) {
    let Ok(machined) = ManagerProxy::new(bus).await else {
        return;
    };
    let deadline = Instant::now() + FORGET_TIMEOUT;
    while machined.get_machine(name.to_string()).await.is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
