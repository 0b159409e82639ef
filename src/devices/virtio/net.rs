//! virtio-net over a tap: queue 0 receives, queue 1 transmits.
//!
//! The tap was opened by the launcher with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; the helper sets
//! its vnet header to the 12 bytes of `virtio_net_hdr_v1`, so headers pass between the guest
//! and the host kernel unchanged, and enables on the tap exactly the offloads the guest
//! accepted. Frames the guest sends are checked first: a source MAC that is not the VM's (with
//! `locked-lladdr`, the default), a header asking for an offload that was not negotiated, a
//! frame shorter than an Ethernet header or longer than the largest one — each is dropped and
//! counted. When the guest has no receive buffers the worker stops reading the tap until the
//! guest posts some (it never spins, and a burst from the host only fills the tap's queue).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::chain::{self, Request};
use super::{DeviceDescription, DeviceError, QueueHandler, VIRTIO_F_VERSION_1, drain_queue};
use crate::devices::bus::RateLimiter;

/// The receive and transmit queues.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const VNET_HEADER_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: usize = 10;
const ETHERNET_HEADER_LEN: usize = 14;
/// The largest frame either way: a 64 KiB TSO segment with its Ethernet header, and the vnet
/// header in front.
const MAX_FRAME_LEN: usize = VNET_HEADER_LEN + ETHERNET_HEADER_LEN + 65535;
/// At most this many frames are moved per wake-up, so transmit is never starved by receive.
const RX_BURST: usize = 64;

/// `TUNSETOFFLOAD` and its flags (<linux/if_tun.h>).
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
/// `TUNSETVNETHDRSZ`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// What the device dropped, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub tx_spoofed: u64,
    pub tx_malformed: u64,
    pub tx_failed: u64,
    pub rx_dropped: u64,
}

/// One network interface.
pub struct NetDevice {
    name: String,
    tap: File,
    mac: [u8; 6],
    locked_lladdr: bool,
    /// The features the driver accepted at the last activation.
    features: u64,
    /// A frame from the tap waiting for receive buffers.
    pending: Option<Vec<u8>>,
    /// The guest has no receive buffers: do not read the tap until it posts some.
    rx_stalled: bool,
    counters: NetCounters,
    drop_log: RateLimiter,
}

/// Errors from [`NetDevice::new`].
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot set the tap's vnet header size (is it a tap opened with IFF_VNET_HDR?)")]
    VnetHeader(#[source] std::io::Error),
    #[error("cannot make the tap non-blocking")]
    NonBlocking(#[source] std::io::Error),
}

impl NetDevice {
    /// A device over `tap` (an open tap with a vnet header) with the guest-visible `mac`.
    pub fn new(
        name: String,
        tap: File,
        mac: [u8; 6],
        locked_lladdr: bool,
    ) -> Result<Self, NetError> {
        let size: libc::c_int = VNET_HEADER_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer, which points at `size`.
        let ret = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(NetError::VnetHeader(std::io::Error::last_os_error()));
        }
        set_nonblocking(&tap).map_err(NetError::NonBlocking)?;
        Ok(NetDevice {
            name,
            tap,
            mac,
            locked_lladdr,
            features: 0,
            pending: None,
            rx_stalled: false,
            counters: NetCounters::default(),
            drop_log: RateLimiter::new(),
        })
    }

    /// A device over any datagram fd standing in for a tap (tests: a socketpair keeps frame
    /// boundaries as a tap does), with `features` as if the driver had accepted them.
    #[cfg(test)]
    fn over(tap: File, mac: [u8; 6], features: u64) -> Self {
        set_nonblocking(&tap).expect("non-blocking");
        NetDevice {
            name: "net-test".into(),
            tap,
            mac,
            locked_lladdr: true,
            features,
            pending: None,
            rx_stalled: false,
            counters: NetCounters::default(),
            drop_log: RateLimiter::new(),
        }
    }

    pub fn description(&self) -> DeviceDescription {
        let features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_ECN
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_HOST_ECN;
        // struct virtio_net_config: mac[6], status (unused without VIRTIO_NET_F_STATUS).
        let mut config = self.mac.to_vec();
        config.extend_from_slice(&[0, 0]);
        DeviceDescription {
            device_type: virtio_bindings::virtio_ids::VIRTIO_ID_NET,
            name: self.name.clone(),
            queue_max_sizes: vec![QUEUE_SIZE, QUEUE_SIZE],
            features,
            config,
        }
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    fn accepted(&self, feature: u32) -> bool {
        self.features & (1 << feature) != 0
    }

    /// The tap offloads matching what the guest accepted to receive.
    fn tap_offloads(&self) -> libc::c_uint {
        let mut flags = 0;
        if self.accepted(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if self.accepted(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if self.accepted(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
            if self.accepted(VIRTIO_NET_F_GUEST_ECN) && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                flags |= TUN_F_TSO_ECN;
            }
        }
        flags
    }

    fn log_drop(&self, what: &str) {
        if let Some(more) = self.drop_log.admit_note("drops") {
            tracing::warn!(
                "{}: dropped {what}; totals {:?}{more}",
                self.name,
                self.counters
            );
        }
    }

    /// Why a frame from the guest may not leave, if it may not.
    fn check_outgoing(&self, frame: &[u8]) -> Result<(), TxRefusal> {
        if frame.len() < VNET_HEADER_LEN + ETHERNET_HEADER_LEN || frame.len() > MAX_FRAME_LEN {
            return Err(TxRefusal::Malformed("a frame of impossible length"));
        }
        let flags = u32::from(frame[0]);
        let gso = u32::from(frame[1]);
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !self.accepted(VIRTIO_NET_F_CSUM) {
            return Err(TxRefusal::Malformed(
                "a frame asking for checksum offload, which was not negotiated",
            ));
        }
        let gso_allowed = match gso & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => gso & VIRTIO_NET_HDR_GSO_ECN == 0,
            VIRTIO_NET_HDR_GSO_TCPV4 => self.accepted(VIRTIO_NET_F_HOST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => self.accepted(VIRTIO_NET_F_HOST_TSO6),
            _ => false,
        } && (gso & VIRTIO_NET_HDR_GSO_ECN == 0
            || self.accepted(VIRTIO_NET_F_HOST_ECN));
        if !gso_allowed {
            return Err(TxRefusal::Malformed(
                "a frame asking for a segmentation offload that was not negotiated",
            ));
        }
        let source = &frame[VNET_HEADER_LEN + 6..VNET_HEADER_LEN + 12];
        if self.locked_lladdr && source != self.mac {
            return Err(TxRefusal::Spoofed);
        }
        Ok(())
    }

    /// Sends one chain's frame to the tap (or drops it).
    fn transmit(&mut self, request: &Request, memory: &GuestMemoryMmap) {
        let len = request.readable_len();
        if len > MAX_FRAME_LEN as u64 || !request.writable.is_empty() {
            self.counters.tx_malformed += 1;
            self.log_drop("a transmit buffer of the wrong shape");
            return;
        }
        let mut frame = vec![0u8; len as usize];
        if chain::read_bytes(memory, &request.readable, &mut frame).is_err() {
            self.counters.tx_malformed += 1;
            self.log_drop("a frame outside guest memory");
            return;
        }
        match self.check_outgoing(&frame) {
            Ok(()) => {}
            Err(TxRefusal::Spoofed) => {
                self.counters.tx_spoofed += 1;
                self.log_drop("a frame with a source MAC that is not the VM's");
                return;
            }
            Err(TxRefusal::Malformed(what)) => {
                self.counters.tx_malformed += 1;
                self.log_drop(what);
                return;
            }
        }
        if let Err(err) = (&self.tap).write(&frame) {
            // A full tap queue (EAGAIN) or a frame the host kernel refuses: the frame is lost,
            // as on a wire.
            self.counters.tx_failed += 1;
            self.log_drop(&format!("a frame the tap did not take ({err})"));
        }
    }

    /// Moves frames from the tap into receive buffers until the tap is empty, the guest has no
    /// buffers left, or a burst is done.
    fn receive(&mut self, rx: &mut Queue, memory: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut used = false;
        for _ in 0..RX_BURST {
            let frame = match self.pending.take() {
                Some(frame) => frame,
                None => match self.read_tap()? {
                    Some(frame) => frame,
                    None => break,
                },
            };
            match self.deliver(&frame, rx, memory)? {
                Delivery::Delivered => used = true,
                Delivery::Dropped => {}
                Delivery::NoBuffers => {
                    self.pending = Some(frame);
                    self.rx_stalled = true;
                    break;
                }
            }
        }
        if used
            && !rx
                .needs_notification(memory)
                .map_err(|source| DeviceError::Queue {
                    queue: RX_QUEUE,
                    source,
                })?
        {
            return Ok(false);
        }
        Ok(used)
    }

    fn read_tap(&mut self) -> Result<Option<Vec<u8>>, DeviceError> {
        let mut buffer = vec![0u8; MAX_FRAME_LEN];
        match (&self.tap).read(&mut buffer) {
            Ok(0) => Ok(None),
            Ok(len) => {
                buffer.truncate(len);
                Ok(Some(buffer))
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => Ok(None),
            Err(err) => Err(DeviceError::Backend(err)),
        }
    }

    /// Writes `frame` (vnet header first) into as many receive chains as it needs (one without
    /// MRG_RXBUF); gives them back untouched if there are not enough.
    fn deliver(
        &mut self,
        frame: &[u8],
        rx: &mut Queue,
        memory: &GuestMemoryMmap,
    ) -> Result<Delivery, DeviceError> {
        let queue_error = DeviceError::in_queue(RX_QUEUE);
        if frame.len() < VNET_HEADER_LEN {
            self.counters.rx_dropped += 1;
            return Ok(Delivery::Dropped);
        }
        let mergeable = self.accepted(VIRTIO_NET_F_MRG_RXBUF);
        let start = rx.next_avail();
        let mut chains: Vec<Request> = Vec::new();
        let mut room = 0u64;
        while room < frame.len() as u64 && (mergeable || chains.is_empty()) {
            let next = rx.iter(memory).map_err(queue_error)?.next();
            let Some(descriptors) = next else {
                break;
            };
            let head = descriptors.head_index();
            match Request::parse(descriptors) {
                Ok(request) if head < rx.size() => {
                    room += request.writable_len();
                    chains.push(request);
                }
                // A broken receive chain can take no frame: give it back empty.
                _ if head < rx.size() => rx.add_used(memory, head, 0).map_err(queue_error)?,
                _ => {}
            }
        }
        if room < frame.len() as u64 {
            if !mergeable && !chains.is_empty() {
                // One buffer too small for this frame: the frame is lost, the buffer kept.
                rx.set_next_avail(start);
                self.counters.rx_dropped += 1;
                self.log_drop("a received frame larger than the guest's buffer");
                return Ok(Delivery::Dropped);
            }
            rx.set_next_avail(start);
            return Ok(Delivery::NoBuffers);
        }
        let mut header = [0u8; VNET_HEADER_LEN];
        header.copy_from_slice(&frame[..VNET_HEADER_LEN]);
        let buffers = chains.len() as u16;
        header[NUM_BUFFERS_OFFSET..].copy_from_slice(&buffers.to_le_bytes());
        let mut rest: Vec<u8> = Vec::with_capacity(frame.len());
        rest.extend_from_slice(&header);
        rest.extend_from_slice(&frame[VNET_HEADER_LEN..]);
        let mut offset = 0usize;
        for request in &chains {
            let take = (request.writable_len() as usize).min(rest.len() - offset);
            let written =
                match chain::write_bytes(memory, &request.writable, &rest[offset..offset + take]) {
                    Ok(written) => written,
                    Err(_) => {
                        // A buffer outside guest memory: this frame is lost.
                        self.counters.rx_dropped += 1;
                        0
                    }
                };
            offset += take;
            rx.add_used(memory, request.head, written as u32)
                .map_err(queue_error)?;
        }
        Ok(Delivery::Delivered)
    }
}

enum TxRefusal {
    Spoofed,
    Malformed(&'static str),
}

enum Delivery {
    Delivered,
    Dropped,
    NoBuffers,
}

fn set_nonblocking(file: &File) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(file.as_fd(), FcntlArg::F_GETFL)?;
    fcntl(
        file.as_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    Ok(())
}

impl QueueHandler for NetDevice {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        match index {
            RX_QUEUE => {
                // New receive buffers: take the tap up again.
                self.rx_stalled = false;
                self.receive(queue, memory)
            }
            TX_QUEUE => drain_queue(index, queue, memory, |_, request| {
                match request {
                    Ok(request) => self.transmit(&request, memory),
                    Err(why) => {
                        self.counters.tx_malformed += 1;
                        self.log_drop(&format!("a transmit chain ({why})"));
                    }
                }
                0
            }),
            _ => Ok(false),
        }
    }

    fn activate(&mut self, features: u64) -> Result<(), DeviceError> {
        self.features = features;
        self.pending = None;
        self.rx_stalled = false;
        let offloads = self.tap_offloads();
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret = unsafe { libc::ioctl(self.tap.as_raw_fd(), TUNSETOFFLOAD, offloads) };
        if ret < 0 {
            return Err(DeviceError::Backend(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn backend_fd(&self) -> Option<BorrowedFd<'_>> {
        (!self.rx_stalled).then(|| self.tap.as_fd())
    }

    fn process_backend(
        &mut self,
        queues: &mut [Queue],
        memory: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        match queues.get_mut(RX_QUEUE) {
            Some(rx) if rx.ready() => self.receive(rx, memory),
            _ => {
                // No receive queue yet: leave the frames in the tap.
                self.rx_stalled = true;
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::testing::{self, NEXT, TestQueue, WRITE};

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const RX_BASE: u64 = 0x0;
    const TX_BASE: u64 = 0x4000;
    const BUFFERS: u64 = 0x10000;

    struct Rig {
        memory: GuestMemoryMmap,
        rx: TestQueue,
        tx: TestQueue,
        host: UnixDatagram,
        device: NetDevice,
    }

    fn rig(features: u64) -> Rig {
        let memory = testing::memory();
        let (host, tap) = UnixDatagram::pair().expect("socketpair");
        host.set_nonblocking(true).expect("non-blocking");
        let device = NetDevice::over(File::from(std::os::fd::OwnedFd::from(tap)), MAC, features);
        Rig {
            rx: TestQueue::new(&memory, RX_BASE, 16),
            tx: TestQueue::new(&memory, TX_BASE, 16),
            memory,
            host,
            device,
        }
    }

    /// A frame as the guest sends it: the vnet header, then Ethernet from `source`.
    fn guest_frame(source: [u8; 6], header: [u8; 2], payload: usize) -> Vec<u8> {
        let mut frame = vec![header[0], header[1], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&source);
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend(std::iter::repeat_n(0xab, payload));
        frame
    }

    impl Rig {
        fn send(&mut self, frame: &[u8], slot: u16) {
            let addr = BUFFERS + u64::from(slot) * 0x1_0000;
            self.memory.write_slice(frame, GuestAddress(addr)).unwrap();
            self.tx
                .set_descriptor(&self.memory, slot, addr, frame.len() as u32, 0, 0);
            self.tx.offer(&self.memory, slot);
            self.device
                .process_queue(TX_QUEUE, &mut self.tx.queue, &self.memory)
                .unwrap();
        }

        fn host_receives(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; MAX_FRAME_LEN];
            let len = self.host.recv(&mut buf).ok()?;
            buf.truncate(len);
            Some(buf)
        }

        fn post_rx(&mut self, slot: u16, len: u32) {
            let addr = BUFFERS + 0x8_0000 + u64::from(slot) * 0x1000;
            self.rx
                .set_descriptor(&self.memory, slot, addr, len, WRITE, 0);
            self.rx.offer(&self.memory, slot);
        }

        fn rx_buffer(&self, slot: u16, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            let addr = BUFFERS + 0x8_0000 + u64::from(slot) * 0x1000;
            self.memory
                .read_slice(&mut buf, GuestAddress(addr))
                .unwrap();
            buf
        }
    }

    #[test]
    fn frames_from_the_vms_own_address_leave_and_others_are_dropped() {
        let mut rig = rig(0);
        let good = guest_frame(MAC, [0, 0], 50);
        rig.send(&good, 0);
        assert_eq!(rig.host_receives(), Some(good));
        assert_eq!(rig.tx.used(&rig.memory, 0), (0, 0));

        rig.send(
            &guest_frame([0x52, 0x54, 0, 0x12, 0x34, 0x57], [0, 0], 50),
            1,
        );
        rig.send(&guest_frame(MAC, [1, 0], 50), 2); // NEEDS_CSUM, not negotiated
        rig.send(&guest_frame(MAC, [0, 1], 50), 3); // TSO4, not negotiated
        rig.send(&guest_frame(MAC, [0, 0], 0)[..20], 4); // shorter than Ethernet
        assert_eq!(rig.host_receives(), None);
        assert_eq!(rig.tx.used_idx(&rig.memory), 5);
        let counters = rig.device.counters();
        assert_eq!((counters.tx_spoofed, counters.tx_malformed), (1, 3));
    }

    #[test]
    fn negotiated_offloads_may_be_asked_for() {
        let features = 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4;
        let mut rig = rig(features);
        let frame = guest_frame(MAC, [1, 1], 50);
        rig.send(&frame, 0);
        assert_eq!(rig.host_receives(), Some(frame));
    }

    #[test]
    fn received_frames_fill_buffers_and_wait_when_there_are_none() {
        let mut rig = rig(1 << VIRTIO_NET_F_MRG_RXBUF);
        let mut frame = vec![0u8; VNET_HEADER_LEN];
        frame.extend(std::iter::repeat_n(0x5a, 3000));
        rig.host.send(&frame).unwrap();

        // No buffers yet: the frame waits and the tap is not watched.
        let mut queues = [std::mem::replace(
            &mut rig.rx.queue,
            Queue::new(16).unwrap(),
        )];
        assert!(
            !rig.device
                .process_backend(&mut queues, &rig.memory)
                .unwrap()
        );
        rig.rx.queue = std::mem::replace(&mut queues[0], Queue::new(16).unwrap());
        assert!(rig.device.backend_fd().is_none());

        // Two 2 KiB buffers take the 3 KiB frame; num_buffers says so.
        rig.post_rx(0, 2048);
        rig.post_rx(1, 2048);
        assert!(
            rig.device
                .process_queue(RX_QUEUE, &mut rig.rx.queue, &rig.memory)
                .unwrap()
        );
        assert!(rig.device.backend_fd().is_some());
        assert_eq!(rig.rx.used_idx(&rig.memory), 2);
        assert_eq!(rig.rx.used(&rig.memory, 0), (0, 2048));
        assert_eq!(rig.rx.used(&rig.memory, 1), (1, 3012 - 2048));
        let first = rig.rx_buffer(0, 2048);
        assert_eq!(u16::from_le_bytes([first[10], first[11]]), 2);
        assert!(first[VNET_HEADER_LEN..].iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn without_mergeable_buffers_a_frame_too_large_is_dropped_and_the_buffer_kept() {
        let mut rig = rig(0);
        let mut frame = vec![0u8; VNET_HEADER_LEN];
        frame.extend(std::iter::repeat_n(0x11, 3000));
        rig.host.send(&frame).unwrap();
        let mut small = vec![0u8; VNET_HEADER_LEN];
        small.extend(std::iter::repeat_n(0x22, 100));
        rig.host.send(&small).unwrap();
        rig.post_rx(0, 2048);
        rig.device
            .process_queue(RX_QUEUE, &mut rig.rx.queue, &rig.memory)
            .unwrap();
        assert_eq!(rig.rx.used_idx(&rig.memory), 1);
        assert_eq!(rig.rx.used(&rig.memory, 0), (0, 112));
        assert_eq!(rig.rx_buffer(0, 112)[VNET_HEADER_LEN], 0x22);
        assert_eq!(rig.device.counters().rx_dropped, 1);
    }

    #[test]
    fn a_receive_chain_the_device_cannot_write_is_returned_empty() {
        let mut rig = rig(1 << VIRTIO_NET_F_MRG_RXBUF);
        let mut frame = vec![0u8; VNET_HEADER_LEN];
        frame.extend(std::iter::repeat_n(0x33, 60));
        rig.host.send(&frame).unwrap();
        // A readable descriptor before a writable one: not a receive buffer.
        rig.rx
            .set_descriptor(&rig.memory, 0, BUFFERS, 64, WRITE | NEXT, 1);
        rig.rx.set_descriptor(&rig.memory, 1, BUFFERS, 64, 0, 0);
        rig.rx.offer(&rig.memory, 0);
        rig.post_rx(2, 2048);
        rig.device
            .process_queue(RX_QUEUE, &mut rig.rx.queue, &rig.memory)
            .unwrap();
        assert_eq!(rig.rx.used(&rig.memory, 0), (0, 0));
        assert_eq!(rig.rx.used(&rig.memory, 1), (2, 72));
    }
}
