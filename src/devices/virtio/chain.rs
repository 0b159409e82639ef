//! A descriptor chain as two byte streams: what the driver gave the device to read, followed by
//! what it gave the device to write (virtio 1.x, 2.7.4.2: readable descriptors come first).
//!
//! Devices see requests through [`Request`] only, which has already checked the chain's shape:
//! it ends (no loop, no `next` past the table: the `virtio-queue` iterator stops those, and a
//! chain cut short is refused here), readable descriptors precede writable ones, lengths add up
//! without overflow. Addresses are checked when the bytes are touched: every access goes through
//! `GuestMemory`, which refuses anything outside guest RAM.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};

/// A contiguous piece of guest memory named by one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Why a chain cannot be served at all (not even with an error status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain does not end (a loop, or a next index past the table)")]
    Unterminated,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain's lengths overflow")]
    TooLong,
}

/// A parsed chain: its head (for the used ring) and its two streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl Request {
    /// Walks `chain`. Zero-length descriptors carry no bytes and are dropped.
    pub fn parse<M>(chain: DescriptorChain<M>) -> Result<Request, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut request = Request {
            head,
            readable: Vec::new(),
            writable: Vec::new(),
        };
        let mut total: u64 = 0;
        let mut last_has_next = false;
        for descriptor in chain {
            last_has_next = descriptor.has_next();
            total = total
                .checked_add(u64::from(descriptor.len()))
                .ok_or(ChainError::TooLong)?;
            if descriptor.len() == 0 {
                continue;
            }
            let segment = Segment {
                addr: descriptor.addr(),
                len: descriptor.len(),
            };
            if descriptor.is_write_only() {
                request.writable.push(segment);
            } else if request.writable.is_empty() {
                request.readable.push(segment);
            } else {
                return Err(ChainError::ReadableAfterWritable);
            }
        }
        // The iterator stops after `queue size` descriptors or at an index past the table; a
        // last descriptor that still says "next" was cut off there.
        if last_has_next {
            return Err(ChainError::Unterminated);
        }
        Ok(request)
    }

    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }

    pub fn writable_len(&self) -> u64 {
        total_len(&self.writable)
    }
}

pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// The segments covering `len` bytes of `segments` from byte `skip` on (fewer if they end).
pub fn sub_range(segments: &[Segment], mut skip: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for segment in segments {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(segment.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let take = (seg_len - skip).min(len);
        // `skip < seg_len <= u32::MAX`, so the address stays inside the descriptor's range.
        out.push(Segment {
            addr: GuestAddress(segment.addr.0.wrapping_add(skip)),
            len: take as u32,
        });
        len -= take;
        skip = 0;
    }
    out
}

/// Copies the first `buf.len()` bytes of `segments` out of guest memory.
pub fn read_bytes(
    memory: &GuestMemoryMmap,
    segments: &[Segment],
    buf: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for segment in sub_range(segments, 0, buf.len() as u64) {
        let len = segment.len as usize;
        memory.read_slice(&mut buf[done..done + len], segment.addr)?;
        done += len;
    }
    if done < buf.len() {
        return Err(vm_memory::GuestMemoryError::PartialBuffer {
            expected: buf.len(),
            completed: done,
        });
    }
    Ok(())
}

/// Copies `data` into the first bytes of `segments`; returns how many were written.
pub fn write_bytes(
    memory: &GuestMemoryMmap,
    segments: &[Segment],
    data: &[u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for segment in sub_range(segments, 0, data.len() as u64) {
        let len = segment.len as usize;
        memory.write_slice(&data[done..done + len], segment.addr)?;
        done += len;
    }
    Ok(done)
}

/// The guest memory behind `segments`, as host slices for vectored I/O. Fails if any byte lies
/// outside guest RAM.
pub fn guest_slices<'m>(
    memory: &'m GuestMemoryMmap,
    segments: &[Segment],
) -> Result<Vec<VolatileSlice<'m, ()>>, vm_memory::GuestMemoryError> {
    let mut slices = Vec::with_capacity(segments.len());
    for segment in segments {
        for slice in GuestMemoryBackend::get_slices(memory, segment.addr, segment.len as usize) {
            slices.push(slice?);
        }
    }
    Ok(slices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// Puts `descriptors` in a queue of 16 as one chain at head 0 and parses it.
    fn parse(memory: &GuestMemoryMmap, descriptors: &[Descriptor]) -> Result<Request, ChainError> {
        let mock = MockSplitQueue::new(memory, 16);
        let raw: Vec<RawDescriptor> = descriptors
            .iter()
            .map(|d| RawDescriptor::from(*d))
            .collect();
        mock.build_desc_chain(&raw).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = queue.iter(memory).unwrap().next().unwrap();
        Request::parse(chain)
    }

    #[test]
    fn splits_readable_and_writable() {
        let memory = memory();
        let request = parse(
            &memory,
            &[
                Descriptor::new(0x1000, 16, NEXT, 1),
                Descriptor::new(0x2000, 0, NEXT, 2),
                Descriptor::new(0x3000, 512, WRITE | NEXT, 3),
                Descriptor::new(0x4000, 1, WRITE, 0),
            ],
        )
        .unwrap();
        assert_eq!(request.readable_len(), 16);
        assert_eq!(request.writable_len(), 513);
        assert_eq!(request.writable.len(), 2);
    }

    #[test]
    fn refuses_readable_after_writable() {
        let memory = memory();
        let result = parse(
            &memory,
            &[
                Descriptor::new(0x1000, 16, WRITE | NEXT, 1),
                Descriptor::new(0x2000, 16, 0, 0),
            ],
        );
        assert_eq!(result, Err(ChainError::ReadableAfterWritable));
    }

    #[test]
    fn sub_ranges_cross_segments() {
        let segments = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 10,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 10,
            },
        ];
        assert_eq!(
            sub_range(&segments, 8, 5),
            vec![
                Segment {
                    addr: GuestAddress(0x1008),
                    len: 2
                },
                Segment {
                    addr: GuestAddress(0x2000),
                    len: 3
                }
            ]
        );
        assert!(sub_range(&segments, 20, 5).is_empty());
        assert_eq!(total_len(&sub_range(&segments, 0, 100)), 20);
    }

    #[test]
    fn memory_outside_ram_is_an_error_not_a_fault() {
        let memory = memory();
        let outside = [Segment {
            addr: GuestAddress(0xf_fff0),
            len: 0x100,
        }];
        assert!(guest_slices(&memory, &outside).is_err());
        let mut buf = [0u8; 0x100];
        assert!(read_bytes(&memory, &outside, &mut buf).is_err());
        assert!(write_bytes(&memory, &outside, &buf).is_err());
    }
}
