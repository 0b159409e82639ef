//! Emulated devices of the x86 platform and the buses that route guest accesses to them.
//!
//! Every device sees only an offset into its own range, so it never learns (or trusts) the
//! guest's absolute address; the bus rejects accesses that do not fall entirely inside one device.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod console_journal;
pub mod i8042;
pub mod manager;
pub mod serial;
pub mod stop;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use stop::{GuestStop, StopSignal};
