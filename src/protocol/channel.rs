//! The control channel: one `AF_UNIX` `SOCK_SEQPACKET` socket, one message per datagram.
//!
//! The fd is blocking. Every method takes `&self` and makes one `send` or `recv` per message, so
//! one thread may send while another receives. A receive error about one datagram
//! ([`RecvError::TooLarge`], [`RecvError::Decode`]) consumed that datagram only: the channel
//! stays usable, and the caller decides whether to go on or to drop the peer.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};
use thiserror::Error;

use super::codec::{DecodeError, EncodeError, MAX_DATAGRAM, Message, decode, encode};
use super::messages::{Event, Request};

/// Why a message could not be sent.
#[derive(Debug, Error)]
pub enum SendError {
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The peer closed its end of the channel (`EPIPE`, `ECONNRESET`, `ECONNREFUSED` or
    /// `ENOTCONN`).
    #[error("the peer closed the control channel")]
    PeerClosed,
    /// `send` failed otherwise.
    #[error("cannot send on the control socket")]
    Io(#[source] io::Error),
    /// `send` took only part of the datagram (not expected of a `SOCK_SEQPACKET` socket).
    #[error("the control socket took {sent} of {len} bytes")]
    Incomplete {
        /// The bytes sent.
        sent: usize,
        /// The datagram's length.
        len: usize,
    },
}

/// Why no message could be received.
#[derive(Debug, Error)]
pub enum RecvError {
    /// `recv` failed.
    #[error("cannot receive from the control socket")]
    Io(#[source] io::Error),
    /// `poll` failed.
    #[error("cannot poll the control socket")]
    Poll(#[source] io::Error),
    /// The peer sent a datagram larger than [`MAX_DATAGRAM`]; it was discarded.
    #[error("received a {len}-byte datagram; at most {MAX_DATAGRAM} bytes are allowed")]
    TooLarge {
        /// The datagram's length in bytes.
        len: usize,
    },
    /// The peer sent a datagram that is not a valid message; it was discarded.
    #[error("received a malformed control message")]
    Decode(#[from] DecodeError),
    /// No message arrived in time.
    #[error("no event arrived within {timeout:?}")]
    TimedOut {
        /// The timeout that passed.
        timeout: Duration,
    },
}

/// One end of the control channel between the launcher and a VM's helper.
#[derive(Debug)]
pub struct ControlChannel {
    fd: OwnedFd,
}

impl ControlChannel {
    /// Wraps a connected `AF_UNIX` `SOCK_SEQPACKET` socket, such as one the helper inherited.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Creates a connected pair of channels, both `SOCK_CLOEXEC`.
    ///
    /// To hand one end to a helper across `exec`, take its fd with [`ControlChannel::into_fd`]
    /// and clear `FD_CLOEXEC` on it (or `dup2` it) in the child.
    pub fn pair() -> io::Result<(ControlChannel, ControlChannel)> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Self::from_fd(a), Self::from_fd(b)))
    }

    /// Borrows the socket's fd, for example to poll it.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Gives back the socket's fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends a request to the helper.
    pub fn send_request(&self, request: &Request) -> Result<(), SendError> {
        self.send(request)
    }

    /// Sends an event to the launcher.
    pub fn send_event(&self, event: &Event) -> Result<(), SendError> {
        self.send(event)
    }

    /// Waits for a request from the launcher; `Ok(None)` means the launcher closed the channel.
    pub fn recv_request(&self) -> Result<Option<Request>, RecvError> {
        self.recv(MsgFlags::empty())
    }

    /// Waits for an event from the helper; `Ok(None)` means the helper closed the channel.
    pub fn recv_event(&self) -> Result<Option<Event>, RecvError> {
        self.recv(MsgFlags::empty())
    }

    /// Like [`ControlChannel::recv_event`], but gives up with [`RecvError::TimedOut`] once
    /// `timeout` has passed. A zero timeout only takes an event that is already queued.
    pub fn recv_event_timeout(&self, timeout: Duration) -> Result<Option<Event>, RecvError> {
        // No deadline (wait for ever) if `now + timeout` does not fit in an `Instant`.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let remaining = deadline.map_or(Duration::MAX, |deadline| {
                deadline.saturating_duration_since(Instant::now())
            });
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, poll_timeout(remaining)) {
                Ok(0) => {
                    if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                        return Err(RecvError::TimedOut { timeout });
                    }
                }
                // Readable, hung up or in error: `recv` says which. Another thread may have taken
                // the datagram in between, so do not block.
                Ok(_) => match self.recv(MsgFlags::MSG_DONTWAIT) {
                    Err(RecvError::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => {}
                    result => return result,
                },
                Err(Errno::EINTR) => {}
                Err(errno) => return Err(RecvError::Poll(errno.into())),
            }
        }
    }

    fn send<M: Message>(&self, message: &M) -> Result<(), SendError> {
        let datagram = encode(message)?;
        loop {
            match socket::send(self.fd.as_raw_fd(), &datagram, MsgFlags::MSG_NOSIGNAL) {
                Ok(sent) if sent == datagram.len() => return Ok(()),
                Ok(sent) => {
                    return Err(SendError::Incomplete {
                        sent,
                        len: datagram.len(),
                    });
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ECONNREFUSED | Errno::ENOTCONN) => {
                    return Err(SendError::PeerClosed);
                }
                Err(errno) => return Err(SendError::Io(errno.into())),
            }
        }
    }

    fn recv<M: Message>(&self, flags: MsgFlags) -> Result<Option<M>, RecvError> {
        // One byte more than the largest valid datagram, and MSG_TRUNC to learn the real length:
        // a datagram that does not fit is reported, never silently cut.
        let mut buf = vec![0; MAX_DATAGRAM + 1];
        let len = loop {
            match socket::recv(self.fd.as_raw_fd(), &mut buf, flags | MsgFlags::MSG_TRUNC) {
                Ok(len) => break len,
                Err(Errno::EINTR) => {}
                // The peer closed while a datagram we sent was still unread in its queue: the
                // kernel reports that once as ECONNRESET, then end-of-file.
                Err(Errno::ECONNRESET) => return Ok(None),
                Err(errno) => return Err(RecvError::Io(errno.into())),
            }
        };
        if len > MAX_DATAGRAM {
            return Err(RecvError::TooLarge { len });
        }
        if len == 0 {
            // End-of-file, or an empty datagram: only the peer's shutdown tells them apart.
            return if self.peer_shut_down()? {
                Ok(None)
            } else {
                Err(DecodeError::TooShort { len: 0 }.into())
            };
        }
        Ok(Some(decode(&buf[..len])?))
    }

    /// Whether the peer closed or shut down its sending side.
    fn peer_shut_down(&self) -> Result<bool, RecvError> {
        // nix has no name for POLLRDHUP, and its `revents()` gives up on bits it cannot name, so
        // rely on the count: with POLLIN not asked for, the fd counts only if the peer shut down
        // (POLLRDHUP, POLLHUP) or the socket has an error (POLLERR, such as a reset).
        let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
        loop {
            let mut fds = [PollFd::new(self.fd.as_fd(), rdhup)];
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(ready) => return Ok(ready > 0),
                Err(Errno::EINTR) => {}
                Err(errno) => return Err(RecvError::Poll(errno.into())),
            }
        }
    }
}

impl AsFd for ControlChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<OwnedFd> for ControlChannel {
    fn from(fd: OwnedFd) -> Self {
        Self::from_fd(fd)
    }
}

impl From<ControlChannel> for OwnedFd {
    fn from(channel: ControlChannel) -> Self {
        channel.fd
    }
}

/// `remaining` as a poll timeout: rounded up to whole milliseconds (so a deadline is never
/// reported early), capped at `PollTimeout::MAX` (the caller loops).
fn poll_timeout(remaining: Duration) -> PollTimeout {
    let millis = remaining.as_nanos().div_ceil(1_000_000);
    PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::{MAGIC, PROTOCOL_VERSION};
    use crate::protocol::messages::{RunState, VmConfig};
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use proptest::prelude::*;

    fn config() -> VmConfig {
        VmConfig {
            name: "web-1".into(),
            vcpus: 4,
            memory_bytes: 1 << 30,
            cmdline: "console=ttyS0 root=/dev/vda \"quoted\" \u{263a}".into(),
            disks: vec![crate::protocol::DiskConfig {
                format: crate::protocol::ImageFormat::Qcow2,
                read_only: true,
                serial: "root".into(),
                backing: vec![crate::protocol::ImageFormat::Raw],
            }],
            entropy: true,
            interfaces: Vec::new(),
        }
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Start { config: config() },
            Request::Pause,
            Request::Resume,
            Request::Query,
            Request::Shutdown { deadline_ms: 0 },
            Request::Shutdown {
                deadline_ms: u64::MAX,
            },
        ]
    }

    fn all_events() -> Vec<Event> {
        vec![
            Event::Created,
            Event::Failed {
                reason: "cannot open /dev/kvm: No such file".into(),
            },
            Event::State {
                state: RunState::Running,
            },
            Event::State {
                state: RunState::Paused,
            },
            Event::GuestPowerOff,
            Event::GuestReboot,
            Event::Error {
                reason: String::new(),
            },
        ]
    }

    fn send_raw(channel: &ControlChannel, bytes: &[u8]) {
        let sent = socket::send(channel.as_fd().as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL);
        assert_eq!(sent, Ok(bytes.len()));
    }

    #[test]
    fn round_trips_every_message() {
        let (launcher, helper) = ControlChannel::pair().unwrap();
        // Queue them all first: each datagram keeps its boundary.
        for request in all_requests() {
            launcher.send_request(&request).unwrap();
        }
        for request in all_requests() {
            assert_eq!(helper.recv_request().unwrap(), Some(request));
        }
        for event in all_events() {
            helper.send_event(&event).unwrap();
        }
        for event in all_events() {
            assert_eq!(launcher.recv_event().unwrap(), Some(event));
        }
    }

    #[test]
    fn largest_message_fits() {
        let (a, b) = ControlChannel::pair().unwrap();
        let overhead = r#"{"error":{"reason":""}}"#.len();
        let event = Event::Error {
            reason: "x".repeat(crate::protocol::MAX_PAYLOAD - overhead),
        };
        a.send_event(&event).unwrap();
        assert_eq!(b.recv_event().unwrap(), Some(event));
    }

    #[test]
    fn pair_is_cloexec() {
        let (a, b) = ControlChannel::pair().unwrap();
        for channel in [&a, &b] {
            let flags = fcntl(channel.as_fd(), FcntlArg::F_GETFD).unwrap();
            assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
        }
    }

    #[test]
    fn eof_is_none() {
        let (a, b) = ControlChannel::pair().unwrap();
        a.send_event(&Event::Created).unwrap();
        drop(a);
        // Queued messages come first, then end-of-file, for good.
        assert_eq!(b.recv_event().unwrap(), Some(Event::Created));
        assert_eq!(b.recv_event().unwrap(), None);
        assert_eq!(b.recv_request().unwrap(), None);
    }

    #[test]
    fn peer_closing_with_unread_messages_is_none() {
        let (launcher, helper) = ControlChannel::pair().unwrap();
        launcher.send_request(&Request::Pause).unwrap();
        drop(helper);
        assert_eq!(launcher.recv_event().unwrap(), None);
        assert_eq!(launcher.recv_event().unwrap(), None);
    }

    #[test]
    fn shutdown_is_none() {
        let (a, b) = ControlChannel::pair().unwrap();
        socket::shutdown(a.as_fd().as_raw_fd(), socket::Shutdown::Write).unwrap();
        assert_eq!(b.recv_event().unwrap(), None);
    }

    #[test]
    fn send_to_closed_peer_fails_clearly() {
        let (a, b) = ControlChannel::pair().unwrap();
        drop(b);
        let err = a.send_request(&Request::Resume).unwrap_err();
        assert!(matches!(err, SendError::PeerClosed), "{err:?}");
        assert_eq!(err.to_string(), "the peer closed the control channel");
    }

    #[test]
    fn encode_error_is_reported_before_sending() {
        let (a, b) = ControlChannel::pair().unwrap();
        let event = Event::Failed {
            reason: "x".repeat(crate::protocol::MAX_PAYLOAD),
        };
        assert!(matches!(
            a.send_event(&event),
            Err(SendError::Encode(EncodeError::TooLarge { .. }))
        ));
        drop(a);
        assert_eq!(b.recv_event().unwrap(), None);
    }

    #[test]
    fn oversized_datagram_is_an_error_then_channel_goes_on() {
        let (a, b) = ControlChannel::pair().unwrap();
        for len in [MAX_DATAGRAM + 1, 100_000] {
            let mut datagram = vec![b' '; len];
            datagram[..4].copy_from_slice(b"VMD\x01");
            send_raw(&a, &datagram);
            let err = b.recv_event().unwrap_err();
            assert!(
                matches!(err, RecvError::TooLarge { len: l } if l == len),
                "{err:?}"
            );
        }
        a.send_event(&Event::GuestReboot).unwrap();
        assert_eq!(b.recv_event().unwrap(), Some(Event::GuestReboot));
    }

    #[test]
    fn malformed_datagrams_are_errors_then_channel_goes_on() {
        let (a, b) = ControlChannel::pair().unwrap();
        let mut wrong_version = MAGIC.to_vec();
        wrong_version.extend_from_slice(&[PROTOCOL_VERSION + 1, 2, 0, 0, 0, b'{', b'}']);
        send_raw(&a, b"VMD");
        send_raw(&a, b"XYZ\x01\0\0\0\0");
        send_raw(&a, &wrong_version);
        send_raw(&a, b"VMD\x01\x09\0\0\0\"pause\"");
        send_raw(&a, b"VMD\x01\x02\0\0\0{}");
        a.send_request(&Request::Pause).unwrap();
        let errors: Vec<_> = (0..5).map(|_| b.recv_event().unwrap_err()).collect();
        assert!(matches!(
            errors[..],
            [
                RecvError::Decode(DecodeError::TooShort { len: 3 }),
                RecvError::Decode(DecodeError::BadMagic { .. }),
                RecvError::Decode(DecodeError::UnsupportedVersion { found: 2, .. }),
                RecvError::Decode(DecodeError::LengthMismatch { .. }),
                RecvError::Decode(DecodeError::Json { .. }),
            ]
        ));
        // A request is not an event.
        assert!(matches!(
            b.recv_event(),
            Err(RecvError::Decode(DecodeError::Json { kind: "event", .. }))
        ));
        a.send_event(&Event::Created).unwrap();
        assert_eq!(b.recv_event().unwrap(), Some(Event::Created));
    }

    #[test]
    fn empty_datagram_is_not_eof() {
        let (a, b) = ControlChannel::pair().unwrap();
        send_raw(&a, b"");
        assert!(matches!(
            b.recv_request(),
            Err(RecvError::Decode(DecodeError::TooShort { len: 0 }))
        ));
        a.send_request(&Request::Pause).unwrap();
        assert_eq!(b.recv_request().unwrap(), Some(Request::Pause));
        drop(a);
        assert_eq!(b.recv_request().unwrap(), None);
    }

    #[test]
    fn timeout_without_event() {
        let (_a, b) = ControlChannel::pair().unwrap();
        let start = Instant::now();
        let timeout = Duration::from_millis(50);
        let err = b.recv_event_timeout(timeout).unwrap_err();
        assert!(start.elapsed() >= timeout);
        assert!(matches!(err, RecvError::TimedOut { timeout: t } if t == timeout));
        assert!(matches!(
            b.recv_event_timeout(Duration::ZERO),
            Err(RecvError::TimedOut { .. })
        ));
        // Sub-millisecond timeouts do not spin or fail early.
        assert!(matches!(
            b.recv_event_timeout(Duration::from_micros(10)),
            Err(RecvError::TimedOut { .. })
        ));
    }

    #[test]
    fn timeout_with_event_or_eof() {
        let (a, b) = ControlChannel::pair().unwrap();
        a.send_event(&Event::GuestPowerOff).unwrap();
        assert_eq!(
            b.recv_event_timeout(Duration::ZERO).unwrap(),
            Some(Event::GuestPowerOff)
        );
        a.send_event(&Event::Created).unwrap();
        assert_eq!(
            b.recv_event_timeout(Duration::MAX).unwrap(),
            Some(Event::Created)
        );
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            a.send_event(&Event::GuestReboot).unwrap();
            // `a` drops here: end-of-file.
        });
        assert_eq!(
            b.recv_event_timeout(Duration::from_secs(10)).unwrap(),
            Some(Event::GuestReboot)
        );
        sender.join().unwrap();
        assert_eq!(b.recv_event_timeout(Duration::from_secs(10)).unwrap(), None);
    }

    #[test]
    fn fd_conversions() {
        let (a, b) = ControlChannel::pair().unwrap();
        let a = ControlChannel::from(OwnedFd::from(a));
        let b = ControlChannel::from_fd(b.into_fd());
        a.send_request(&Request::Resume).unwrap();
        assert_eq!(b.recv_request().unwrap(), Some(Request::Resume));
    }

    fn valid_config() -> impl Strategy<Value = VmConfig> {
        (
            // Valid VM names: dot-separated labels, '-' only inside a label, at most 58 chars.
            "[A-Za-z0-9]([A-Za-z0-9-]{0,30}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?){0,2}",
            1..=crate::protocol::MAX_VCPUS,
            (crate::protocol::MIN_MEMORY_BYTES / crate::protocol::MEMORY_ALIGN_BYTES)
                ..=(crate::protocol::MAX_MEMORY_BYTES / crate::protocol::MEMORY_ALIGN_BYTES),
            // At most 4 bytes per character: never more than MAX_CMDLINE_BYTES.
            "[^\u{0}]{0,511}",
        )
            .prop_map(|(name, vcpus, chunks, cmdline)| VmConfig {
                name,
                vcpus,
                memory_bytes: chunks * crate::protocol::MEMORY_ALIGN_BYTES,
                cmdline,
                disks: Vec::new(),
                entropy: false,
                interfaces: Vec::new(),
            })
    }

    proptest! {
        #[test]
        fn arbitrary_valid_configs_round_trip(config in valid_config()) {
            prop_assert_eq!(config.validate(), Ok(()));
            let (launcher, helper) = ControlChannel::pair().unwrap();
            let request = Request::Start { config };
            launcher.send_request(&request).unwrap();
            prop_assert_eq!(helper.recv_request().unwrap(), Some(request));
        }

        #[test]
        fn arbitrary_reasons_round_trip(reason in any::<String>(), failed in any::<bool>()) {
            let (launcher, helper) = ControlChannel::pair().unwrap();
            let event = if failed { Event::Failed { reason } } else { Event::Error { reason } };
            helper.send_event(&event).unwrap();
            prop_assert_eq!(launcher.recv_event().unwrap(), Some(event));
        }
    }
}
