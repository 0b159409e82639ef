//! Reload: the administrator's definitions (/etc/vmd/vms) are read again and applied, as
//! `systemctl reload vmd` and vmctl's `reload` ask. A new file defines a VM, a changed file
//! changes its VM's definition (used from its next start), and a VM whose file is gone is
//! removed once it is not running. A file that cannot be read or is invalid changes nothing
//! (it is logged), so a typo never removes a VM.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Manager;
use crate::daemon::definition::VmDefinition;
use crate::daemon::store::Origin;
use crate::daemon::vm::Property;

/// The names of the VMs a reload added, changed and removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl Manager {
    pub async fn reload(self: &Arc<Self>) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock().await;
        // A few small files, but still file system work: not on the runtime's thread.
        let manager = Arc::clone(self);
        let files: BTreeMap<String, Option<VmDefinition>> =
            match tokio::task::spawn_blocking(move || manager.store.read_admin()).await {
                Ok(files) => files.into_iter().collect(),
                Err(err) => {
                    // Nothing was read, so nothing is known to be gone: change nothing.
                    tracing::error!(
                        "reload: cannot read {}: {err}",
                        self.store.admin_dir().display()
                    );
                    return ReloadReport::default();
                }
            };
        let mut report = ReloadReport::default();
        for vm in self.all() {
            if vm.origin != Origin::Admin || files.contains_key(&vm.name) {
                continue;
            }
            if vm.claim_removal().is_ok() {
                self.forget(&vm).await;
                report.removed.push(vm.name.clone());
            } else {
                tracing::warn!(
                    "VM {}: its definition is gone from {}, but it is {}; it stays until it has stopped and vmd is reloaded",
                    vm.name,
                    self.store.admin_dir().display(),
                    vm.state().as_str()
                );
            }
        }
        for (name, definition) in files {
            // Unusable: logged when read; its VM (if any) stays as it was.
            let Some(definition) = definition else {
                continue;
            };
            match self.get(&name) {
                Ok(vm) if vm.origin == Origin::Admin => {
                    if vm.definition() != definition {
                        vm.replace_definition(definition);
                        self.announce(&vm, vec![Property::Definition], vm.snapshot());
                        report.changed.push(name);
                    }
                }
                Ok(_) => tracing::warn!(
                    "ignoring {}/{name}.toml: a VM of that name was defined over D-Bus",
                    self.store.admin_dir().display()
                ),
                Err(_) => match self.add(definition, Origin::Admin).await {
                    Ok(_) => report.added.push(name),
                    Err(err) => tracing::warn!("cannot load VM {name}: {err}"),
                },
            }
        }
        tracing::info!(
            "reloaded {}: {} added, {} changed, {} removed",
            self.store.admin_dir().display(),
            report.added.len(),
            report.changed.len(),
            report.removed.len()
        );
        report
    }
}
