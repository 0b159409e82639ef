//! A VM's console: a pseudo-terminal the daemon allocates when the VM starts and releases when
//! it ends, so it survives guest reboots (each new helper gets the same master), daemon
//! restarts (the master waits in systemd's fd store as `vmcon-<name>`, and the terminal side is
//! opened again from it) and clients can come and go (`OpenConsole`'s one client is relayed to
//! the terminal side by [`super::console_relay`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::pty::openpty;
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};

/// Errors from creating or sharing a console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot allocate a pseudo-terminal")]
    Open(#[source] nix::Error),
    #[error("cannot put the console terminal in raw mode")]
    Raw(#[source] nix::Error),
    #[error("cannot duplicate the console fd")]
    Dup(#[source] std::io::Error),
    #[error("cannot open the terminal side of the stored console")]
    Peer(#[source] std::io::Error),
}

pub struct Console {
    /// The helper writes guest output here and reads guest input.
    master: OwnedFd,
    /// Clients read guest output here and write its input. The daemon keeps one open, so the
    /// helper never sees a hung-up terminal between clients.
    terminal: OwnedFd,
}

impl Console {
    pub fn new() -> Result<Console, ConsoleError> {
        let pty = openpty(None, None).map_err(ConsoleError::Open)?;
        for fd in [&pty.master, &pty.slave] {
            fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(ConsoleError::Open)?;
        }
        make_raw(&pty.slave)?;
        Ok(Console {
            master: pty.master,
            terminal: pty.slave,
        })
    }

    /// The console of a running VM whose master a previous daemon kept: its terminal side is
    /// opened again from the master (TIOCGPTPEER), so the helper's console is live again.
    pub fn from_master(master: OwnedFd) -> Result<Console, ConsoleError> {
        // SAFETY: TIOCGPTPEER takes open flags and returns a new fd (or -1); `master` is an
        // open fd for the duration of the call.
        let fd = unsafe {
            libc::ioctl(
                master.as_raw_fd(),
                libc::TIOCGPTPEER,
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(ConsoleError::Peer(std::io::Error::last_os_error()));
        }
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let terminal = unsafe { OwnedFd::from_raw_fd(fd) };
        // The terminal's settings were reset when its last fd closed with the old daemon.
        make_raw(&terminal)?;
        Ok(Console { master, terminal })
    }

    /// Takes what the guest wrote and nobody read yet, at most `limit` bytes (the last ones),
    /// without waiting for more.
    pub fn take_unread_output(&self, limit: usize) -> Vec<u8> {
        let mut output = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let mut fds = [PollFd::new(self.terminal.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(1)
                    if fds[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLIN)) => {}
                _ => break,
            }
            match nix::unistd::read(self.terminal.as_fd(), &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => output.extend_from_slice(&buf[..n]),
            }
            if output.len() > limit {
                output.drain(..output.len() - limit);
            }
        }
        output
    }

    /// The master, as kept in systemd's fd store.
    pub fn master(&self) -> BorrowedFd<'_> {
        self.master.as_fd()
    }

    /// The fd passed to a helper as `console`.
    pub fn helper_end(&self) -> Result<OwnedFd, ConsoleError> {
        self.master.try_clone().map_err(ConsoleError::Dup)
    }

    /// The terminal side, for the relay to `OpenConsole`'s client.
    pub fn client_end(&self) -> Result<OwnedFd, ConsoleError> {
        self.terminal.try_clone().map_err(ConsoleError::Dup)
    }
}

/// Raw: no echo, no line editing, no CR/LF translation; the guest's bytes pass unchanged.
fn make_raw(terminal: &OwnedFd) -> Result<(), ConsoleError> {
    let mut termios = tcgetattr(terminal).map_err(ConsoleError::Raw)?;
    cfmakeraw(&mut termios);
    tcsetattr(terminal, SetArg::TCSANOW, &termios).map_err(ConsoleError::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_from_a_kept_master_reaches_the_same_terminal() {
        let first = Console::new().expect("pty");
        let master = first.helper_end().expect("dup");
        // The old daemon is gone: only the master (in the fd store) and the helper's copy stay.
        drop(first);
        let console = Console::from_master(master).expect("from master");
        let helper = console.helper_end().expect("dup");
        let client = console.client_end().expect("dup");
        nix::unistd::write(&helper, b"after\r\n").expect("write");
        let mut buf = [0u8; 64];
        let n = nix::unistd::read(client.as_fd(), &mut buf).expect("read");
        // Raw again: no CR/LF translation on the way.
        assert_eq!(&buf[..n], b"after\r\n");
        nix::unistd::write(&client, b"in").expect("write");
        let n = nix::unistd::read(helper.as_fd(), &mut buf).expect("read");
        assert_eq!(&buf[..n], b"in");
    }

    #[test]
    fn unread_output_is_taken_up_to_its_last_bytes() {
        let console = Console::new().expect("pty");
        let helper = console.helper_end().expect("dup");
        nix::unistd::write(&helper, b"first line\nlast line\n").expect("write");
        assert_eq!(console.take_unread_output(10), b"last line\n");
        assert!(console.take_unread_output(10).is_empty());
    }

    #[test]
    fn a_console_needs_a_pty_master() {
        let (read, _write) = nix::unistd::pipe().expect("pipe");
        assert!(matches!(
            Console::from_master(read),
            Err(ConsoleError::Peer(_))
        ));
    }

    #[test]
    fn bytes_pass_unchanged_both_ways() {
        let console = Console::new().expect("pty");
        let helper = console.helper_end().expect("dup");
        let client = console.client_end().expect("dup");
        nix::unistd::write(&helper, b"guest output\r\n").expect("write");
        let mut buf = [0u8; 64];
        let n = nix::unistd::read(client.as_fd(), &mut buf).expect("read");
        assert_eq!(&buf[..n], b"guest output\r\n");
        nix::unistd::write(&client, b"typed\n").expect("write");
        let n = nix::unistd::read(helper.as_fd(), &mut buf).expect("read");
        assert_eq!(&buf[..n], b"typed\n");
    }
}
