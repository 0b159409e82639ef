//! Registering running VMs with systemd-machined, so `machinectl list/status/terminate` know
//! them. Optional: without machined on the bus, VMs simply are not registered.

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
/// `machinectl terminate` stops the scope.
pub async fn register(
    bus: &Connection,
    name: &str,
    uuid: uuid::Uuid,
    leader: u32,
    ifindices: Vec<i32>,
) -> Result<(), zbus::Error> {
    let machined = ManagerProxy::new(bus).await?;
    machined
        .register_machine_with_network(
            name.to_string(),
            uuid.as_bytes().to_vec(),
            "vmd".to_string(),
            "vm".to_string(),
            leader,
            String::new(),
            ifindices,
        )
        .await?;
    Ok(())
}
