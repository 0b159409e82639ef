//! A network namespace of the test's own with a tap in it: the only network the tests touch
//! (addresses in 10.200.0.0/16, inside the namespace; nothing leaves it).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Output};

/// `ip netns` state that is removed on drop.
pub struct NetNs {
    pub name: String,
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

impl NetNs {
    /// A fresh namespace named after the test process and `tag`.
    pub fn new(tag: &str) -> NetNs {
        let name = format!("vmdtest-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ns = NetNs { name };
        ns.ok(&["ip", "netns", "add", &ns.name]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `argv` on the host, failing the test if it fails.
    fn ok(&self, argv: &[&str]) -> Output {
        let output = Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
        assert!(
            output.status.success(),
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Runs `argv` inside the namespace, failing the test if it fails.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend(argv);
        self.ok(&full)
    }

    /// Runs `argv` inside the namespace and returns its output whatever its status.
    pub fn run(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"))
    }

    /// Creates tap `ifname` in the namespace (with a vnet header, as vmd's launchers open
    /// taps) and returns its fd; the tap exists as long as the fd is open.
    pub fn tap(&self, ifname: &str) -> OwnedFd {
        let path = format!("/var/run/netns/{}", self.name);
        let name = ifname.to_string();
        // setns(CLONE_NEWNET) changes only the calling thread: do it on a thread of its own.
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on an open namespace fd; it affects only this thread.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            let tun = CString::new("/dev/net/tun").unwrap();
            // SAFETY: a NUL-terminated path and plain flags.
            let fd = unsafe { libc::open(tun.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            assert!(
                fd >= 0,
                "open /dev/net/tun: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `fd` was just opened and is owned by nothing else.
            let tap = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: an all-zero ifreq is valid; the name fits (IFNAMSIZ is 16).
            let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
            for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
                *slot = byte as libc::c_char;
            }
            request.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
            // SAFETY: TUNSETIFF reads and writes the ifreq we own.
            let ret = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF, &mut request) };
            assert_eq!(ret, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            tap
        })
        .join()
        .expect("tap thread")
    }

    /// Gives `ifname` the address `cidr` and brings it up.
    pub fn address(&self, ifname: &str, cidr: &str) {
        self.exec(&["ip", "addr", "add", cidr, "dev", ifname]);
        self.exec(&["ip", "link", "set", ifname, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
