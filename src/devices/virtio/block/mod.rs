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
        if let Some(suppressed) = self.bad_requests.admit() {
            let more = match suppressed {
                0 => String::new(),
                n => format!(" ({n} more bad requests in the last second not logged)"),
            };
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
