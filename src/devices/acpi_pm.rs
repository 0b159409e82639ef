//! ACPI PM1 fixed hardware: the PM1a event block (status and enable) and the PM1a control
//! block, at the ports the FADT announces (`layout::PM1A_EVT_PORT`, `layout::PM1A_CNT_PORT`).
//!
//! It gives the guest the two things an ACPI OS expects from a PC: soft-off (writing SLP_TYP=S5
//! with SLP_EN to PM1_CNT, ACPI 6.5 §4.8.3.2.1) and the fixed-feature power button
//! (PWRBTN_STS, §4.8.3.1.1), which the VMM presses to ask the guest to shut down. The button
//! raises the SCI while its status and enable bits are both set.

use std::sync::Arc;

use super::{BusDevice, GuestStop, StopSignal};
use crate::vmm::layout::S5_SLEEP_TYPE;

/// PM1_STS / PM1_EN bit of the power button.
pub const PWRBTN: u16 = 1 << 8;
/// PM1_CNT: SCI_EN (ACPI mode is always on: there is no SMI_CMD to switch it).
const SCI_EN: u16 = 1 << 0;
/// PM1_CNT: SLP_TYP field and the write-only SLP_EN trigger.
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0b111 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;

/// Offsets inside the device's one port range: the event block (4 bytes) directly followed by the
/// control block (2 bytes), as `layout::PM1A_EVT_PORT` and `layout::PM1A_CNT_PORT` place them.
const STS_OFFSET: u64 = 0;
const EN_OFFSET: u64 = 2;
const CNT_OFFSET: u64 = 4;

/// A level-triggered interrupt line (the SCI).
pub trait IrqLine: Send {
    fn set_level(&self, high: bool);
}

pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    sci: Box<dyn IrqLine>,
    stop: Arc<StopSignal>,
}

impl AcpiPm {
    pub fn new(sci: Box<dyn IrqLine>, stop: Arc<StopSignal>) -> Self {
        AcpiPm {
            status: 0,
            enable: 0,
            control: SCI_EN,
            sci,
            stop,
        }
    }

    /// Presses the power button: the guest sees PWRBTN_STS, and an interrupt if it enabled one.
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN;
        self.update_sci();
    }

    fn update_sci(&self) {
        self.sci.set_level(self.status & self.enable != 0);
    }

    fn write_control(&mut self, value: u16) {
        // SLP_EN is write-only and reads as zero.
        self.control = value & !SLP_EN;
        let sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if value & SLP_EN != 0 {
            if sleep_type == S5_SLEEP_TYPE {
                self.stop.request(GuestStop::PowerOff);
            } else {
                tracing::info!(
                    "guest asked for ACPI sleep type {sleep_type}, which is not supported; ignored"
                );
            }
        }
    }
}

/// Reads a register of `width` bytes (1 or 2) at `offset` within it into `data`, little endian.
fn read_register(register: u16, offset_in_register: u64, data: &mut [u8]) {
    let bytes = register.to_le_bytes();
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset_in_register)
            .ok()
            .and_then(|o| bytes.get(o + i).copied())
            .unwrap_or(0);
    }
}

/// Assembles a register write of 1 or 2 bytes at `offset_in_register`, keeping the other byte of
/// `current` for a 1-byte write. `None` for accesses that do not fit the register.
fn merge_write(current: u16, offset_in_register: u64, data: &[u8]) -> Option<(u16, u16)> {
    let mut bytes = current.to_le_bytes();
    let mut written = [0u8; 2];
    let start = usize::try_from(offset_in_register).ok()?;
    if start + data.len() > 2 {
        return None;
    }
    bytes[start..start + data.len()].copy_from_slice(data);
    written[start..start + data.len()].copy_from_slice(data);
    Some((u16::from_le_bytes(bytes), u16::from_le_bytes(written)))
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            STS_OFFSET | 1 => read_register(self.status, offset - STS_OFFSET, data),
            EN_OFFSET | 3 => read_register(self.enable, offset - EN_OFFSET, data),
            CNT_OFFSET | 5 => read_register(self.control, offset - CNT_OFFSET, data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            STS_OFFSET | 1 => {
                // Write one to clear (ACPI §4.8.3.1).
                if let Some((_, written)) = merge_write(0, offset - STS_OFFSET, data) {
                    self.status &= !written;
                    self.update_sci();
                }
            }
            EN_OFFSET | 3 => {
                // Fully read/write, as on real chipsets: ACPICA checks that the global-lock
                // enable bit sticks, though only the power button ever raises status here.
                if let Some((value, _)) = merge_write(self.enable, offset - EN_OFFSET, data) {
                    self.enable = value;
                    self.update_sci();
                }
            }
            CNT_OFFSET | 5 => {
                if let Some((value, _)) = merge_write(self.control, offset - CNT_OFFSET, data) {
                    self.write_control(value);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct RecordingLine(Arc<Mutex<Vec<bool>>>);
    impl IrqLine for RecordingLine {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    fn device() -> (AcpiPm, Arc<StopSignal>, Arc<Mutex<Vec<bool>>>) {
        let stop = Arc::new(StopSignal::new().expect("eventfd"));
        let levels = Arc::new(Mutex::new(Vec::new()));
        let pm = AcpiPm::new(Box::new(RecordingLine(levels.clone())), stop.clone());
        (pm, stop, levels)
    }

    fn read16(pm: &mut AcpiPm, offset: u64) -> u16 {
        let mut data = [0u8; 2];
        pm.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut pm, stop, _) = device();
        assert_eq!(read16(&mut pm, CNT_OFFSET), SCI_EN);
        // SLP_TYP without SLP_EN does nothing; another sleep type does nothing.
        pm.write(CNT_OFFSET, &(5u16 << 10).to_le_bytes());
        pm.write(CNT_OFFSET, &((3u16 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(stop.reason(), None);
        pm.write(CNT_OFFSET, &((5u16 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(stop.reason(), Some(GuestStop::PowerOff));
        assert_eq!(read16(&mut pm, CNT_OFFSET) & SLP_EN, 0);
    }

    #[test]
    fn s5_by_single_byte_write_to_high_byte() {
        let (mut pm, stop, _) = device();
        pm.write(CNT_OFFSET + 1, &[((5u16 << 10 | SLP_EN) >> 8) as u8]);
        assert_eq!(stop.reason(), Some(GuestStop::PowerOff));
    }

    #[test]
    fn power_button_sets_status_and_sci_only_when_enabled() {
        let (mut pm, _, levels) = device();
        pm.press_power_button();
        assert_eq!(read16(&mut pm, STS_OFFSET), PWRBTN);
        assert_eq!(levels.lock().unwrap().last(), Some(&false));
        pm.write(EN_OFFSET, &PWRBTN.to_le_bytes());
        assert_eq!(levels.lock().unwrap().last(), Some(&true));
        // Writing zero clears nothing; writing one clears the bit and lowers the SCI.
        pm.write(STS_OFFSET, &0u16.to_le_bytes());
        assert_eq!(read16(&mut pm, STS_OFFSET), PWRBTN);
        pm.write(STS_OFFSET, &PWRBTN.to_le_bytes());
        assert_eq!(read16(&mut pm, STS_OFFSET), 0);
        assert_eq!(levels.lock().unwrap().last(), Some(&false));
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut pm, stop, _) = device();
        pm.write(CNT_OFFSET, &[0xff; 4]);
        pm.write(1, &[0xff, 0xff]);
        pm.write(6, &[0xff]);
        let mut data = [0xaa; 4];
        pm.read(7, &mut data);
        assert_eq!(data, [0; 4]);
        assert_eq!(stop.reason(), None);
    }
}
