//! The console relay: a blocking poll(2) loop that copies the user's input to the console fd and
//! the console's output to the user, until one of them ends or it is told to stop.
//!
//! Each direction has a buffer; a direction reads only when its buffer is empty and writes only
//! when its destination polls writable, so a slow reader on one side never stalls the other.
//! The console fd's flags are left alone: the daemon may share its open file description.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd},
    time::Duration,
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    unistd::{read, write},
};

use crate::escape::EscapeDetector;

/// What the controller writes to the relay's control pipe.
pub mod control {
    /// Stop at once.
    pub const QUIT: u8 = b'q';
    /// The VM is down: copy out what the console still has, then stop.
    pub const DRAIN: u8 = b'd';
}

/// How long the console must stay quiet, after a drain request, before the relay stops.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

const BUFFER_SIZE: usize = 4096;

/// Why the relay stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// The user typed `~.`.
    Escape,
    /// The console fd reached end of file or hung up (EIO on a pty).
    ConsoleClosed,
    /// Our output was closed (e.g. `vmctl console vm | head`).
    OutputClosed,
    /// [`control::QUIT`] was received.
    Quit,
    /// [`control::DRAIN`] was received, and the console had nothing more to say.
    Drained,
}

/// How the relay ended, and whether the user's screen was left in the middle of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub end: RelayEnd,
    /// The last byte written to the output was not a line end: a notice printed now must
    /// start on a new line.
    pub mid_line: bool,
}

/// The fds the relay works on.
pub struct Ends<'a> {
    /// The guest's console.
    pub console: BorrowedFd<'a>,
    /// The user's input (stdin).
    pub input: BorrowedFd<'a>,
    /// The user's output (stdout).
    pub output: BorrowedFd<'a>,
    /// The read end of the control pipe.
    pub control: BorrowedFd<'a>,
    /// The escape character (`None`: no escapes).
    pub escape: Option<u8>,
}

/// Relays until the end; see the [module documentation](self). With stdin at end of file, the
/// console's output keeps being copied until another end comes.
pub fn relay(ends: &Ends<'_>) -> io::Result<Outcome> {
    let mut mid_line = false;
    let end = copy(ends, &mut mid_line)?;
    Ok(Outcome { end, mid_line })
}

/// The loop of [`relay`]; `mid_line` follows what was written to the output.
fn copy(ends: &Ends<'_>, mid_line: &mut bool) -> io::Result<RelayEnd> {
    let mut escape = EscapeDetector::with_escape(ends.escape);
    let mut to_console: Vec<u8> = Vec::new();
    let mut to_output: Vec<u8> = Vec::new();
    let mut input_open = true;
    let mut draining = false;
    let mut buffer = [0u8; BUFFER_SIZE];

    loop {
        let wants = Wants {
            input: input_open && !draining && to_console.is_empty(),
            console_in: to_output.is_empty(),
            console_out: !to_console.is_empty(),
            output: !to_output.is_empty(),
        };
        let timeout = if draining {
            PollTimeout::try_from(DRAIN_QUIET).unwrap_or(PollTimeout::MAX)
        } else {
            PollTimeout::NONE
        };
        let ready = match wait(ends, &wants, timeout) {
            Ok(ready) => ready,
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        };
        if draining && ready == Ready::default() && to_output.is_empty() {
            return Ok(RelayEnd::Drained);
        }

        if ready.control {
            match read_some(ends.control, &mut buffer)? {
                Some(bytes) if bytes.contains(&control::QUIT) => return Ok(RelayEnd::Quit),
                Some(bytes) if bytes.contains(&control::DRAIN) => draining = true,
                Some(_) => {}
                // The controller went away: nobody can stop us any more, so stop now.
                None => return Ok(RelayEnd::Quit),
            }
        }
        if ready.input {
            match read_some(ends.input, &mut buffer) {
                Ok(Some(bytes)) => {
                    let filtered = escape.filter(bytes);
                    to_console.extend_from_slice(&filtered.forward);
                    if filtered.help {
                        to_output.extend_from_slice(escape.help().as_bytes());
                    }
                    if filtered.disconnect {
                        return Ok(RelayEnd::Escape);
                    }
                }
                // End of file, or EIO from a terminal that hung up: output still goes on.
                Ok(None) => input_open = false,
                Err(error) if error.raw_os_error() == Some(libc::EIO) => input_open = false,
                Err(error) => return Err(error),
            }
        }
        if ready.console_in || ready.console_hup {
            match read_some(ends.console, &mut buffer) {
                Ok(Some(bytes)) if !bytes.is_empty() => to_output.extend_from_slice(bytes),
                // Interrupted, or nothing to read after all.
                Ok(Some(_)) if !ready.console_hup => {}
                // End of file, or a hang-up with nothing left to read.
                Ok(_) => {
                    return finish(ends.output, &to_output, mid_line, RelayEnd::ConsoleClosed);
                }
                // EIO: the other side of the pty is closed.
                Err(error) if error.raw_os_error() == Some(libc::EIO) => {
                    return finish(ends.output, &to_output, mid_line, RelayEnd::ConsoleClosed);
                }
                Err(error) => return Err(error),
            }
        }
        if ready.console_out {
            match write_some(ends.console, &mut to_console, &mut false) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(libc::EIO) => {
                    return finish(ends.output, &to_output, mid_line, RelayEnd::ConsoleClosed);
                }
                Err(error) => return Err(error),
            }
        }
        if ready.output {
            match write_some(ends.output, &mut to_output, mid_line) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(libc::EPIPE) => {
                    return Ok(RelayEnd::OutputClosed);
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// Which fds the loop wants to hear about.
struct Wants {
    input: bool,
    console_in: bool,
    console_out: bool,
    output: bool,
}

/// Which fds are ready.
#[derive(Debug, Default, PartialEq, Eq)]
struct Ready {
    control: bool,
    input: bool,
    /// The console has data to read.
    console_in: bool,
    /// The console hung up or has an error: a read finds out what is left.
    console_hup: bool,
    console_out: bool,
    output: bool,
}

fn wait(ends: &Ends<'_>, wants: &Wants, timeout: PollTimeout) -> Result<Ready, Errno> {
    let console_events = match (wants.console_in, wants.console_out) {
        (true, true) => PollFlags::POLLIN | PollFlags::POLLOUT,
        (true, false) => PollFlags::POLLIN,
        (false, true) => PollFlags::POLLOUT,
        // Still polled, for POLLHUP/POLLERR.
        (false, false) => PollFlags::empty(),
    };
    let mut fds = vec![
        PollFd::new(ends.control, PollFlags::POLLIN),
        PollFd::new(ends.console, console_events),
    ];
    let input_slot = wants.input.then(|| {
        fds.push(PollFd::new(ends.input, PollFlags::POLLIN));
        fds.len() - 1
    });
    let output_slot = wants.output.then(|| {
        fds.push(PollFd::new(ends.output, PollFlags::POLLOUT));
        fds.len() - 1
    });
    if poll(&mut fds, timeout)? == 0 {
        return Ok(Ready::default());
    }
    let events = |slot: usize| fds[slot].revents().unwrap_or(PollFlags::empty());
    let any = PollFlags::all();
    let gone = PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
    let console = events(1);
    Ok(Ready {
        control: events(0).intersects(any),
        input: input_slot.is_some_and(|slot| events(slot).intersects(any)),
        console_in: console.intersects(PollFlags::POLLIN),
        console_hup: console.intersects(gone),
        console_out: console.intersects(PollFlags::POLLOUT),
        output: output_slot.is_some_and(|slot| events(slot).intersects(any)),
    })
}

/// One read: `Some(bytes)`, or `None` at end of file. EINTR and EAGAIN give an empty slice.
fn read_some<'b>(fd: BorrowedFd<'_>, buffer: &'b mut [u8]) -> io::Result<Option<&'b [u8]>> {
    match read(fd, buffer) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(&buffer[..n])),
        Err(Errno::EINTR | Errno::EAGAIN) => Ok(Some(&[])),
        Err(errno) => Err(errno.into()),
    }
}

/// One write from the front of `pending`; what was written is removed from it, and
/// `mid_line` says whether it ended inside a line.
fn write_some(fd: BorrowedFd<'_>, pending: &mut Vec<u8>, mid_line: &mut bool) -> io::Result<()> {
    match write(fd, pending) {
        Ok(n) => {
            if let Some(&last) = pending[..n].last() {
                *mid_line = !matches!(last, b'\n' | b'\r');
            }
            pending.drain(..n);
            Ok(())
        }
        Err(Errno::EINTR | Errno::EAGAIN) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

/// Writes out what is left for the user, then reports `end`.
fn finish(
    output: BorrowedFd<'_>,
    pending: &[u8],
    mid_line: &mut bool,
    end: RelayEnd,
) -> io::Result<RelayEnd> {
    let mut rest = pending;
    while !rest.is_empty() {
        match write(output.as_fd(), rest) {
            Ok(n) => {
                if let Some(&last) = rest[..n].last() {
                    *mid_line = !matches!(last, b'\n' | b'\r');
                }
                rest = &rest[n..];
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(Errno::EPIPE) => return Ok(RelayEnd::OutputClosed),
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        io::{Read, Write},
        os::{fd::OwnedFd, unix::net::UnixStream},
        thread,
    };

    use nix::unistd::pipe;

    use super::*;

    /// A relay running on a thread over a socketpair "console", a pipe for input, a pipe for
    /// output and the control pipe.
    struct Harness {
        guest: UnixStream,
        input: Option<File>,
        output: File,
        control: File,
        relay: thread::JoinHandle<io::Result<RelayEnd>>,
    }

    fn start() -> Harness {
        let (console, guest) = UnixStream::pair().expect("socketpair");
        let (input_r, input_w) = pipe().expect("pipe");
        let (output_r, output_w) = pipe().expect("pipe");
        let (control_r, control_w) = pipe().expect("pipe");
        let relay = thread::spawn(move || {
            let console = OwnedFd::from(console);
            relay(&Ends {
                console: console.as_fd(),
                input: input_r.as_fd(),
                output: output_w.as_fd(),
                control: control_r.as_fd(),
                escape: Some(b'~'),
            })
            .map(|outcome| outcome.end)
        });
        Harness {
            guest,
            input: Some(File::from(input_w)),
            output: File::from(output_r),
            control: File::from(control_w),
            relay,
        }
    }

    fn read_exactly(file: &mut impl Read, n: usize) -> Vec<u8> {
        let mut data = vec![0; n];
        file.read_exact(&mut data).expect("read");
        data
    }

    #[test]
    fn copies_both_ways_and_stops_on_escape() {
        let mut h = start();
        h.guest.write_all(b"login: ").expect("write");
        assert_eq!(read_exactly(&mut h.output, 7), b"login: ");
        let input = h.input.as_mut().expect("input");
        input.write_all(b"root\r").expect("write");
        assert_eq!(read_exactly(&mut h.guest, 5), b"root\r");
        input.write_all(b"~.").expect("write");
        assert_eq!(
            h.relay.join().expect("join").expect("relay"),
            RelayEnd::Escape
        );
    }

    #[test]
    fn keeps_copying_output_after_input_ends_until_the_console_closes() {
        let mut h = start();
        drop(h.input.take());
        h.guest.write_all(b"one\n").expect("write");
        assert_eq!(read_exactly(&mut h.output, 4), b"one\n");
        h.guest.write_all(b"two\n").expect("write");
        drop(h.guest);
        assert_eq!(
            h.relay.join().expect("join").expect("relay"),
            RelayEnd::ConsoleClosed
        );
        let mut rest = Vec::new();
        h.output.read_to_end(&mut rest).expect("read");
        assert_eq!(rest, b"two\n");
    }

    #[test]
    fn quit_stops_at_once() {
        let mut h = start();
        h.control.write_all(&[control::QUIT]).expect("write");
        assert_eq!(
            h.relay.join().expect("join").expect("relay"),
            RelayEnd::Quit
        );
    }

    #[test]
    fn drain_copies_what_is_left_then_stops() {
        let mut h = start();
        h.guest.write_all(b"Power down.\n").expect("write");
        h.control.write_all(&[control::DRAIN]).expect("write");
        assert_eq!(
            h.relay.join().expect("join").expect("relay"),
            RelayEnd::Drained
        );
        let mut rest = Vec::new();
        h.output.read_to_end(&mut rest).expect("read");
        assert_eq!(rest, b"Power down.\n");
    }

    #[test]
    fn says_whether_the_screen_was_left_mid_line() {
        for (said, mid_line) in [(&b"login: "[..], true), (b"Power down.\r\n", false)] {
            let (console, mut guest) = UnixStream::pair().expect("socketpair");
            let (input_r, _input_w) = pipe().expect("pipe");
            let (output_r, output_w) = pipe().expect("pipe");
            let (control_r, _control_w) = pipe().expect("pipe");
            guest.write_all(said).expect("write");
            drop(guest);
            let outcome = relay(&Ends {
                console: console.as_fd(),
                input: input_r.as_fd(),
                output: output_w.as_fd(),
                control: control_r.as_fd(),
                escape: Some(b'~'),
            })
            .expect("relay");
            assert_eq!(outcome.end, RelayEnd::ConsoleClosed);
            assert_eq!(outcome.mid_line, mid_line, "{said:?}");
            drop(output_w);
            let mut shown = Vec::new();
            File::from(output_r).read_to_end(&mut shown).expect("read");
            assert_eq!(shown, said);
        }
    }

    #[test]
    fn help_goes_to_the_user_not_the_guest() {
        let mut h = start();
        let input = h.input.as_mut().expect("input");
        input.write_all(b"~?").expect("write");
        let help = String::from_utf8(read_exactly(&mut h.output, 40)).expect("utf-8");
        assert!(help.contains("Supported escape sequences"), "{help}");
        h.input
            .as_mut()
            .expect("input")
            .write_all(b"x~.")
            .expect("write");
        // x went to the guest (mid-line, so ~. is data there too) ...
        assert_eq!(read_exactly(&mut h.guest, 3), b"x~.");
        h.control.write_all(&[control::QUIT]).expect("write");
        assert_eq!(
            h.relay.join().expect("join").expect("relay"),
            RelayEnd::Quit
        );
    }
}
