//! `vmd run`: boot a kernel in a VM in the foreground, like `firecracker --config-file` or
//! `systemd-vmspawn`. It uses the same launcher as the daemon (a real fork+exec of the helper
//! with LISTEN_FDS), relays the console between the helper and stdin/stdout, and exits with the
//! helper's status: 0 guest powered off, 75 guest asked to reboot, 1 failure.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{self, MsgFlags};
use nix::sys::stat::SFlag;

use super::disk_option::{DiskOption, open_disks, parse_disk_option};
use super::net_option::{NetOption, open_nets, parse_net_option};
use crate::helper::{EXIT_FAILURE, EXIT_REBOOT, error_chain};
use crate::launch::{HelperExit, HelperProcess, HelperSpawn, Launcher};
use crate::poll_set::PollSet;
use crate::protocol::{Event, HelperFds, Request, VmConfig};

/// How long the helper may take to build the VM before `vmd run` gives up on it.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest gets to power off after Ctrl-C or SIGTERM (a second one kills it).
const INTERRUPT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Kernel to boot: a bzImage, or a 64-bit ELF such as vmlinux or the vmd test guest.
    #[arg(long, short = 'k')]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, short = 'i')]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Guest memory, in bytes or with a K, M, G or T suffix (a multiple of 2 MiB).
    #[arg(long, short = 'm', default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, short = 'p', default_value_t = 1)]
    pub cpus: u32,
    /// A disk, in guest order (repeatable): an image file (raw, or qcow2 with its backing chain),
    /// read-write unless `ro`. Opened and locked with your own rights.
    #[arg(long = "disk", short = 'd', value_name = "PATH[,ro][,format=raw|qcow2|auto][,serial=S]",
          value_parser = parse_disk_option)]
    pub disks: Vec<DiskOption>,
    /// A network interface, in guest order (repeatable): attach to the tap NAME (yours, or
    /// with CAP_NET_ADMIN), or take the tap fd N that vmd run inherited. The MAC is stable
    /// for the VM's --name unless given; frames the guest sends from another MAC are dropped
    /// unless locked-lladdr=off.
    #[arg(long = "net", short = 'n',
          value_name = "tap=NAME|fd=N[,mac=MAC][,locked-lladdr=off]",
          value_parser = parse_net_option)]
    pub nets: Vec<NetOption>,
    /// Give the guest a virtio-rng entropy source.
    #[arg(long)]
    pub entropy: bool,
    /// VM name (used in logs).
    #[arg(long, default_value = "run")]
    pub name: String,
    /// Run the helper without landlock, seccomp, uid and capability drop. For debugging only.
    #[arg(long)]
    pub no_sandbox: bool,
    /// Test aid: have the helper report what its sandbox allows.
    #[arg(long, hide = true)]
    pub probe_sandbox: bool,
}

/// Parses "268435456", "256M", "1G", "512k" (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 10),
        Some((i, 'm' | 'M')) => (&text[..i], 20),
        Some((i, 'g' | 'G')) => (&text[..i], 30),
        Some((i, 't' | 'T')) => (&text[..i], 40),
        _ => (text, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 256M, 1G, or a byte count)"))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Runs the command; returns the exit status.
pub fn run(args: RunArgs) -> i32 {
    match run_vm(&args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("vmd: {message}");
            EXIT_FAILURE
        }
    }
}

fn open_readable(what: &str, path: &Path) -> Result<OwnedFd, String> {
    File::open(path)
        .map(OwnedFd::from)
        .map_err(|e| format!("cannot open the {what} {}: {e}", path.display()))
}

fn run_vm(args: &RunArgs) -> Result<i32, String> {
    let mut config = VmConfig {
        name: args.name.clone(),
        vcpus: args.cpus,
        memory_bytes: args.memory,
        cmdline: args.cmdline.clone(),
        disks: Vec::new(),
        entropy: args.entropy,
        interfaces: Vec::new(),
    };
    config.validate().map_err(|e| e.to_string())?;
    if args.disks.len() > crate::protocol::MAX_DISKS {
        return Err(format!(
            "{} disks given; at most {} are allowed",
            args.disks.len(),
            crate::protocol::MAX_DISKS
        ));
    }
    // Locked until the helper, which inherits the open files, exits.
    let (disks, disk_configs) = open_disks(&args.disks)?;
    config.disks = disk_configs;
    if args.nets.len() > crate::protocol::MAX_NETS {
        return Err(format!(
            "{} interfaces given; at most {} are allowed",
            args.nets.len(),
            crate::protocol::MAX_NETS
        ));
    }
    let (nets, interface_configs) = open_nets(&args.name, &args.nets)?;
    config.interfaces = interface_configs;
    config.validate().map_err(|e| e.to_string())?;

    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let initrd = args
        .initrd
        .as_deref()
        .map(|initrd| open_readable("initrd", initrd))
        .transpose()?;
    let (console, helper_console) =
        UnixStream::pair().map_err(|e| format!("cannot create the console socket: {e}"))?;
    let fds = HelperFds {
        kvm: OwnedFd::from(kvm),
        kernel: open_readable("kernel", &args.kernel)?,
        initrd,
        disks,
        nets,
        console: Some(OwnedFd::from(helper_console)),
    };
    console
        .set_nonblocking(true)
        .map_err(|e| format!("cannot make the console socket non-blocking: {e}"))?;

    // Ctrl-C and SIGTERM become a request to power the guest off.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("cannot create a signalfd: {e}"))?;

    let mut helper_args = vec!["vm".to_string()];
    if args.no_sandbox {
        helper_args.push("--no-sandbox".into());
    }
    if args.probe_sandbox {
        helper_args.push("--probe-sandbox".into());
    }
    let launcher = Launcher::current_executable().map_err(|e| error_chain(&e))?;
    let helper = launcher
        .spawn(HelperSpawn {
            fds: fds.into_spawn_list(),
            args: helper_args,
        })
        .map_err(|e| error_chain(&e))?;

    helper
        .control
        .send_request(&Request::Start { config })
        .map_err(|e| format!("cannot send the configuration: {}", error_chain(&e)))?;
    match helper.control.recv_event_timeout(CREATE_TIMEOUT) {
        Ok(Some(Event::Created)) => {}
        Ok(Some(Event::Failed { reason })) => {
            finish(&helper);
            return Err(format!("cannot start the VM: {reason}"));
        }
        Ok(Some(other)) => {
            let _ = kill(helper.pid, Signal::SIGKILL);
            finish(&helper);
            return Err(format!("unexpected first event from the helper: {other:?}"));
        }
        Ok(None) => {
            let status = finish(&helper);
            return Err(format!(
                "the helper ended before creating the VM ({status})"
            ));
        }
        Err(err) => {
            let _ = kill(helper.pid, Signal::SIGKILL);
            finish(&helper);
            return Err(format!("no answer from the helper: {}", error_chain(&err)));
        }
    }

    let status = match relay(&helper, &console, &signal_fd)? {
        Some(done) => done,
        None => finish(&helper),
    };
    Ok(match status {
        HelperExit::Exited(code) => {
            if code == EXIT_REBOOT {
                eprintln!("vmd: the guest asked to reboot");
            }
            code
        }
        HelperExit::Signaled(signal) => {
            eprintln!("vmd: the VM helper was killed by signal {signal}");
            EXIT_FAILURE
        }
    })
}

impl std::fmt::Display for HelperExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HelperExit::Exited(code) => write!(f, "exit status {code}"),
            HelperExit::Signaled(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

fn finish(helper: &HelperProcess) -> HelperExit {
    helper.wait().unwrap_or(HelperExit::Exited(EXIT_FAILURE))
}

/// Copies the console to stdout and stdin to the console, reports the helper's events, and
/// returns when the helper is done and its output is written out (or given up on: a signal
/// after the helper's end leaves what stdout has not taken yet).
///
/// The helper is done when it has exited, or when it said the guest powered off or rebooted
/// and then closed its control socket: it does so once its vCPUs are stopped and its disks
/// flushed and closed, before the kernel tears down the KVM VM (milliseconds nobody needs to
/// wait for). Then the exit status is returned here, and the helper is not waited for.
fn relay(
    helper: &HelperProcess,
    console: &UnixStream,
    signal_fd: &SignalFd,
) -> Result<Option<HelperExit>, String> {
    let stdin = std::io::stdin();
    let mut stdin_open = true;
    let mut control_open = true;
    let mut console_open = true;
    let mut exited = false;
    let mut guest_end = GuestEnd::default();
    let mut interrupts = 0;
    let mut stdout = StdoutSink::new();
    let mut input: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if exited && !console_open && !stdout.has_pending() {
            if guest_end.done && !control_open {
                return Ok(guest_end.status);
            }
            report_remaining_events(helper, control_open, &mut guest_end);
            return Ok(None);
        }
        let mut fds = PollSet::new();
        // A full stdout buffer stops console reads: the console socket fills, and the helper's
        // COM1 drops output as it does when nobody reads.
        if console_open && stdout.has_room() {
            fds.watch(Source::Console, console.as_fd(), PollFlags::POLLIN);
        }
        if stdout.has_pending() {
            fds.watch(Source::Stdout, stdout.as_fd(), PollFlags::POLLOUT);
        }
        if !exited {
            fds.watch(Source::Exit, helper.pidfd.as_fd(), PollFlags::POLLIN);
        }
        fds.watch(Source::Signals, signal_fd.as_fd(), PollFlags::POLLIN);
        if control_open {
            fds.watch(Source::Control, helper.control.as_fd(), PollFlags::POLLIN);
        }
        if stdin_open && !exited && input.len() < INPUT_BUFFER {
            fds.watch(Source::Stdin, stdin.as_fd(), PollFlags::POLLIN);
        }
        if !input.is_empty() && !exited {
            fds.watch(Source::ConsoleInput, console.as_fd(), PollFlags::POLLOUT);
        }
        // Once the helper is done nothing more reaches the console: take what is there without
        // waiting for more.
        let draining = exited && console_open && stdout.has_room();
        let timeout = if draining {
            PollTimeout::ZERO
        } else {
            PollTimeout::NONE
        };
        let ready = fds
            .wait(timeout)
            .map_err(|err| format!("poll failed: {err}"))?;
        if draining && !ready.contains(&Source::Console) {
            console_open = false;
        }

        for source in ready {
            match source {
                Source::Console => {
                    let room = stdout.room().min(buf.len());
                    match nix::unistd::read(console.as_fd(), &mut buf[..room]) {
                        Ok(0) => console_open = false,
                        Ok(len) => stdout.push(&buf[..len]),
                        Err(Errno::EINTR) => {}
                        // Once the helper is gone nothing more can arrive.
                        Err(Errno::EAGAIN) => console_open = !exited,
                        Err(_) => console_open = false,
                    }
                }
                Source::Stdout => stdout.write_some(),
                // The helper is gone, so its end of the console is closed: what is left in the
                // socket is drained by the loop, then reads see EOF.
                Source::Exit => exited = true,
                Source::Control => {
                    control_open = report_events(helper, &mut guest_end);
                    if guest_end.closed && guest_end.status.is_some() {
                        guest_end.done = true;
                        exited = true;
                    }
                }
                Source::Stdin => {
                    let room = (INPUT_BUFFER - input.len()).min(buf.len());
                    match nix::unistd::read(stdin.as_fd(), &mut buf[..room]) {
                        Ok(0) | Err(_) => stdin_open = false,
                        Ok(len) => {
                            input.extend_from_slice(&buf[..len]);
                            stdin_open &= forward_input(console, &mut input);
                        }
                    }
                }
                Source::ConsoleInput => stdin_open &= forward_input(console, &mut input),
                Source::Signals => {
                    while let Ok(Some(_)) = signal_fd.read_signal() {
                        interrupts += 1;
                    }
                    if exited {
                        // Only stdout is left, and it has stalled: stop waiting for it.
                        if guest_end.done {
                            return Ok(guest_end.status);
                        }
                        report_remaining_events(helper, control_open, &mut guest_end);
                        return Ok(None);
                    }
                    if interrupts == 1 {
                        let _ = helper.control.send_request(&Request::Shutdown {
                            deadline_ms: INTERRUPT_SHUTDOWN_DEADLINE.as_millis() as u64,
                        });
                    } else if interrupts > 1 {
                        let _ = kill(helper.pid, Signal::SIGKILL);
                    }
                }
            }
        }
    }
}

/// Reports the events the helper sent before it ended.
fn report_remaining_events(helper: &HelperProcess, mut control_open: bool, end: &mut GuestEnd) {
    while control_open {
        control_open = report_events(helper, end);
    }
}

/// How the guest ended, from the helper's events.
#[derive(Default)]
struct GuestEnd {
    /// The exit status the helper's report stands for: power-off or reboot, and no error
    /// reported (a failure is only believed from the helper's real exit status).
    status: Option<HelperExit>,
    /// The helper reported an error or failure.
    error: bool,
    /// The helper closed its control socket (end of file, not an error).
    closed: bool,
    /// It did so after that report: it is done.
    done: bool,
}

impl GuestEnd {
    fn record(&mut self, event: &Event) {
        match event {
            Event::GuestPowerOff if !self.error => {
                let status = HelperExit::Exited(crate::helper::EXIT_POWER_OFF);
                self.status.get_or_insert(status);
            }
            Event::GuestReboot if !self.error => {
                self.status.get_or_insert(HelperExit::Exited(EXIT_REBOOT));
            }
            // Whatever was said before or after, an error leaves the status to the helper.
            Event::Error { .. } | Event::Failed { .. } => {
                self.error = true;
                self.status = None;
            }
            _ => {}
        }
    }
}

/// Which fd a poll slot of [`relay`] watches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Console,
    /// The console can take more of the input waiting for it.
    ConsoleInput,
    Stdout,
    Exit,
    Signals,
    Control,
    Stdin,
}

/// Input read from stdin and not yet taken by the console, at most this much: stdin is read
/// only while there is room, so a guest that reads slowly slows the typist, never loses input.
const INPUT_BUFFER: usize = 64 * 1024;

/// Writes as much of `pending` to the non-blocking `console` as it takes now; `false` when the
/// console is gone.
fn forward_input(console: &UnixStream, pending: &mut Vec<u8>) -> bool {
    while !pending.is_empty() {
        match nix::unistd::write(console, pending) {
            Ok(written) => {
                pending.drain(..written);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return true,
            Err(_) => {
                pending.clear();
                return false;
            }
        }
    }
    true
}

/// Console output not yet taken by stdout, at most this much.
const STDOUT_BUFFER: usize = 64 * 1024;
/// Bytes a pipe takes in one write without blocking once poll says it is writable.
const PIPE_BUF: usize = 4096;

/// Console output on its way to stdout, written without ever blocking the relay. Setting
/// O_NONBLOCK on the inherited stdout would change the file description every process
/// sharing it uses (the shell, a pager), so a pipe or terminal is opened again, privately and
/// non-blocking, and a socket is written with MSG_DONTWAIT.
struct StdoutSink {
    stdout: std::io::Stdout,
    target: StdoutTarget,
    pending: Vec<u8>,
    /// Writing failed (e.g. the reader is gone): output is dropped from then on.
    failed: bool,
}

enum StdoutTarget {
    /// Our own non-blocking open of stdout's pipe or terminal.
    Reopened(File),
    /// stdout is a socket: sent with MSG_DONTWAIT.
    Socket,
    /// A regular file (writes do not wait for a reader), or a pipe or terminal that could not be
    /// opened again: written only when poll says it is writable, at most PIPE_BUF bytes at a
    /// time, which a pipe then takes without blocking.
    Shared,
}

impl StdoutSink {
    fn new() -> Self {
        let stdout = std::io::stdout();
        let kind = nix::sys::stat::fstat(stdout.as_fd())
            .map(|stat| SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT);
        let target = match kind {
            Ok(SFlag::S_IFSOCK) => StdoutTarget::Socket,
            Ok(SFlag::S_IFIFO | SFlag::S_IFCHR) => OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open("/proc/self/fd/1")
                .map_or(StdoutTarget::Shared, StdoutTarget::Reopened),
            _ => StdoutTarget::Shared,
        };
        StdoutSink {
            stdout,
            target,
            pending: Vec::new(),
            failed: false,
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.target {
            StdoutTarget::Reopened(file) => file.as_fd(),
            StdoutTarget::Socket | StdoutTarget::Shared => self.stdout.as_fd(),
        }
    }

    /// How much more console output may be read now.
    fn room(&self) -> usize {
        if self.failed {
            PIPE_BUF
        } else {
            STDOUT_BUFFER.saturating_sub(self.pending.len())
        }
    }

    fn has_room(&self) -> bool {
        self.room() > 0
    }

    fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.pending.extend_from_slice(bytes);
        }
    }

    /// Writes what stdout takes now; called when poll says it is writable.
    fn write_some(&mut self) {
        let written = match &self.target {
            StdoutTarget::Reopened(file) => nix::unistd::write(file, &self.pending),
            StdoutTarget::Socket => socket::send(
                self.stdout.as_fd().as_raw_fd(),
                &self.pending,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ),
            StdoutTarget::Shared => {
                let chunk = self.pending.len().min(PIPE_BUF);
                nix::unistd::write(self.stdout.as_fd(), &self.pending[..chunk])
            }
        };
        match written {
            Ok(len) => {
                self.pending.drain(..len);
            }
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(err) => {
                eprintln!("vmd: cannot write the console to stdout: {err}; dropping it");
                self.failed = true;
                self.pending = Vec::new();
            }
        }
    }
}

/// Reads one event and reports what a user needs to see; false once the channel is closed.
fn report_events(helper: &HelperProcess, end: &mut GuestEnd) -> bool {
    match helper.control.recv_event_timeout(Duration::ZERO) {
        Ok(Some(event)) => {
            end.record(&event);
            match event {
                Event::Error { reason } | Event::Failed { reason } => {
                    eprintln!("vmd: {reason}");
                }
                event => tracing::debug!("helper event: {event:?}"),
            }
            true
        }
        Ok(None) => {
            end.closed = true;
            false
        }
        Err(crate::protocol::RecvError::TimedOut { .. }) => false,
        Err(err) => {
            eprintln!("vmd: {}", error_chain(&err));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn only_a_guest_report_without_an_error_stands_for_the_exit_status() {
        let mut end = GuestEnd::default();
        end.record(&Event::Created);
        assert_eq!(end.status, None);
        end.record(&Event::GuestReboot);
        assert_eq!(end.status, Some(HelperExit::Exited(EXIT_REBOOT)));
        // A failure after the report: only the helper's real status counts.
        end.record(&Event::Error {
            reason: "disk flush failed".into(),
        });
        assert_eq!(end.status, None);
        end.record(&Event::GuestPowerOff);
        assert_eq!(end.status, None);
        let mut powered_off = GuestEnd::default();
        powered_off.record(&Event::GuestPowerOff);
        assert_eq!(powered_off.status, Some(HelperExit::Exited(0)));
        let mut failed_first = GuestEnd::default();
        failed_first.record(&Event::Failed {
            reason: "no".into(),
        });
        assert_eq!(failed_first.status, None);
    }

    #[test]
    fn input_the_console_cannot_take_yet_waits_instead_of_being_lost() {
        let (ours, mut guest) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("non-blocking");
        // Far more than a socket buffer holds.
        let sent: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let mut pending = sent.clone();
        assert!(forward_input(&ours, &mut pending));
        assert!(!pending.is_empty(), "the socket took 4 MiB at once");
        let mut received = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        while received.len() < sent.len() {
            let n = guest.read(&mut chunk).expect("read");
            received.extend_from_slice(&chunk[..n]);
            assert!(forward_input(&ours, &mut pending));
        }
        assert!(pending.is_empty());
        assert_eq!(received, sent);
        // A console that is gone ends forwarding.
        drop(guest);
        let mut more = vec![1u8; 16];
        assert!(!forward_input(&ours, &mut more));
    }
}
