//! The VM helper (`vmd vm`): one process per VM, the Linux form of OpenBSD vmd's `vm_main`.
//!
//! It takes its fds from LISTEN_FDS, locks itself down (landlock without any path, no new
//! privileges, an unprivileged uid, no capabilities, not dumpable), reads its configuration over
//! the control socket, builds the VM, installs a seccomp filter per thread, answers `Created`, and
//! runs the guest until it powers off (exit 0), asks to reboot (exit 75) or fails (exit 1).

pub mod event_loop;
pub mod listen_fds;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use crate::devices::console_journal::ConsoleJournal;
use crate::devices::virtio::worker::{WorkerKind, WorkerSetup};
use crate::protocol::{ControlChannel, Event, Request, VmConfig};
use crate::sandbox::{self, Account, SandboxMode, ThreadKind};
use crate::vmm::vcpu::install_kick_handler;
use crate::vmm::vm::{DiskFiles, MachineConfig, MachineFiles, build_vm};
use listen_fds::{FdIntakeFailure, FdName, ReceivedFds};

/// Helper exit statuses (DESIGN.md, "Launch protocol").
pub const EXIT_POWER_OFF: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_REBOOT: i32 = 75;

/// Command-line options of `vmd vm`.
#[derive(Debug, Clone)]
pub struct HelperOptions {
    pub sandbox: SandboxMode,
    /// Test aid: after the lock-down, try to open paths and report on stderr what happened.
    pub probe_sandbox: bool,
    /// The account to switch to, as the launcher resolved it; looked up here without one.
    pub account: Option<Account>,
}

/// Runs the helper on the fds `listen_fds::take_listen_fds` took (or the reason it refused
/// them), with `console_journal` (from `logging::console_journal_socket`) for a copy of the
/// console's lines; returns the process exit status.
pub fn main(
    fds: Result<ReceivedFds, FdIntakeFailure>,
    options: HelperOptions,
    console_journal: Option<OwnedFd>,
) -> i32 {
    let mut fds = match fds {
        Ok(fds) => fds,
        Err(failure) => {
            let reason = format!("refusing the passed fds: {}", failure.error);
            eprintln!("vmd vm: {reason}");
            if let Some(control) = failure.control {
                let _ = ControlChannel::from_fd(control).send_event(&Event::Failed { reason });
            }
            return EXIT_FAILURE;
        }
    };
    let Some(control) = fds.take(FdName::Control) else {
        eprintln!("vmd vm: no control fd");
        return EXIT_FAILURE;
    };
    let control = ControlChannel::from_fd(control);
    // A panic is a failure like any other (vCPU threads and the event loop catch their own):
    // the launcher hears why, and the status is 1 rather than std's 101.
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        start(&control, fds, options, console_journal)
    }))
    .unwrap_or_else(|payload| Err(panic_reason("while starting", payload.as_ref())));
    match started {
        Ok(running) => {
            let (code, vm) = running.run();
            // Nothing the guest did can be lost any more: its vCPUs are stopped, its disks
            // flushed and closed, its last events sent. Closing the control socket says so
            // (`vmd run` exits on it); only then go guest memory and the KVM VM, whose fd
            // takes milliseconds to close (the kernel waits for RCU grace periods), so that
            // nobody waits for that.
            drop(control);
            drop(vm);
            code
        }
        Err(reason) => {
            tracing::error!("cannot start the VM: {reason}");
            let _ = control.send_event(&Event::Failed { reason });
            EXIT_FAILURE
        }
    }
}

/// What a caught panic says, for a failure report.
pub fn panic_reason(when: &str, payload: &(dyn std::any::Any + Send)) -> String {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("the VMM thread panicked {when}: {message}")
}

/// Everything up to `Created`: lock-down, configuration, VM build, vCPU threads, seccomp.
fn start(
    control: &ControlChannel,
    mut fds: ReceivedFds,
    options: HelperOptions,
    console_journal: Option<OwnedFd>,
) -> Result<event_loop::EventLoop<'_>, String> {
    // Signals the main loop handles are blocked before any thread exists, so that every
    // thread inherits the mask and only the loop's signalfd sees them.
    let signals = event_loop::block_termination_signals().map_err(|e| e.to_string())?;

    let report = sandbox::lock_down_process(options.sandbox, options.account.clone())
        .map_err(|e| error_chain(&e))?;
    tracing::debug!("sandbox: {report:?}");
    if options.probe_sandbox {
        probe_sandbox(&mut fds);
    }

    let config = match control.recv_request() {
        Ok(Some(Request::Start { config })) => config,
        Ok(Some(other)) => {
            return Err(format!(
                "expected Start as the first request, got {other:?}"
            ));
        }
        Ok(None) => return Err("the control socket closed before the configuration arrived".into()),
        Err(err) => {
            return Err(format!(
                "cannot read the configuration: {}",
                error_chain(&err)
            ));
        }
    };
    config
        .validate()
        .map_err(|e| format!("invalid configuration: {e}"))?;
    let kvm = fds.take(FdName::Kvm).ok_or("no kvm fd")?;
    let mut files = machine_files(&mut fds, &config)?;
    files.console_journal = console_journal.map(|socket| ConsoleJournal::new(socket, &config.name));
    let mode = options.sandbox;
    let worker_setup: WorkerSetup = Arc::new(move |kind| {
        let thread = match kind {
            WorkerKind::Block => ThreadKind::Block,
            WorkerKind::Entropy => ThreadKind::Entropy,
            WorkerKind::Net => ThreadKind::Net,
        };
        sandbox::apply_seccomp(thread, mode).map_err(|e| error_chain(&e))
    });
    let mut vm = build_vm(&machine_config(&config), kvm, files, worker_setup)
        .map_err(|e| error_chain(&e))?;

    install_kick_handler().map_err(|e| format!("cannot install the vCPU kick handler: {e}"))?;
    let vcpus = vm
        .start_vcpus(Arc::new(move || {
            sandbox::apply_seccomp(ThreadKind::Vcpu, mode).map_err(|e| error_chain(&e))
        }))
        .map_err(|e| error_chain(&e))?;
    sandbox::apply_seccomp(ThreadKind::Vmm, mode).map_err(|e| error_chain(&e))?;
    tracing::info!(
        "VM {} created: {} vCPUs, {} MiB",
        config.name,
        config.vcpus,
        config.memory_bytes >> 20
    );
    Ok(event_loop::EventLoop::new(vm, vcpus, control, signals))
}

fn machine_config(config: &VmConfig) -> MachineConfig {
    MachineConfig {
        // validate() bounds vcpus to 1..=254.
        vcpus: u8::try_from(config.vcpus).unwrap_or(u8::MAX),
        memory_bytes: config.memory_bytes,
        cmdline: config.cmdline.clone(),
        disks: config.disks.clone(),
        entropy: config.entropy,
        interfaces: config.interfaces.clone(),
    }
}

/// Takes the fds the configuration calls for; the intake already refused unknown names, and
/// here a disk fd without a configuration (or the reverse) is refused too.
fn machine_files(fds: &mut ReceivedFds, config: &VmConfig) -> Result<MachineFiles, String> {
    let kernel = File::from(fds.take(FdName::Kernel).ok_or("no kernel fd")?);
    let initrd = fds.take(FdName::Initrd).map(File::from);
    let console = fds.take(FdName::Console).map(set_nonblocking).transpose()?;
    let mut disks = Vec::with_capacity(config.disks.len());
    for (index, disk) in (0u8..).zip(&config.disks) {
        let image = fds
            .take(FdName::Disk(index))
            .ok_or_else(|| format!("no fd for disk {index}"))?;
        let mut bases = Vec::with_capacity(disk.backing.len());
        for layer in (1u8..).take(disk.backing.len()) {
            let base = fds
                .take(FdName::DiskBase { disk: index, layer })
                .ok_or_else(|| {
                    format!("no fd for layer {layer} of disk {index}'s backing chain")
                })?;
            bases.push(File::from(base));
        }
        disks.push(DiskFiles {
            image: File::from(image),
            bases,
        });
    }
    let mut taps = Vec::with_capacity(config.interfaces.len());
    for index in (0u8..).take(config.interfaces.len()) {
        let tap = fds
            .take(FdName::Net(index))
            .ok_or_else(|| format!("no tap fd for network interface {index}"))?;
        taps.push(File::from(tap));
    }
    if let Some(extra) = fds.names().into_iter().find(|name| {
        matches!(
            name,
            FdName::Disk(_) | FdName::DiskBase { .. } | FdName::Net(_)
        )
    }) {
        return Err(format!(
            "fd {extra} was passed but the configuration has no use for it"
        ));
    }
    Ok(MachineFiles {
        kernel,
        initrd,
        console,
        console_journal: None,
        disks,
        taps,
    })
}

/// Console output must never block a vCPU.
fn set_nonblocking(fd: OwnedFd) -> Result<OwnedFd, String> {
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL)
        .map_err(|e| format!("cannot read the console fd's flags: {e}"))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags))
        .map_err(|e| format!("cannot make the console fd non-blocking: {e}"))?;
    Ok(fd)
}

/// Tries what the sandbox must forbid and what it must still allow, and says so on stderr.
fn probe_sandbox(fds: &mut ReceivedFds) {
    for path in ["/etc/hostname", "/dev/kvm", "/"] {
        match File::open(path) {
            Ok(_) => eprintln!("sandbox probe: open {path}: allowed"),
            Err(err) => eprintln!(
                "sandbox probe: open {path}: {}",
                nix::Error::from_raw(err.raw_os_error().unwrap_or(0))
            ),
        }
    }
    if let Some(kvm) = fds.take(FdName::Kvm) {
        // SAFETY: KVM_GET_API_VERSION takes no argument and only reads the fd.
        let version = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&kvm), 0xae00, 0) };
        let outcome = if version < 0 {
            std::io::Error::last_os_error().to_string()
        } else {
            format!("API version {version}")
        };
        eprintln!("sandbox probe: passed kvm fd: {outcome}");
        fds.insert(FdName::Kvm, kvm);
    }
}

/// An error and its sources, joined by ": ".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors print their source in their own message as well ("Kernel Loader:
        // Invalid bzImage", whose source is "Invalid bzImage"): say each cause once.
        if !last.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        last = cause_text;
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("Invalid bzImage")]
    struct Inner;

    /// As linux-loader's errors: the source's message inside its own.
    #[derive(Debug, thiserror::Error)]
    #[error("Kernel Loader: {0}")]
    struct Repeats(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("the kernel is not a bzImage")]
    struct Outer(#[source] Repeats);

    #[test]
    fn each_cause_is_said_once() {
        assert_eq!(
            error_chain(&Outer(Repeats(Inner))),
            "the kernel is not a bzImage: Kernel Loader: Invalid bzImage"
        );
        let io = std::io::Error::other("disk gone");
        assert_eq!(error_chain(&io), "disk gone");
    }
}
