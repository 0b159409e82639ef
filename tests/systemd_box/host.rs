//! The host side of a box: what the host offers (cgroup hierarchies, device nodes, tools), the
//! box's cgroup subtree, pidfds, and the sweep of leftovers from killed test processes.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// Where the host mounts its cgroup hierarchies.
pub(super) const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Prefix of every box's name, cgroup subtree and state directory: `vmd-box-<test pid>-<n>`.
pub(super) const NAME_PREFIX: &str = "vmd-box-";

/// The systemd the box boots (Debian's merged /usr).
pub(super) const SYSTEMD: &str = "/usr/lib/systemd/systemd";

/// Device nodes recreated in the box's /dev when the host has them.
const DEVICES: &[&str] = &[
    "null",
    "zero",
    "full",
    "random",
    "urandom",
    "tty",
    "kvm",
    "net/tun",
    "vhost-net",
    "vhost-vsock",
    "fuse",
];

/// Host programs the harness and stage 2 run (the box runs the same ones from the same files).
const TOOLS: &[&str] = &[
    "unshare",
    "nsenter",
    "setpriv",
    "systemd-run",
    "mount",
    "umount",
    "pivot_root",
    "mknod",
    "tar",
    "hostname",
    "dbus-daemon",
];

/// Looks a program up in the standard directories (not in the test's PATH, which may be odd).
pub(super) fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

/// Whether this host can run boxes; the reason when it cannot.
pub(super) fn check_support() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (mounts, namespaces, cgroups)".into());
    }
    if Path::new("/run/systemd/system").exists() {
        return Err(
            "the host runs systemd: a box would need a delegated cgroup subtree there, \
                    which this harness does not implement"
                .into(),
        );
    }
    let cgroup_fs = nix::sys::statfs::statfs(CGROUP_ROOT)
        .map_err(|error| format!("cannot statfs {CGROUP_ROOT}: {error}"))?;
    if cgroup_fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Err(format!(
            "{CGROUP_ROOT} is not the tmpfs of a hybrid or legacy (v1) cgroup layout; \
             a pure cgroup2 host is not supported"
        ));
    }
    let hierarchies = hierarchies().map_err(|error| format!("cannot read mountinfo: {error}"))?;
    if !hierarchies.iter().any(|h| h.name == "systemd") {
        return Err(format!(
            "no name=systemd hierarchy at {CGROUP_ROOT}/systemd"
        ));
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.lines().any(|line| line.ends_with("\toverlay")) {
        return Err("overlayfs is not available (modprobe overlay)".into());
    }
    if !Path::new(SYSTEMD).is_file() {
        return Err(format!("{SYSTEMD} is missing"));
    }
    match TOOLS.iter().find(|name| tool(name).is_none()) {
        Some(missing) => Err(format!("the program {missing} is missing")),
        None => Ok(()),
    }
}

/// A cgroup hierarchy mounted directly under /sys/fs/cgroup.
pub(super) struct Hierarchy {
    /// Its directory under /sys/fs/cgroup (`memory`, `systemd`, `unified`...).
    pub name: String,
    /// Whether the box's processes join a subtree of their own in it. Not in cpuset, whose new
    /// cgroups have no CPUs or memory nodes until someone assigns them.
    pub joined: bool,
}

/// The host's cgroup hierarchies, from /proc/self/mountinfo.
pub(super) fn hierarchies() -> io::Result<Vec<Hierarchy>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let prefix = format!("{CGROUP_ROOT}/");
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = before.split(' ').nth(4) else {
            continue;
        };
        let mut after = after.split(' ');
        let (fs_type, super_options) = (after.next(), after.nth(1).unwrap_or(""));
        let Some(name) = mount_point.strip_prefix(&prefix) else {
            continue;
        };
        if !matches!(fs_type, Some("cgroup" | "cgroup2")) || name.contains('/') {
            continue;
        }
        found.push(Hierarchy {
            name: name.to_owned(),
            joined: !super_options.split(',').any(|option| option == "cpuset"),
        });
    }
    Ok(found)
}

/// What the box's /sys/fs/cgroup needs besides binds of the host's hierarchies.
pub(super) struct CgroupPlaceholders {
    /// Read-only empty mount points for the v1 controllers that the kernel has but the host
    /// does not mount (`hierarchy` 0 in /proc/cgroups): systemd then does not mount them.
    pub dirs: Vec<String>,
    /// `(link, target)`: the names of the pair that systemd mounts as one hierarchy.
    pub links: Vec<(String, String)>,
}

/// The placeholders for this host, given its mounted hierarchies.
pub(super) fn cgroup_placeholders(mounted: &[Hierarchy]) -> io::Result<CgroupPlaceholders> {
    let mut placeholders = CgroupPlaceholders {
        dirs: Vec::new(),
        links: Vec::new(),
    };
    for line in fs::read_to_string("/proc/cgroups")?.lines() {
        let mut fields = line.split_whitespace();
        let (Some(controller), Some("0")) = (fields.next(), fields.next()) else {
            continue;
        };
        if controller.starts_with('#') {
            continue;
        }
        let name = match controller {
            "net_cls" | "net_prio" => {
                let pair = "net_cls,net_prio";
                placeholders
                    .links
                    .push((controller.to_owned(), pair.to_owned()));
                pair
            }
            other => other,
        };
        let taken = mounted.iter().any(|h| h.name == name)
            || placeholders.dirs.iter().any(|dir| dir == name);
        if !taken {
            placeholders.dirs.push(name.to_owned());
        }
    }
    placeholders
        .links
        .retain(|(link, _)| !mounted.iter().any(|h| &h.name == link));
    Ok(placeholders)
}

/// A device node to recreate in the box: the host's numbers, mode and owner.
pub(super) struct DeviceNode {
    /// Path under /dev.
    pub path: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub major: u32,
    pub minor: u32,
}

/// The host's character devices from [`DEVICES`] (missing ones are left out).
pub(super) fn device_nodes() -> Vec<DeviceNode> {
    DEVICES
        .iter()
        .filter_map(|path| {
            let metadata = fs::metadata(Path::new("/dev").join(path)).ok()?;
            metadata.file_type().is_char_device().then(|| DeviceNode {
                path,
                mode: metadata.mode() & 0o7777,
                uid: metadata.uid(),
                gid: metadata.gid(),
                major: libc::major(metadata.rdev()),
                minor: libc::minor(metadata.rdev()),
            })
        })
        .collect()
}

/// The box's own cgroup subtree, `/<name>` in every joined hierarchy. systemd in the box takes
/// its PID 1's cgroup (minus `/init.scope`) as its root, so all its units live below it, and
/// removing the subtree after the box died leaves the host's hierarchies as they were.
pub(super) struct BoxCgroup {
    dirs: Vec<PathBuf>,
}

impl BoxCgroup {
    /// Creates `/<name>` in every joined hierarchy.
    pub fn create(name: &str, hierarchies: &[Hierarchy]) -> io::Result<BoxCgroup> {
        let mut cgroup = BoxCgroup { dirs: Vec::new() };
        for hierarchy in hierarchies.iter().filter(|h| h.joined) {
            let dir = Path::new(CGROUP_ROOT).join(&hierarchy.name).join(name);
            if let Err(error) = fs::create_dir(&dir) {
                let _ = cgroup.remove(Duration::ZERO);
                return Err(error);
            }
            cgroup.dirs.push(dir);
        }
        Ok(cgroup)
    }

    /// The `cgroup.procs` files that a process writes `0` into to join the subtree.
    pub fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .map(|dir| {
                CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                    .expect("cgroup paths have no NUL")
            })
            .collect()
    }

    /// Removes the subtree, depth first, retrying while the kernel finishes releasing the last
    /// processes; names what is still there after `patience`.
    pub fn remove(&mut self, patience: Duration) -> Result<(), String> {
        let deadline = Instant::now() + patience;
        loop {
            self.dirs.retain(|dir| remove_tree(dir).is_err());
            if self.dirs.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let left: Vec<_> = self
                    .dirs
                    .iter()
                    .map(|dir| dir.display().to_string())
                    .collect();
                return Err(format!("cgroups not removable: {}", left.join(" ")));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `rmdir` of a cgroup directory and all the cgroups below it (their control files go with
/// them). A directory that is already gone counts as removed.
fn remove_tree(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes what boxes of test processes that no longer exist left behind: a test process that
/// is killed takes its boxes with it (PR_SET_PDEATHSIG) but cannot remove their (empty) cgroups
/// and state directories. Leftovers of live processes are never touched.
pub(super) fn sweep_stale(state_parent: &Path) {
    let owner_gone = |name: &str| {
        name.strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut parents: Vec<PathBuf> = hierarchies()
        .unwrap_or_default()
        .iter()
        .filter(|h| h.joined)
        .map(|h| Path::new(CGROUP_ROOT).join(&h.name))
        .collect();
    parents.push(state_parent.to_owned());
    for parent in parents {
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            if !owner_gone(&entry.file_name().to_string_lossy()) {
                continue;
            }
            // Best effort: a cgroup that still has processes stays (EBUSY).
            if parent == state_parent {
                let _ = fs::remove_dir_all(entry.path());
            } else {
                let _ = remove_tree(&entry.path());
            }
        }
    }
}

/// A pidfd: signals reach exactly the process it was opened for, even after its pid was reused.
pub(super) struct PidFd(OwnedFd);

impl PidFd {
    pub fn open(pid: u32) -> io::Result<PidFd> {
        let pid =
            libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags (0) and returns a new descriptor or -1; no
        // memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `signal`; a process that is already gone is not an error.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal on a descriptor we own, with a null siginfo (the kernel
        // then fills in the usual kill() information) and flags 0.
        let result = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        match result {
            0 => Ok(()),
            _ => match io::Error::last_os_error() {
                error if error.raw_os_error() == Some(libc::ESRCH) => Ok(()),
                error => Err(error),
            },
        }
    }

    pub fn kill(&self) -> io::Result<()> {
        self.signal(libc::SIGKILL)
    }
}

/// The pids of all processes.
pub(super) fn processes() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The children of a single-threaded process.
pub(super) fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|child| child.parse().ok())
        .collect()
}

/// Fields 3 and on of /proc/PID/stat (state, ppid, ...): after COMM, which may contain
/// anything, so split after its last ')'.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

pub(super) fn parent_pid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The start time of a process (field 22 of its stat), which tells a reused pid apart; also
/// for a zombie.
pub(super) fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// The PID namespace of a process (the target of /proc/PID/ns/pid).
pub(super) fn pid_namespace(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}
