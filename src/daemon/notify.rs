//! What the daemon tells systemd (Type=notify): READY=1 once the bus name is owned, a STATUS=
//! line with the VM counts, WATCHDOG=1 pings when WatchdogSec is set, STOPPING=1 on the way out.

use sd_notify::NotifyState;

use super::manager::Manager;

pub fn ready(manager: &Manager) {
    let status = status_line(manager);
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

pub fn status(manager: &Manager) {
    let status = status_line(manager);
    let _ = sd_notify::notify(&[NotifyState::Status(&status)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

fn status_line(manager: &Manager) -> String {
    let (vms, running) = manager.counts();
    format!("{vms} VMs defined, {running} running")
}

/// Pings the watchdog at half its interval, if systemd set one.
pub fn spawn_watchdog() {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let interval = timeout / 2;
    tokio::spawn(async move {
        loop {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            tokio::time::sleep(interval).await;
        }
    });
}
