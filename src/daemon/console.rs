//! A VM's console: a pseudo-terminal owned by the daemon for the VM's whole life, so it
//! survives guest reboots (each new helper gets the same master) and clients can come and go
//! (each `OpenConsole` hands out the terminal side).

use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
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
        // Raw: no echo, no line editing, no CR/LF translation; the guest's bytes pass unchanged.
        let mut termios = tcgetattr(&pty.slave).map_err(ConsoleError::Raw)?;
        cfmakeraw(&mut termios);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &termios).map_err(ConsoleError::Raw)?;
        Ok(Console {
            master: pty.master,
            terminal: pty.slave,
        })
    }

    /// The fd passed to a helper as `console`.
    pub fn helper_end(&self) -> Result<OwnedFd, ConsoleError> {
        self.master.try_clone().map_err(ConsoleError::Dup)
    }

    /// The fd handed to a client by `OpenConsole`.
    pub fn client_end(&self) -> Result<OwnedFd, ConsoleError> {
        self.terminal.try_clone().map_err(ConsoleError::Dup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
