//! What the daemon tells systemd (Type=notify): READY=1 once the bus name is owned, a STATUS=
//! line with the VM counts, WATCHDOG=1 pings when WatchdogSec is set, STOPPING=1 on the way out.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

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

/// Reload began (RELOADING=1); [`ready`] says it ended.
pub fn reloading() {
    let _ = sd_notify::notify(&[NotifyState::Reloading]);
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

/// What a running VM keeps in the fd store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredFd {
    /// The helper's control socket.
    Control,
    /// The helper's pidfd.
    Pidfd,
    /// A transient VM's definition (no file holds it).
    Definition,
    /// The console's pty master.
    Console,
    /// The daemon's end of the attached console client's socket.
    ConsoleClient,
}

/// The fd store name of each kind of fd, before the VM's name.
const STORED_FD_PREFIXES: [(StoredFd, &str); 5] = [
    (StoredFd::Control, "vmctl-"),
    (StoredFd::Pidfd, "vmpid-"),
    (StoredFd::Definition, "vmdef-"),
    (StoredFd::Console, "vmcon-"),
    (StoredFd::ConsoleClient, "vmcli-"),
];

/// The fd store names of a VM's fds, in the order of [`StoredFd`].
pub fn stored_fd_names(vm_name: &str) -> [String; 5] {
    STORED_FD_PREFIXES.map(|(_, prefix)| format!("{prefix}{vm_name}"))
}

/// Which fd of which VM an fd store name is.
pub fn parse_stored_fd_name(name: &str) -> Option<(StoredFd, &str)> {
    STORED_FD_PREFIXES
        .iter()
        .find_map(|(kind, prefix)| Some((*kind, name.strip_prefix(prefix)?)))
}

/// Keeps a running VM's control socket, helper pidfd and console in systemd's fd store, so a
/// restarted daemon can adopt the VM instead of the VM losing its manager. A transient VM's
/// definition goes along as a sealed memfd of its TOML: nothing else remembers it.
pub fn store_vm_fds(
    vm_name: &str,
    control: BorrowedFd<'_>,
    pidfd: BorrowedFd<'_>,
    console: Option<BorrowedFd<'_>>,
    console_client: Option<BorrowedFd<'_>>,
    transient_definition: Option<&str>,
) {
    let [control_name, pid_name, definition_name, console_name, _] = stored_fd_names(vm_name);
    let definition = transient_definition.map(|toml| definition_memfd(vm_name, toml));
    let mut stored = vec![(control_name, control, true), (pid_name, pidfd, true)];
    // Not polled: a pty master hangs up whenever nobody holds the terminal side, which is the
    // case exactly while the daemon restarts.
    if let Some(console) = console {
        stored.push((console_name, console, false));
    }
    match &definition {
        Some(Ok(memfd)) => stored.push((definition_name, memfd.as_fd(), false)),
        Some(Err(err)) => {
            tracing::warn!("VM {vm_name}: cannot keep its definition for a daemon restart: {err}")
        }
        None => {}
    }
    for (name, fd, pollable) in stored {
        store_fd(&name, fd, pollable);
    }
    if let Some(client) = console_client {
        store_console_client(vm_name, client);
    }
}

/// Keeps the daemon's end of a console client's socket in the fd store, so the client stays
/// attached across a daemon restart. Polled: systemd drops it once the client hangs up (or
/// the daemon took the console from it).
pub fn store_console_client(vm_name: &str, socket: BorrowedFd<'_>) {
    let [.., client_name] = stored_fd_names(vm_name);
    store_fd(&client_name, socket, true);
}

fn store_fd(name: &str, fd: BorrowedFd<'_>, pollable: bool) {
    // systemd drops a polled fd on POLLHUP (the helper or the client gone); a memfd cannot be
    // polled, and a console must not be.
    let poll = if pollable { "FDPOLL=1" } else { "FDPOLL=0" };
    let state = [
        NotifyState::FdStore,
        NotifyState::FdName(name),
        NotifyState::Custom(poll),
    ];
    if let Err(err) = sd_notify::notify_with_fds(&state, &[fd]) {
        tracing::warn!("cannot keep {name} in systemd's fd store: {err}");
    }
}

fn definition_memfd(vm_name: &str, toml: &str) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let memfd = memfd_create(
        format!("vmd-definition-{vm_name}").as_str(),
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(toml.as_bytes())?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(file.into())
}

/// Reads back a definition kept by `store_vm_fds`.
pub fn read_stored_definition(memfd: OwnedFd) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(memfd);
    let length = file.metadata()?.len();
    // Definitions are a few hundred bytes; anything big is not ours.
    if length > 64 * 1024 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{length} bytes is not a VM definition"),
        ));
    }
    let mut bytes = vec![0; length as usize];
    file.read_exact_at(&mut bytes, 0)?;
    String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The fd store name of a VM's passed disk `index` (`vmdsk<i>-<name>`).
fn disk_fd_name(vm_name: &str, index: usize) -> String {
    format!("vmdsk{index}-{vm_name}")
}

/// Which disk of which VM an fd store name is.
pub fn parse_disk_fd_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("vmdsk")?;
    let (index, vm_name) = rest.split_once('-')?;
    let index = match index.as_bytes() {
        [digit @ b'0'..=b'9'] => usize::from(digit - b'0'),
        _ => return None,
    };
    (index < crate::protocol::MAX_DISKS).then_some((index, vm_name))
}

/// Keeps the fds of a VM's passed disks in systemd's fd store for as long as the VM is defined,
/// so that a restarted daemon still has them (nothing else could open them again).
pub fn store_passed_disks(vm_name: &str, disks: &[super::disks::DiskSpec]) {
    use super::disks::{DiskSource, PassedDisk};
    for (index, disk) in disks.iter().enumerate() {
        let DiskSource::Passed(PassedDisk { fd: Some(fd), .. }) = &disk.source else {
            continue;
        };
        let name = disk_fd_name(vm_name, index);
        // A regular file never hangs up: nothing to poll.
        let state = [
            NotifyState::FdStore,
            NotifyState::FdName(&name),
            NotifyState::Custom("FDPOLL=0"),
        ];
        if let Err(err) = sd_notify::notify_with_fds(&state, &[fd.as_fd()]) {
            tracing::warn!("cannot keep {name} in systemd's fd store: {err}");
        }
    }
}

/// Drops a removed VM's passed disks from the fd store.
pub fn forget_passed_disks(vm_name: &str) {
    for index in 0..crate::protocol::MAX_DISKS {
        let name = disk_fd_name(vm_name, index);
        let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]);
    }
}

/// Drops a VM's fds from the fd store once its helper is gone.
pub fn forget_vm_fds(vm_name: &str) {
    for name in stored_fd_names(vm_name) {
        let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_fd_names_read_back_as_what_they_name() {
        let [control, pidfd, definition, console, client] = stored_fd_names("web-1");
        assert_eq!(console, "vmcon-web-1");
        assert_eq!(
            parse_stored_fd_name(&console),
            Some((StoredFd::Console, "web-1"))
        );
        assert_eq!(
            parse_stored_fd_name(&control),
            Some((StoredFd::Control, "web-1"))
        );
        assert_eq!(
            parse_stored_fd_name(&pidfd),
            Some((StoredFd::Pidfd, "web-1"))
        );
        assert_eq!(
            parse_stored_fd_name(&definition),
            Some((StoredFd::Definition, "web-1"))
        );
        assert_eq!(
            parse_stored_fd_name(&client),
            Some((StoredFd::ConsoleClient, "web-1"))
        );
        assert_eq!(parse_stored_fd_name("vmd"), None);
        assert_eq!(
            parse_disk_fd_name(&disk_fd_name("web-1", 7)),
            Some((7, "web-1"))
        );
        for other in [
            "vmdsk8-web",
            "vmdsk-web",
            "vmdsk10-web",
            "vmdskx-web",
            "vmctl-web",
        ] {
            assert_eq!(parse_disk_fd_name(other), None, "{other}");
        }
        // Disk fds are not taken for another kind, nor the other way round.
        assert_eq!(parse_stored_fd_name(&disk_fd_name("web-1", 0)), None);
    }

    #[test]
    fn a_stored_definition_reads_back_and_cannot_be_changed() {
        let memfd = definition_memfd("t", "kernel = \"/k\"\n").expect("memfd");
        let copy = memfd.try_clone().expect("dup");
        assert!(
            nix::unistd::write(&copy, b"x").is_err(),
            "the memfd is sealed"
        );
        assert_eq!(
            read_stored_definition(memfd).expect("read"),
            "kernel = \"/k\"\n"
        );
    }
}
