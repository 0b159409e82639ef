//! The device manager: places virtio devices on the MMIO bus and wires them to KVM when they
//! are attached (never later, on a vCPU thread): an MMIO window and an interrupt line from the
//! allocators, an ioeventfd per queue, an irqfd per device, the worker thread, and the
//! `virtio_mmio.device=` entry that tells the guest kernel where to look.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::virtio::mmio::{MMIO_WINDOW_SIZE, MmioTransport, TransportError};
use super::virtio::worker::{Worker, WorkerHandle, WorkerKind, WorkerSetup};
use super::virtio::{DeviceDescription, DeviceShared, Interrupt, QueueHandler};
use super::{Bus, BusError, StopSignal};
use crate::protocol::MAX_DEVICE_CMDLINE_BYTES;
use crate::vmm::layout;

/// Errors from attaching a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("no room left for another device's MMIO window")]
    MmioSpace(#[source] vm_allocator::Error),
    #[error("no interrupt line left for another device")]
    Irq(#[source] vm_allocator::Error),
    #[error("cannot create an eventfd for {0}")]
    EventFd(String, #[source] std::io::Error),
    #[error("cannot register {0}'s interrupt with KVM")]
    Irqfd(String, #[source] kvm_ioctls::Error),
    #[error("cannot register {0}'s queue notifications with KVM")]
    Ioeventfd(String, #[source] kvm_ioctls::Error),
    #[error("cannot set up {0}'s transport")]
    Transport(String, #[source] TransportError),
    #[error("cannot place {0} on the MMIO bus")]
    Bus(String, #[source] BusError),
    #[error("cannot start {0}'s worker thread")]
    Worker(String, #[source] std::io::Error),
    #[error("the devices' command-line entries do not fit")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot set up the device allocators")]
    Allocator(#[source] vm_allocator::Error),
}

/// Attaches devices while the VM is built; [`DeviceManager::finish`] hands over what must live
/// as long as the VM.
pub struct DeviceManager {
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    stop: Arc<StopSignal>,
    worker_setup: WorkerSetup,
    mmio: Bus,
    mmio_space: AddressAllocator,
    irqs: IdAllocator,
    cmdline: Cmdline,
    workers: Vec<WorkerHandle>,
}

/// What the built VM keeps of the device manager.
pub struct AttachedDevices {
    pub mmio: Bus,
    pub workers: Vec<WorkerHandle>,
    /// The entries for the kernel command line (empty without devices).
    pub cmdline: String,
}

impl DeviceManager {
    pub fn new(
        vm_fd: Arc<VmFd>,
        memory: GuestMemoryMmap,
        stop: Arc<StopSignal>,
        worker_setup: WorkerSetup,
    ) -> Result<Self, DeviceManagerError> {
        Ok(DeviceManager {
            vm_fd,
            memory,
            stop,
            worker_setup,
            mmio: Bus::new("MMIO"),
            mmio_space: AddressAllocator::new(layout::VIRTIO_MMIO_START, layout::VIRTIO_MMIO_SIZE)
                .map_err(DeviceManagerError::Allocator)?,
            irqs: IdAllocator::new(layout::VIRTIO_FIRST_GSI, layout::VIRTIO_LAST_GSI)
                .map_err(DeviceManagerError::Allocator)?,
            cmdline: Cmdline::new(MAX_DEVICE_CMDLINE_BYTES + 1)
                .map_err(DeviceManagerError::Cmdline)?,
            workers: Vec::new(),
        })
    }

    /// Attaches a virtio device served by `handler` on a worker thread of `kind`.
    pub fn attach_virtio(
        &mut self,
        description: DeviceDescription,
        handler: Box<dyn QueueHandler>,
        kind: WorkerKind,
    ) -> Result<(), DeviceManagerError> {
        let name = description.name.clone();
        let window = self
            .mmio_space
            .allocate(MMIO_WINDOW_SIZE, MMIO_WINDOW_SIZE, AllocPolicy::FirstMatch)
            .map_err(DeviceManagerError::MmioSpace)?;
        let base = window.start();
        let irq = self.allocate_irq()?;

        let event =
            || EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceManagerError::EventFd(name.clone(), e));
        let irqfd = event()?;
        self.vm_fd
            .register_irqfd(&irqfd, irq)
            .map_err(|e| DeviceManagerError::Irqfd(name.clone(), e))?;
        let notify = base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY);
        let mut queue_events = Vec::new();
        let mut transport_events = Vec::new();
        for index in 0..description.queue_max_sizes.len() {
            let queue_event = event()?;
            // KVM completes a QueueNotify write of this queue's index by itself: no exit.
            self.vm_fd
                .register_ioevent(&queue_event, &IoEventAddress::Mmio(notify), index as u32)
                .map_err(|e| DeviceManagerError::Ioeventfd(name.clone(), e))?;
            transport_events.push(
                queue_event
                    .try_clone()
                    .map_err(|e| DeviceManagerError::EventFd(name.clone(), e))?,
            );
            queue_events.push(queue_event);
        }

        let shared = Arc::new(DeviceShared::new(Interrupt::new(irqfd)));
        let transport = MmioTransport::new(
            description,
            shared.clone(),
            self.memory.clone(),
            transport_events,
        )
        .map_err(|e| DeviceManagerError::Transport(name.clone(), e))?;
        self.mmio
            .insert(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))
            .map_err(|e| DeviceManagerError::Bus(name.clone(), e))?;
        self.cmdline
            .add_virtio_mmio_device(MMIO_WINDOW_SIZE, GuestAddress(base), irq, None)
            .map_err(DeviceManagerError::Cmdline)?;

        let worker = Worker {
            name: name.clone(),
            kind,
            handler,
            shared,
            memory: self.memory.clone(),
            queue_events,
        };
        let handle = worker
            .spawn(self.worker_setup.clone(), self.stop.clone())
            .map_err(|e| DeviceManagerError::Worker(name.clone(), e))?;
        self.workers.push(handle);
        tracing::debug!("{name}: virtio-mmio at {base:#x}, interrupt {irq}");
        Ok(())
    }

    /// The next free interrupt line; the ACPI SCI's line is never handed out.
    fn allocate_irq(&mut self) -> Result<u32, DeviceManagerError> {
        loop {
            let irq = self.irqs.allocate_id().map_err(DeviceManagerError::Irq)?;
            if irq != layout::SCI_GSI {
                return Ok(irq);
            }
        }
    }

    pub fn finish(self) -> Result<AttachedDevices, DeviceManagerError> {
        let cmdline = self
            .cmdline
            .as_cstring()
            .map_err(DeviceManagerError::Cmdline)?
            .into_string()
            .unwrap_or_default();
        Ok(AttachedDevices {
            mmio: self.mmio,
            workers: self.workers,
            cmdline,
        })
    }
}
