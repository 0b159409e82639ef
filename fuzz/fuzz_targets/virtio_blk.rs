//! The virtio-blk request path over guest memory and a descriptor table the input controls:
//! `BlockDevice::process_queue` must return `Ok` or `Err` for anything a driver can put in
//! memory, never panic, never grow the image, and never write a read-only one.
//!
//! Input layout (little-endian), short inputs padded with zeros:
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | flags: bit 0 read-only disk; bits 1-2 memory layout; bit 3 EVENT_IDX; bits 4-5 rounds - 1; bits 6-7 a tail of 0/100/511/512 bytes after the image's 64 KiB |
//! | 1 | queue size: `1 << (b & 15)`, or the byte itself if bit 7 is set (invalid sizes included) |
//! | 2-7 | descriptor table, avail ring and used ring addresses (u16 each) |
//! | 8-11 | next_avail, next_used (u16 each) |
//! | 12-15 | before rounds 2-4: a new avail idx (u16 each, the last one twice), as if the driver went on |
//! | 16.. | guest memory from address 0 on (the rest is zero) |
//!
//! Memory layouts: 0, one 64 KiB region; 1, two adjacent 32 KiB regions (buffers that straddle
//! regions); 2, 32 KiB at 0 and 32 KiB at 48 KiB (a hole inside the address range); 3, 64 KiB
//! at 0 and 4 KiB far away at 1 MiB.

#![no_main]

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmd::devices::virtio::QueueHandler;
use vmd::devices::virtio::block::{BlockDevice, DiskImage, QUEUE_SIZE};
use vmd::protocol::ImageFormat;

const HEADER: usize = 16;
const DISK_BYTES: u64 = 64 << 10;
const KIB: usize = 1 << 10;

fn memory(layout: u8) -> GuestMemoryMmap {
    let ranges: &[(GuestAddress, usize)] = match layout {
        0 => &[(GuestAddress(0), 64 * KIB)],
        1 => &[
            (GuestAddress(0), 32 * KIB),
            (GuestAddress(32 << 10), 32 * KIB),
        ],
        2 => &[
            (GuestAddress(0), 32 * KIB),
            (GuestAddress(48 << 10), 32 * KIB),
        ],
        _ => &[
            (GuestAddress(0), 64 * KIB),
            (GuestAddress(1 << 20), 4 * KIB),
        ],
    };
    GuestMemoryMmap::<()>::from_ranges(ranges).expect("guest memory")
}

/// A zero-filled anonymous file of `len` bytes.
fn memfd(len: u64) -> File {
    // SAFETY: a valid NUL-terminated name; the returned fd is checked and then owned by File.
    let fd = unsafe { libc::memfd_create(c"virtio-blk-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).expect("ftruncate");
    file
}

fn u16_at(header: &[u8; HEADER], at: usize) -> u16 {
    u16::from_le_bytes([header[at], header[at + 1]])
}

fuzz_target!(|data: &[u8]| {
    let mut header = [0u8; HEADER];
    let split = data.len().min(HEADER);
    header[..split].copy_from_slice(&data[..split]);
    let image_bytes = &data[split..];

    let flags = header[0];
    let read_only = flags & 1 != 0;
    let memory = memory((flags >> 1) & 3);
    let event_idx = flags & 8 != 0;
    let rounds = 1 + usize::from((flags >> 4) & 3);
    let tail = [0, 100, 511, 512][usize::from(flags >> 6)];

    // Guest memory from address 0 on; what does not fit (or falls in a hole) is dropped.
    let _ = memory.write_slice(image_bytes, GuestAddress(0));

    let size = if header[1] & 0x80 != 0 {
        u16::from(header[1])
    } else {
        1u16 << (header[1] & 15)
    };
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(u32::from(u16_at(&header, 2))), Some(0));
    queue.set_avail_ring_address(Some(u32::from(u16_at(&header, 4))), Some(0));
    queue.set_used_ring_address(Some(u32::from(u16_at(&header, 6))), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_next_avail(u16_at(&header, 8));
    queue.set_next_used(u16_at(&header, 10));
    queue.set_ready(true);
    if !queue.is_valid(&memory) {
        return;
    }

    let disk_len = DISK_BYTES + tail;
    let file = memfd(disk_len);
    let handle = file.try_clone().expect("dup");
    let image =
        DiskImage::open(handle, ImageFormat::Raw, Vec::new(), read_only).expect("raw image");
    let mut device = BlockDevice::new("fuzz".into(), image, read_only, "fuzz-serial");

    let avail_idx_at = queue.avail_ring().checked_add(2).map(GuestAddress);
    for round in 0..rounds {
        if round > 0
            && let Some(at) = avail_idx_at
        {
            let idx = u16_at(&header, 12 + 2 * (round - 1).min(1));
            let _ = memory.write_obj(idx, at);
        }
        // Any error is the driver's fault and fine; the device only has to survive it.
        let _ = device.process_queue(0, &mut queue, &memory);
    }
    device.flush().expect("flushing a memfd");
    drop(device);

    let len = file.metadata().expect("fstat").len();
    assert_eq!(len, disk_len, "the guest changed the image's size");
    if read_only {
        let mut contents = Vec::with_capacity(disk_len as usize);
        (&file).read_to_end(&mut contents).expect("read back");
        assert!(
            contents.iter().all(|&b| b == 0),
            "a read-only disk was written"
        );
    }
});
