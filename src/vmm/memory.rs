//! Guest RAM: one memfd, mapped into the helper and registered with KVM.
//!
//! Memory is memfd-backed (not anonymous) so that it has an fd: later snapshots and
//! vhost-user devices can share it without copying.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use nix::sys::memfd::{MFdFlags, memfd_create};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors from [`map_guest_memory`] and [`register_guest_memory`].
#[derive(Debug, thiserror::Error)]
pub enum GuestMemoryError {
    #[error("cannot create the memfd for guest RAM")]
    Memfd(#[source] nix::Error),
    #[error("cannot size the guest RAM memfd to {0} bytes")]
    Resize(u64, #[source] std::io::Error),
    #[error("guest RAM size {0} bytes does not fit this host's address space")]
    TooLarge(u64),
    #[error("cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("KVM refused memory slot {slot} ({size} bytes at {guest_addr:#x})")]
    RegisterSlot {
        slot: u32,
        guest_addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The guest-physical ranges that hold `size` bytes of RAM: below the MMIO gap first, the rest
/// from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Creates `size` bytes of guest RAM in a memfd and maps it. KVM does not know it yet:
/// [`register_guest_memory`] tells it.
pub fn map_guest_memory(size: u64) -> Result<GuestMemoryMmap, GuestMemoryError> {
    let memfd =
        memfd_create(c"vmd-guest-ram", MFdFlags::MFD_CLOEXEC).map_err(GuestMemoryError::Memfd)?;
    // Going through a raw fd keeps the File and the OwnedFd from both owning it.
    // SAFETY: `into_raw_fd` hands over sole ownership of a valid, open fd.
    let file = unsafe { File::from_raw_fd(memfd.into_raw_fd()) };
    file.set_len(size)
        .map_err(|err| GuestMemoryError::Resize(size, err))?;

    let mut file_offset = 0u64;
    let mut regions = Vec::new();
    for (guest_addr, len) in ram_ranges(size) {
        let len_usize = usize::try_from(len).map_err(|_| GuestMemoryError::TooLarge(size))?;
        let file = file
            .try_clone()
            .map_err(|err| GuestMemoryError::Resize(size, err))?;
        regions.push((
            guest_addr,
            len_usize,
            Some(FileOffset::new(file, file_offset)),
        ));
        file_offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(regions).map_err(GuestMemoryError::Map)
}

/// Registers every region of `memory` with KVM, as memory slots 0, 1...
///
/// The caller must keep `memory` mapped for as long as `vm` exists (`Vm` holds both).
///
/// Each new slot makes KVM wait for an SRCU grace period before the ioctl returns. Call it before
/// anything else on the VM (irqchip, PIT, ioeventfds) has put devices on KVM's buses: then the
/// wait is short (about 0.1 ms here) instead of a timer-driven 4-10 ms.
pub fn register_guest_memory(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    for (slot, region) in (0u32..).zip(memory.iter()) {
        let guest_addr = region.start_addr().0;
        let size = region.len();
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `size` bytes owned by `memory`, which the caller
        // keeps (in `Vm`) for as long as the VM fd exists, so KVM never sees a dangling mapping.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| {
            GuestMemoryError::RegisterSlot {
                slot,
                guest_addr,
                size,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range_and_large_ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        assert_eq!(
            ram_ranges(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
