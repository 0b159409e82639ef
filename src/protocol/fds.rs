//! The fds a helper is started with: their `LISTEN_FDNAMES` names as a type, and the one builder
//! of the fd list that both launchers (the daemon and `vmd run`) use (DESIGN.md, "Launch
//! protocol", step 3).

use std::fmt;
use std::os::fd::OwnedFd;

/// The most disks a VM may have.
pub const MAX_DISKS: usize = 8;
/// The deepest qcow2 backing chain accepted (the top image not counted).
pub const MAX_BACKING_DEPTH: usize = 16;
/// The most network interfaces a VM may have.
pub const MAX_NETS: usize = 4;

/// One fd's name in `LISTEN_FDNAMES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FdName {
    /// The control socket (SOCK_SEQPACKET) to the launcher.
    Control,
    /// An open /dev/kvm.
    Kvm,
    /// The kernel image, readable.
    Kernel,
    /// The initrd, readable.
    Initrd,
    /// The console: guest output is written to it, guest input read from it.
    Console,
    /// Disk `i`'s image (`disk<i>`), read-write unless the disk is read-only.
    Disk(u8),
    /// Layer `layer` (1 = the top image's backing file) of disk `disk`'s qcow2 backing chain
    /// (`disk<i>.base<j>`), always read-only.
    DiskBase { disk: u8, layer: u8 },
    /// Network interface `i`'s tap (`net<i>`).
    Net(u8),
}

/// Names every helper needs.
pub const REQUIRED_FDS: [FdName; 3] = [FdName::Control, FdName::Kvm, FdName::Kernel];

impl fmt::Display for FdName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FdName::Control => f.write_str("control"),
            FdName::Kvm => f.write_str("kvm"),
            FdName::Kernel => f.write_str("kernel"),
            FdName::Initrd => f.write_str("initrd"),
            FdName::Console => f.write_str("console"),
            FdName::Disk(i) => write!(f, "disk{i}"),
            FdName::DiskBase { disk, layer } => write!(f, "disk{disk}.base{layer}"),
            FdName::Net(i) => write!(f, "net{i}"),
        }
    }
}

impl FdName {
    /// Parses a name as the launcher writes it; anything else (an index out of range, a leading
    /// zero, a base layer 0) is `None`.
    pub fn parse(name: &str) -> Option<FdName> {
        match name {
            "control" => return Some(FdName::Control),
            "kvm" => return Some(FdName::Kvm),
            "kernel" => return Some(FdName::Kernel),
            "initrd" => return Some(FdName::Initrd),
            "console" => return Some(FdName::Console),
            _ => {}
        }
        if let Some(rest) = name.strip_prefix("disk") {
            return match rest.split_once(".base") {
                None => Some(FdName::Disk(index(rest, MAX_DISKS - 1)?)),
                Some((disk, layer)) => {
                    let disk = index(disk, MAX_DISKS - 1)?;
                    let layer = index(layer, MAX_BACKING_DEPTH)?;
                    (layer >= 1).then_some(FdName::DiskBase { disk, layer })
                }
            };
        }
        let rest = name.strip_prefix("net")?;
        Some(FdName::Net(index(rest, MAX_NETS - 1)?))
    }
}

/// A decimal index without sign or leading zero, at most `max`.
fn index(text: &str, max: usize) -> Option<u8> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return None;
    }
    let value: usize = text.parse().ok()?;
    if value > max {
        return None;
    }
    u8::try_from(value).ok()
}

/// A disk's open files: the image the guest sees, and its qcow2 backing chain, nearest first.
#[derive(Debug)]
pub struct DiskFds {
    pub image: OwnedFd,
    pub bases: Vec<OwnedFd>,
}

/// Everything a helper is passed besides `control` (which the launcher creates itself).
#[derive(Debug)]
pub struct HelperFds {
    pub kvm: OwnedFd,
    pub kernel: OwnedFd,
    pub initrd: Option<OwnedFd>,
    pub disks: Vec<DiskFds>,
    /// One tap per network interface, in order.
    pub nets: Vec<OwnedFd>,
    pub console: Option<OwnedFd>,
}

impl HelperFds {
    /// The named fds in `LISTEN_FDNAMES` order: kvm, kernel, initrd, each disk followed by its
    /// backing chain, the taps, console.
    pub fn into_named(self) -> Vec<(FdName, OwnedFd)> {
        let mut named = vec![(FdName::Kvm, self.kvm), (FdName::Kernel, self.kernel)];
        named.extend(self.initrd.map(|fd| (FdName::Initrd, fd)));
        for (disk, files) in (0u8..).zip(self.disks) {
            named.push((FdName::Disk(disk), files.image));
            for (layer, base) in (1u8..).zip(files.bases) {
                named.push((FdName::DiskBase { disk, layer }, base));
            }
        }
        for (index, tap) in (0u8..).zip(self.nets) {
            named.push((FdName::Net(index), tap));
        }
        named.extend(self.console.map(|fd| (FdName::Console, fd)));
        named
    }

    /// [`Self::into_named`] with the names as strings, for [`crate::launch::HelperSpawn`].
    pub fn into_spawn_list(self) -> Vec<(String, OwnedFd)> {
        self.into_named()
            .into_iter()
            .map(|(name, fd)| (name.to_string(), fd))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let names = [
            FdName::Control,
            FdName::Kvm,
            FdName::Kernel,
            FdName::Initrd,
            FdName::Console,
            FdName::Disk(0),
            FdName::Disk(7),
            FdName::DiskBase { disk: 3, layer: 1 },
            FdName::DiskBase { disk: 0, layer: 16 },
            FdName::Net(3),
        ];
        for name in names {
            assert_eq!(FdName::parse(&name.to_string()), Some(name), "{name}");
        }
        assert_eq!(
            FdName::DiskBase { disk: 2, layer: 10 }.to_string(),
            "disk2.base10"
        );
    }

    #[test]
    fn refuses_anything_not_canonical() {
        for bad in [
            "",
            "disk",
            "disk8",
            "disk01",
            "disk-1",
            "disk+1",
            "disk0.base0",
            "disk0.base17",
            "disk0.base",
            "disk0.base01",
            "disk0.base1.base1",
            "disk0x",
            "net4",
            "net",
            "Disk0",
            "kvm0",
            "disk-of-doom",
        ] {
            assert_eq!(FdName::parse(bad), None, "{bad:?}");
        }
    }
}
