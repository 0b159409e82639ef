//! What the daemon tells systemd (Type=notify): READY=1 once the bus name is owned, a STATUS=
//! line with the VM counts, WATCHDOG=1 pings when WatchdogSec is set, STOPPING=1 on the way out.

use std::os::fd::BorrowedFd;

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

/// fd store names of a VM's control socket and helper pidfd.
pub fn stored_fd_names(vm_name: &str) -> (String, String) {
    (format!("vmctl-{vm_name}"), format!("vmpid-{vm_name}"))
}

/// Keeps a running VM's control socket and helper pidfd in systemd's fd store, so a restarted
/// daemon can adopt the VM instead of the VM losing its manager.
pub fn store_vm_fds(vm_name: &str, control: BorrowedFd<'_>, pidfd: BorrowedFd<'_>) {
    let (control_name, pid_name) = stored_fd_names(vm_name);
    for (name, fd) in [(control_name, control), (pid_name, pidfd)] {
        let state = [NotifyState::FdStore, NotifyState::FdName(&name)];
        if let Err(err) = sd_notify::notify_with_fds(&state, &[fd]) {
            tracing::warn!("cannot keep {name} in systemd's fd store: {err}");
        }
    }
}

/// Drops a VM's fds from the fd store once its helper is gone.
pub fn forget_vm_fds(vm_name: &str) {
    let (control_name, pid_name) = stored_fd_names(vm_name);
    for name in [control_name, pid_name] {
        let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]);
    }
}
