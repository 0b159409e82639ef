//! Host-side taps, as the launchers prepare them for a helper's `net<i>` fds: opened on
//! `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (the virtio-net device relies on the
//! vnet header), checked when a caller passes one, and, for the daemon, created under a name of
//! its own, brought up and attached to a bridge. Everything here is an ioctl: on the tun
//! device, or on an AF_UNIX socket for the interface requests (SIOCGIFINDEX, SIOCSIFFLAGS,
//! SIOCBRADDIF), so no netlink socket and no `ip` binary is needed.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Interface names are at most this many bytes (IFNAMSIZ 16, with its NUL).
pub const MAX_IFNAME: usize = 15;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Fail TUNSETIFF if the interface exists already (instead of attaching to it).
const IFF_TUN_EXCL: libc::c_short = -0x8000; // 0x8000 as a c_short
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 204, int)`
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
/// `_IOR('T', 210, unsigned int)`
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `linux/sockios.h`
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// An `ifreq` naming `name` (which must fit, without NUL bytes).
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() > MAX_IFNAME || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name (1 to {MAX_IFNAME} bytes)"),
        ));
    }
    // SAFETY: ifreq is plain data (a name array and a union of plain fields): all zeroes is a
    // valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(request)
}

fn open_tun() -> io::Result<OwnedFd> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map(OwnedFd::from)
}

/// TUNSETIFF on a fresh /dev/net/tun fd with the tap flags and `extra`.
fn set_iff(name: &str, extra: libc::c_short) -> io::Result<OwnedFd> {
    let tun = open_tun()?;
    let mut request = ifreq(name)?;
    request.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | extra;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which we own, on an fd we own.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut request) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

/// Attaches to the tap `name` (`vmd run --net tap=NAME`): the caller must own it, or have
/// CAP_NET_ADMIN (then a tap of that name is created if there is none; it goes away with the
/// last fd).
pub fn open(name: &str) -> io::Result<OwnedFd> {
    set_iff(name, 0)
}

/// Creates the tap `name`, which must not exist yet, owned by `owner` (only that uid, or
/// CAP_NET_ADMIN, may attach to it). It is not persistent: it disappears when the last fd of it
/// is closed.
pub fn create(name: &str, owner: u32) -> io::Result<OwnedFd> {
    let tap = set_iff(name, IFF_TUN_EXCL)?;
    // SAFETY: TUNSETOWNER takes the uid as its argument value.
    let ret = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOWNER, owner as libc::c_ulong) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tap)
}

/// The name of the tap behind `fd`, if it is a tap with the flags vmd needs (no packet
/// information, a vnet header); otherwise a sentence saying what is wrong.
pub fn check(fd: &OwnedFd) -> Result<String, String> {
    // SAFETY: all zeroes is a valid ifreq.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes the ifreq we own; on an fd that is not a tun device it fails.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut request) };
    if ret < 0 {
        let error = io::Error::last_os_error();
        return Err(format!("it is not an attached tap ({error})"));
    }
    // SAFETY: TUNGETIFF filled in the flags member.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    let name: Vec<u8> = request
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    let name = String::from_utf8_lossy(&name).into_owned();
    if flags & IFF_TAP == 0 {
        return Err(format!("{name} is a tun device, not a tap"));
    }
    if flags & IFF_NO_PI == 0 || flags & IFF_VNET_HDR == 0 {
        return Err(format!(
            "tap {name} must be opened with IFF_NO_PI and IFF_VNET_HDR"
        ));
    }
    Ok(name)
}

/// A socket for interface ioctls; any family will do, and AF_UNIX is the one vmd may use.
fn control_socket() -> io::Result<OwnedFd> {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)
}

/// The index of interface `name`.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let socket = control_socket()?;
    let mut request = ifreq(name)?;
    // SAFETY: SIOCGIFINDEX reads the name and writes the index into the ifreq we own.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFINDEX, &mut request) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFINDEX filled in the index member.
    let index = unsafe { request.ifr_ifru.ifru_ifindex };
    u32::try_from(index).map_err(|_| io::Error::other("negative interface index"))
}

/// Brings interface `name` up (needs CAP_NET_ADMIN).
pub fn set_up(name: &str) -> io::Result<()> {
    let socket = control_socket()?;
    let mut request = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags into the ifreq we own.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled in the flags member.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes interface `port` a port of the bridge `bridge` (needs CAP_NET_ADMIN).
pub fn attach_to_bridge(bridge: &str, port: &str) -> io::Result<()> {
    let port_index = ifindex(port)?;
    let socket = control_socket()?;
    let mut request = ifreq(bridge)?;
    request.ifr_ifru.ifru_ifindex = port_index as libc::c_int;
    // SAFETY: SIOCBRADDIF reads the bridge's name and the port's index from the ifreq we own.
    if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCBRADDIF, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The name of the tap the daemon makes for interface `index` of VM `vm`: `vt-<vm>`, with
/// `-<index>` after it for every interface but the first. A name too long for an interface
/// keeps its start and ends in a hash of the whole, so different VMs get different names.
pub fn vm_tap_name(vm: &str, index: usize) -> String {
    let suffix = if index == 0 {
        String::new()
    } else {
        format!("-{index}")
    };
    let full = format!("vt-{vm}{suffix}");
    if full.len() <= MAX_IFNAME {
        return full;
    }
    // FNV-1a of the VM's name: stable across releases, unlike std's hasher.
    let hash = vm.bytes().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    let hash = format!("{:05x}", hash & 0xf_ffff);
    // VM names are ASCII, so any byte count is a character boundary.
    let keep = MAX_IFNAME - "vt-".len() - hash.len() - suffix.len();
    format!("vt-{}{hash}{suffix}", &vm[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_and_differ() {
        assert_eq!(vm_tap_name("web", 0), "vt-web");
        assert_eq!(vm_tap_name("web", 1), "vt-web-1");
        assert_eq!(vm_tap_name("abcdefghijkl", 0), "vt-abcdefghijkl");
        let long = vm_tap_name("a-very-long-vm-name.example.com", 0);
        let other = vm_tap_name("a-very-long-vm-name.example.org", 0);
        let third = vm_tap_name("a-very-long-vm-name.example.com", 3);
        for name in [&long, &other, &third] {
            assert!(
                name.len() <= MAX_IFNAME && name.starts_with("vt-a-ver"),
                "{name}"
            );
        }
        assert_ne!(long, other);
        assert!(third.ends_with("-3"), "{third}");
        assert_eq!(long, vm_tap_name("a-very-long-vm-name.example.com", 0));
        // Exactly at the limit, and one over it.
        assert_eq!(vm_tap_name("abcdefghij", 1), "vt-abcdefghij-1");
        let over = vm_tap_name("abcdefghijk", 1);
        assert!(over.len() == MAX_IFNAME && over.ends_with("-1"), "{over}");
    }

    #[test]
    fn bad_interface_names_are_refused() {
        for bad in ["", "a/b", "sixteen-chars-xx"] {
            assert!(ifreq(bad).is_err(), "{bad:?}");
        }
        assert!(ifreq("fifteen-chars-x").is_ok());
    }

    #[test]
    fn a_file_is_not_a_tap() {
        let file = OwnedFd::from(tempfile::tempfile().expect("tempfile"));
        assert!(check(&file).unwrap_err().contains("not an attached tap"));
    }
}
