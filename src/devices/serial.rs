//! The 16550 UART on COM1, wired to the VM's console fd (a pty master under the daemon, a socket
//! under `vmd run`).
//!
//! Output never blocks the guest: the fd is non-blocking, and what the reader does not take in
//! time is dropped and counted (a stalled console must not stall a vCPU). Input is pushed into the
//! UART's receive FIFO by the helper's main loop while the FIFO has room. Under the daemon every
//! output line also goes to the journal ([`ConsoleJournal`]), whether anyone reads the console
//! or not.

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use super::console_journal::ConsoleJournal;

/// The UART's interrupt: an eventfd registered with KVM as an irqfd on the COM1 GSI.
pub struct IrqEvent(pub EventFd);

impl Trigger for IrqEvent {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Writes console output without ever blocking; what cannot be written now is dropped.
pub struct ConsoleOutput {
    fd: Option<OwnedFd>,
    dropped_bytes: u64,
    /// The journal's copy of every line, when the helper logs to the journal.
    journal: Option<ConsoleJournal>,
}

impl ConsoleOutput {
    /// `fd` must be non-blocking. `None` discards all output (a VM without a console), except
    /// for the journal's copy.
    pub fn new(fd: Option<OwnedFd>, journal: Option<ConsoleJournal>) -> Self {
        ConsoleOutput {
            fd,
            dropped_bytes: 0,
            journal,
        }
    }

    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_bytes
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(journal) = &mut self.journal {
            journal.write(buf);
        }
        let Some(fd) = &self.fd else {
            return Ok(buf.len());
        };
        let mut rest = buf;
        while !rest.is_empty() {
            match nix::unistd::write(fd.as_fd(), rest) {
                Ok(written) => rest = &rest[written..],
                Err(Errno::EINTR) => continue,
                // EAGAIN: nobody reads fast enough; EIO/EPIPE: nobody is connected. Either way
                // the byte is lost, not the guest's time.
                Err(_) => {
                    self.dropped_bytes += rest.len() as u64;
                    break;
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// COM1 as a bus device: eight one-byte registers.
pub struct SerialDevice {
    uart: Serial<IrqEvent, NoEvents, ConsoleOutput>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, output: ConsoleOutput) -> Self {
        SerialDevice {
            uart: Serial::new(IrqEvent(interrupt), output),
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues console input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or_else(|err| {
            tracing::warn!("cannot raise the COM1 receive interrupt: {err:?}");
            0
        })
    }

    pub fn dropped_output_bytes(&self) -> u64 {
        self.uart.writer().dropped_bytes()
    }

    /// The VM has ended: sends a last console line without a newline to the journal, and says
    /// how many lines the journal did not take.
    pub fn finish_console_journal(&mut self) {
        if let Some(journal) = &mut self.uart.writer_mut().journal {
            journal.flush();
            let dropped = journal.dropped_lines();
            if dropped > 0 {
                tracing::warn!("{dropped} console lines could not be sent to the journal");
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(register), [byte]) => *byte = self.uart.read(register),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(register), [byte]) = (u8::try_from(offset), data) {
            // The writer never fails; a failing interrupt trigger only loses an interrupt.
            if let Err(err) = self.uart.write(register, *byte) {
                tracing::warn!("COM1 write to register {register} failed: {err:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use std::io::Read;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn serial_into_socket() -> (SerialDevice, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        let output = ConsoleOutput::new(Some(OwnedFd::from(ours)), None);
        let device = SerialDevice::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"), output);
        (device, theirs)
    }

    #[test]
    fn guest_bytes_reach_the_console() {
        let (mut device, mut reader) = serial_into_socket();
        for byte in b"hi\n" {
            device.write(0, &[*byte]);
        }
        let mut got = [0u8; 3];
        reader.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hi\n");
    }

    #[test]
    fn a_console_nobody_reads_drops_output_instead_of_blocking() {
        let (mut device, _reader) = serial_into_socket();
        for _ in 0..1_000_000 {
            device.write(0, b"x");
        }
        assert!(device.dropped_output_bytes() > 0);
    }

    #[test]
    fn wide_accesses_are_ignored_and_read_all_ones() {
        let (mut device, _reader) = serial_into_socket();
        device.write(0, b"ab");
        let mut data = [0u8; 2];
        device.read(5, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(device.dropped_output_bytes(), 0);
    }

    #[test]
    fn input_fills_the_fifo_up_to_its_capacity() {
        let (mut device, _reader) = serial_into_socket();
        let capacity = device.input_capacity();
        assert_eq!(device.enqueue_input(&vec![b'a'; capacity + 10]), capacity);
        assert_eq!(device.enqueue_input(b"more"), 0);
        let mut byte = [0u8];
        device.read(0, &mut byte);
        assert_eq!(byte, [b'a']);
        assert_eq!(device.input_capacity(), 1);
    }
}
