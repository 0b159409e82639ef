//! The control protocol between a launcher (the daemon, or `vmd run`) and a VM's helper process.
//!
//! The two talk over one `AF_UNIX` `SOCK_SEQPACKET` socketpair, the control channel
//! ([`ControlChannel`]). The launcher sends [`Request`]s, the helper sends [`Event`]s. Each
//! message is one datagram: an 8-byte header (magic `b"VMD"`, [`PROTOCOL_VERSION`], payload
//! length) and the message as JSON; [`codec`] describes the header, [`messages`] the JSON shape.

pub mod channel;
pub mod codec;
pub mod fds;
pub mod messages;
pub mod name;

pub use channel::{ControlChannel, RecvError, SendError};
pub use codec::{
    DecodeError, EncodeError, HEADER_LEN, MAGIC, MAX_DATAGRAM, MAX_PAYLOAD, PROTOCOL_VERSION,
    decode_event, decode_request, encode_event, encode_request,
};
pub use fds::{DiskFds, FdName, HelperFds, MAX_BACKING_DEPTH, MAX_DISKS, MAX_NETS};
pub use messages::{
    ConfigError, DiskConfig, Event, ImageFormat, InterfaceConfig, MAX_CMDLINE_BYTES,
    MAX_DEVICE_CMDLINE_BYTES, MAX_DISK_SERIAL_BYTES, MAX_MEMORY_BYTES, MAX_VCPUS,
    MEMORY_ALIGN_BYTES, MIN_MEMORY_BYTES, MacAddress, Request, RunState, VmConfig,
};
pub use name::{MAX_VM_NAME_LEN, NameError, validate_vm_name};
