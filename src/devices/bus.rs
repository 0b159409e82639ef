//! A guest address bus (one for port I/O, one for MMIO) mapping ranges to devices.
//!
//! The bus is filled while the VM is built and is immutable afterwards, so vCPU threads share it
//! without a lock; each device has its own mutex. Accesses that hit no device are ignored (reads
//! return all ones, as on a PC with nothing decoding the address) and logged at a limited rate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// A device on a bus. `offset` is relative to the start of the device's range; `data` has the
/// length of the guest's access (1, 2, 4 or 8 bytes).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from [`Bus::insert`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("cannot map a device at {base:#x} with length zero")]
    EmptyRange { base: u64 },
    #[error("device range {base:#x}+{len:#x} overflows the address space")]
    Overflow { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
}

/// What the bus did with a guest access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A device handled it.
    Handled,
    /// No device decodes this address (or the access straddles a device's end).
    Unmapped,
}

struct Mapping {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (port I/O or MMIO).
pub struct Bus {
    name: &'static str,
    /// Keyed by base address; ranges never overlap.
    mappings: BTreeMap<u64, Mapping>,
    unmapped_log: RateLimiter,
}

impl Bus {
    pub fn new(name: &'static str) -> Self {
        Bus {
            name,
            mappings: BTreeMap::new(),
            unmapped_log: RateLimiter::new(),
        }
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        let overlaps_previous = self
            .mappings
            .range(..end)
            .next_back()
            .is_some_and(|(prev_base, prev)| prev_base + prev.len > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        self.mappings.insert(base, Mapping { len, device });
        Ok(())
    }

    /// The device whose range holds the whole access `[addr, addr + size)`, and the offset in it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&Mapping, u64)> {
        let (base, mapping) = self.mappings.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= mapping.len).then_some((mapping, offset))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) -> Access {
        match self.resolve(addr, data.len()) {
            Some((mapping, offset)) => {
                lock_device(&mapping.device).read(offset, data);
                Access::Handled
            }
            None => {
                data.fill(0xff);
                self.log_unmapped("read", addr, data.len());
                Access::Unmapped
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Access {
        match self.resolve(addr, data.len()) {
            Some((mapping, offset)) => {
                lock_device(&mapping.device).write(offset, data);
                Access::Handled
            }
            None => {
                self.log_unmapped("write", addr, data.len());
                Access::Unmapped
            }
        }
    }

    fn log_unmapped(&self, what: &str, addr: u64, size: usize) {
        if let Some(suppressed) = self.unmapped_log.admit_note("such accesses") {
            tracing::info!(
                "guest {what} of {size} bytes at {} address {addr:#x} hits no device; ignored{suppressed}",
                self.name
            );
        }
    }
}

/// Locks a device, carrying on with its state if another vCPU thread panicked while holding it:
/// a device's registers are plain data and stay consistent enough to keep the guest running.
pub fn lock_device<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Lets one log line through per second and counts what it held back.
pub struct RateLimiter {
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimiter {
    pub fn new() -> Self {
        RateLimiter {
            last_second: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// When this event may be logged, the note to end its line with: empty, or how many
    /// `what` were held back in the last second.
    pub fn admit_note(&self, what: &str) -> Option<String> {
        self.admit().map(|suppressed| match suppressed {
            0 => String::new(),
            n => format!(" ({n} more {what} in the last second not logged)"),
        })
    }

    /// `Some(count of suppressed events)` when this event may be logged.
    pub fn admit(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_second.load(Ordering::Relaxed);
        if now != last
            && self
                .last_second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn bus_with_recorder(base: u64, len: u64) -> (Bus, Arc<Mutex<Recorder>>) {
        let mut bus = Bus::new("test");
        let device = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(base, len, device.clone()).expect("insert");
        (bus, device)
    }

    #[test]
    fn routes_accesses_by_offset() {
        let (bus, device) = bus_with_recorder(0x3f8, 8);
        let mut data = [0u8; 1];
        assert_eq!(bus.read(0x3fd, &mut data), Access::Handled);
        assert_eq!(data, [5]);
        assert_eq!(bus.write(0x3f8, b"x"), Access::Handled);
        assert_eq!(device.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn unmapped_reads_return_all_ones() {
        let (bus, _) = bus_with_recorder(0x3f8, 8);
        let mut data = [0u8; 4];
        assert_eq!(bus.read(0x4400, &mut data), Access::Unmapped);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(bus.write(0x3f7, &[1]), Access::Unmapped);
    }

    #[test]
    fn access_straddling_the_end_of_a_device_is_unmapped() {
        let (bus, device) = bus_with_recorder(0x600, 4);
        assert_eq!(bus.write(0x602, &[0; 4]), Access::Unmapped);
        assert_eq!(bus.write(u64::MAX, &[0; 8]), Access::Unmapped);
        assert!(device.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn rejects_overlapping_and_empty_ranges() {
        let (mut bus, device) = bus_with_recorder(0x100, 0x10);
        assert_eq!(
            bus.insert(0x10f, 1, device.clone()),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(0xf8, 0x9, device.clone()),
            Err(BusError::Overlap { base: 0xf8, len: 9 })
        );
        assert_eq!(
            bus.insert(0x50, 0, device.clone()),
            Err(BusError::EmptyRange { base: 0x50 })
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, device.clone()),
            Err(BusError::Overflow { .. })
        ));
        assert_eq!(bus.insert(0x110, 1, device.clone()), Ok(()));
        assert_eq!(bus.insert(0xf0, 0x10, device), Ok(()));
    }
}
