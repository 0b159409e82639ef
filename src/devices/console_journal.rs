//! The guest console's lines in the journal (DESIGN.md, Devices: "every line also goes to the
//! journal"), one entry per line, written by whichever thread drives COM1 (a vCPU).
//!
//! Each entry carries `MESSAGE=<line>`, `VM_NAME=<name>`, `VM_CONSOLE=1`,
//! `SYSLOG_IDENTIFIER=vmd-console` and `PRIORITY=6`; the sender's cgroup puts it under
//! `journalctl -u vmd-<name>.scope`. The socket is connected and made non-blocking before the
//! helper locks itself down, and entries go out with plain `write(2)`, which the vCPU filter
//! already allows: when journald does not keep up (`EAGAIN`) the line is dropped and counted,
//! never waited for.
//!
//! What the guest writes is cleaned up for the journal: CR and other control characters are
//! dropped (a tab becomes a space), ANSI escape sequences are removed, a line longer than
//! [`MAX_LINE`] bytes is cut into several entries, invalid UTF-8 is replaced, and lines left
//! empty are not sent. A last line without its newline goes out when the VM ends
//! ([`ConsoleJournal::flush`], also on drop).

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;

use crate::logging::encode_entry;

/// The longest line sent as one entry; the rest of a longer line follows in the next entries.
pub const MAX_LINE: usize = 1024;
/// The journal priority of console lines: info.
const PRIORITY: u8 = 6;
const ESC: u8 = 0x1b;

/// Where the cleaner is in an escape sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After ESC: one more byte decides the kind.
    Start,
    /// In a CSI sequence (ESC [): parameters until a final byte 0x40..=0x7e.
    Csi,
}

/// Cuts a byte stream into clean journal lines.
#[derive(Debug)]
struct LineSplitter {
    line: Vec<u8>,
    escape: Escape,
}

impl LineSplitter {
    fn new() -> Self {
        LineSplitter {
            line: Vec::with_capacity(MAX_LINE),
            escape: Escape::None,
        }
    }

    /// Feeds one byte; returns a finished line, if this byte ended one.
    fn push(&mut self, byte: u8) -> Option<Vec<u8>> {
        match self.escape {
            Escape::Start => {
                self.escape = if byte == b'[' {
                    Escape::Csi
                } else {
                    Escape::None
                };
                return None;
            }
            Escape::Csi => {
                if (0x40..=0x7e).contains(&byte) {
                    self.escape = Escape::None;
                }
                return None;
            }
            Escape::None => {}
        }
        match byte {
            b'\n' => return self.take(),
            ESC => self.escape = Escape::Start,
            b'\t' => self.line.push(b' '),
            // CR (of CRLF, or a progress line redrawn in place), the other C0 controls, DEL.
            0..=0x1f | 0x7f => {}
            _ => self.line.push(byte),
        }
        if self.line.len() >= MAX_LINE {
            return self.take();
        }
        None
    }

    /// The line collected so far (none if it is empty), starting a new one.
    fn take(&mut self) -> Option<Vec<u8>> {
        self.escape = Escape::None;
        if self.line.is_empty() {
            return None;
        }
        let line = std::mem::replace(&mut self.line, Vec::with_capacity(MAX_LINE));
        Some(line)
    }
}

/// Sends the guest console's lines to the journal.
pub struct ConsoleJournal {
    /// A datagram socket connected to journald's native socket, non-blocking.
    socket: OwnedFd,
    /// The fields every entry carries besides `PRIORITY` and `MESSAGE`.
    fields: Vec<u8>,
    splitter: LineSplitter,
    dropped_lines: u64,
}

impl ConsoleJournal {
    /// `socket` must be connected to the journal and non-blocking.
    pub fn new(socket: OwnedFd, vm_name: &str) -> Self {
        let fields = format!("SYSLOG_IDENTIFIER=vmd-console\nVM_NAME={vm_name}\nVM_CONSOLE=1\n")
            .into_bytes();
        ConsoleJournal {
            socket,
            fields,
            splitter: LineSplitter::new(),
            dropped_lines: 0,
        }
    }

    /// Takes guest output; sends every line it completes.
    pub fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if let Some(line) = self.splitter.push(byte) {
                self.send(&line);
            }
        }
    }

    /// Sends a last line that has no newline yet (the VM ends).
    pub fn flush(&mut self) {
        if let Some(line) = self.splitter.take() {
            self.send(&line);
        }
    }

    /// Lines journald did not take in time (or could not take at all).
    pub fn dropped_lines(&self) -> u64 {
        self.dropped_lines
    }

    fn send(&mut self, line: &[u8]) {
        let message = String::from_utf8_lossy(line);
        let entry = encode_entry(&self.fields, PRIORITY, message.as_bytes());
        loop {
            match nix::unistd::write(self.socket.as_fd(), &entry) {
                Ok(_) => return,
                Err(Errno::EINTR) => continue,
                // EAGAIN: journald is behind; ECONNREFUSED and the like: it is gone. The
                // guest's time matters more than the line.
                Err(_) => {
                    self.dropped_lines += 1;
                    return;
                }
            }
        }
    }
}

impl Drop for ConsoleJournal {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    fn lines_of(input: &[u8]) -> Vec<String> {
        let mut splitter = LineSplitter::new();
        let mut lines: Vec<String> = input
            .iter()
            .filter_map(|&b| splitter.push(b))
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .collect();
        lines.extend(
            splitter
                .take()
                .map(|l| String::from_utf8_lossy(&l).into_owned()),
        );
        lines
    }

    #[test]
    fn lines_are_split_at_newlines_without_cr_or_controls() {
        assert_eq!(
            lines_of(b"one\r\ntwo\n\n\r\nthree\tfour\x07\x00\nlast"),
            ["one", "two", "three four", "last"]
        );
    }

    #[test]
    fn escape_sequences_are_removed() {
        assert_eq!(
            lines_of(b"\x1b[1;32mgreen\x1b[0m text\x1bc\n"),
            ["green text"]
        );
    }

    #[test]
    fn long_lines_are_cut_at_the_bound() {
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let lines = lines_of(&long);
        assert_eq!(
            lines.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE, MAX_LINE, 5]
        );
    }

    fn journal_pair(name: &str) -> (ConsoleJournal, UnixDatagram) {
        let (ours, theirs) = UnixDatagram::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        (ConsoleJournal::new(OwnedFd::from(ours), name), theirs)
    }

    #[test]
    fn each_line_is_one_entry_and_the_last_is_flushed() {
        let (mut journal, reader) = journal_pair("web");
        journal.write(b"hello\r\nwor");
        journal.write(b"ld\npartial");
        drop(journal);
        let mut buf = [0u8; 4096];
        let mut entries = Vec::new();
        reader.set_nonblocking(true).expect("nonblocking");
        while let Ok(n) = reader.recv(&mut buf) {
            entries.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let expected = |message: &str| {
            format!(
                "PRIORITY=6\nSYSLOG_IDENTIFIER=vmd-console\nVM_NAME=web\nVM_CONSOLE=1\n\
                 MESSAGE={message}\n"
            )
        };
        assert_eq!(
            entries,
            [expected("hello"), expected("world"), expected("partial")]
        );
    }

    #[test]
    fn a_journal_that_does_not_read_drops_lines_instead_of_blocking() {
        let (mut journal, _reader) = journal_pair("web");
        for _ in 0..100_000 {
            journal.write(b"a line of console output\n");
        }
        assert!(journal.dropped_lines() > 0);
    }
}
