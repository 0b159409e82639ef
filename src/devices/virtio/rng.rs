//! virtio-rng: fills the guest's device-writable buffers from getrandom(2).

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::chain::{self, Request};
use super::{DeviceDescription, DeviceError, QueueHandler, VIRTIO_F_VERSION_1, drain_queue};

/// The size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets: a guest asking for more gets this much (the used length
/// says so), so one request never holds the worker for long.
const MAX_BYTES_PER_REQUEST: u64 = 64 << 10;

/// The entropy device.
#[derive(Default)]
pub struct EntropyDevice;

impl EntropyDevice {
    pub fn description(&self) -> DeviceDescription {
        DeviceDescription {
            device_type: virtio_bindings::virtio_ids::VIRTIO_ID_RNG,
            name: "rng".into(),
            queue_max_sizes: vec![QUEUE_SIZE],
            features: VIRTIO_F_VERSION_1,
            config: Vec::new(),
        }
    }

    /// Fills one request's writable buffers; returns the bytes written.
    fn fill(request: &Request, memory: &GuestMemoryMmap) -> u32 {
        let len = request.writable_len().min(MAX_BYTES_PER_REQUEST);
        let mut bytes = vec![0u8; len as usize];
        if let Err(err) = getrandom(&mut bytes) {
            tracing::warn!("rng: getrandom failed: {err}");
            return 0;
        }
        chain::write_bytes(memory, &request.writable, &bytes).map_or(0, |n| n as u32)
    }
}

/// Fills `buf` from the kernel's entropy pool (never blocks once the pool is initialized,
/// which it is long before a VM starts).
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        done += n as usize;
    }
    Ok(())
}

impl QueueHandler for EntropyDevice {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        drain_queue(index, queue, memory, |head, request| match request {
            Ok(request) => Self::fill(&request, memory),
            Err(why) => {
                tracing::debug!("rng: refusing the request at descriptor {head}: {why}");
                0
            }
        })
    }
}
