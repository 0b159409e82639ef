//! `vmd run --net tap=NAME|fd=N[,mac=52:54:..][,locked-lladdr=off]`, and opening such an
//! interface's tap with the invoking user's own rights.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::protocol::{InterfaceConfig, MacAddress};
use crate::tap;

const FORM: &str = "tap=NAME|fd=N[,mac=52:54:00:12:34:56][,locked-lladdr=on|off]";

/// Where an interface's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Attach to the tap of this name.
    Name(String),
    /// A tap fd inherited from whoever started `vmd run`.
    Fd(RawFd),
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOption {
    pub tap: TapSource,
    /// `None`: derived from the VM's name and the interface's index.
    pub mac: Option<MacAddress>,
    pub locked_lladdr: bool,
}

/// Parses one `--net` value.
pub fn parse_net_option(text: &str) -> Result<NetOption, String> {
    let mut parts = text.split(',');
    let tap = match parts.next().and_then(|first| first.split_once('=')) {
        Some(("tap", name)) if !name.is_empty() && name.len() <= tap::MAX_IFNAME => {
            TapSource::Name(name.to_string())
        }
        Some(("tap", name)) => {
            return Err(format!(
                "{name:?} is not a tap name (1 to {} bytes)",
                tap::MAX_IFNAME
            ));
        }
        Some(("fd", fd)) => match fd.parse::<RawFd>() {
            Ok(fd) if fd > 2 => TapSource::Fd(fd),
            _ => return Err(format!("fd={fd}: a tap fd is a number above 2")),
        },
        _ => return Err(format!("{text:?}: an interface is {FORM}")),
    };
    let mut option = NetOption {
        tap,
        mac: None,
        locked_lladdr: true,
    };
    for part in parts {
        match part.split_once('=') {
            Some(("mac", mac)) => {
                let mac: MacAddress = mac.parse()?;
                if !mac.is_unicast() {
                    return Err(format!("{mac} is not a unicast MAC address"));
                }
                option.mac = Some(mac);
            }
            Some(("locked-lladdr", "on")) => option.locked_lladdr = true,
            Some(("locked-lladdr", "off")) => option.locked_lladdr = false,
            _ => {
                return Err(format!(
                    "{text:?}: unknown interface option {part:?} (an interface is {FORM})"
                ));
            }
        }
    }
    Ok(option)
}

/// The MAC a `vmd run` interface gets unless one is given: stable for a VM name and index.
pub fn default_mac(vm_name: &str, index: usize) -> MacAddress {
    MacAddress::derived(format!("vmd-run/{vm_name}/{index}").as_bytes())
}

/// Opens (or takes over) every interface's tap; returns the fds and the helper's view of each
/// interface.
pub fn open_nets(
    vm_name: &str,
    nets: &[NetOption],
) -> Result<(Vec<OwnedFd>, Vec<InterfaceConfig>), String> {
    let mut fds = Vec::with_capacity(nets.len());
    let mut configs = Vec::with_capacity(nets.len());
    for (index, net) in nets.iter().enumerate() {
        let fd = match &net.tap {
            TapSource::Name(name) => tap::open(name).map_err(|e| {
                format!("interface {index}: cannot attach to tap {name}: {e} (the tap must be yours, or vmd run needs CAP_NET_ADMIN)")
            })?,
            TapSource::Fd(raw) => inherited(index, *raw, nets)?,
        };
        tap::check(&fd).map_err(|e| format!("interface {index}: {e}"))?;
        fds.push(fd);
        configs.push(InterfaceConfig {
            mac: net.mac.unwrap_or_else(|| default_mac(vm_name, index)),
            locked_lladdr: net.locked_lladdr,
        });
    }
    Ok((fds, configs))
}

/// Takes ownership of the inherited fd `raw`, which must be open and given only once.
fn inherited(index: usize, raw: RawFd, nets: &[NetOption]) -> Result<OwnedFd, String> {
    let given = nets
        .iter()
        .filter(|net| net.tap == TapSource::Fd(raw))
        .count();
    if given > 1 {
        return Err(format!("fd {raw} is given for more than one interface"));
    }
    // SAFETY: F_GETFD only reads the fd's flags; it fails with EBADF on a closed fd.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(format!(
            "interface {index}: fd {raw} is not open (was it passed to vmd run?)"
        ));
    }
    // SAFETY: the fd is open, above stdio, and was handed to this process by its parent for
    // this interface; nothing in vmd opened it, and it is taken once (checked above), so this
    // is its only owner. It becomes close-on-exec: only the launcher passes it on.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("interface {index}: fd {raw}: {e}"))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse() {
        assert_eq!(
            parse_net_option("tap=vt0,mac=52:54:00:12:34:56,locked-lladdr=off").expect("valid"),
            NetOption {
                tap: TapSource::Name("vt0".into()),
                mac: Some("52:54:00:12:34:56".parse().unwrap()),
                locked_lladdr: false,
            }
        );
        assert_eq!(
            parse_net_option("fd=7").expect("valid"),
            NetOption {
                tap: TapSource::Fd(7),
                mac: None,
                locked_lladdr: true,
            }
        );
        for bad in [
            "",
            "vt0",
            "tap=",
            "tap=sixteen-chars-xx",
            "fd=1",
            "fd=-3",
            "fd=x",
            "tap=a,mac=01:00:00:00:00:01",
            "tap=a,mac=52:54",
            "tap=a,locked-lladdr=maybe",
            "tap=a,switch=b",
        ] {
            assert!(parse_net_option(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_macs_are_stable_local_and_distinct() {
        let mac = default_mac("web", 0);
        assert_eq!(mac, default_mac("web", 0));
        assert_ne!(mac, default_mac("web", 1));
        assert_ne!(mac, default_mac("db", 0));
        assert!(mac.is_unicast() && mac.0[0] & 2 == 2, "{mac}");
    }

    #[test]
    fn a_closed_or_repeated_fd_is_refused() {
        let closed = NetOption {
            tap: TapSource::Fd(987),
            mac: None,
            locked_lladdr: true,
        };
        let error = open_nets("t", std::slice::from_ref(&closed)).unwrap_err();
        assert!(error.contains("not open"), "{error}");
        let error = open_nets("t", &[closed.clone(), closed]).unwrap_err();
        assert!(error.contains("more than one"), "{error}");
    }
}
