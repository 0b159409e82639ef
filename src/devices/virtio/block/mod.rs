//! virtio-blk: IN, OUT, FLUSH and GET_ID requests on one queue, served from a [`DiskImage`].
//!
//! Every request is checked before the image is touched: the header must be device-readable
//! and whole, the status byte device-writable, the data a whole number of sectors inside the
//! disk and inside guest memory. A bad request gets `VIRTIO_BLK_S_IOERR` (or, when not even a
//! status byte can be written, is returned unused with a rate-limited log line) and the device
//! goes on serving good ones.

pub mod image;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

pub use image::{DiskImage, ImageError};

use super::chain::{self, Request, Segment};
use super::{DeviceDescription, DeviceError, QueueHandler, VIRTIO_F_VERSION_1, drain_queue};
use crate::devices::bus::RateLimiter;

/// virtio-blk's sectors are always 512 bytes, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// The size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The request header: type, reserved, sector.
const HEADER_LEN: usize = 16;

/// A disk as the guest sees it.
pub struct BlockDevice {
    name: String,
    image: DiskImage,
    read_only: bool,
    /// GET_ID's answer, NUL-padded.
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    bad_requests: RateLimiter,
}

/// How a request ended, as the status byte says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    IoError,
    Unsupported,
}

impl Status {
    fn byte(self) -> u8 {
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoError => VIRTIO_BLK_S_IOERR,
            Status::Unsupported => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

impl BlockDevice {
    pub fn new(name: String, image: DiskImage, read_only: bool, serial: &str) -> Self {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        for (slot, byte) in id.iter_mut().zip(serial.bytes()) {
            *slot = byte;
        }
        BlockDevice {
            name,
            image,
            read_only,
            serial: id,
            bad_requests: RateLimiter::new(),
        }
    }

    /// The capacity in sectors (a raw image's tail shorter than a sector is not visible).
    pub fn capacity_sectors(&self) -> u64 {
        self.image.size() / SECTOR_SIZE
    }

    /// The features and configuration space this disk offers.
    pub fn description(&self) -> DeviceDescription {
        let mut features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_SEG_MAX;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        // struct virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32),
        // geometry (4 bytes), blk_size (le32).
        let mut config = Vec::with_capacity(24);
        config.extend_from_slice(&self.capacity_sectors().to_le_bytes());
        config.extend_from_slice(&0u32.to_le_bytes());
        config.extend_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config.extend_from_slice(&[0; 4]);
        config.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        DeviceDescription {
            device_type: virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            name: self.name.clone(),
            queue_max_sizes: vec![QUEUE_SIZE],
            features,
            config,
        }
    }

    /// Serves one request; returns the number of bytes written into guest buffers (the used
    /// length).
    fn handle(&mut self, request: &Request, memory: &GuestMemoryMmap) -> u32 {
        let writable_len = request.writable_len();
        let Some(status_at) = writable_len.checked_sub(1) else {
            self.log_bad(request.head, "it has no device-writable status byte");
            return 0;
        };
        let data_in = chain::sub_range(&request.writable, 0, status_at);
        let status_byte = chain::sub_range(&request.writable, status_at, 1);
        let (status, written) = match self.serve(request, &data_in, memory) {
            Ok(written) => (Status::Ok, written),
            Err((status, why)) => {
                self.log_bad(request.head, &why);
                (status, 0)
            }
        };
        let Some(status_byte) = status_byte.first() else {
            return 0;
        };
        if let Err(err) = memory.write_obj(status.byte(), status_byte.addr) {
            self.log_bad(
                request.head,
                &format!("its status byte is not writable: {err}"),
            );
            return 0;
        }
        written.saturating_add(1)
    }

    /// Executes a request; the error carries the status to report and why, for the log.
    fn serve(
        &mut self,
        request: &Request,
        data_in: &[Segment],
        memory: &GuestMemoryMmap,
    ) -> Result<u32, (Status, String)> {
        let io_error = |why: String| (Status::IoError, why);
        let mut header = [0u8; HEADER_LEN];
        chain::read_bytes(memory, &request.readable, &mut header)
            .map_err(|e| io_error(format!("its header is unreadable: {e}")))?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let readable_len = request.readable_len();
        let data_out = chain::sub_range(&request.readable, HEADER_LEN as u64, readable_len);

        match kind {
            VIRTIO_BLK_T_IN => {
                if !data_out.is_empty() {
                    return Err(io_error("a read carries data to write".into()));
                }
                let offset = self.checked_range(sector, data_in).map_err(io_error)?;
                let buffers = chain::guest_slices(memory, data_in)
                    .map_err(|e| io_error(format!("its buffer is outside guest memory: {e}")))?;
                self.image
                    .read(&buffers, offset)
                    .map_err(|e| io_error(format!("reading the image failed: {e}")))?;
                Ok(chain::total_len(data_in) as u32)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(io_error("a write to a read-only disk".into()));
                }
                if !data_in.is_empty() {
                    return Err(io_error("a write has device-writable data buffers".into()));
                }
                let offset = self.checked_range(sector, &data_out).map_err(io_error)?;
                let buffers = chain::guest_slices(memory, &data_out)
                    .map_err(|e| io_error(format!("its buffer is outside guest memory: {e}")))?;
                self.image
                    .write(&buffers, offset)
                    .map_err(|e| io_error(format!("writing the image failed: {e}")))?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.image
                    .flush()
                    .map_err(|e| io_error(format!("flushing the image failed: {e}")))?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let written = chain::write_bytes(memory, data_in, &self.serial)
                    .map_err(|e| io_error(format!("its buffer is outside guest memory: {e}")))?;
                Ok(written as u32)
            }
            other => Err((
                Status::Unsupported,
                format!("request type {other} is unknown"),
            )),
        }
    }

    /// The byte offset of a transfer of `data` at `sector`, if it is whole sectors inside the
    /// disk.
    fn checked_range(&self, sector: u64, data: &[Segment]) -> Result<u64, String> {
        let len = chain::total_len(data);
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(format!("a transfer of {len} bytes is not whole sectors"));
        }
        let capacity = self.capacity_sectors();
        let end = sector.checked_add(len / SECTOR_SIZE);
        match end {
            Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
            _ => Err(format!(
                "sectors {sector}+{} lie past the disk's end ({capacity} sectors)",
                len / SECTOR_SIZE
            )),
        }
    }

    fn log_bad(&self, head: u16, why: &str) {
        if let Some(more) = self.bad_requests.admit_note("bad requests") {
            tracing::warn!(
                "{}: refusing the guest's request at descriptor {head}: {why}{more}",
                self.name
            );
        }
    }
}

impl QueueHandler for BlockDevice {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        drain_queue(index, queue, memory, |head, request| match request {
            Ok(request) => self.handle(&request, memory),
            Err(why) => {
                self.log_bad(head, &why.to_string());
                0
            }
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.image.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::protocol::ImageFormat;

    use virtio_queue::QueueT;

    use crate::devices::virtio::testing::{self, NEXT, TestQueue, WRITE};

    const QUEUE: u16 = 16;
    const HEADERS: u64 = 0x3000;
    const DATA: u64 = 0x10000;
    const MEMORY: u64 = 1 << 20;

    /// A guest's side of the disk's queue.
    struct Driver {
        memory: GuestMemoryMmap,
        ring: TestQueue,
    }

    impl Driver {
        fn new() -> Self {
            let memory = testing::memory();
            let ring = TestQueue::new(&memory, 0, QUEUE);
            Driver { memory, ring }
        }

        fn set_descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.ring
                .set_descriptor(&self.memory, index, addr, len, flags, next);
        }

        fn offer(&mut self, head: u16) -> u16 {
            self.ring.offer(&self.memory, head)
        }

        fn used(&self, position: u16) -> (u32, u32) {
            self.ring.used(&self.memory, position)
        }

        fn used_idx(&self) -> u16 {
            self.ring.used_idx(&self.memory)
        }

        fn request(&mut self, kind: u32, sector: u64, data: (u64, u32), data_flags: u16) -> u16 {
            self.memory.write_obj(kind, GuestAddress(HEADERS)).unwrap();
            self.memory
                .write_obj(sector, GuestAddress(HEADERS + 8))
                .unwrap();
            self.memory
                .write_obj(0xffu8, GuestAddress(HEADERS + 16))
                .unwrap();
            self.set_descriptor(0, HEADERS, 16, NEXT, 1);
            self.set_descriptor(1, data.0, data.1, data_flags | NEXT, 2);
            self.set_descriptor(2, HEADERS + 16, 1, WRITE, 0);
            self.offer(0)
        }

        fn status(&self) -> u8 {
            self.memory.read_obj(GuestAddress(HEADERS + 16)).unwrap()
        }

        fn run(&mut self, device: &mut BlockDevice) -> bool {
            device
                .process_queue(0, &mut self.ring.queue, &self.memory)
                .unwrap()
        }
    }

    fn raw_disk(sectors: u64) -> (tempfile::NamedTempFile, DiskImage) {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(sectors * SECTOR_SIZE).unwrap();
        let handle = file.reopen().unwrap();
        let image = DiskImage::open(handle, ImageFormat::Raw, Vec::new(), false).unwrap();
        (file, image)
    }

    fn device(image: DiskImage, read_only: bool) -> BlockDevice {
        BlockDevice::new("disk0".into(), image, read_only, "serial-0")
    }

    #[test]
    fn writes_then_reads_back_and_the_file_has_the_data() {
        let (file, image) = raw_disk(64);
        let mut disk = device(image, false);
        let mut driver = Driver::new();
        driver
            .memory
            .write_slice(&[0xa5; 1024], GuestAddress(DATA))
            .unwrap();
        let n = driver.request(VIRTIO_BLK_T_OUT, 3, (DATA, 1024), 0);
        assert!(driver.run(&mut disk));
        assert_eq!(driver.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(driver.used(n), (0, 1));
        let n = driver.request(VIRTIO_BLK_T_FLUSH, 0, (DATA, 0), 0);
        driver.run(&mut disk);
        assert_eq!(driver.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(driver.used(n).1, 1);

        let n = driver.request(VIRTIO_BLK_T_IN, 2, (DATA + 0x1000, 2048), WRITE);
        driver.run(&mut disk);
        assert_eq!(driver.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(driver.used(n).1, 2049);
        let mut back = [0u8; 2048];
        driver
            .memory
            .read_slice(&mut back, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert!(back[..512].iter().all(|&b| b == 0));
        assert!(back[512..1536].iter().all(|&b| b == 0xa5));
        assert!(back[1536..].iter().all(|&b| b == 0));

        let mut on_disk = vec![0u8; 1024];
        let mut f = file.reopen().unwrap();
        f.seek(SeekFrom::Start(3 * SECTOR_SIZE)).unwrap();
        f.read_exact(&mut on_disk).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn answers_get_id_and_describes_itself() {
        let (_file, image) = raw_disk(8);
        let mut disk = device(image, true);
        let description = disk.description();
        assert_ne!(description.features & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(&description.config[..8], &8u64.to_le_bytes());
        let mut driver = Driver::new();
        let n = driver.request(VIRTIO_BLK_T_GET_ID, 0, (DATA, 20), WRITE);
        driver.run(&mut disk);
        assert_eq!(driver.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(driver.used(n).1, 21);
        let mut id = [0u8; 20];
        driver
            .memory
            .read_slice(&mut id, GuestAddress(DATA))
            .unwrap();
        assert_eq!(&id[..9], b"serial-0\0");
    }

    #[test]
    fn refuses_bad_requests_with_ioerr_and_goes_on() {
        let (file, image) = raw_disk(8);
        let mut disk = device(image, false);
        let mut driver = Driver::new();
        // (type, sector, data buffer, its flags, the status expected)
        type Case = (u32, u64, (u64, u32), u16, u8);
        let cases: [Case; 8] = [
            // Past the end of the disk.
            (
                VIRTIO_BLK_T_IN,
                7,
                (DATA, 1024),
                WRITE,
                VIRTIO_BLK_S_IOERR as u8,
            ),
            (
                VIRTIO_BLK_T_OUT,
                u64::MAX,
                (DATA, 512),
                0,
                VIRTIO_BLK_S_IOERR as u8,
            ),
            // Not whole sectors; nothing at all.
            (
                VIRTIO_BLK_T_IN,
                0,
                (DATA, 100),
                WRITE,
                VIRTIO_BLK_S_IOERR as u8,
            ),
            (
                VIRTIO_BLK_T_IN,
                0,
                (DATA, 0),
                WRITE,
                VIRTIO_BLK_S_IOERR as u8,
            ),
            // Outside guest memory; a length no memory has.
            (
                VIRTIO_BLK_T_IN,
                0,
                (MEMORY - 512, 1024),
                WRITE,
                VIRTIO_BLK_S_IOERR as u8,
            ),
            (
                VIRTIO_BLK_T_OUT,
                0,
                (DATA, 0xffff_fe00),
                0,
                VIRTIO_BLK_S_IOERR as u8,
            ),
            // A read whose buffer the device may not write.
            (VIRTIO_BLK_T_IN, 0, (DATA, 512), 0, VIRTIO_BLK_S_IOERR as u8),
            (99, 0, (DATA, 512), WRITE, VIRTIO_BLK_S_UNSUPP as u8),
        ];
        for (kind, sector, data, flags, expected) in cases {
            let n = driver.request(kind, sector, data, flags);
            driver.run(&mut disk);
            assert_eq!(driver.status(), expected, "type {kind} sector {sector}");
            assert_eq!(driver.used(n), (0, 1), "type {kind} sector {sector}");
        }
        let mut on_disk = Vec::new();
        file.reopen().unwrap().read_to_end(&mut on_disk).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0), "a refused request wrote");
    }

    #[test]
    fn unservable_chains_are_returned_unused() {
        let (_file, image) = raw_disk(8);
        let mut disk = device(image, false);
        let mut driver = Driver::new();
        // A loop: 0 -> 1 -> 0.
        driver.set_descriptor(0, HEADERS, 16, NEXT, 1);
        driver.set_descriptor(1, DATA, 512, WRITE | NEXT, 0);
        driver.offer(0);
        // No device-writable byte at all.
        driver.set_descriptor(2, HEADERS, 16, 0, 0);
        driver.offer(2);
        // A next index past the table.
        driver.set_descriptor(3, HEADERS, 16, NEXT, 200);
        driver.offer(3);
        // A readable descriptor after a writable one.
        driver.set_descriptor(4, DATA, 512, WRITE | NEXT, 5);
        driver.set_descriptor(5, HEADERS, 16, 0, 0);
        driver.offer(4);
        // A head index past the table: dropped, no used element can name it.
        driver.offer(QUEUE + 7);
        assert!(driver.run(&mut disk));
        assert_eq!(driver.used_idx(), 4);
        for n in 0..4 {
            assert_eq!(driver.used(n).1, 0, "request {n}");
        }
        // And a good request still works.
        driver.request(VIRTIO_BLK_T_IN, 0, (DATA, 512), WRITE);
        driver.run(&mut disk);
        assert_eq!(driver.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(driver.used_idx(), 5);
        assert_eq!(driver.used(4), (0, 513));
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let (file, image) = raw_disk(8);
        let mut disk = device(image, true);
        let mut driver = Driver::new();
        driver
            .memory
            .write_slice(&[0x5a; 512], GuestAddress(DATA))
            .unwrap();
        driver.request(VIRTIO_BLK_T_OUT, 0, (DATA, 512), 0);
        driver.run(&mut disk);
        assert_eq!(driver.status(), VIRTIO_BLK_S_IOERR as u8);
        let mut on_disk = Vec::new();
        file.reopen().unwrap().read_to_end(&mut on_disk).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0));
    }

    #[test]
    fn an_avail_index_running_ahead_is_a_queue_error() {
        let (_file, image) = raw_disk(8);
        let mut disk = device(image, false);
        let mut driver = Driver::new();
        driver.ring.set_avail_idx(&driver.memory, QUEUE + 1);
        assert!(matches!(
            disk.process_queue(0, &mut driver.ring.queue, &driver.memory),
            Err(DeviceError::Queue { queue: 0, .. })
        ));
    }

    #[test]
    fn a_used_ring_over_the_avail_ring_does_not_keep_the_device_busy() {
        // Found by the virtio_blk fuzz target: with both rings at one address, each used
        // element the device adds moves the avail index it reads next. Here the device starts
        // 4 entries behind it, so every used element keeps 4 more "available", for ever.
        let (_file, image) = raw_disk(8);
        let mut disk = device(image, false);
        let mut driver = Driver::new();
        driver
            .ring
            .queue
            .set_used_ring_address(Some(driver.ring.avail_addr() as u32), Some(0));
        driver.ring.queue.set_next_avail(0u16.wrapping_sub(4));
        assert!(driver.ring.queue.is_valid(&driver.memory));
        let _ = disk.process_queue(0, &mut driver.ring.queue, &driver.memory);
        // One drain serves at most a queue's worth; the driver must notify again for more.
        assert_eq!(driver.ring.queue.next_avail(), QUEUE - 4);
        assert_eq!(driver.ring.queue.next_used(), QUEUE);
    }

    #[test]
    fn no_interrupt_when_the_driver_suppresses_them() {
        let (_file, image) = raw_disk(8);
        let mut disk = device(image, false);
        let mut driver = Driver::new();
        driver.request(VIRTIO_BLK_T_IN, 0, (DATA, 512), WRITE);
        assert!(driver.run(&mut disk));
        // VRING_AVAIL_F_NO_INTERRUPT: the request is served, the driver is not interrupted.
        driver
            .memory
            .write_obj(1u16, GuestAddress(driver.ring.avail_addr()))
            .unwrap();
        driver.request(VIRTIO_BLK_T_IN, 1, (DATA, 512), WRITE);
        assert!(!driver.run(&mut disk));
        assert_eq!(driver.status(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(driver.used_idx(), 2);
        // With EVENT_IDX the flag means nothing: used_event asks for the third used element.
        driver.ring.queue.set_event_idx(true);
        driver
            .memory
            .write_obj(
                2u16,
                GuestAddress(driver.ring.avail_addr() + 4 + 2 * u64::from(QUEUE)),
            )
            .unwrap();
        driver.request(VIRTIO_BLK_T_IN, 2, (DATA, 512), WRITE);
        assert!(driver.run(&mut disk));
    }

    #[test]
    fn raw_tail_shorter_than_a_sector_is_not_visible() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[1u8; 1000]).unwrap();
        let image =
            DiskImage::open(file.reopen().unwrap(), ImageFormat::Raw, Vec::new(), false).unwrap();
        assert_eq!(device(image, false).capacity_sectors(), 1);
    }

    fn run_tool(program: &str, args: &[&str]) -> String {
        let output = std::process::Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} (install qemu-utils): {e}"));
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{program} {args:?}: {text}");
        text
    }

    #[test]
    fn a_qcow2_over_a_raw_base_takes_writes_and_leaves_the_base_alone() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let top = dir.path().join("top.qcow2");
        let (base_s, top_s) = (base.to_str().unwrap(), top.to_str().unwrap());
        run_tool("qemu-img", &["create", "-q", "-f", "raw", base_s, "1M"]);
        run_tool(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x11 0 1M", base_s],
        );
        run_tool(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", base_s, "-F", "raw", top_s,
            ],
        );

        let open = |path: &std::path::Path, write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .unwrap()
        };
        let image = DiskImage::open(
            open(&top, true),
            ImageFormat::Qcow2,
            vec![(open(&base, false), ImageFormat::Raw)],
            false,
        )
        .unwrap();
        let mut disk = device(image, false);
        assert_eq!(disk.capacity_sectors(), 2048);
        let mut driver = Driver::new();
        driver
            .memory
            .write_slice(&[0x22; 4096], GuestAddress(DATA))
            .unwrap();
        driver.request(VIRTIO_BLK_T_OUT, 8, (DATA, 4096), 0);
        driver.run(&mut disk);
        assert_eq!(driver.status(), VIRTIO_BLK_S_OK as u8);
        // Reads see the write over the base's data.
        driver.request(VIRTIO_BLK_T_IN, 7, (DATA + 0x2000, 1024), WRITE);
        driver.run(&mut disk);
        let mut back = [0u8; 1024];
        driver
            .memory
            .read_slice(&mut back, GuestAddress(DATA + 0x2000))
            .unwrap();
        assert!(back[..512].iter().all(|&b| b == 0x11));
        assert!(back[512..].iter().all(|&b| b == 0x22));
        // The worker flushes when the VM ends.
        disk.flush().unwrap();
        drop(disk);

        run_tool("qemu-img", &["check", top_s]);
        run_tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x22 4096 4096", top_s],
        );
        run_tool(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x11 0 4096", top_s],
        );
        run_tool("qemu-io", &["-f", "raw", "-c", "read -P 0x11 0 1M", base_s]);
    }
}
