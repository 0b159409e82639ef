//! `vmd run`: boot a kernel in a VM in the foreground, like `firecracker --config-file` or
//! `systemd-vmspawn`. It uses the same launcher as the daemon (a real fork+exec of the helper
//! with LISTEN_FDS), relays the console between the helper and stdin/stdout, and exits with the
//! helper's status: 0 guest powered off, 75 guest asked to reboot, 1 failure.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::helper::{EXIT_FAILURE, EXIT_REBOOT, error_chain};
use crate::launch::{HelperExit, HelperProcess, HelperSpawn, Launcher};
use crate::protocol::{Event, Request, VmConfig};

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
    let config = VmConfig {
        name: args.name.clone(),
        vcpus: args.cpus,
        memory_bytes: args.memory,
        cmdline: args.cmdline.clone(),
    };
    config.validate().map_err(|e| e.to_string())?;

    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let mut fds = vec![
        ("kvm".to_string(), OwnedFd::from(kvm)),
        ("kernel".to_string(), open_readable("kernel", &args.kernel)?),
    ];
    if let Some(initrd) = &args.initrd {
        fds.push(("initrd".to_string(), open_readable("initrd", initrd)?));
    }
    let (console, helper_console) =
        UnixStream::pair().map_err(|e| format!("cannot create the console socket: {e}"))?;
    fds.push(("console".to_string(), OwnedFd::from(helper_console)));
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
            fds,
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

    relay(&helper, &console, &signal_fd)?;
    let status = finish(&helper);
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
/// returns when the helper has exited and its output is drained.
fn relay(helper: &HelperProcess, console: &UnixStream, signal_fd: &SignalFd) -> Result<(), String> {
    let stdin = std::io::stdin();
    let mut stdin_open = true;
    let mut control_open = true;
    let mut interrupts = 0;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = vec![
            PollFd::new(console.as_fd(), PollFlags::POLLIN),
            PollFd::new(helper.pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN),
        ];
        if control_open {
            fds.push(PollFd::new(helper.control.as_fd(), PollFlags::POLLIN));
        }
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(err) => return Err(format!("poll failed: {err}")),
        }
        let ready = |i: usize| {
            fds.get(i)
                .and_then(PollFd::revents)
                .is_some_and(|r| !r.is_empty())
        };
        let (console_ready, exited, signalled) = (ready(0), ready(1), ready(2));
        let control_ready = control_open && ready(3);
        let stdin_ready = stdin_open && ready(if control_open { 4 } else { 3 });
        drop(fds);

        if console_ready {
            copy_console_out(console, &mut stdout, &mut buf);
        }
        if control_ready {
            control_open = report_events(helper);
        }
        if stdin_ready {
            match nix::unistd::read(stdin.as_fd(), &mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(len) => {
                    let _ = (&*console).write_all(&buf[..len]);
                }
            }
        }
        if signalled {
            while let Ok(Some(_)) = signal_fd.read_signal() {
                interrupts += 1;
            }
            if interrupts == 1 {
                let _ = helper.control.send_request(&Request::Shutdown {
                    deadline_ms: INTERRUPT_SHUTDOWN_DEADLINE.as_millis() as u64,
                });
            } else if interrupts > 1 {
                let _ = kill(helper.pid, Signal::SIGKILL);
            }
        }
        if exited {
            // The helper is gone, so its end of the console is closed: drain what is left.
            copy_console_out(console, &mut stdout, &mut buf);
            while control_open {
                control_open = report_events(helper);
            }
            return Ok(());
        }
    }
}

/// Copies what the console has now to stdout (the console socket is non-blocking).
fn copy_console_out(console: &UnixStream, stdout: &mut impl Write, buf: &mut [u8]) {
    loop {
        match nix::unistd::read(console.as_fd(), buf) {
            Ok(0) => break,
            Ok(len) => {
                let _ = stdout.write_all(&buf[..len]);
                let _ = stdout.flush();
            }
            Err(Errno::EINTR) => continue,
            // EAGAIN: nothing more for now.
            Err(_) => break,
        }
    }
}

/// Reads one event and reports what a user needs to see; false once the channel is closed.
fn report_events(helper: &HelperProcess) -> bool {
    match helper.control.recv_event_timeout(Duration::ZERO) {
        Ok(Some(Event::Error { reason } | Event::Failed { reason })) => {
            eprintln!("vmd: {reason}");
            true
        }
        Ok(Some(event)) => {
            tracing::debug!("helper event: {event:?}");
            true
        }
        Ok(None) => false,
        Err(crate::protocol::RecvError::TimedOut { .. }) => false,
        Err(err) => {
            eprintln!("vmd: {}", error_chain(&err));
            true
        }
    }
}
