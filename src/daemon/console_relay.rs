//! One console client at a time. A client does not get the pty itself: it gets one end of a
//! socket pair, and a relay task in the daemon copies between the other end and the console's
//! terminal side. The daemon can thus take the console away from a client, which a pty fd
//! handed out could never be (Linux cannot revoke an open terminal without CAP_SYS_TTY_CONFIG
//! and a controlling terminal, neither of which vmd.service has): ending the relay closes the
//! daemon's end, and the old client reads end of file. A client that goes away (exits, crashes,
//! closes its fd) ends its relay by closing its end, so the console is free again at once, for
//! bus and peer-to-peer clients alike. Across a daemon restart the pty master and the daemon's
//! end of the client's socket wait in the fd store, and the next daemon relays again: an
//! attached client only sees a pause.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a takeover waits for the previous client's relay to end.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// The client holding a console, and its relay.
pub struct ConsoleClient {
    /// Who holds it, for the refusal of the next client ("user alice, bus name :1.42").
    pub holder: String,
    stop: Option<oneshot::Sender<()>>,
    relay: JoinHandle<()>,
    /// The daemon's end of the client's socket, kept for the fd store and for the takeover's
    /// shutdown (which reaches every copy of it, the fd store's included).
    ours: OwnedFd,
}

impl ConsoleClient {
    /// Starts relaying between `terminal` (the console's terminal side) and a new socket; the
    /// client gets the socket's other end.
    pub fn start(terminal: OwnedFd, holder: String) -> std::io::Result<(ConsoleClient, OwnedFd)> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let client = ConsoleClient::resume(terminal, OwnedFd::from(ours), holder)?;
        Ok((client, OwnedFd::from(theirs)))
    }

    /// Relays again to a client whose socket end a previous daemon kept in the fd store.
    pub fn resume(terminal: OwnedFd, ours: OwnedFd, holder: String) -> std::io::Result<Self> {
        let kept = ours.try_clone()?;
        let ours = std::os::unix::net::UnixStream::from(ours);
        ours.set_nonblocking(true)?;
        let flags = fcntl(terminal.as_fd(), FcntlArg::F_GETFL)?;
        fcntl(
            terminal.as_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )?;
        // SAFETY: the file is an open fd that the AsyncFd owns for its whole life.
        let terminal = unsafe { AsyncFd::register(std::fs::File::from(terminal)) }
            .map_err(|e| e.into_parts().1)?;
        let socket = tokio::net::UnixStream::from_std(ours)?;
        let (stop, stopped) = oneshot::channel();
        let relay = tokio::spawn(relay(terminal, socket, stopped));
        Ok(ConsoleClient {
            holder,
            stop: Some(stop),
            relay,
            ours: kept,
        })
    }

    /// The daemon's end of the client's socket, for the fd store.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.ours.as_fd()
    }

    /// Whether the client still holds the console (its relay runs).
    pub fn holds(&self) -> bool {
        !self.relay.is_finished()
    }

    /// Ends the relay: the client's fd reads end of file from now on.
    pub async fn take_away(mut self) {
        // Shut down, not just closed: the fd store holds a copy of the daemon's end.
        let _ = nix::sys::socket::shutdown(self.ours.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(TAKEOVER_WAIT, &mut self.relay).await;
    }
}

impl Drop for ConsoleClient {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Copies guest output to the client and the client's input to the guest until either side
/// ends (the client closes its fd, or the console goes with the VM) or `stop` fires.
async fn relay(
    terminal: AsyncFd<std::fs::File>,
    mut socket: tokio::net::UnixStream,
    mut stop: oneshot::Receiver<()>,
) {
    // Borrowed halves: an owned write half would shut the socket down when dropped, and the
    // fd store's copy of it must outlive this daemon.
    let (mut from_client, mut to_client) = socket.split();
    let mut output = [0u8; 4096];
    let mut input = [0u8; 4096];
    loop {
        tokio::select! {
            _ = &mut stop => return,
            ready = terminal.readable() => {
                let Ok(mut guard) = ready else { return };
                match guard.try_io(|file| file.get_ref().read(&mut output)) {
                    // End of file, or EIO once the VM's console is gone.
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => {
                        if to_client.write_all(&output[..n]).await.is_err() {
                            return;
                        }
                    }
                    Err(_would_block) => continue,
                }
            }
            read = from_client.read(&mut input) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &input[..n];
                while !rest.is_empty() {
                    let Ok(mut guard) = terminal.writable().await else { return };
                    match guard.try_io(|file| file.get_ref().write(rest)) {
                        Ok(Ok(written)) => rest = &rest[written..],
                        Ok(Err(_)) => return,
                        Err(_would_block) => continue,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::console::Console;

    fn read_some(fd: &OwnedFd) -> Vec<u8> {
        let mut buf = [0u8; 256];
        let n = nix::unistd::read(fd.as_fd(), &mut buf).expect("read");
        buf[..n].to_vec()
    }

    #[tokio::test]
    async fn a_client_talks_to_the_guest_until_it_is_taken_away() {
        let console = Console::new().expect("pty");
        let helper = console.helper_end().expect("dup");
        let (client, fd) = ConsoleClient::start(console.client_end().expect("dup"), "first".into())
            .expect("relay");
        let fd = tokio::task::spawn_blocking(move || {
            nix::unistd::write(&helper, b"guest says hi\r\n").expect("write");
            let seen = read_some(&fd);
            assert_eq!(seen, b"guest says hi\r\n");
            nix::unistd::write(&fd, b"typed").expect("write");
            assert_eq!(read_some(&helper), b"typed");
            fd
        })
        .await
        .expect("client");
        assert!(client.holds());
        client.take_away().await;
        // The old client's fd reads end of file.
        let seen = tokio::task::spawn_blocking(move || read_some(&fd))
            .await
            .expect("read");
        assert!(seen.is_empty());
    }

    #[tokio::test]
    async fn a_client_that_closes_its_fd_frees_the_console() {
        let console = Console::new().expect("pty");
        let (client, fd) =
            ConsoleClient::start(console.client_end().expect("dup"), "gone".into()).expect("relay");
        drop(fd);
        tokio::time::timeout(Duration::from_secs(5), async {
            while client.holds() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the relay ended");
    }
}
