//! A driver's side of a split virtqueue for device tests: descriptors, the available ring and
//! the used ring written and read straight in guest memory, as a guest would.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
pub const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

/// Guest memory for tests: 1 MiB from address 0.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
}

/// One queue of `size` entries whose rings start at `base` (descriptors), `base + 0x1000`
/// (available) and `base + 0x2000` (used).
pub struct TestQueue {
    pub queue: Queue,
    size: u16,
    desc_table: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
}

impl TestQueue {
    pub fn new(memory: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let (desc_table, avail, used) = (base, base + 0x1000, base + 0x2000);
        let mut queue = Queue::new(size).expect("queue");
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc_table as u32), Some(0));
        queue.set_avail_ring_address(Some(avail as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(memory));
        TestQueue {
            queue,
            size,
            desc_table,
            avail,
            used,
            avail_idx: 0,
        }
    }

    pub fn set_descriptor(
        &self,
        memory: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc_table + u64::from(index) * 16);
        memory.write_obj(addr, at).unwrap();
        memory.write_obj(len, at.unchecked_add(8)).unwrap();
        memory.write_obj(flags, at.unchecked_add(12)).unwrap();
        memory.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Offers the chain starting at `head`; returns its position in the rings.
    pub fn offer(&mut self, memory: &GuestMemoryMmap, head: u16) -> u16 {
        let slot = u64::from(self.avail_idx % self.size);
        memory
            .write_obj(head, GuestAddress(self.avail + 4 + slot * 2))
            .unwrap();
        let position = self.avail_idx;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        memory
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        position
    }

    /// Where the available ring is (flags, idx, ring[size], used_event).
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    /// Sets the available index directly (a driver that runs ahead).
    pub fn set_avail_idx(&self, memory: &GuestMemoryMmap, idx: u16) {
        memory.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// The used element at `position`: (id, len).
    pub fn used(&self, memory: &GuestMemoryMmap, position: u16) -> (u32, u32) {
        let at = GuestAddress(self.used + 4 + u64::from(position % self.size) * 8);
        (
            memory.read_obj(at).unwrap(),
            memory.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }

    pub fn used_idx(&self, memory: &GuestMemoryMmap) -> u16 {
        memory.read_obj(GuestAddress(self.used + 2)).unwrap()
    }
}
