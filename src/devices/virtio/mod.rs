//! Virtio 1.x devices over the virtio-mmio transport.
//!
//! A virtio device is split along the threads that touch it:
//! - [`mmio::MmioTransport`] sits on the MMIO bus and answers the guest's register accesses on
//!   vCPU threads: feature negotiation, queue set-up, status, interrupt acknowledgement, and the
//!   device's read-only configuration space;
//! - a [`QueueHandler`] (the block device, the entropy source) runs on the device's own
//!   [`worker`] thread, woken by the queues' ioeventfds, and serves the queues the driver set up;
//! - [`DeviceShared`] is what the two share: the activated queues (under a mutex the worker holds
//!   while it serves them, so a reset waits for a request in flight), the interrupt, and the
//!   device's NEEDS_RESET flag.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub mod testing;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Feature bit 32: the device follows virtio 1.x (the only kind this transport offers).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Interrupt status bit: the device used buffers.
pub const INTERRUPT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration (here: the device status) changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// What the transport needs to know about a device (all of it fixed when the device is made).
#[derive(Debug, Clone)]
pub struct DeviceDescription {
    /// The virtio device id (2 block, 4 entropy).
    pub device_type: u32,
    /// A short name for log lines, e.g. "disk0".
    pub name: String,
    /// The largest size of each queue.
    pub queue_max_sizes: Vec<u16>,
    /// The features the device offers (VERSION_1 included).
    pub features: u64,
    /// The device's configuration space, read-only for the guest.
    pub config: Vec<u8>,
}

/// A failure of a device's queue processing that the device cannot go on from: the device is
/// marked NEEDS_RESET until the driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the driver's queue {queue} is broken: {source}")]
    Queue {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("the host side of the device failed: {0}")]
    Backend(#[source] std::io::Error),
}

impl DeviceError {
    /// Makes a queue error of queue `index` (for `map_err`).
    pub fn in_queue(index: usize) -> impl Fn(virtio_queue::Error) -> DeviceError + Copy {
        move |source| DeviceError::Queue {
            queue: index,
            source,
        }
    }
}

/// Serves the queues of one device on its worker thread.
pub trait QueueHandler: Send {
    /// Takes every available request of `queue` (number `index`) and returns whether any buffer
    /// was used (so the guest must be interrupted).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError>;

    /// Makes everything written so far durable; called when the VM ends, whatever the reason.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    /// The driver activated the device with `features` (called on the worker, before any
    /// queue of this activation is served). A failure marks the device NEEDS_RESET.
    fn activate(&mut self, _features: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    /// An fd of the device's host side (a tap) the worker waits on besides the queues, when
    /// the device wants to hear from it now (e.g. not while the guest has no receive buffers).
    fn backend_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// [`QueueHandler::backend_fd`] is readable: move what arrived into `queues`.
    fn process_backend(
        &mut self,
        _queues: &mut [Queue],
        _memory: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        Ok(false)
    }
}

/// Serves the available chains of `queue` with `serve` (which gets the parsed chain, or why
/// it could not be parsed, and returns the used length), then returns whether the driver must
/// be interrupted. A used ring or avail index the driver broke is a [`DeviceError`].
///
/// One call serves at most `queue size` chains. A driver never has more than that available at
/// once (virtio 1.x, 2.7.13: it only reuses a descriptor the device has used), and whatever it
/// adds during the drain comes with a notification of its own, so nothing is lost; but a driver
/// that keeps adding, or whose used ring overlaps its avail ring (so that each used element
/// the device writes looks like a new available one), cannot keep the worker here for ever.
pub fn drain_queue(
    index: usize,
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    mut serve: impl FnMut(u16, Result<chain::Request, chain::ChainError>) -> u32,
) -> Result<bool, DeviceError> {
    let queue_error = DeviceError::in_queue(index);
    let mut used_any = false;
    for _ in 0..queue.size() {
        let next = queue.iter(memory).map_err(queue_error)?.next();
        let Some(descriptors) = next else {
            break;
        };
        let head = descriptors.head_index();
        if head >= queue.size() {
            // No used element can name it: the request is dropped, the queue goes on.
            tracing::debug!("queue {index}: dropping a request with head {head} past the table");
            continue;
        }
        let used_len = serve(head, chain::Request::parse(descriptors));
        queue
            .add_used(memory, head, used_len)
            .map_err(queue_error)?;
        used_any = true;
    }
    if !used_any || !queue.needs_notification(memory).map_err(queue_error)? {
        return Ok(false);
    }
    // virtio-queue leaves VRING_AVAIL_F_NO_INTERRUPT to us (virtio 1.2, 2.7.7.2 Used Buffer
    // Notification Suppression): "If the VIRTIO_F_EVENT_IDX feature bit is not negotiated: [...]
    // If flags is 1, the device SHOULD NOT send a notification." A polling driver sets it, and
    // an interrupt it did not ask for still costs it a VM exit per request. needs_notification
    // has already fenced the used ring's writes against this read.
    if queue.event_idx_enabled() {
        return Ok(true);
    }
    let flags: u16 = memory
        .read_obj(GuestAddress(queue.avail_ring()))
        .map_err(|e| queue_error(virtio_queue::Error::GuestMemory(e)))?;
    Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
}

const VRING_AVAIL_F_NO_INTERRUPT: u16 =
    virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// The queues of an activated device: set when the driver writes DRIVER_OK, taken on reset.
pub struct ActiveQueues {
    pub queues: Vec<Queue>,
    /// The features the driver accepted.
    pub features: u64,
    /// Counts activations, so the worker tells a new one from the one it already saw.
    pub generation: u64,
}

/// What a device's transport (vCPU threads) and worker share.
pub struct DeviceShared {
    pub active: Mutex<Option<ActiveQueues>>,
    pub interrupt: Interrupt,
    needs_reset: AtomicBool,
}

impl DeviceShared {
    pub fn new(interrupt: Interrupt) -> Self {
        DeviceShared {
            active: Mutex::new(None),
            interrupt,
            needs_reset: AtomicBool::new(false),
        }
    }

    /// Locks the active queues, carrying on after a panic of the other side: the panic has
    /// already marked the device NEEDS_RESET.
    pub fn lock_active(&self) -> MutexGuard<'_, Option<ActiveQueues>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the device broken until the driver resets it, and tells the driver so.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        self.interrupt.raise(INTERRUPT_CONFIG_CHANGE);
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    fn clear_needs_reset(&self) {
        self.needs_reset.store(false, Ordering::Release);
    }
}

/// A device's interrupt: the InterruptStatus bits and the irqfd KVM turns into an edge on the
/// device's interrupt line.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in InterruptStatus and interrupts the guest.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(err) = self.irqfd.write(1) {
            // Only an overflowing counter fails, and then an interrupt is pending anyway.
            tracing::warn!("cannot signal a virtio interrupt: {err}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// The driver acknowledged `bits` (InterruptACK).
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}
