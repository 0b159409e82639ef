//! Logging for every mode of the binary: to the journal (native protocol, with `VM_NAME=` on a
//! helper's lines) when systemd connected stderr to it, else to stderr.
//!
//! The journal socket is connected once at start, before the helper locks itself down, and then
//! written with plain `write(2)`, which the helper's seccomp filters already allow: no new
//! system call and no path lookup is needed after the lock-down.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Sets up logging; `vm_name` tags a helper's lines. `VMD_LOG` sets the filter (default info).
pub fn init(vm_name: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match journal_writer(vm_name) {
        Some(journal) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(journal)
            .with_ansi(false)
            .without_time()
            .with_level(false)
            .with_target(false)
            .init(),
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(io::stderr)
            .with_target(false)
            .init(),
    }
}

/// A journal connection for the guest console's lines (`devices::console_journal`), if this
/// process logs to the journal: connected now (before the helper's lock-down forbids it) and
/// non-blocking, so that a console line never waits for journald.
pub fn console_journal_socket() -> Option<OwnedFd> {
    if !stderr_is_journal() {
        return None;
    }
    let socket = UnixDatagram::unbound().ok()?;
    socket.connect(JOURNAL_SOCKET).ok()?;
    socket.set_nonblocking(true).ok()?;
    Some(socket.into())
}

/// Whether systemd connected stderr to the journal (its `JOURNAL_STREAM` check).
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream.split_once(':') else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(io::stderr()) else {
        return false;
    };
    device.parse::<u64>().ok() == Some(stat.st_dev)
        && inode.parse::<u64>().ok() == Some(stat.st_ino)
}

/// A journal connection, if stderr is the journal.
fn journal_writer(vm_name: Option<&str>) -> Option<JournalWriter> {
    if !stderr_is_journal() {
        return None;
    }
    let socket = UnixDatagram::unbound().ok()?;
    socket.connect(JOURNAL_SOCKET).ok()?;
    let mut fields = b"SYSLOG_IDENTIFIER=vmd\n".to_vec();
    if let Some(name) = vm_name {
        fields.extend_from_slice(format!("VM_NAME={name}\n").as_bytes());
    }
    Some(JournalWriter {
        socket: Arc::new(socket),
        fields: Arc::new(fields),
    })
}

#[derive(Clone)]
struct JournalWriter {
    socket: Arc<UnixDatagram>,
    /// Fields added to every entry.
    fields: Arc<Vec<u8>>,
}

/// One log event, sent as one journal entry.
struct JournalEntry {
    writer: JournalWriter,
    priority: u8,
}

impl<'a> MakeWriter<'a> for JournalWriter {
    type Writer = JournalEntry;

    fn make_writer(&'a self) -> JournalEntry {
        JournalEntry {
            writer: self.clone(),
            priority: 6,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> JournalEntry {
        let priority = match *meta.level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        JournalEntry {
            writer: self.clone(),
            priority,
        }
    }
}

impl Write for JournalEntry {
    fn write(&mut self, formatted: &[u8]) -> io::Result<usize> {
        let message = formatted.strip_suffix(b"\n").unwrap_or(formatted);
        let entry = encode_entry(&self.writer.fields, self.priority, message);
        // SAFETY: write(2) of a local buffer to a connected datagram socket we own.
        let sent = unsafe {
            libc::write(
                self.writer.socket.as_raw_fd(),
                entry.as_ptr().cast(),
                entry.len(),
            )
        };
        if sent < 0 {
            // Too large for one datagram, or the journal is gone: keep the line on stderr.
            let _ = io::stderr().write_all(formatted);
        }
        Ok(formatted.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The journal's native format: `KEY=value` lines, with the length-prefixed binary form for a
/// message that contains a newline.
pub(crate) fn encode_entry(fields: &[u8], priority: u8, message: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(fields.len() + message.len() + 32);
    entry.extend_from_slice(format!("PRIORITY={priority}\n").as_bytes());
    entry.extend_from_slice(fields);
    if message.contains(&b'\n') {
        entry.extend_from_slice(b"MESSAGE\n");
        entry.extend_from_slice(&(message.len() as u64).to_le_bytes());
        entry.extend_from_slice(message);
        entry.push(b'\n');
    } else {
        entry.extend_from_slice(b"MESSAGE=");
        entry.extend_from_slice(message);
        entry.push(b'\n');
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_use_the_native_format() {
        assert_eq!(
            encode_entry(b"VM_NAME=web\n", 4, b"disk full"),
            b"PRIORITY=4\nVM_NAME=web\nMESSAGE=disk full\n".to_vec()
        );
        let multi = encode_entry(b"", 6, b"a\nb");
        let mut expected = b"PRIORITY=6\nMESSAGE\n".to_vec();
        expected.extend_from_slice(&3u64.to_le_bytes());
        expected.extend_from_slice(b"a\nb\n");
        assert_eq!(multi, expected);
    }
}
