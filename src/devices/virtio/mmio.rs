//! The virtio-mmio transport, version 2 (virtio 1.x, "modern" only): the register block a
//! driver finds through `virtio_mmio.device=<size>@<base>:<irq>` on the kernel command line.
//!
//! Everything here runs on vCPU threads and touches only guest-written register values, which
//! are checked before use: a queue is handed to the worker only once the driver wrote
//! DRIVER_OK after FEATURES_OK and the queue's rings lie in guest memory.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueues, DeviceDescription, DeviceShared, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;

/// The size of one device's register window (Linux's `virtio_mmio.device=4K@...`).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// "virt" in little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// Register layout version 2: virtio 1.x.
const MMIO_VERSION: u32 = 2;
/// "VMD\0": the vendor id, which drivers only print.
const VENDOR_ID: u32 = 0x0044_4d56;

/// One virtio device's register window.
pub struct MmioTransport {
    description: DeviceDescription,
    shared: Arc<DeviceShared>,
    memory: GuestMemoryMmap,
    /// The worker's queue notification eventfds (KVM writes them on QueueNotify; the transport
    /// writes them on activation, so requests queued before DRIVER_OK are seen).
    queue_events: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    activations: u64,
}

/// Errors from [`MmioTransport::new`].
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid queue size {0} for device {1}")]
    QueueSize(u16, String),
    #[error("device {name} has {queues} queues but {events} notification eventfds")]
    EventCount {
        name: String,
        queues: usize,
        events: usize,
    },
}

impl MmioTransport {
    pub fn new(
        description: DeviceDescription,
        shared: Arc<DeviceShared>,
        memory: GuestMemoryMmap,
        queue_events: Vec<EventFd>,
    ) -> Result<Self, TransportError> {
        if queue_events.len() != description.queue_max_sizes.len() {
            return Err(TransportError::EventCount {
                name: description.name.clone(),
                queues: description.queue_max_sizes.len(),
                events: queue_events.len(),
            });
        }
        let queues = new_queues(&description)?;
        Ok(MmioTransport {
            description,
            shared,
            memory,
            queue_events,
            queues,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            activations: 0,
        })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let index = usize::try_from(self.queue_select).ok()?;
        self.queues.get_mut(index)
    }

    fn activated(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    fn read_register(&self, offset: u32) -> u32 {
        let queue = usize::try_from(self.queue_select)
            .ok()
            .and_then(|i| self.queues.get(i));
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.description.device_type,
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.description.features as u32,
                1 => (self.description.features >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.shared.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => {
                let needs_reset = if self.shared.needs_reset() {
                    VIRTIO_CONFIG_S_NEEDS_RESET
                } else {
                    0
                };
                self.status | needs_reset
            }
            // No shared memory regions: a length of all ones says "none" (virtio 1.2, 4.2.2).
            reg::VIRTIO_MMIO_SHM_LEN_LOW | reg::VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            // The configuration space never changes after the device is made.
            reg::VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    return; // Features are fixed once accepted.
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.shared.interrupt.acknowledge(value),
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_READY
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            _ => {}
        }
    }

    /// Queue set-up, allowed between FEATURES_OK and DRIVER_OK (the rings of an activated
    /// device belong to the worker).
    fn write_queue_register(&mut self, offset: u32, value: u32) {
        if self.activated() || self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return;
        }
        let Some(queue) = self.selected_queue() else {
            return;
        };
        match offset {
            reg::VIRTIO_MMIO_QUEUE_NUM => queue.set_size(value as u16),
            reg::VIRTIO_MMIO_QUEUE_READY => queue.set_ready(value == 1),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.set_avail_ring_address(Some(value), None),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.set_avail_ring_address(None, Some(value)),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => queue.set_used_ring_address(Some(value), None),
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// A QueueNotify that KVM's ioeventfd did not take (it only matches a queue's own index).
    fn notify(&self, value: u32) {
        if let Some(event) = usize::try_from(value)
            .ok()
            .and_then(|i| self.queue_events.get(i))
        {
            let _ = event.write(1);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // A driver only ever adds status bits until it resets the device.
        if value & self.status != self.status {
            tracing::debug!(
                "{}: the driver cleared status bits ({:#x} -> {value:#x}); ignored",
                self.description.name,
                self.status
            );
            return;
        }
        let added = value & !self.status;
        let mut status = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads the status back and gives up: FEATURES_OK stays clear.
            status &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                status &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else if let Err(why) = self.activate() {
                tracing::warn!("{}: cannot activate: {why}", self.description.name);
                status &= !VIRTIO_CONFIG_S_DRIVER_OK;
                self.status = status;
                self.shared.set_needs_reset();
                return;
            }
        }
        self.status = status;
    }

    /// The driver accepted only features the device offered, and virtio 1.x.
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.description.features == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    /// Hands the ready queues to the worker and wakes it.
    fn activate(&mut self) -> Result<(), String> {
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(&self.memory) {
                return Err(format!(
                    "queue {index} has an invalid size or rings outside guest memory"
                ));
            }
        }
        // The worker gets its own copy of each queue; the transport keeps its copies only to
        // answer register reads (QueueReady, QueueNumMax) until the next reset.
        let queues = self
            .queues
            .iter()
            .map(|queue| Queue::try_from(queue.state()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot copy a queue: {e}"))?;
        self.activations += 1;
        *self.shared.lock_active() = Some(ActiveQueues {
            queues,
            features: self.driver_features,
            generation: self.activations,
        });
        for event in &self.queue_events {
            let _ = event.write(1);
        }
        Ok(())
    }

    /// Device reset: the worker lets go of the queues (waiting for a request in flight) and
    /// every register returns to its initial value.
    fn reset(&mut self) {
        *self.shared.lock_active() = None;
        if let Ok(queues) = new_queues(&self.description) {
            self.queues = queues;
        }
        self.shared.interrupt.clear();
        self.shared.clear_needs_reset();
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = &self.description.config;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
}

fn new_queues(description: &DeviceDescription) -> Result<Vec<Queue>, TransportError> {
    description
        .queue_max_sizes
        .iter()
        .map(|&size| {
            Queue::new(size).map_err(|_| TransportError::QueueSize(size, description.name.clone()))
        })
        .collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let config_start = u64::from(reg::VIRTIO_MMIO_CONFIG);
        if offset >= config_start {
            self.read_config(offset - config_start, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let value = self.read_register(offset as u32);
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            // Registers are 32 bits wide; other accesses read as zero.
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let config_start = u64::from(reg::VIRTIO_MMIO_CONFIG);
        // The configuration space is read-only; registers take aligned 32-bit writes only.
        if offset >= config_start || data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset as u32, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{INTERRUPT_USED_BUFFER, Interrupt};
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn transport() -> (MmioTransport, Arc<DeviceShared>, EventFd) {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let shared = Arc::new(DeviceShared::new(Interrupt::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )));
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        let description = DeviceDescription {
            device_type: 2,
            name: "test".into(),
            queue_max_sizes: vec![16],
            features: VIRTIO_F_VERSION_1 | 1 << 9,
            config: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        let transport = MmioTransport::new(
            description,
            shared.clone(),
            memory,
            vec![event.try_clone().unwrap()],
        )
        .unwrap();
        (transport, shared, event)
    }

    fn read32(t: &mut MmioTransport, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        t.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(t: &mut MmioTransport, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features_high: u32) -> u32 {
        write32(t, reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        write32(t, reg::VIRTIO_MMIO_STATUS, status);
        write32(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, features_high);
        write32(
            t,
            reg::VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        read32(t, reg::VIRTIO_MMIO_STATUS)
    }

    fn set_up_queue(t: &mut MmioTransport, size: u32) {
        write32(t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        write32(t, reg::VIRTIO_MMIO_QUEUE_NUM, size);
        write32(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write32(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        write32(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        write32(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn identifies_itself() {
        let (mut t, _, _) = transport();
        assert_eq!(read32(&mut t, 0), MAGIC_VALUE);
        assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_DEVICE_ID), 2);
        write32(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 1);
        assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        let mut byte = [0u8; 1];
        t.read(0x103, &mut byte);
        assert_eq!(byte, [4]);
        let mut past = [0xffu8; 4];
        t.read(0x106, &mut past);
        assert_eq!(past, [7, 8, 0, 0]);
        // Unaligned or narrow register reads are zero, not a panic.
        let mut odd = [0xffu8; 2];
        t.read(0x2, &mut odd);
        assert_eq!(odd, [0, 0]);
    }

    #[test]
    fn refuses_features_it_did_not_offer_or_without_version_1() {
        let (mut t, _, _) = transport();
        assert_eq!(negotiate(&mut t, 0) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        let (mut t, _, _) = transport();
        assert_eq!(negotiate(&mut t, 1 | 2) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        let (mut t, _, _) = transport();
        assert_ne!(negotiate(&mut t, 1) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn activates_valid_queues_and_wakes_the_worker() {
        let (mut t, shared, event) = transport();
        let status = negotiate(&mut t, 1);
        set_up_queue(&mut t, 16);
        write32(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_ne!(
            read32(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK,
            0
        );
        assert!(shared.lock_active().is_some());
        assert_eq!(event.read().unwrap(), 1);
        // Queue registers are frozen once active.
        write32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
        // Reset takes the queues back and clears everything.
        shared.interrupt.raise(INTERRUPT_USED_BUFFER);
        write32(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        assert!(shared.lock_active().is_none());
        assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(read32(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn a_queue_outside_memory_is_not_activated() {
        for (register, address) in [
            (reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0xfff_0000u32),
            (reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0xffff_fffe),
            (reg::VIRTIO_MMIO_QUEUE_USED_HIGH, 1),
        ] {
            let (mut t, shared, _) = transport();
            let status = negotiate(&mut t, 1);
            set_up_queue(&mut t, 16);
            write32(&mut t, register, address);
            write32(
                &mut t,
                reg::VIRTIO_MMIO_STATUS,
                status | VIRTIO_CONFIG_S_DRIVER_OK,
            );
            let status = read32(&mut t, reg::VIRTIO_MMIO_STATUS);
            assert_eq!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0, "{register:#x}");
            assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "{register:#x}");
            assert!(shared.lock_active().is_none());
        }
    }
}
