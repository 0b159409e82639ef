//! Self test of the systemd box harness (`tests/systemd_box/`): a box boots a private systemd
//! with its own system bus, runs units, scopes, machined and users, and leaves the host as it
//! found it: no files, cgroups or processes, also when the test process is killed. Every test
//! skips, saying why, on hosts where boxes cannot run (`SystemdBox::supported`).

mod systemd_box;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use systemd_box::{BoxOptions, ExecOptions, SystemdBox};

/// The seeded unit the first test starts.
const HELLO_UNIT: &str = "\
[Unit]
Description=vmd-box self test
[Service]
Type=oneshot
ExecStart=/bin/echo hello-from-box
";

/// Set for the child process of `a_killed_test_process_takes_its_box_along`.
const HOLDER_ENV: &str = "VMD_BOX_SELFTEST_HOLDER";

fn supported() -> bool {
    match SystemdBox::supported() {
        Ok(()) => true,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            false
        }
    }
}

#[test]
fn a_box_boots_works_and_leaves_the_host_as_it_was() {
    if !supported() {
        return;
    }
    // The host's /tmp must survive the box's tmpfiles purge.
    let sentinel = Path::new("/tmp").join(format!("vmdbox-sentinel-{}", std::process::id()));
    fs::write(&sentinel, "keep").unwrap();
    let before = HostState::now();
    // tempfile makes 0700 directories: the box's / must not become 0700 through the seed.
    let seed = tempfile::tempdir().unwrap();
    let units = seed.path().join("etc/systemd/system");
    fs::create_dir_all(&units).unwrap();
    fs::write(units.join("vmd-box-hello.service"), HELLO_UNIT).unwrap();
    let shared = tempfile::tempdir().unwrap();

    let started = Instant::now();
    let sb = SystemdBox::boot(BoxOptions {
        seed: vec![seed.path().to_owned()],
        binds: vec![(shared.path().to_owned(), "/mnt/shared".into())],
        mask: vec![],
    })
    .expect("boot");
    eprintln!("booted {} in {:?}", sb.name(), started.elapsed());

    // Booted, nothing failed, and the box is what it should be.
    let state = text(&sb.exec(&["systemctl", "is-system-running"]).stdout);
    assert!(
        matches!(state.trim(), "running" | "degraded"),
        "state {state}"
    );
    let failed = sb.exec_ok(&["systemctl", "--failed", "--no-legend", "--plain"]);
    assert_eq!(failed.trim(), "", "failed units");
    assert_eq!(sb.exec_ok(&["stat", "-c", "%a %U", "/"]).trim(), "755 root");
    assert_eq!(sb.exec_ok(&["hostname"]).trim(), "vmd-box");
    assert_eq!(
        sb.exec_ok(&["systemd-detect-virt"]).trim(),
        "container-other"
    );
    for read_only in ["/sys", "/proc/sys"] {
        let options = sb.exec_ok(&["findmnt", "-no", "OPTIONS", read_only]);
        assert!(options.starts_with("ro,"), "{read_only}: {options}");
    }
    // Its own device nodes (not the host's inodes), its own network (only lo).
    let host_null = fs::metadata("/dev/null").unwrap().ino().to_string();
    assert_ne!(
        sb.exec_ok(&["stat", "-c", "%i", "/dev/null"]).trim(),
        host_null
    );
    let interfaces = sb.exec_ok(&["cat", "/proc/net/dev"]);
    let interfaces: Vec<&str> = interfaces.lines().skip(2).collect();
    assert!(
        interfaces.len() == 1 && interfaces[0].trim_start().starts_with("lo:"),
        "{interfaces:?}"
    );

    // A seeded unit runs, and its output is in the box's journal.
    sb.exec_ok(&["systemctl", "start", "vmd-box-hello.service"]);
    let hello = [
        "journalctl",
        "-u",
        "vmd-box-hello.service",
        "-o",
        "cat",
        "--no-pager",
    ];
    wait_for("the unit's output in the journal", || {
        sb.exec_ok(&hello).contains("hello-from-box")
    });

    // The system bus, inside and from the host (which talks to the box's systemd).
    let names = sb.exec_ok(&["busctl", "--system", "list", "--no-pager"]);
    for name in [
        "org.freedesktop.DBus",
        "org.freedesktop.systemd1",
        "org.freedesktop.login1",
    ] {
        assert!(names.contains(name), "{name} missing from\n{names}");
    }
    let from_host = Command::new("busctl")
        .arg(format!("--address={}", sb.bus_address()))
        .args([
            "get-property",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
        ])
        .args(["org.freedesktop.systemd1.Manager", "ControlGroup"])
        .output()
        .unwrap();
    let root_cgroup = text(&from_host.stdout);
    assert!(
        root_cgroup.contains(&format!("\"/{}\"", sb.name())),
        "the box's manager from the host: {root_cgroup} {}",
        text(&from_host.stderr)
    );

    // Transient scopes: by hand, and the harness's own.
    sb.exec_ok(&[
        "systemd-run",
        "--quiet",
        "--scope",
        "--unit=vmd-box-selftest.scope",
        "true",
    ]);
    let own_cgroup = |scope| {
        let options = ExecOptions {
            argv: &["cat", "/proc/self/cgroup"],
            scope,
            ..Default::default()
        };
        let cgroups = text(&sb.exec_with(options).stdout);
        let line = cgroups.lines().find(|line| line.contains(":name=systemd:"));
        line.unwrap_or_default().to_owned()
    };
    let in_scope = own_cgroup(true);
    assert!(
        in_scope.contains(&format!(":/{}/system.slice/", sb.name()))
            && in_scope.ends_with(".scope"),
        "{in_scope}"
    );
    assert!(
        !own_cgroup(false).contains(sb.name()),
        "without a scope, the host's cgroups"
    );

    // systemd-machined, where the host has it installed.
    if Path::new("/usr/lib/systemd/systemd-machined").exists() {
        sb.exec_ok(&["systemctl", "start", "systemd-machined.service"]);
        sb.exec_ok(&["machinectl", "list", "--no-pager"]);
    } else {
        eprintln!("machined not checked: systemd-machined is not installed (systemd-container)");
    }

    // A user made in the box exists in the box only.
    sb.exec_ok(&["useradd", "-m", "vmdtester"]);
    let as_tester = |scope| {
        let argv = &[
            "sh",
            "-c",
            "id -un; echo $HOME; grep -c name=systemd:/.*scope /proc/self/cgroup",
        ];
        let options = ExecOptions {
            argv,
            user: Some("vmdtester"),
            scope,
            ..Default::default()
        };
        text(&sb.exec_with(options).stdout)
    };
    assert_eq!(as_tester(false), "vmdtester\n/home/vmdtester\n0\n");
    assert_eq!(as_tester(true), "vmdtester\n/home/vmdtester\n1\n");

    // A clean environment plus ours, a working directory, stdin.
    let output = sb.exec_with(ExecOptions {
        argv: &["sh", "-c", "pwd; echo $GREETING; cat; env | grep -c CARGO"],
        env: &[("GREETING", "hi")],
        cwd: Some("/etc"),
        stdin: Some(b"from-stdin\n"),
        ..Default::default()
    });
    assert_eq!(text(&output.stdout), "/etc\nhi\nfrom-stdin\n0\n");

    // Files: through host_path (into the overlay, not the host) and through a bind.
    fs::write(sb.host_path("/etc/vmd-box-probe"), "via-host-path").unwrap();
    assert_eq!(sb.exec_ok(&["cat", "/etc/vmd-box-probe"]), "via-host-path");
    assert!(!Path::new("/etc/vmd-box-probe").exists());
    assert_eq!(
        fs::read_to_string(sb.host_path("/etc/hostname")).unwrap(),
        "vmd-box\n"
    );
    sb.exec_ok(&["sh", "-c", "echo from-box > /mnt/shared/out"]);
    assert_eq!(
        fs::read_to_string(shared.path().join("out")).unwrap(),
        "from-box\n"
    );

    // Spawned commands: signals reach the command, kill kills it, and one left running does
    // not hold up the poweroff.
    let watcher = "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done";
    let mut child = sb.spawn(&["sh", "-c", watcher]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    child.signal(Signal::SIGTERM).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got-term");
    assert_eq!(child.wait().unwrap().code(), Some(3));
    let mut child = sb.spawn(&["sleep", "1001"]);
    wait_for("the spawned command", || {
        sb.exec(&["pgrep", "-xf", "sleep 1001"]).status.success()
    });
    assert_eq!(child.kill().unwrap().signal(), Some(libc::SIGKILL));
    assert!(!sb.exec(&["pgrep", "-xf", "sleep 1001"]).status.success());
    let _left_running = sb.spawn(&["sleep", "1003"]);

    // Something left running outside the box's cgroups must die with the box too.
    sb.exec_ok(&["sh", "-c", "sleep 1002 >/dev/null 2>&1 &"]);
    let journal = sb.journal();
    assert!(journal.contains("hello-from-box"), "{journal}");

    let name = sb.name().to_owned();
    let state_dir = sb.state_dir().to_owned();
    let members = pid_namespace_members(sb.pid());
    assert!(
        members.len() >= 7,
        "systemd, journald, dbus, logind, machined, 2 sleeps: {members:?}"
    );
    let stopping = Instant::now();
    sb.stop().expect("clean stop");
    eprintln!("stopped {name} in {:?}", stopping.elapsed());

    let alive: Vec<_> = members.iter().filter(|process| process.alive()).collect();
    assert!(alive.is_empty(), "processes of the box left: {alive:?}");
    assert_eq!(box_cgroups(&name), Vec::<PathBuf>::new());
    assert_eq!(processes_in_cgroup(&name), Vec::<u32>::new());
    assert!(!state_dir.exists(), "{}", state_dir.display());
    assert_eq!(HostState::now(), before);
    assert_eq!(fs::read_to_string(&sentinel).unwrap(), "keep");
    fs::remove_file(&sentinel).unwrap();
}

#[test]
fn two_boxes_run_side_by_side() {
    if !supported() {
        return;
    }
    let started = Instant::now();
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(|| SystemdBox::boot(BoxOptions::default()));
        let b = s.spawn(|| SystemdBox::boot(BoxOptions::default()));
        (
            a.join().unwrap().expect("boot a"),
            b.join().unwrap().expect("boot b"),
        )
    });
    eprintln!(
        "booted {} and {} in {:?}",
        a.name(),
        b.name(),
        started.elapsed()
    );

    for sb in [&a, &b] {
        sb.exec_ok(&[
            "systemd-run",
            "--quiet",
            "--scope",
            "-p",
            "MemoryMax=10M",
            "true",
        ]);
        let cgroup = sb.exec_ok(&["systemctl", "show", "-P", "ControlGroup", "dbus.service"]);
        assert_eq!(
            cgroup.trim(),
            format!("/{}/system.slice/dbus.service", sb.name())
        );
    }
    assert_ne!(
        a.exec_ok(&["cat", "/etc/machine-id"]),
        b.exec_ok(&["cat", "/etc/machine-id"])
    );
    // A unit of one box does not exist in the other.
    a.exec_ok(&[
        "systemd-run",
        "--quiet",
        "--unit=only-in-a",
        "sleep",
        "1000",
    ]);
    assert_eq!(
        a.exec_ok(&["systemctl", "is-active", "only-in-a"]).trim(),
        "active"
    );
    assert_ne!(
        text(&b.exec(&["systemctl", "is-active", "only-in-a"]).stdout).trim(),
        "active"
    );

    let names = [a.name().to_owned(), b.name().to_owned()];
    let stopping = Instant::now();
    thread::scope(|s| {
        let a = s.spawn(|| a.stop());
        let b = s.spawn(|| b.stop());
        a.join().unwrap().expect("stop a");
        b.join().unwrap().expect("stop b");
    });
    eprintln!("stopped both in {:?}", stopping.elapsed());
    for name in names {
        assert_eq!(box_cgroups(&name), Vec::<PathBuf>::new());
    }
}

#[test]
fn a_killed_test_process_takes_its_box_along() {
    if !supported() {
        return;
    }
    // A child test process boots a box and reports it, then is killed with SIGKILL: no Drop,
    // no cleanup code of ours runs.
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "box_holder",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut report = String::new();
    for line in BufReader::new(holder.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("holding ") {
            report = line;
            break;
        }
    }
    let fields: Vec<&str> = report.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "holder's report: {report:?}");
    let (pid1, name) = (fields[1].parse().unwrap(), fields[2]);
    let members = pid_namespace_members(pid1);
    assert!(!members.is_empty());

    holder.kill().unwrap();
    holder.wait().unwrap();
    wait_for("the orphaned box to die", || {
        members.iter().all(|process| !process.alive())
    });
    // Its empty cgroups and state directory stay until someone sweeps.
    systemd_box::sweep_stale();
    assert_eq!(box_cgroups(name), Vec::<PathBuf>::new());
    assert!(!std::env::temp_dir().join(name).exists());
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    if !supported() {
        return;
    }
    let mut name = String::new();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let sb = SystemdBox::boot(BoxOptions::default()).expect("boot");
        name = sb.name().to_owned();
        sb.exec_ok(&["false"]);
    }));
    assert!(panicked.is_err());
    assert!(!name.is_empty());
    assert_eq!(box_cgroups(&name), Vec::<PathBuf>::new());
    assert_eq!(processes_in_cgroup(&name), Vec::<u32>::new());
    assert!(!std::env::temp_dir().join(&name).exists());
}

/// Boots a box, reports it on stdout and waits to be killed: the child process of
/// `a_killed_test_process_takes_its_box_along`.
#[test]
#[ignore = "a helper process of a_killed_test_process_takes_its_box_along"]
fn box_holder() {
    if std::env::var_os(HOLDER_ENV).is_none() {
        return;
    }
    let sb = SystemdBox::boot(BoxOptions::default()).expect("boot");
    // After a newline: libtest has printed "test box_holder ... " without one.
    println!("\nholding {} {}", sb.pid(), sb.name());
    std::io::stdout().flush().unwrap();
    thread::sleep(Duration::from_secs(60));
    panic!("the holder was not killed");
}

/// What a box must leave exactly as it was on the host.
#[derive(Debug, PartialEq)]
struct HostState {
    /// Mode, owner, group and device number of /dev/null, /dev/kvm and /dev/net/tun.
    nodes: Vec<Option<(u32, u32, u32, u64)>>,
    passwd: String,
    group: String,
    /// /proc/cgroups without the (changing) numbers of cgroups.
    controllers: Vec<String>,
    /// Directories that a box writes to in its overlay.
    listings: Vec<Vec<String>>,
}

impl HostState {
    fn now() -> HostState {
        let node = |path: &str| {
            let metadata = fs::metadata(path).ok()?;
            Some((
                metadata.mode(),
                metadata.uid(),
                metadata.gid(),
                metadata.rdev(),
            ))
        };
        let listing = |dir: &str| {
            let mut names: Vec<String> = fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            names
        };
        let controllers = fs::read_to_string("/proc/cgroups").unwrap();
        HostState {
            nodes: vec![node("/dev/null"), node("/dev/kvm"), node("/dev/net/tun")],
            passwd: fs::read_to_string("/etc/passwd").unwrap(),
            group: fs::read_to_string("/etc/group").unwrap(),
            controllers: controllers
                .lines()
                .map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    format!("{} {} {}", fields[0], fields[1], fields.last().unwrap())
                })
                .collect(),
            listings: [
                "/etc/systemd/system",
                "/etc/dbus-1/system.d",
                "/home",
                "/var/log/journal",
            ]
            .into_iter()
            .map(listing)
            .collect(),
        }
    }
}

/// A process, by pid and start time (which tells a reused pid apart).
#[derive(Debug)]
struct Process {
    pid: u32,
    start: String,
}

impl Process {
    fn alive(&self) -> bool {
        start_time(self.pid).is_some_and(|start| start == self.start)
    }
}

fn start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // A zombie ("Z") counts as gone. The start time is field 22, the 20th after "(comm)".
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19).map(|start| start.to_string())
}

/// The processes in the PID namespace of `pid`.
fn pid_namespace_members(pid: u32) -> Vec<Process> {
    let namespace = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let target = namespace(&pid.to_string()).expect("the box's PID 1");
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| namespace(&pid.to_string()).as_ref() == Some(&target))
        .filter_map(|pid| {
            Some(Process {
                pid,
                start: start_time(pid)?,
            })
        })
        .collect()
}

/// Host processes whose name=systemd cgroup is in the box's subtree.
fn processes_in_cgroup(name: &str) -> Vec<u32> {
    let subtree = format!(":name=systemd:/{name}");
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|cgroups| {
                cgroups
                    .lines()
                    .any(|line| line.ends_with(&subtree) || line.contains(&format!("{subtree}/")))
            })
        })
        .collect()
}

/// The box's cgroup directories that still exist on the host.
fn box_cgroups(name: &str) -> Vec<PathBuf> {
    fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|hierarchy| hierarchy.path().join(name))
        .filter(|dir| dir.exists())
        .collect()
}

/// Polls `condition` for up to 5 s.
fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
