//! Just enough of the i8042 keyboard controller to reset the machine: Linux's default reboot
//! method on x86 (`reboot=k`) writes the pulse-reset command 0xfe to the command port.

use std::sync::Arc;

use super::{BusDevice, GuestStop, StopSignal};

/// Offsets from the data port (0x60); the command/status port is 0x64.
#[cfg(test)]
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;
/// Pulse the output line that resets the CPU.
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    stop: Arc<StopSignal>,
}

impl I8042 {
    pub fn new(stop: Arc<StopSignal>) -> Self {
        I8042 { stop }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing. Guests that probe for a
        // keyboard find none and move on.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Other commands and data (keyboard enable, LEDs, A20) need no effect here.
        if offset == COMMAND_OFFSET && data == [CMD_RESET_CPU] {
            self.stop.request(GuestStop::Reboot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reboot() {
        let stop = Arc::new(StopSignal::new().expect("eventfd"));
        let mut i8042 = I8042::new(stop.clone());
        i8042.write(COMMAND_OFFSET, &[0xd1]);
        i8042.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        i8042.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        assert_eq!(stop.reason(), None);
        i8042.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(stop.reason(), Some(GuestStop::Reboot));
    }
}
