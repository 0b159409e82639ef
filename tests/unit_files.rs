//! The files that integrate vmd with systemd and D-Bus, and the Debian package that ships them:
//!
//! * `systemd/vmd.service`: its sandbox scores at most 2.0 in `systemd-analyze security`, it
//!   passes `systemd-analyze verify`, it keeps the contract the daemon relies on (notify, bus
//!   name, fd store, runtime directory), and its system call filter leaves the VM helper the
//!   calls it needs for its own lock-down (the helper inherits the filter);
//! * `systemd/vmd.socket`, `systemd/sysusers.d/vmd.conf`, `systemd/tmpfiles.d/vmd.conf`: as
//!   systemd reads them;
//! * `dbus/org.vmd.vmd1.conf` and `dbus/org.vmd.vmd1.service`: loaded into a private
//!   dbus-daemon, which must accept them and then let only root own the name and everyone call it;
//! * `packaging/build-deb.sh`: the package holds every file at its path, with its mode, and the
//!   control fields and maintainer scripts are right.
//!
//! The host tools these tests run (systemd-analyze, systemd-sysusers, systemd-tmpfiles,
//! dbus-daemon, busctl, dpkg-deb) come with Debian 12's systemd, dbus and dpkg. A few checks
//! need root (switching to another user, creating root-owned files) and say so when they skip.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const VMD: &str = env!("CARGO_BIN_EXE_vmd");
const VMCTL: &str = env!("CARGO_BIN_EXE_vmctl");
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The highest `systemd-analyze security` exposure vmd.service may have.
const MAX_EXPOSURE: f64 = 2.0;

fn repo_file(relative: &str) -> PathBuf {
    Path::new(REPO).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_file(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Runs a command to its end; panics (naming the command) when it cannot be started.
fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// One `Key=Value` line of a unit file or D-Bus key file, with its section.
#[derive(Debug)]
struct Entry {
    section: String,
    key: String,
    value: String,
}

/// Reads a systemd-style key file (`[Section]`, `Key=Value`, `#`/`;` comments). Panics on a line
/// that is none of those, so that a broken file fails the test here with its line.
fn parse_key_file(name: &str, text: &str) -> Vec<Entry> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "{name}:{}: continuation lines are not expected here",
            number + 1
        );
        if let Some(header) = line.strip_prefix('[') {
            section = header
                .strip_suffix(']')
                .unwrap_or_else(|| panic!("{name}:{}: bad section header {line:?}", number + 1))
                .to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{name}:{}: not Key=Value: {line:?}", number + 1));
        assert!(
            !section.is_empty(),
            "{name}:{}: {key} outside a section",
            number + 1
        );
        entries.push(Entry {
            section: section.clone(),
            key: key.trim().to_owned(),
            value: value.trim().to_owned(),
        });
    }
    entries
}

/// Every value of `key` in `section`, in file order.
fn values<'a>(entries: &'a [Entry], section: &str, key: &str) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|e| e.section == section && e.key == key)
        .map(|e| e.value.as_str())
        .collect()
}

/// The single value of `key` in `section`; panics when it is missing or given twice.
fn value<'a>(entries: &'a [Entry], section: &str, key: &str) -> &'a str {
    match values(entries, section, key).as_slice() {
        [one] => one,
        [] => panic!("[{section}] {key}= is missing"),
        many => panic!("[{section}] {key}= is given {} times: {many:?}", many.len()),
    }
}

fn service_entries() -> Vec<Entry> {
    parse_key_file("vmd.service", &read("systemd/vmd.service"))
}

// ---------------------------------------------------------------------------------------------
// vmd.service: hardening score

#[test]
fn service_exposure_is_at_most_2_0() {
    let path = repo_file("systemd/vmd.service");
    let output = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!(
            "--threshold={}",
            (MAX_EXPOSURE * 10.0).round() as u32
        ))
        .arg(&path));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let exposure = stdout
        .lines()
        .find_map(|line| {
            let rest = line
                .split("Overall exposure level for vmd.service:")
                .nth(1)?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .unwrap_or_else(|| panic!("no overall exposure in the output: {}", describe(&output)));
    println!("vmd.service exposure: {exposure}");
    assert!(
        exposure <= MAX_EXPOSURE,
        "vmd.service exposure {exposure} > {MAX_EXPOSURE}: {}",
        describe(&output)
    );
    // With --threshold, systemd-analyze fails by itself above the limit, and on errors.
    assert!(output.status.success(), "{}", describe(&output));
}

// ---------------------------------------------------------------------------------------------
// vmd.service and vmd.socket: systemd-analyze verify

/// `systemd-analyze verify` on both units. It checks that ExecStart= is executable, so the
/// service is verified with ExecStart= pointing at the binary cargo built (the one the package
/// installs as /usr/sbin/vmd, which the package test checks); the line is otherwise unchanged.
/// verify exits 0 even after warnings (an unknown key, a value it cannot parse): any output at
/// all fails the test.
#[test]
fn units_pass_systemd_analyze_verify() {
    let service = read("systemd/vmd.service");
    let installed = "ExecStart=/usr/sbin/vmd daemon";
    assert_eq!(
        service.lines().filter(|l| l.trim() == installed).count(),
        1,
        "vmd.service must have exactly one {installed:?} line"
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    let rewritten = service.replace(installed, &format!("ExecStart={VMD} daemon"));
    fs::write(dir.path().join("vmd.service"), rewritten).expect("write vmd.service");
    fs::copy(
        repo_file("systemd/vmd.socket"),
        dir.path().join("vmd.socket"),
    )
    .expect("copy vmd.socket");

    let output = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--generators=no", "--no-pager"])
        .arg(dir.path().join("vmd.socket"))
        .arg(dir.path().join("vmd.service")));
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "systemd-analyze verify complained: {}",
        describe(&output)
    );
}

// ---------------------------------------------------------------------------------------------
// vmd.service and vmd.socket: what the daemon relies on

#[test]
fn service_keeps_the_daemon_contract() {
    let unit = service_entries();
    let s = "Service";
    assert_eq!(value(&unit, s, "Type"), "notify");
    assert_eq!(value(&unit, s, "BusName"), "org.vmd.vmd1");
    assert_eq!(value(&unit, s, "ExecStart"), "/usr/sbin/vmd daemon");
    assert_eq!(value(&unit, s, "NotifyAccess"), "main");
    assert_eq!(value(&unit, s, "Restart"), "on-failure");
    // A failed start drops the fd store, and with it every running VM: never rate-limit.
    assert_eq!(value(&unit, "Unit", "StartLimitIntervalSec"), "0");
    let store: u32 = value(&unit, s, "FileDescriptorStoreMax")
        .parse()
        .expect("FileDescriptorStoreMax= is a number");
    assert!(
        store >= 256,
        "FileDescriptorStoreMax={store} is too small for the VMs"
    );
    // VMs live in their own scopes; the service's own cgroup holds the daemon and, briefly,
    // helpers not moved yet. control-group would signal those at the same time as the daemon.
    let kill_mode = value(&unit, s, "KillMode");
    assert!(
        ["mixed", "process"].contains(&kill_mode),
        "KillMode={kill_mode}"
    );
    assert_eq!(value(&unit, s, "StateDirectory"), "vmd");
    assert_eq!(value(&unit, s, "RuntimeDirectory"), "vmd");
    // vmd.socket lives in /run/vmd: the directory must survive the service's stop.
    assert_eq!(value(&unit, s, "RuntimeDirectoryPreserve"), "yes");
    assert_eq!(value(&unit, s, "StateDirectoryMode"), "0700");
    assert!(
        !values(&unit, "Unit", "Requires")
            .iter()
            .chain(&values(&unit, "Unit", "BindsTo"))
            .any(|v| v.contains("vmd.socket")),
        "the service is also started by D-Bus activation and at boot: it must not require its socket"
    );
    assert_eq!(values(&unit, "Install", "WantedBy"), ["multi-user.target"]);

    // Devices: the real /dev filtered by the device cgroup. PrivateDevices would hide /dev/kvm.
    assert!(
        values(&unit, s, "PrivateDevices")
            .iter()
            .all(|v| ["no", "false", "0", ""].contains(v)),
        "PrivateDevices= hides /dev/kvm"
    );
    assert_eq!(value(&unit, s, "DevicePolicy"), "closed");
    let devices: BTreeSet<&str> = values(&unit, s, "DeviceAllow").into_iter().collect();
    for device in [
        "/dev/kvm rw",
        "/dev/net/tun rw",
        "/dev/ptmx rw",
        "char-pts rw",
    ] {
        assert!(devices.contains(device), "DeviceAllow={device} is missing");
    }

    // The helper switches to vmd-vm and empties its bounding set itself; the daemon makes
    // taps. It signals helpers that no longer run as root as their own user, without
    // CAP_KILL (whose exposure CAP_NET_ADMIN's takes).
    let caps: BTreeSet<&str> = values(&unit, s, "CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .collect();
    for cap in ["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_NET_ADMIN"] {
        assert!(caps.contains(cap), "CapabilityBoundingSet= lacks {cap}");
    }
    assert!(
        !caps.contains("CAP_KILL"),
        "CapabilityBoundingSet= has CAP_KILL"
    );
    assert!(
        !caps.iter().any(|c| c.starts_with('~')),
        "CapabilityBoundingSet= is expected as an allow list"
    );
    assert_eq!(value(&unit, s, "NoNewPrivileges"), "yes");
    assert!(
        values(&unit, s, "User").iter().all(|u| *u == "root"),
        "the daemon runs as root"
    );
}

#[test]
fn socket_keeps_the_daemon_contract() {
    let unit = parse_key_file("vmd.socket", &read("systemd/vmd.socket"));
    let s = "Socket";
    assert_eq!(values(&unit, s, "ListenStream"), ["/run/vmd/vmd.sock"]);
    assert_eq!(value(&unit, s, "SocketMode"), "0666");
    assert_eq!(value(&unit, s, "FileDescriptorName"), "vmd");
    assert_eq!(value(&unit, s, "Service"), "vmd.service");
    assert!(
        values(&unit, s, "Accept")
            .iter()
            .all(|v| ["no", "false", "0"].contains(v)),
        "one daemon serves every connection: Accept=no"
    );
    assert_eq!(values(&unit, "Install", "WantedBy"), ["sockets.target"]);
}

// ---------------------------------------------------------------------------------------------
// vmd.service: the system call filter, as the helper inherits it

/// System calls the daemon and its helpers make that a filter could take away (beyond plain
/// file and memory I/O), and why.
const REQUIRED_SYSCALLS: &[(&str, &str)] = &[
    ("landlock_create_ruleset", "the helper's landlock ruleset"),
    ("landlock_add_rule", "the helper's landlock ruleset"),
    ("landlock_restrict_self", "the helper's landlock ruleset"),
    ("seccomp", "the helper's own per-thread filter"),
    (
        "prctl",
        "no_new_privs, PR_CAPBSET_DROP, dumpable, pdeathsig",
    ),
    ("capget", "the helper checks its capabilities"),
    ("capset", "the helper empties its capability sets"),
    ("setgroups", "the helper drops supplementary groups"),
    ("setresgid", "the helper becomes vmd-vm"),
    ("setresuid", "the helper becomes vmd-vm"),
    ("execveat", "the daemon re-executes itself as the helper"),
    ("clone3", "fork and threads"),
    ("clone", "fork and threads"),
    ("setsid", "the helper leaves the daemon's session"),
    ("ioctl", "KVM, tap and pty requests"),
    ("mmap", "guest memory"),
    ("munmap", "guest memory"),
    ("madvise", "guest memory"),
    ("memfd_create", "memory shared between processes"),
    ("pidfd_open", "the daemon watches its helpers"),
    ("pidfd_send_signal", "the daemon signals its helpers"),
    ("signalfd4", "signals in the event loops"),
    ("eventfd2", "the async runtime"),
    ("epoll_pwait", "the async runtime"),
    ("socketpair", "the control socket"),
    ("sendmsg", "fd passing"),
    ("recvmsg", "fd passing"),
    ("rt_sigaction", "the vCPU kick signal"),
    ("tgkill", "kicking vCPU threads"),
    ("waitid", "reaping helpers"),
    ("fsync", "atomic writes of definitions"),
    ("fdatasync", "disk flushes"),
    ("preadv", "disk reads"),
    ("pwritev", "disk writes"),
    ("fallocate", "qcow2 cluster allocation"),
    ("getrandom", "virtio-rng"),
];

/// System calls the service has no business making.
const FORBIDDEN_SYSCALLS: &[&str] = &[
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "ptrace",
    "process_vm_writev",
    "init_module",
    "finit_module",
    "kexec_load",
    "reboot",
    "swapon",
    "settimeofday",
    "clock_settime",
    "iopl",
    "ioperm",
    "acct",
    "bpf",
    "perf_event_open",
    "unshare",
    "setns",
];

/// Every group `systemd-analyze syscall-filter` knows, with its entries (calls and groups).
fn syscall_groups() -> BTreeMap<String, Vec<String>> {
    let output = run(Command::new("systemd-analyze").args(["syscall-filter", "--no-pager"]));
    assert!(output.status.success(), "{}", describe(&output));
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_owned());
            groups.insert(line.trim().to_owned(), Vec::new());
        } else if line.trim().is_empty() {
            current = None;
        } else if let Some(group) = &current {
            let entry = line.trim();
            if !entry.starts_with('#') {
                groups.get_mut(group).expect("group").push(entry.to_owned());
            }
        }
    }
    assert!(
        groups.contains_key("@system-service"),
        "no @system-service in {groups:?}"
    );
    groups
}

fn expand(item: &str, groups: &BTreeMap<String, Vec<String>>, into: &mut BTreeSet<String>) {
    if item.starts_with('@') {
        let entries = groups
            .get(item)
            .unwrap_or_else(|| panic!("unknown system call group {item}"));
        for entry in entries {
            expand(entry, groups, into);
        }
    } else {
        into.insert(item.to_owned());
    }
}

/// The system calls a unit's SystemCallFilter= lines allow, as systemd combines them: the first
/// line decides between an allow list and a deny list (`~`), later lines of the same kind add to
/// it, lines of the other kind take away from it, and an empty assignment starts over.
/// Returns (allow list?, calls).
fn effective_filter(lines: &[&str]) -> (bool, BTreeSet<String>) {
    let groups = syscall_groups();
    let mut allow_list = None;
    let mut set = BTreeSet::new();
    for line in lines {
        if line.is_empty() {
            allow_list = None;
            set.clear();
            continue;
        }
        let (deny, items) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, *line),
        };
        let mut calls = BTreeSet::new();
        for item in items.split_whitespace() {
            // "name:errno" sets the errno for that call only.
            expand(item.split(':').next().unwrap_or(item), &groups, &mut calls);
        }
        let is_allow_list = *allow_list.get_or_insert(!deny);
        if is_allow_list != deny {
            set.extend(calls);
        } else {
            set.retain(|call| !calls.contains(call));
        }
    }
    (allow_list.unwrap_or(false), set)
}

#[test]
fn system_call_filter_leaves_the_helper_its_lock_down() {
    let unit = service_entries();
    let lines = values(&unit, "Service", "SystemCallFilter");
    let (allow_list, allowed) = effective_filter(&lines);
    assert!(
        allow_list,
        "SystemCallFilter= should be an allow list: {lines:?}"
    );
    let missing: Vec<String> = REQUIRED_SYSCALLS
        .iter()
        .filter(|(call, _)| !allowed.contains(*call))
        .map(|(call, why)| format!("{call} ({why})"))
        .collect();
    assert!(
        missing.is_empty(),
        "vmd.service's SystemCallFilter= denies calls the daemon or the helper needs: {missing:?}"
    );
    let open: Vec<&str> = FORBIDDEN_SYSCALLS
        .iter()
        .copied()
        .filter(|call| allowed.contains(*call))
        .collect();
    assert!(open.is_empty(), "SystemCallFilter= allows {open:?}");
    assert_eq!(value(&unit, "Service", "SystemCallArchitectures"), "native");
}

#[test]
fn effective_filter_follows_systemd_rules() {
    // The model the previous test relies on, checked on known groups.
    let (allow, set) = effective_filter(&["@system-service", "~@setuid"]);
    assert!(allow);
    assert!(set.contains("read") && !set.contains("setresuid"));
    let (allow, set) = effective_filter(&["~@mount", "@mount"]);
    assert!(!allow);
    assert!(!set.contains("mount"));
    let (allow, set) = effective_filter(&["~@mount", "", "@basic-io seccomp:EPERM"]);
    assert!(allow);
    assert!(set.contains("seccomp") && set.contains("read") && !set.contains("mount"));
}

// ---------------------------------------------------------------------------------------------
// sysusers.d and tmpfiles.d, applied to an empty root

#[test]
fn sysusers_creates_the_helper_user() {
    let root = tempfile::tempdir().expect("temporary directory");
    fs::create_dir(root.path().join("etc")).expect("mkdir etc");
    let config = fs::File::open(repo_file("systemd/sysusers.d/vmd.conf")).expect("sysusers.d");
    let output = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg("-")
        .stdin(config));
    assert!(output.status.success(), "{}", describe(&output));
    let passwd = fs::read_to_string(root.path().join("etc/passwd")).expect("passwd written");
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("vmd-vm:"))
        .unwrap_or_else(|| panic!("no vmd-vm in {passwd:?}"));
    let fields: Vec<&str> = entry.split(':').collect();
    assert_eq!(fields.len(), 7, "{entry}");
    let uid: u32 = fields[2].parse().expect("uid");
    assert!(
        uid > 0 && uid < 1000,
        "vmd-vm must be a system user: {entry}"
    );
    assert_eq!(fields[5], "/", "no home directory: {entry}");
    assert!(fields[6].ends_with("/nologin"), "no login shell: {entry}");
    let group = fs::read_to_string(root.path().join("etc/group")).expect("group written");
    assert!(group.lines().any(|l| l.starts_with("vmd-vm:")), "{group}");
}

#[test]
fn tmpfiles_creates_the_directories() {
    if !is_root() {
        eprintln!("skipped: systemd-tmpfiles makes the directories root's, which needs root");
        return;
    }
    let root = tempfile::tempdir().expect("temporary directory");
    let config = fs::File::open(repo_file("systemd/tmpfiles.d/vmd.conf")).expect("tmpfiles.d");
    let output = run(Command::new("systemd-tmpfiles")
        .args(["--create"])
        .arg(format!("--root={}", root.path().display()))
        .arg("-")
        .stdin(config));
    assert!(output.status.success(), "{}", describe(&output));
    for (dir, mode) in [
        ("var/lib/vmd", 0o700),
        ("var/lib/vmd/vms", 0o700),
        ("run/vmd", 0o755),
        ("etc/vmd", 0o755),
        ("etc/vmd/vms", 0o755),
    ] {
        let meta = fs::metadata(root.path().join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(meta.is_dir(), "{dir} is not a directory");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of {dir}");
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            0,
            "owner of {dir}"
        );
    }
    // The service creates the same directories; the modes must agree, or every start of the
    // service would change them.
    let unit = service_entries();
    assert_eq!(value(&unit, "Service", "StateDirectoryMode"), "0700");
    assert_eq!(value(&unit, "Service", "RuntimeDirectoryMode"), "0755");
}

// ---------------------------------------------------------------------------------------------
// D-Bus: activation file and bus policy, in a private dbus-daemon

#[test]
fn activation_file_names_the_service() {
    let file = parse_key_file("org.vmd.vmd1.service", &read("dbus/org.vmd.vmd1.service"));
    assert!(
        file.iter().all(|e| e.section == "D-BUS Service"),
        "only a [D-BUS Service] section is expected"
    );
    let s = "D-BUS Service";
    // dbus-daemon finds system services by file name: it must be <Name>.service.
    assert_eq!(value(&file, s, "Name"), "org.vmd.vmd1");
    assert_eq!(value(&file, s, "SystemdService"), "vmd.service");
    assert_eq!(value(&file, s, "User"), "root");
    assert!(!value(&file, s, "Exec").is_empty());
    let unit = service_entries();
    assert_eq!(value(&unit, "Service", "BusName"), value(&file, s, "Name"));
}

/// A dbus-daemon of its own, killed when dropped.
struct Bus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts dbus-daemon with a configuration like the system bus's defaults (calls denied unless
/// a policy allows them, no one owns names unless allowed), our policy file included, and our
/// activation file in its service directory. dbus-daemon refuses to start when an included file
/// is not a valid bus configuration.
fn private_bus() -> Bus {
    let dir = tempfile::tempdir().expect("temporary directory");
    // Other users connect to the bus socket in there.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let services = dir.path().join("services");
    fs::create_dir(&services).expect("mkdir services");
    fs::copy(
        repo_file("dbus/org.vmd.vmd1.service"),
        services.join("org.vmd.vmd1.service"),
    )
    .expect("copy the activation file");
    let socket = dir.path().join("bus");
    let config = format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>vmd-unit-test</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{services}</servicedir>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
        socket = socket.display(),
        services = services.display(),
        policy = repo_file("dbus/org.vmd.vmd1.conf").display(),
    );
    let config_path = dir.path().join("bus.conf");
    fs::write(&config_path, config).expect("write bus.conf");
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", config_path.display()))
        .args(["--nofork", "--nopidfile", "--print-address"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run dbus-daemon (Debian package dbus)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read dbus-daemon's address");
    if line.trim().is_empty() {
        let output = child.wait_with_output().expect("dbus-daemon's end");
        panic!(
            "dbus-daemon did not start with the policy included: {}",
            describe(&output)
        );
    }
    Bus {
        child,
        address: format!("unix:path={}", socket.display()),
        _dir: dir,
    }
}

/// `busctl call` on the bus, as root or (with `as_nobody`) as uid/gid 65534.
fn busctl_call(bus: &Bus, as_nobody: bool, args: &[&str]) -> Output {
    let mut command = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "busctl"]);
        c
    } else {
        Command::new("busctl")
    };
    command
        .arg(format!("--address={}", bus.address))
        .args(["--timeout=10", "call"])
        .args(args);
    run(&mut command)
}

const REQUEST_NAME: &[&str] = &[
    "org.freedesktop.DBus",
    "/org/freedesktop/DBus",
    "org.freedesktop.DBus",
    "RequestName",
    "su",
    "org.vmd.vmd1",
    "0",
];

#[test]
fn bus_policy_lets_root_own_and_everyone_call() {
    let bus = private_bus();
    if !is_root() {
        eprintln!("skipped the policy checks: they compare root with another user (needs root)");
        return;
    }
    // Root may own org.vmd.vmd1 (1 = DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER).
    let output = busctl_call(&bus, false, REQUEST_NAME);
    assert!(output.status.success(), "root: {}", describe(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "u 1");

    // Nobody else may.
    let output = busctl_call(&bus, true, REQUEST_NAME);
    assert!(
        !output.status.success(),
        "nobody owned the name: {}",
        describe(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Access denied"),
        "{}",
        describe(&output)
    );

    // Anyone may call any interface of it. Nobody owns the name on this bus, so the call
    // starts activation, which dbus-daemon attempts only after the policy let the call through
    // (and which the activation file's Exec=/bin/false then fails). A denied call would be
    // "Access denied"; a missing or misnamed activation file "not provided by any .service".
    for (interface, method, signature) in [
        ("org.freedesktop.DBus.Peer", "Ping", None),
        ("org.freedesktop.DBus.Introspectable", "Introspect", None),
        (
            "org.freedesktop.DBus.Properties",
            "GetAll",
            Some(["s", "org.vmd.vmd1.Manager"]),
        ),
        ("org.vmd.vmd1.Manager", "ListVMs", None),
    ] {
        let mut args = vec!["org.vmd.vmd1", "/org/vmd/vmd1", interface, method];
        args.extend(signature.iter().flatten());
        let output = busctl_call(&bus, true, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("exited with status"),
            "{interface}.{method} as nobody should reach activation: {}",
            describe(&output)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The Debian package

/// (path in the package, mode, where its content comes from)
fn expected_files() -> Vec<(&'static str, u32, PathBuf)> {
    vec![
        ("usr/sbin/vmd", 0o755, PathBuf::from(VMD)),
        ("usr/bin/vmctl", 0o755, PathBuf::from(VMCTL)),
        (
            "lib/systemd/system/vmd.service",
            0o644,
            repo_file("systemd/vmd.service"),
        ),
        (
            "lib/systemd/system/vmd.socket",
            0o644,
            repo_file("systemd/vmd.socket"),
        ),
        (
            "usr/lib/sysusers.d/vmd.conf",
            0o644,
            repo_file("systemd/sysusers.d/vmd.conf"),
        ),
        (
            "usr/lib/tmpfiles.d/vmd.conf",
            0o644,
            repo_file("systemd/tmpfiles.d/vmd.conf"),
        ),
        (
            "usr/share/dbus-1/system-services/org.vmd.vmd1.service",
            0o644,
            repo_file("dbus/org.vmd.vmd1.service"),
        ),
        (
            "usr/share/dbus-1/system.d/org.vmd.vmd1.conf",
            0o644,
            repo_file("dbus/org.vmd.vmd1.conf"),
        ),
        (
            "usr/share/dbus-1/interfaces/org.vmd.vmd1.xml",
            0o644,
            repo_file("dbus/org.vmd.vmd1.xml"),
        ),
        (
            "usr/share/polkit-1/actions/org.vmd.vmd1.policy",
            0o644,
            repo_file("dbus/org.vmd.vmd1.policy"),
        ),
        (
            "usr/share/doc/vmd/README",
            0o644,
            repo_file("packaging/doc/README"),
        ),
        (
            "usr/share/doc/vmd/examples/web.toml",
            0o644,
            repo_file("packaging/examples/web.toml"),
        ),
        (
            "usr/share/doc/vmd/examples/lan.toml",
            0o644,
            repo_file("packaging/examples/lan.toml"),
        ),
        (
            "usr/share/doc/vmd/examples/50-vmd.rules",
            0o644,
            repo_file("packaging/examples/50-vmd.rules"),
        ),
        (
            "usr/share/bash-completion/completions/vmctl",
            0o644,
            repo_file("completions/vmctl.bash"),
        ),
        (
            "usr/share/zsh/vendor-completions/_vmctl",
            0o644,
            repo_file("completions/_vmctl"),
        ),
        (
            "usr/share/fish/vendor_completions.d/vmctl.fish",
            0o644,
            repo_file("completions/vmctl.fish"),
        ),
    ]
}

/// Files the package may hold besides those above (their content is generated).
const GENERATED_FILES: &[&str] = &[
    "usr/share/doc/vmd/copyright",
    "usr/share/doc/vmd/changelog.gz",
    // man/*, gzipped.
    "usr/share/man/man5/vmd.toml.5.gz",
    "usr/share/man/man8/vmctl.8.gz",
    "usr/share/man/man8/vmd.8.gz",
];

fn mode_of(permissions: &str) -> u32 {
    assert_eq!(permissions.len(), 10, "{permissions}");
    permissions[1..]
        .chars()
        .zip([0o400, 0o200, 0o100, 0o40, 0o20, 0o10, 0o4, 0o2, 0o1])
        .map(|(c, bit)| if c == '-' { 0 } else { bit })
        .sum()
}

#[test]
fn debian_package_holds_every_file() {
    let out = tempfile::tempdir().expect("temporary directory");
    // Takes the binaries `cargo test` built: a nested `cargo build` would wait for the lock
    // this cargo holds.
    let output = run(Command::new(repo_file("packaging/build-deb.sh"))
        .args([
            "--profile",
            "debug",
            "--vmd",
            VMD,
            "--vmctl",
            VMCTL,
            "--out",
        ])
        .arg(out.path()));
    assert!(
        output.status.success(),
        "build-deb.sh: {}",
        describe(&output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let deb = PathBuf::from(stdout.trim());
    assert_eq!(
        deb,
        out.path().join(format!("vmd_{VERSION}_amd64.deb")),
        "build-deb.sh must print the package's path, and only that, on stdout"
    );
    assert!(deb.is_file(), "{} is missing", deb.display());

    // Contents: every expected file and the directories leading to it, nothing else, all
    // root's, with the right modes.
    let output = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    assert!(output.status.success(), "{}", describe(&output));
    let mut listed: BTreeMap<String, (char, u32, String)> = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 6, "unexpected dpkg-deb line: {line}");
        let path = fields[5].trim_start_matches("./").trim_end_matches('/');
        if path.is_empty() {
            continue;
        }
        let kind = fields[0].chars().next().expect("type");
        listed.insert(
            path.to_owned(),
            (kind, mode_of(fields[0]), fields[1].to_owned()),
        );
    }
    let expected = expected_files();
    let mut wanted_dirs = BTreeSet::new();
    for path in expected
        .iter()
        .map(|(p, _, _)| *p)
        .chain(GENERATED_FILES.iter().copied())
    {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            wanted_dirs.insert(dir.to_string_lossy().into_owned());
            parent = dir.parent();
        }
    }
    for (path, mode, _) in &expected {
        let (kind, got, owner) = listed
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is not in the package: {listed:#?}"));
        assert_eq!(*kind, '-', "{path} is not a regular file");
        assert_eq!(*got, *mode, "mode of {path}: {got:o}, not {mode:o}");
        assert_eq!(owner, "root/root", "owner of {path}");
    }
    for dir in &wanted_dirs {
        let (kind, mode, owner) = listed
            .get(dir)
            .unwrap_or_else(|| panic!("directory {dir} is not in the package"));
        assert_eq!((*kind, *mode), ('d', 0o755), "directory {dir}");
        assert_eq!(owner, "root/root", "owner of {dir}");
    }
    let unexpected: Vec<&String> = listed
        .keys()
        .filter(|p| {
            !expected.iter().any(|(e, _, _)| e == p)
                && !GENERATED_FILES.contains(&p.as_str())
                && !wanted_dirs.contains(*p)
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected in the package: {unexpected:?}"
    );

    // The files are the repository's (and the binaries the ones given).
    let tree = out.path().join("tree");
    let output = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree));
    assert!(output.status.success(), "{}", describe(&output));
    for (path, _, source) in &expected {
        let packaged = fs::read(tree.join(path)).expect("extracted file");
        let original = fs::read(source).expect("source file");
        assert!(
            packaged == original,
            "{path} differs from {}",
            source.display()
        );
    }

    // Control fields.
    let field = |name: &str| -> String {
        let output = run(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(name));
        assert!(output.status.success(), "{}", describe(&output));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    assert_eq!(field("Package"), "vmd");
    assert_eq!(field("Version"), VERSION);
    assert_eq!(field("Architecture"), "amd64");
    assert!(!field("Maintainer").is_empty(), "Maintainer is missing");
    let description = field("Description");
    let synopsis = description.lines().next().unwrap_or_default();
    assert!(
        !synopsis.is_empty() && synopsis.len() <= 80,
        "Description synopsis: {synopsis:?}"
    );
    assert!(description.lines().count() > 1, "no long description");
    let depends: Vec<String> = field("Depends")
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or_default().to_owned())
        .collect();
    for package in ["libc6", "systemd", "dbus"] {
        assert!(
            depends.iter().any(|d| d == package),
            "Depends lacks {package}: {depends:?}"
        );
    }
    let output = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(output.status.success(), "{}", describe(&output));
    println!("{}", String::from_utf8_lossy(&output.stdout));

    // Maintainer scripts: present, executable, valid sh, and doing what they must.
    let control = out.path().join("control");
    let output = run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert!(output.status.success(), "{}", describe(&output));
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        let meta = fs::metadata(&path).unwrap_or_else(|e| panic!("{script}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "mode of {script}");
        let output = run(Command::new("sh").arg("-n").arg(&path));
        assert!(output.status.success(), "{script}: {}", describe(&output));
    }
    let postinst = fs::read_to_string(control.join("postinst")).expect("postinst");
    for needle in [
        "systemd-sysusers /usr/lib/sysusers.d/vmd.conf",
        "systemd-tmpfiles --create /usr/lib/tmpfiles.d/vmd.conf",
        "for unit in vmd.socket vmd.service",
        "deb-systemd-helper enable \"$unit\"",
        "deb-systemd-invoke try-restart vmd.service",
        "daemon-reload",
        "ReloadConfig",
        "/run/systemd/system",
    ] {
        assert!(postinst.contains(needle), "postinst lacks {needle:?}");
    }
    // An upgrade must never stop the daemon (systemd would drop its fd store: the VMs'
    // control sockets).
    let prerm = fs::read_to_string(control.join("prerm")).expect("prerm");
    assert!(
        prerm.contains("\"$1\" = remove"),
        "prerm may stop vmd on removal only"
    );
}

#[test]
fn build_script_refuses_bad_arguments() {
    for args in [
        &["--profile", "fast"][..],
        &["--vmd", VMD][..],
        &["--bogus"][..],
    ] {
        let output = run(Command::new(repo_file("packaging/build-deb.sh"))
            .args(args)
            .stdin(Stdio::null()));
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            describe(&output)
        );
        assert!(output.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}

/// A tool the test needs: missing is a failure under CI, a skip (said so) elsewhere.
fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is missing (tests/run-all.sh installs it)"
        );
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// lintian has nothing to say about the package: no error, no warning (packaging/README.md
/// lists what it checks). Built as a release package is (stripped binaries), from the binaries
/// `cargo test` built.
#[test]
fn lintian_accepts_the_package() {
    if !have_tool("lintian") {
        return;
    }
    let out = tempfile::tempdir().expect("temporary directory");
    let output = run(Command::new(repo_file("packaging/build-deb.sh"))
        .args([
            "--profile",
            "release",
            "--vmd",
            VMD,
            "--vmctl",
            VMCTL,
            "--out",
        ])
        .arg(out.path()));
    assert!(
        output.status.success(),
        "build-deb.sh: {}",
        describe(&output)
    );
    let deb = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let output = run(Command::new("lintian")
        .args(["--fail-on", "error,warning", "--no-tag-display-limit"])
        .arg(&deb));
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success()
            && !report
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian: {}",
        describe(&output)
    );
}

/// Each manual page renders without a warning from groff (what lintian's and man's
/// `--warnings` report), and says what it documents.
#[test]
fn manual_pages_render_cleanly() {
    if !have_tool("man") {
        return;
    }
    for (page, needles) in [
        (
            "man/vmctl.8",
            &["vmctl", "console", "--define", "autostart"][..],
        ),
        (
            "man/vmd.8",
            &["vmd daemon", "org.vmd.vmd1.manage", "VM_CONSOLE=1"][..],
        ),
        (
            "man/vmd.toml.5",
            &["memory-bytes", "[[disk]]", "/etc/vmd/switches"][..],
        ),
    ] {
        let output = run(Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(repo_file(page))
            .env("MANWIDTH", "80")
            .env("PAGER", "cat"));
        assert!(output.status.success(), "{page}: {}", describe(&output));
        assert!(
            output.stderr.is_empty(),
            "{page} renders with warnings: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Bold and underline come as overstrikes ("v\x08v"): keep the last of each pair.
        let mut text = String::new();
        for c in String::from_utf8_lossy(&output.stdout).chars() {
            match c {
                '\u{8}' => {
                    text.pop();
                }
                '\u{2010}' | '\u{2212}' => text.push('-'),
                c => text.push(c),
            }
        }
        for needle in needles {
            assert!(text.contains(needle), "{page} lacks {needle:?}:\n{text}");
        }
    }
}

/// The shell completions load in their shells, and bash's completes VM names from
/// `vmctl status` (here a stand-in vmctl printing a table) and commands.
#[test]
fn shell_completions_load_and_complete_vm_names() {
    for (shell, file) in [
        ("zsh", "completions/_vmctl"),
        ("fish", "completions/vmctl.fish"),
    ] {
        if !have_tool(shell) {
            continue;
        }
        let output = run(Command::new(shell).arg("-n").arg(repo_file(file)));
        assert!(output.status.success(), "{file}: {}", describe(&output));
    }
    let bash_completion = Path::new("/usr/share/bash-completion/bash_completion");
    if !bash_completion.exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "bash-completion is missing (tests/run-all.sh installs it)"
        );
        eprintln!("SKIPPED: bash-completion is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let fake = dir.path().join("vmctl");
    fs::write(
        &fake,
        "#!/bin/sh\n\
         echo '   ID   PID VCPUS  MAXMEM  CURMEM     TTY        OWNER    STATE NAME    REASON'\n\
         echo '    1     -     1    512M       -       -         root  stopped web     -'\n\
         echo '    2     -     1    512M       -       -         root   failed db.prod no kernel'\n",
    )
    .expect("write");
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).expect("chmod");
    let complete = |line: &str| -> String {
        let script = format!(
            ". {} && . {} && COMP_WORDS=({line}) && COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)) && \
             COMP_LINE='{line}' && COMP_POINT=${{#COMP_LINE}} && _vmctl && echo \"${{COMPREPLY[*]}}\"",
            bash_completion.display(),
            repo_file("completions/vmctl.bash").display()
        );
        let output = run(Command::new("bash")
            .arg("-c")
            .arg(script)
            .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display())));
        assert!(output.status.success(), "{line}: {}", describe(&output));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    assert_eq!(complete("vmctl console ''"), "web db.prod");
    assert_eq!(complete("vmctl stop d"), "db.prod");
    assert_eq!(complete("vmctl autostart web ''"), "on off");
    assert_eq!(complete("vmctl rel"), "reload");
}
