//! `vmctl console` (and `start -c`): the user's terminal on the guest's console.
//!
//! The relay itself ([`crate::relay`]) is a blocking loop on its own thread. This side puts the
//! terminal in raw mode (only when stdin is one) and restores it whatever happens, turns SIGINT,
//! SIGTERM and SIGHUP into a clean stop, and watches the VM so that the session ends, after the
//! last output, when the VM goes down.

use std::{
    io::{self, Write},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    time::Duration,
};

use nix::{
    sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr},
    unistd::{isatty, pipe, write},
};
use tokio::signal::unix::{SignalKind, signal};
use zbus::{Connection, OwnedObjectPath};

use crate::{
    cli::EscapeChar,
    error::{VmctlError, is_console_busy},
    proxies::VmProxy,
    relay::{self, Ends, RelayEnd, control},
    watch::{Down, Watcher},
};

/// How to attach.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub escape: EscapeChar,
    /// Take the console over from the client that has it.
    pub force: bool,
    pub quiet: bool,
}

/// Attaches to the console of `vm` (called `name`, at `path`) until the user leaves, the console
/// closes, the VM goes down or a signal comes. Returns the exit status: 0, 1 if the VM failed, or
/// 128 + the signal's number.
pub async fn attach(
    conn: &Connection,
    vm: &VmProxy<'_>,
    name: &str,
    path: OwnedObjectPath,
    options: Options,
) -> Result<u8, VmctlError> {
    let quiet = options.quiet;
    let opened = if options.force {
        vm.open_console_force().await
    } else {
        vm.open_console().await
    };
    let console: OwnedFd = match opened {
        Ok(fd) => fd.into(),
        Err(error) if is_console_busy(&error) => {
            // The daemon's sentence says who has it.
            let said = crate::error::describe(&error);
            let said = said.trim_end_matches('.');
            return Err(VmctlError::Message(format!(
                "{said}; vmctl console --force {name} takes it over"
            )));
        }
        Err(error) => return Err(error.into()),
    };
    let escape = match options.escape {
        EscapeChar::Byte(byte) => Some(byte),
        EscapeChar::None => None,
    };
    // Subscribe before the session starts, so that a VM stopping right away is noticed.
    let mut watcher = Watcher::new(conn, path).await?;
    let mut signals = Signals::new()?;
    let (control_r, control_w) =
        pipe().map_err(|errno| VmctlError::io("cannot create a pipe", errno))?;

    let stdin = io::stdin();
    let interactive = isatty(stdin.as_fd()).unwrap_or(false);
    let raw = if interactive {
        Some(RawMode::enter(stdin.as_fd())?)
    } else {
        None
    };
    if interactive && !quiet {
        match escape {
            Some(byte) => {
                let e = crate::escape::shown(byte);
                eprint!("Connected to vm {name} (type {e}. to disconnect, {e}? for help)\r\n");
            }
            None => eprint!("Connected to vm {name} (no escape character)\r\n"),
        }
    }

    let mut relay = tokio::task::spawn_blocking(move || {
        relay::relay(&Ends {
            console: console.as_fd(),
            input: io::stdin().as_fd(),
            output: io::stdout().as_fd(),
            control: control_r.as_fd(),
            escape,
        })
    });

    let mut down: Option<Down> = None;
    let mut watching = true;
    let mut caught: Option<i32> = None;
    let mut pause = None;
    let ended = loop {
        let pause_first = pause.take();
        tokio::select! {
            ended = &mut relay => break ended,
            result = async {
                if let Some(pause) = pause_first {
                    tokio::time::sleep(pause).await;
                }
                watcher.wait_down().await
            }, if watching => match result {
                // While the daemon restarts, the VM's object is missing for a moment; the
                // session goes on (the daemon keeps it), and a VM really gone closes its
                // console.
                Ok(Down::Gone) => pause = Some(GONE_RECHECK),
                Ok(how) => {
                    watching = false;
                    down = Some(how);
                    tell(&control_w, control::DRAIN);
                }
                // Not knowing the state is no reason to end the session: keep relaying.
                Err(_) => watching = false,
            },
            signo = signals.next() => {
                caught = Some(signo);
                tell(&control_w, control::QUIT);
            }
        }
    };
    drop(raw);
    let _ = io::stdout().flush();

    let outcome = ended
        .map_err(|error| VmctlError::Message(format!("the console relay failed: {error}")))?
        .map_err(|error| VmctlError::io("relaying the console", error))?;
    let ended = outcome.end;
    // Whatever is said now starts on a line of its own, not after the guest's last words.
    let new_line = if outcome.mid_line { "\n" } else { "" };
    if let Some(signo) = caught {
        if outcome.mid_line {
            println!();
        }
        return Ok(128u8.saturating_add(u8::try_from(signo).unwrap_or(0)));
    }
    if interactive && !quiet && ended == RelayEnd::Escape {
        eprintln!("{new_line}[EOT]");
    }
    let mut taken_over = false;
    if ended == RelayEnd::ConsoleClosed && down.is_none() {
        // The console closes because the VM goes down, or because another client took it
        // over: then the daemon says the console is busy.
        match vm.open_console().await {
            Err(error) if is_console_busy(&error) => taken_over = true,
            // Free again (the fd is closed at once), or gone with the VM: say how it went down.
            _ => {
                if let Ok(Ok(how)) = tokio::time::timeout(STATE_GRACE, watcher.wait_down()).await {
                    down = Some(how);
                }
            }
        }
    }
    match down {
        Some(Down::Failed(reason)) => {
            let reason = if reason.is_empty() {
                "no reason given".to_owned()
            } else {
                reason
            };
            eprintln!("{new_line}vmctl: vm {name} failed: {reason}");
            Ok(1)
        }
        Some(Down::Stopped | Down::Gone) => {
            if !quiet {
                eprintln!("{new_line}vmctl: vm {name} stopped");
            }
            Ok(0)
        }
        None if taken_over => {
            eprintln!("{new_line}vmctl: the console of vm {name} was taken over by another client");
            Ok(1)
        }
        None if ended == RelayEnd::ConsoleClosed => {
            eprintln!("{new_line}vmctl: the console of vm {name} closed");
            Ok(1)
        }
        None => Ok(0),
    }
}

/// How long to wait before asking again about a VM whose object was missing.
const GONE_RECHECK: Duration = Duration::from_millis(500);

/// How long to wait for the VM's state to settle after its console closed (the helper's exit,
/// disks flushed, the scope gone).
const STATE_GRACE: Duration = Duration::from_secs(15);

/// Sends one control byte to the relay; it cannot fail in a way worth reporting (the relay
/// holds the read end until it returns).
fn tell(control_w: &OwnedFd, byte: u8) {
    let _ = write(control_w, &[byte]);
}

/// SIGINT, SIGTERM and SIGHUP, handled by Tokio so that they end the session cleanly (the
/// terminal restored) instead of killing vmctl.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, VmctlError> {
        let listen = |kind: SignalKind| {
            signal(kind).map_err(|error| VmctlError::io("cannot handle signals", error))
        };
        Ok(Self {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
            hangup: listen(SignalKind::hangup())?,
        })
    }

    /// The number of the next signal.
    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
            _ = self.hangup.recv() => libc::SIGHUP,
        }
    }
}

/// The terminal in raw mode; the previous settings come back when this is dropped, on every
/// path out of [`attach`] including errors and panics.
struct RawMode<'a> {
    fd: BorrowedFd<'a>,
    saved: Termios,
}

impl<'a> RawMode<'a> {
    fn enter(fd: BorrowedFd<'a>) -> Result<Self, VmctlError> {
        let saved = tcgetattr(fd)
            .map_err(|errno| VmctlError::io("cannot read the terminal mode", errno))?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        // Raw input, but output processing as the terminal had it: a guest that ends its lines
        // with a bare \n (the pty already turns those into \r\n unless the guest side is raw)
        // still shows lines that start at the left margin, not a staircase.
        raw.output_flags = saved.output_flags;
        tcsetattr(fd, SetArg::TCSAFLUSH, &raw)
            .map_err(|errno| VmctlError::io("cannot put the terminal in raw mode", errno))?;
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        let _ = tcsetattr(self.fd, SetArg::TCSADRAIN, &self.saved);
    }
}
