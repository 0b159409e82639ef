//! Announces VMs' property changes: one PropertiesChanged per change, in order, on every
//! connection the objects are served on, from one task so that lifecycle code never waits on
//! D-Bus.

use std::borrow::Cow;
use std::collections::HashMap;

use tokio::sync::mpsc;
use zbus::zvariant::Variant;

use super::{Manager, VM_INTERFACE};
use crate::daemon::dbus::{VmObject, vm_object_path};
use crate::daemon::definition::VmDefinition;
use crate::daemon::read_only::ReadOnlyChecked;
use crate::daemon::vm::{Change, Property};

/// Emits queued property changes, in order, on every connection.
pub(super) async fn announce_changes(
    manager: std::sync::Weak<Manager>,
    mut receiver: mpsc::UnboundedReceiver<Change>,
) {
    while let Some(change) = receiver.recv().await {
        let Some(manager) = manager.upgrade() else {
            return;
        };
        let path = vm_object_path(&change.vm.name);
        for connection in manager.servers() {
            if connection.is_closed() {
                continue;
            }
            let Ok(iface) = connection
                .object_server()
                .interface::<_, ReadOnlyChecked<VmObject>>(path.clone())
                .await
            else {
                continue;
            };
            let emitter = iface.signal_emitter();
            let shown = &change.shown;
            let definition = change.vm.definition();
            let mut changed: HashMap<&str, Variant<'_>> = HashMap::new();
            let mut invalidated: Vec<&str> = Vec::new();
            for property in &change.properties {
                let (name, value) = match property {
                    Property::State => ("State", Variant::from(shown.state.as_str())),
                    Property::Unit => ("Unit", Variant::from(shown.unit.as_str())),
                    Property::LeaderPid => ("LeaderPID", Variant::from(shown.leader_pid)),
                    Property::Restarts => ("Restarts", Variant::from(shown.restarts)),
                    Property::FailureReason => (
                        "FailureReason",
                        Variant::from(shown.failure_reason.as_str()),
                    ),
                    Property::Autostart => ("Autostart", Variant::from(definition.autostart)),
                    Property::Definition => {
                        changed.extend(definition_values(&definition));
                        // Lists of dictionaries: clients read them again.
                        invalidated.extend(["Disks", "Interfaces"]);
                        continue;
                    }
                };
                changed.insert(name, value);
            }
            let result = zbus::fdo::Properties::properties_changed(
                emitter,
                VM_INTERFACE,
                changed,
                Cow::Borrowed(&invalidated),
            )
            .await;
            if let Err(err) = result {
                tracing::debug!("cannot announce a change of VM {}: {err}", change.vm.name);
            }
        }
    }
}

/// The values of the properties a definition shows (Disks and Interfaces aside).
fn definition_values(definition: &VmDefinition) -> Vec<(&'static str, Variant<'static>)> {
    vec![
        ("VCPUs", Variant::from(definition.vcpus)),
        ("MemoryBytes", Variant::from(definition.memory_bytes)),
        (
            "Kernel",
            Variant::from(definition.kernel.display().to_string()),
        ),
        (
            "Initrd",
            Variant::from(
                definition
                    .initrd
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
        ),
        ("Cmdline", Variant::from(definition.cmdline.clone())),
        ("Entropy", Variant::from(definition.entropy)),
        ("Autostart", Variant::from(definition.autostart)),
        ("Owner", Variant::from(definition.owner())),
        (
            "Definition",
            Variant::from(definition.to_named_toml().unwrap_or_default()),
        ),
        ("UUID", Variant::from(definition.uuid.to_string())),
    ]
}
