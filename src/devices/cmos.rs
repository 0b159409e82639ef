//! The CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71 (data), read-only: the
//! host's time in UTC, BCD, 24-hour mode, never "update in progress".
//!
//! Without it, reads of the RTC's ports float to 0xff, which says "update in progress" forever:
//! Linux's `mach_get_cmos_time` then polls the status register for a whole second (10000 rounds
//! of port accesses, each a VM exit) before it gives up with "Unable to read current time from
//! RTC", and does so more than once while it boots. Writes (the guest setting the clock, alarms,
//! periodic interrupts) are ignored, except to the general-purpose CMOS RAM.

use std::time::{SystemTime, UNIX_EPOCH};

use super::BusDevice;

const INDEX_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;
/// Bit 7 of the index port masks NMIs on PCs; it is not part of the register number.
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
/// First byte of general-purpose CMOS RAM.
const RAM_START: u8 = 0x0e;
/// The century byte of the IBM PC/AT layout.
const REG_CENTURY: u8 = 0x32;

/// Status A: update-in-progress clear, 32.768 kHz time base, 1024 Hz rate (the PC default).
const STATUS_A: u8 = 0x26;
/// Status B: 24-hour mode, BCD, no interrupts enabled, no daylight saving.
const STATUS_B: u8 = 0x02;
/// Status D: valid RAM and time (the battery is fine).
const STATUS_D: u8 = 0x80;

/// Seconds since the Unix epoch, now.
pub type Clock = Box<dyn Fn() -> u64 + Send>;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    clock: Clock,
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos::with_clock(Box::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        }))
    }
}

/// A calendar date and time in UTC.
#[derive(Debug, PartialEq)]
struct DateTime {
    year: u64,
    month: u8,
    day: u8,
    /// 1 (Sunday) to 7 (Saturday), as the RTC counts.
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl DateTime {
    fn from_unix(seconds: u64) -> DateTime {
        let days = seconds / 86400;
        let in_day = seconds % 86400;
        // 1970-01-01 was a Thursday (5 in the RTC's count).
        let weekday = ((days + 4) % 7) as u8 + 1;
        let (mut year, mut day_of_year) = (1970, days);
        loop {
            let length = if is_leap(year) { 366 } else { 365 };
            if day_of_year < length {
                break;
            }
            day_of_year -= length;
            year += 1;
        }
        let mut month = 1;
        for length in month_lengths(year) {
            if day_of_year < length {
                break;
            }
            day_of_year -= length;
            month += 1;
        }
        DateTime {
            year,
            month,
            day: day_of_year as u8 + 1,
            weekday,
            hour: (in_day / 3600) as u8,
            minute: (in_day / 60 % 60) as u8,
            second: (in_day % 60) as u8,
        }
    }
}

fn is_leap(year: u64) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn month_lengths(year: u64) -> [u64; 12] {
    let february = if is_leap(year) { 29 } else { 28 };
    [31, february, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
}

fn bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

impl Cmos {
    pub fn with_clock(clock: Clock) -> Self {
        Cmos {
            index: 0,
            ram: [0; 128],
            clock,
        }
    }

    fn register(&self, index: u8) -> u8 {
        let now = || DateTime::from_unix((self.clock)());
        match index {
            REG_SECONDS => bcd(now().second),
            REG_MINUTES => bcd(now().minute),
            REG_HOURS => bcd(now().hour),
            REG_DAY_OF_WEEK => bcd(now().weekday),
            REG_DAY_OF_MONTH => bcd(now().day),
            REG_MONTH => bcd(now().month),
            REG_YEAR => bcd((now().year % 100) as u8),
            REG_CENTURY => bcd((now().year / 100 % 100) as u8),
            REG_STATUS_A => STATUS_A,
            REG_STATUS_B => STATUS_B,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D,
            _ if index >= RAM_START => self.ram[usize::from(index & INDEX_MASK)],
            // The alarm registers: no alarm.
            _ => 0,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (INDEX_OFFSET, 1) => self.index,
            (DATA_OFFSET, 1) => self.register(self.index),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (INDEX_OFFSET, [index]) => self.index = index & INDEX_MASK,
            (DATA_OFFSET, [value]) if self.index >= RAM_START && self.index != REG_CENTURY => {
                self.ram[usize::from(self.index)] = *value;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(INDEX_OFFSET, &[index]);
        let mut data = [0];
        cmos.read(DATA_OFFSET, &mut data);
        data[0]
    }

    #[test]
    fn dates_from_unix_time() {
        let cases = [
            (0, (1970, 1, 1, 5, 0, 0, 0)),
            (946_641_600, (1999, 12, 31, 6, 12, 0, 0)),
            (946_684_800, (2000, 1, 1, 7, 0, 0, 0)),
            (1_709_251_199, (2024, 2, 29, 5, 23, 59, 59)),
            (1_796_520_225, (2026, 12, 6, 1, 1, 23, 45)),
        ];
        for (seconds, (year, month, day, weekday, hour, minute, second)) in cases {
            assert_eq!(
                DateTime::from_unix(seconds),
                DateTime {
                    year,
                    month,
                    day,
                    weekday,
                    hour,
                    minute,
                    second
                },
                "{seconds}"
            );
        }
    }

    #[test]
    fn reads_the_time_in_bcd_and_is_never_updating() {
        let mut cmos = Cmos::with_clock(Box::new(|| 1_709_251_199));
        let registers = [
            (REG_SECONDS, 0x59),
            (REG_MINUTES, 0x59),
            (REG_HOURS, 0x23),
            (REG_DAY_OF_WEEK, 0x05),
            (REG_DAY_OF_MONTH, 0x29),
            (REG_MONTH, 0x02),
            (REG_YEAR, 0x24),
            (REG_CENTURY, 0x20),
            (REG_STATUS_A, STATUS_A),
            (REG_STATUS_B, STATUS_B),
            (REG_STATUS_C, 0),
            (REG_STATUS_D, STATUS_D),
        ];
        for (index, value) in registers {
            assert_eq!(read(&mut cmos, index), value, "register {index:#x}");
            // The NMI-mask bit of the index port selects the same register.
            assert_eq!(read(&mut cmos, index | 0x80), value, "register {index:#x}");
        }
        assert_eq!(
            read(&mut cmos, REG_STATUS_A) & 0x80,
            0,
            "update in progress"
        );
    }

    #[test]
    fn the_clock_is_read_only_and_the_ram_is_not() {
        let mut cmos = Cmos::with_clock(Box::new(|| 0));
        for index in [REG_SECONDS, REG_STATUS_A, REG_STATUS_B, REG_CENTURY] {
            let before = read(&mut cmos, index);
            cmos.write(DATA_OFFSET, &[0x55]);
            assert_eq!(read(&mut cmos, index), before, "register {index:#x}");
        }
        cmos.write(INDEX_OFFSET, &[0x40]);
        cmos.write(DATA_OFFSET, &[0x5a]);
        assert_eq!(read(&mut cmos, 0x40), 0x5a);
        // Wider accesses are not the RTC's: they read as a floating bus and write nothing.
        let mut wide = [0; 2];
        cmos.read(INDEX_OFFSET, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        cmos.write(INDEX_OFFSET, &[0x40, 0x41]);
        assert_eq!(read(&mut cmos, 0x40), 0x5a);
    }
}
