//! The helper's main loop while the guest runs: one `poll` over the VM's stop event, the
//! termination signals, the control socket and the console input.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::{EXIT_FAILURE, EXIT_POWER_OFF, EXIT_REBOOT, error_chain, panic_reason};
use crate::devices::GuestStop;
use crate::devices::bus::lock_device;
use crate::poll_set::PollSet;
use crate::protocol::{ControlChannel, Event, RecvError, Request, RunState};
use crate::vmm::vcpu::VcpuThreads;
use crate::vmm::vm::Vm;

/// How long a guest gets to act on the power button after SIGTERM before the helper stops it.
/// systemd's default stop timeout is 90 s; staying well inside it keeps the stop clean.
pub const SIGTERM_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);
/// How often console input is retried while the guest's receive FIFO is full.
const CONSOLE_RETRY: Duration = Duration::from_millis(20);
/// How often a hung-up console (a pty master whose terminal side nobody holds, e.g. while the
/// daemon restarts) is looked at again. Such a master polls ready at once, forever: watching it
/// without a pause would spin the main thread.
const CONSOLE_HUNG_UP_RETRY: Duration = Duration::from_millis(250);

/// What a signal to the helper asks for, following systemd's conventions for machines
/// (`machinectl poweroff` sends SIGRTMIN+4, `machinectl reboot` SIGINT, `systemctl stop`
/// SIGTERM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalRequest {
    /// Press the ACPI power button and stop the VM if the guest has not powered off in time.
    PowerOff,
    /// Reset the VM: the helper ends as after a guest reboot (exit 75) and its launcher starts
    /// a fresh one. A guest cannot be asked to reboot over ACPI, so this is a hard reset.
    Reboot,
}

/// The signal `machinectl poweroff` sends (glibc's SIGRTMIN, as systemd counts it, plus 4).
pub fn machine_poweroff_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

/// What `signal` asks for, if it is one the helper handles.
pub fn signal_request(signal: libc::c_int) -> Option<SignalRequest> {
    match signal {
        libc::SIGTERM | libc::SIGHUP => Some(SignalRequest::PowerOff),
        libc::SIGINT => Some(SignalRequest::Reboot),
        s if s == machine_poweroff_signal() => Some(SignalRequest::PowerOff),
        _ => None,
    }
}

/// The signals the helper handles (see [`signal_request`]). The launcher already starts the
/// helper with exactly these blocked, so one sent while the helper starts up stays pending for
/// the signalfd instead of killing it.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(signal);
    }
    let mut raw = *set.as_ref();
    // SAFETY: `raw` is an initialized sigset_t and the signal number is a valid real-time
    // signal, so sigaddset only sets one bit in it.
    unsafe { libc::sigaddset(&mut raw, machine_poweroff_signal()) };
    // SAFETY: `raw` came from a valid SigSet and sigaddset kept it valid.
    unsafe { SigSet::from_sigset_t_unchecked(raw) }
}

/// Blocks [`handled_signals`] in the calling thread (and every thread it starts later) and
/// returns a signalfd for them.
pub fn block_termination_signals() -> nix::Result<SignalFd> {
    let set = handled_signals();
    set.thread_block()?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
}

pub struct EventLoop<'a> {
    vm: Vm,
    vcpus: Option<VcpuThreads>,
    control: &'a ControlChannel,
    control_open: bool,
    signals: SignalFd,
    state: RunState,
    shutdown_deadline: Option<Instant>,
    console_open: bool,
    /// The console hung up: it is not watched before this instant.
    console_hung_up_until: Option<Instant>,
}

/// What one round of the main loop does with the console input.
#[derive(Debug, PartialEq, Eq)]
struct ConsolePlan {
    watch: bool,
    /// Wake up after this long at the latest, to look at the console again.
    retry: Option<Duration>,
}

/// Whether to watch the console this round: only while it is open, the guest has room for
/// input and it has not just hung up; otherwise when to look again.
fn console_plan(
    open: bool,
    has_room: bool,
    hung_up_until: Option<Instant>,
    now: Instant,
) -> ConsolePlan {
    if !open {
        return ConsolePlan {
            watch: false,
            retry: None,
        };
    }
    if let Some(until) = hung_up_until.filter(|until| *until > now) {
        return ConsolePlan {
            watch: false,
            retry: Some(until - now),
        };
    }
    if !has_room {
        return ConsolePlan {
            watch: false,
            retry: Some(CONSOLE_RETRY),
        };
    }
    ConsolePlan {
        watch: true,
        retry: None,
    }
}

/// Which fd a poll slot watches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Stop,
    Signals,
    Control,
    Console,
}

impl<'a> EventLoop<'a> {
    pub fn new(vm: Vm, vcpus: VcpuThreads, control: &'a ControlChannel, signals: SignalFd) -> Self {
        let console_open = vm.devices.console_input.is_some();
        EventLoop {
            vm,
            vcpus: Some(vcpus),
            control,
            control_open: true,
            signals,
            state: RunState::Paused,
            shutdown_deadline: None,
            console_open,
            console_hung_up_until: None,
        }
    }

    /// Answers `Created`, lets the vCPUs run, and loops until the VM ends; returns the exit
    /// status and the VM, whose vCPUs are stopped and whose devices are flushed and closed
    /// (the caller decides when guest memory and the KVM VM go, see `helper::main`).
    pub fn run(mut self) -> (i32, Vm) {
        // A panic stops the vCPUs like any other end, before the VM (and the guest memory
        // they run on) is dropped, and is reported as a failure.
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_until_end()))
            .unwrap_or_else(|payload| {
                let reason = panic_reason("while running the VM", payload.as_ref());
                tracing::error!("{reason}");
                self.send(Event::Error { reason });
                EXIT_FAILURE
            });
        self.finish(code)
    }

    fn run_until_end(&mut self) -> i32 {
        self.send(Event::Created);
        if let Some(vcpus) = &self.vcpus {
            vcpus.resume();
        }
        self.set_state(RunState::Running);
        loop {
            if let Some(code) = self.check_stop() {
                return code;
            }
            if let Some(deadline) = self.shutdown_deadline
                && Instant::now() >= deadline
            {
                tracing::warn!(
                    "the guest did not power off in time after the power button; stopping it"
                );
                self.send(Event::Error {
                    reason: "the guest did not power off in time; the VM was stopped".into(),
                });
                return EXIT_POWER_OFF;
            }
            if let Err(err) = self.wait_and_dispatch() {
                tracing::error!("VMM main loop failed: {err}");
                self.send(Event::Error {
                    reason: format!("VMM main loop failed: {err}"),
                });
                return EXIT_FAILURE;
            }
        }
    }

    /// Stops the vCPUs and the devices; returns `code` and the VM.
    fn finish(mut self, code: i32) -> (i32, Vm) {
        if let Some(vcpus) = self.vcpus.take() {
            vcpus.stop();
        }
        self.vm.finish_console();
        // Whatever ended the VM, disks are flushed (and closed) before the helper exits.
        self.vm.stop_devices();
        (code, self.vm)
    }

    /// Turns a recorded stop into events and an exit status.
    fn check_stop(&mut self) -> Option<i32> {
        let reason = self.vm.stop.reason()?;
        Some(match reason {
            GuestStop::PowerOff => {
                tracing::info!("the guest powered off");
                self.send(Event::GuestPowerOff);
                EXIT_POWER_OFF
            }
            GuestStop::Reboot => {
                tracing::info!("the guest asked to reboot");
                self.send(Event::GuestReboot);
                EXIT_REBOOT
            }
            GuestStop::Failure(reason) => {
                self.send(Event::Error { reason });
                EXIT_FAILURE
            }
        })
    }

    fn wait_and_dispatch(&mut self) -> Result<(), String> {
        let console_has_room =
            self.console_open && lock_device(&self.vm.devices.serial).input_capacity() > 0;
        let console = console_plan(
            self.console_open,
            console_has_room,
            self.console_hung_up_until,
            Instant::now(),
        );
        let mut timeout = console.retry;
        if let Some(deadline) = self.shutdown_deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            timeout = Some(timeout.map_or(left, |t| t.min(left)));
        }

        let mut fds = PollSet::new();
        let stop_fd = self.vm.stop.event_fd();
        // SAFETY: the eventfd is owned by the VM's StopSignal, which outlives this call.
        let stop_fd = unsafe { BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(stop_fd)) };
        fds.watch(Source::Stop, stop_fd, PollFlags::POLLIN);
        fds.watch(Source::Signals, self.signals.as_fd(), PollFlags::POLLIN);
        if self.control_open {
            fds.watch(Source::Control, self.control.as_fd(), PollFlags::POLLIN);
        }
        let console_fd = self.vm.devices.console_input.as_ref().map(OwnedFd::as_fd);
        if let (Some(console_fd), true) = (console_fd, console.watch) {
            fds.watch(Source::Console, console_fd, PollFlags::POLLIN);
        }

        let poll_timeout = match timeout {
            Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let ready = fds
            .wait(poll_timeout)
            .map_err(|err| format!("poll failed: {err}"))?;
        for source in ready {
            match source {
                Source::Stop => {
                    // Only resets the counter; check_stop reads the reason.
                    let _ = self.vm.stop.event_fd().read();
                }
                Source::Signals => self.handle_signals(),
                Source::Control => self.handle_control(),
                Source::Console => self.forward_console_input(),
            }
        }
        Ok(())
    }

    fn handle_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let signal = info.ssi_signo as libc::c_int;
            match signal_request(signal) {
                Some(SignalRequest::PowerOff) => {
                    tracing::info!("received signal {signal}; asking the guest to power off");
                    self.begin_shutdown(SIGTERM_SHUTDOWN_DEADLINE);
                }
                Some(SignalRequest::Reboot) => {
                    tracing::info!("received signal {signal}; resetting the VM");
                    self.vm.stop.request(GuestStop::Reboot);
                }
                None => tracing::warn!("received unexpected signal {signal}; ignored"),
            }
        }
    }

    fn handle_control(&mut self) {
        match self.control.recv_request() {
            Ok(Some(request)) => self.handle_request(request),
            Ok(None) => {
                // Every holder of the other end is gone. The daemon keeps it in systemd's fd
                // store across restarts, so this means nobody can manage the VM any more (an
                // orphaned `vmd run`): ask the guest to power off rather than run unmanaged.
                tracing::warn!(
                    "the control socket closed: nobody manages this VM; shutting it down"
                );
                self.control_open = false;
                self.begin_shutdown(SIGTERM_SHUTDOWN_DEADLINE);
            }
            Err(RecvError::Io(err)) => {
                tracing::error!("cannot read the control socket: {err}; ignoring it from now on");
                self.control_open = false;
            }
            Err(err) => {
                let reason = format!("malformed control request: {}", error_chain(&err));
                tracing::warn!("{reason}");
                self.send(Event::Error { reason });
            }
        }
    }

    fn handle_request(&mut self, request: Request) {
        match request {
            Request::Pause => {
                if self.shutdown_deadline.is_some() {
                    self.send(Event::Error {
                        reason: "cannot pause: the VM is shutting down".into(),
                    });
                } else if self.state == RunState::Running {
                    if let Some(vcpus) = &self.vcpus {
                        vcpus.pause();
                    }
                    self.set_state(RunState::Paused);
                } else {
                    self.set_state(RunState::Paused);
                }
            }
            Request::Resume => {
                if let Some(vcpus) = &self.vcpus {
                    vcpus.resume();
                }
                self.set_state(RunState::Running);
            }
            Request::Shutdown { deadline_ms } => {
                self.begin_shutdown(Duration::from_millis(deadline_ms));
            }
            Request::Query => {
                let state = self.state;
                self.send(Event::State { state });
            }
            Request::Start { .. } => self.send(Event::Error {
                reason: "the VM is already started".into(),
            }),
        }
    }

    /// Presses the power button and gives the guest until `deadline` to power off. A paused
    /// guest is resumed first: it cannot react otherwise.
    fn begin_shutdown(&mut self, within: Duration) {
        if self.state == RunState::Paused {
            if let Some(vcpus) = &self.vcpus {
                vcpus.resume();
            }
            self.set_state(RunState::Running);
        }
        self.vm.press_power_button();
        let deadline = Instant::now() + within;
        self.shutdown_deadline = Some(self.shutdown_deadline.map_or(deadline, |d| d.min(deadline)));
    }

    fn forward_console_input(&mut self) {
        let Some(console) = &self.vm.devices.console_input else {
            return;
        };
        let mut serial = lock_device(&self.vm.devices.serial);
        let mut buf = [0u8; 64];
        let room = serial.input_capacity().min(buf.len());
        match nix::unistd::read(console.as_fd(), &mut buf[..room]) {
            Ok(0) => {
                tracing::debug!("console input closed");
                self.console_open = false;
            }
            Ok(len) => {
                self.console_hung_up_until = None;
                serial.enqueue_input(&buf[..len]);
            }
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            // A pty master reads EIO (and polls ready) while nobody has the terminal side open,
            // e.g. while the daemon restarts: look again later, not in a busy loop.
            Err(Errno::EIO) => {
                self.console_hung_up_until = Some(Instant::now() + CONSOLE_HUNG_UP_RETRY);
            }
            Err(err) => {
                tracing::warn!("cannot read console input: {err}; ignoring it from now on");
                self.console_open = false;
            }
        }
    }

    fn set_state(&mut self, state: RunState) {
        self.state = state;
        self.send(Event::State { state });
    }

    fn send(&mut self, event: Event) {
        if !self.control_open {
            return;
        }
        if let Err(err) = self.control.send_event(&event) {
            tracing::info!("cannot send {event:?} to the launcher: {err}");
            self.control_open = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hung_up_console_is_not_watched_until_its_retry() {
        let now = Instant::now();
        let later = now + CONSOLE_HUNG_UP_RETRY;
        assert_eq!(
            console_plan(true, true, Some(later), now),
            ConsolePlan {
                watch: false,
                retry: Some(CONSOLE_HUNG_UP_RETRY)
            }
        );
        // Once the retry is due it is watched again.
        assert_eq!(
            console_plan(true, true, Some(later), later),
            ConsolePlan {
                watch: true,
                retry: None
            }
        );
    }

    #[test]
    fn a_full_or_closed_console_is_not_watched() {
        let now = Instant::now();
        assert_eq!(
            console_plan(true, false, None, now),
            ConsolePlan {
                watch: false,
                retry: Some(CONSOLE_RETRY)
            }
        );
        assert_eq!(
            console_plan(false, true, None, now),
            ConsolePlan {
                watch: false,
                retry: None
            }
        );
        assert_eq!(
            console_plan(true, true, None, now),
            ConsolePlan {
                watch: true,
                retry: None
            }
        );
    }
}
