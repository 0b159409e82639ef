//! The vmd daemon end to end, inside a private systemd (PID 1 of its own namespaces, with its
//! own system bus, journald and machined) booted by `tests/systemd_box`. The package built by
//! `packaging/build-deb.sh` is installed there with dpkg, the daemon is started by bus or socket
//! activation, and real clients drive it: busctl, gdbus, systemctl, machinectl, journalctl and
//! vmctl. The VMs run the project's test guest.

mod common;
#[path = "systemd_box/mod.rs"]
mod systemd_box;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Lines;
use systemd_box::{BoxOptions, ExecOptions, SystemdBox};

const GUEST: &str = "/var/lib/vmd-test/testguest.elf";
const DEB: &str = "/var/cache/vmd-test/vmd.deb";
const MANAGER: &str = "/org/vmd/vmd1";
/// A config naming a file only root may read as the kernel.
const SHADOW_AS_KERNEL: &[&str] = &[
    "busctl",
    "call",
    "org.vmd.vmd1",
    MANAGER,
    "org.vmd.vmd1.Manager",
    "CreateVM",
    "sa{sv}",
    "shadow",
    "1",
    "Kernel",
    "s",
    "/etc/shadow",
];
const LIMIT: Duration = Duration::from_secs(30);

/// Builds the package once per test binary, from the binaries cargo built for this test.
fn package() -> &'static PathBuf {
    static DEB_PATH: OnceLock<PathBuf> = OnceLock::new();
    DEB_PATH.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("daemon-test-deb");
        let _ = std::fs::remove_dir_all(&out);
        systemd_box::vmd::build_package(
            Path::new(env!("CARGO_BIN_EXE_vmd")),
            Path::new(env!("CARGO_BIN_EXE_vmctl")),
            &out,
        )
        .expect("build the package")
    })
}

/// A booted box with vmd installed from the package (not started: the first call activates it).
struct Vmd {
    systemd: SystemdBox,
    _seed: tempfile::TempDir,
    /// A host directory bound into the box, kept as long as the box.
    _bound: Option<tempfile::TempDir>,
}

impl Vmd {
    /// `None` (after saying why) where this host cannot boot a private systemd.
    fn boot() -> Option<Vmd> {
        Vmd::boot_with_images_on_disk(false)
    }

    /// As [`Vmd::boot`]; with `on_disk`, IMAGES is a directory of the host's disk rather than
    /// of the box's tmpfs overlay: a tmpfs page a guest writes is charged to its scope's memory
    /// limit and never reclaimed, so a guest writing fast for long would be OOM-killed there.
    fn boot_with_images_on_disk(on_disk: bool) -> Option<Vmd> {
        if let Err(reason) = SystemdBox::supported() {
            eprintln!("SKIPPED: cannot boot a private systemd here: {reason}");
            return None;
        }
        let seed = systemd_box::vmd::seed_with(&[
            (package(), DEB),
            (Path::new(env!("VMD_TESTGUEST_ELF")), GUEST),
        ])
        .expect("seed dir");
        let bound = on_disk.then(|| {
            tempfile::Builder::new()
                .prefix("vmd-images-")
                .tempdir_in("/var/tmp")
                .expect("images dir on disk")
        });
        let binds = bound
            .iter()
            .map(|dir| (dir.path().to_path_buf(), PathBuf::from(IMAGES)))
            .collect();
        let systemd = SystemdBox::boot(BoxOptions {
            seed: vec![seed.path().to_path_buf()],
            binds,
            ..Default::default()
        })
        .expect("boot the private systemd");
        let vmd = Vmd {
            systemd,
            _seed: seed,
            _bound: bound,
        };
        vmd.ok(&["dpkg", "-i", DEB]);
        Some(vmd)
    }

    /// Runs a command in the box, bounded: a hang is a failure with the journal, not a stuck test.
    fn run(&self, argv: &[&str]) -> Output {
        let mut bounded = vec!["timeout", "120"];
        bounded.extend(argv);
        self.systemd.exec(&bounded)
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, argv: &[&str]) -> String {
        let output = self.run(argv);
        assert!(
            output.status.success(),
            "{argv:?} failed ({}):\nstdout: {}\nstderr: {}\njournal:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.journal_tail()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, argv: &[&str]) -> String {
        let output = self.run(argv);
        assert!(!output.status.success(), "{argv:?} unexpectedly succeeded");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// Waits until `journalctl ARGS` shows `needle` (journald may lag behind under load).
    fn wait_journal(&self, args: &[&str], needle: &str) {
        let start = Instant::now();
        let mut argv = vec!["journalctl", "--no-pager"];
        argv.extend(args);
        loop {
            let journal = self.ok(&argv);
            if journal.contains(needle) {
                return;
            }
            assert!(
                start.elapsed() < LIMIT,
                "journalctl {args:?} never showed {needle:?}:\n{journal}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn journal_tail(&self) -> String {
        let journal = self.systemd.journal();
        let lines: Vec<&str> = journal.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// A connection from this test process to the box's bus (as root), once the daemon runs
    /// there, with the runtime that drives it.
    fn connect(&self) -> (tokio::runtime::Runtime, zbus::Connection) {
        self.ok(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            "ListVMs",
        ]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let bus = runtime
            .block_on(
                zbus::connection::Builder::address(self.systemd.bus_address().as_str()).build(),
            )
            .expect("connect to the box's bus");
        (runtime, bus)
    }

    fn vm_path(name: &str) -> String {
        format!("{MANAGER}/vm/{}", bus_label_escape(name))
    }

    /// CreateVM over busctl with the test guest running `scenario`.
    fn create(&self, name: &str, scenario: &str, extra: &[&str]) -> String {
        let cmdline = format!("testguest={scenario}");
        // "--": names such as "-bad" are arguments, not options.
        let mut argv = vec![
            "busctl",
            "--",
            "call",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            "CreateVM",
            "sa{sv}",
            name,
        ];
        let count = (3 + extra.len() / 3).to_string();
        argv.push(&count);
        argv.extend([
            "Kernel",
            "s",
            GUEST,
            "Cmdline",
            "s",
            &cmdline,
            "MemoryBytes",
            "t",
            "67108864",
        ]);
        argv.extend(extra);
        self.ok(&argv)
    }

    fn call(&self, name: &str, method: &str) -> String {
        self.ok(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            &Self::vm_path(name),
            "org.vmd.vmd1.VM",
            method,
        ])
    }

    /// A property's value as busctl prints it, without the type ("s \"running\"" → "running").
    fn property(&self, name: &str, property: &str) -> String {
        let out = self.ok(&[
            "busctl",
            "get-property",
            "org.vmd.vmd1",
            &Self::vm_path(name),
            "org.vmd.vmd1.VM",
            property,
        ]);
        let value = out.trim().split_once(' ').map_or("", |(_, v)| v);
        value.trim_matches('"').to_string()
    }

    /// Waits until the VM's State is `state`; returns how long that took.
    fn wait_state(&self, name: &str, state: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.property(name, "State") == state {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "VM {name} did not become {state} within {limit:?} (it is {}; FailureReason {:?})\n{}",
                self.property(name, "State"),
                self.property(name, "FailureReason"),
                self.journal_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// systemd's bus label escaping, as the daemon uses for object paths.
fn bus_label_escape(name: &str) -> String {
    name.bytes()
        .enumerate()
        .map(|(i, b)| {
            if b.is_ascii_alphabetic() || (b.is_ascii_digit() && i > 0) {
                (b as char).to_string()
            } else {
                format!("_{b:02x}")
            }
        })
        .collect()
}

#[test]
fn a_vm_through_its_whole_life_with_busctl_gdbus_systemctl_machinectl_and_journalctl() {
    let Some(vmd) = Vmd::boot() else { return };
    // The first call starts vmd.service through bus activation.
    assert!(
        !vmd.run(&["systemctl", "is-active", "vmd.service"])
            .status
            .success()
    );
    let listed = vmd.ok(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "ListVMs",
    ]);
    assert_eq!(listed.trim(), "a(sso) 0");
    assert_eq!(
        vmd.ok(&["systemctl", "is-active", "vmd.service"]).trim(),
        "active"
    );

    // A third client watches the signals from now on.
    let mut monitor =
        vmd.systemd
            .spawn(&["gdbus", "monitor", "--system", "--dest", "org.vmd.vmd1"]);
    let monitor_lines = Lines::collect(monitor.stdout.take().expect("monitor stdout"));
    monitor_lines.wait_for("is owned by", LIMIT);

    let created = vmd.create("web-1", "spin", &["VCPUs", "u", "2"]);
    assert_eq!(created.trim(), "o \"/org/vmd/vmd1/vm/web_2d1\"");
    assert!(
        vmd.ok(&["systemctl", "show", "-P", "StatusText", "vmd.service"])
            .contains("1 VMs defined")
    );
    assert_eq!(vmd.property("web-1", "State"), "defined");

    vmd.call("web-1", "Start");
    assert_eq!(vmd.property("web-1", "State"), "running");
    assert_eq!(vmd.property("web-1", "Unit"), "vmd-web-1.scope");
    assert_eq!(vmd.property("web-1", "VCPUs"), "2");
    let leader = vmd.property("web-1", "LeaderPID");
    // gdbus, a second client implementation, sees the same.
    let gdbus = vmd.ok(&[
        "gdbus",
        "call",
        "--system",
        "--dest",
        "org.vmd.vmd1",
        "--object-path",
        "/org/vmd/vmd1/vm/web_2d1",
        "--method",
        "org.freedesktop.DBus.Properties.Get",
        "org.vmd.vmd1.VM",
        "State",
    ]);
    assert_eq!(gdbus.trim(), "(<'running'>,)");
    let listed = vmd.ok(&[
        "gdbus",
        "call",
        "--system",
        "--dest",
        "org.vmd.vmd1",
        "--object-path",
        MANAGER,
        "--method",
        "org.vmd.vmd1.Manager.ListVMs",
    ]);
    assert!(
        listed.contains("('web-1', 'running', objectpath '/org/vmd/vmd1/vm/web_2d1')"),
        "{listed}"
    );

    // systemd knows the scope and its process; the helper is the leader.
    let status = vmd.ok(&["systemctl", "status", "--no-pager", "vmd-web-1.scope"]);
    assert!(
        status.contains("active (running)") && status.contains("machine.slice"),
        "{status}"
    );
    // The limits README documents: guest memory + 128 MiB, vCPUs + 16 tasks.
    assert_eq!(
        vmd.ok(&["systemctl", "show", "-P", "MemoryMax", "vmd-web-1.scope"])
            .trim(),
        ((64u64 << 20) + (128 << 20)).to_string()
    );
    assert_eq!(
        vmd.ok(&["systemctl", "show", "-P", "TasksMax", "vmd-web-1.scope"])
            .trim(),
        "18"
    );
    // Under CPU control (the default weight), so that busy guests share the CPU as one slice.
    assert_eq!(
        vmd.ok(&["systemctl", "show", "-P", "CPUWeight", "vmd-web-1.scope"])
            .trim(),
        "100"
    );
    let pids = vmd.ok(&["systemctl", "show", "-P", "ControlGroup", "vmd-web-1.scope"]);
    let procs = vmd.ok(&[
        "cat",
        &format!("/sys/fs/cgroup/unified{}/cgroup.procs", pids.trim()),
    ]);
    assert!(
        procs.lines().any(|p| p.trim() == leader),
        "leader {leader} not in the scope: {procs}"
    );
    // machined has it; the journal has the helper's lines, tagged with the VM's name.
    let machines = vmd.ok(&["machinectl", "list", "--no-legend"]);
    assert!(
        machines.contains("web-1") && machines.contains("vm") && machines.contains("vmd"),
        "{machines}"
    );
    vmd.wait_journal(&["-u", "vmd-web-1.scope"], "VM web-1 created");
    vmd.wait_journal(&["VM_NAME=web-1"], "created: 2 vCPUs");

    vmd.call("web-1", "Pause");
    assert_eq!(vmd.property("web-1", "State"), "paused");
    vmd.call("web-1", "Resume");
    assert_eq!(vmd.property("web-1", "State"), "running");

    // systemctl stop: SIGTERM → power button → the guest powers off → stopped, within a second.
    vmd.ok(&["systemctl", "stop", "vmd-web-1.scope"]);
    assert!(vmd.wait_state("web-1", "stopped", LIMIT) < Duration::from_secs(1));
    assert_eq!(vmd.property("web-1", "LeaderPID"), "0");
    assert_eq!(vmd.property("web-1", "FailureReason"), "");

    // systemctl kill -s KILL: a failure, with the reason.
    vmd.call("web-1", "Start");
    vmd.ok(&["systemctl", "kill", "-s", "KILL", "vmd-web-1.scope"]);
    assert!(vmd.wait_state("web-1", "failed", LIMIT) < Duration::from_secs(1));
    assert!(
        vmd.property("web-1", "FailureReason")
            .contains("signal SIGKILL")
    );

    // machinectl terminate stops it too.
    vmd.call("web-1", "Start");
    vmd.ok(&["machinectl", "terminate", "web-1"]);
    vmd.wait_state("web-1", "stopped", LIMIT);

    // Shutdown over D-Bus.
    vmd.call("web-1", "Start");
    vmd.call("web-1", "Shutdown");
    vmd.wait_state("web-1", "stopped", LIMIT);

    // Signals seen by a third client: added, and state changes.
    let seen = monitor_lines.wait_for("'State': <'stopped'>", LIMIT);
    assert!(!seen.is_empty());
    monitor_lines.wait_for(
        "VMAdded ('web-1', objectpath '/org/vmd/vmd1/vm/web_2d1')",
        LIMIT,
    );
    monitor_lines.wait_for("'State': <'running'>", LIMIT);
    monitor_lines.wait_for("'State': <'paused'>", LIMIT);

    vmd.call("web-1", "Remove");
    vmd.fails(&[
        "busctl",
        "get-property",
        "org.vmd.vmd1",
        "/org/vmd/vmd1/vm/web_2d1",
        "org.vmd.vmd1.VM",
        "State",
    ]);
    monitor_lines.wait_for("VMRemoved ('web-1'", LIMIT);
    let _ = monitor.kill();
}

#[test]
fn reboots_restart_the_vm_and_crashes_fail_it() {
    let Some(vmd) = Vmd::boot() else { return };
    // A guest that reboots at once: restarted in a fresh helper, until it does so too often.
    vmd.create("bouncy", "reboot", &[]);
    vmd.call("bouncy", "Start");
    vmd.wait_state("bouncy", "stopped", LIMIT);
    assert_eq!(vmd.property("bouncy", "Restarts"), "3");
    // One console across all those helpers: it holds the output of every boot.
    let console = vmd.ok(&["vmctl", "console", "bouncy"]);
    assert_eq!(
        console.matches("testguest: rebooting").count(),
        4,
        "the console did not survive the reboots:\n{console}"
    );
    assert!(
        vmd.property("bouncy", "FailureReason")
            .contains("rebooted more than 3 times")
    );

    // The guest crashes after it started: Start succeeds, then the VM fails with the reason.
    vmd.create("crashy", "crash", &[]);
    vmd.call("crashy", "Start");
    vmd.wait_state("crashy", "failed", LIMIT);
    let reason = vmd.property("crashy", "FailureReason");
    assert!(
        reason.contains("triple-faulted") || reason.contains("KVM_EXIT_INTERNAL_ERROR"),
        "{reason}"
    );

    // A guest that powers off by itself ends as stopped.
    vmd.create("hello", "hello", &[]);
    vmd.call("hello", "Start");
    vmd.wait_state("hello", "stopped", LIMIT);
}

/// The guest console's lines reach the journal (one entry per line, tagged with the VM's name,
/// under the VM's scope) while nobody is attached to the console.
#[test]
fn the_guest_console_goes_to_the_journal_line_by_line() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.create("talker", "spin", &[]);
    vmd.call("talker", "Start");
    vmd.wait_state("talker", "running", LIMIT);
    // Lines of the running guest, under its scope.
    vmd.wait_journal(&["-u", "vmd-talker.scope"], "testguest: scenario spin");
    vmd.wait_journal(&["-u", "vmd-talker.scope"], "testguest: spin heartbeat 2");
    vmd.ok(&["systemctl", "stop", "vmd-talker.scope"]);
    vmd.wait_state("talker", "stopped", LIMIT);
    let last = "testguest: power button pressed, powering off";
    vmd.wait_journal(&["VM_NAME=talker", "VM_CONSOLE=1"], last);

    // Exactly the guest's lines, in order, nothing lost or added.
    let lines = vmd.ok(&[
        "journalctl",
        "--no-pager",
        "VM_NAME=talker",
        "VM_CONSOLE=1",
        "-o",
        "cat",
    ]);
    let lines: Vec<&str> = lines.lines().collect();
    assert!(lines.len() >= 5, "{lines:#?}");
    let heartbeats = lines.len() - 2;
    let mut expected = vec!["testguest: scenario spin".to_string()];
    expected.extend((0..heartbeats).map(|k| format!("testguest: spin heartbeat {k}")));
    expected.push(last.to_string());
    assert_eq!(lines, expected);

    // The fields other tools rely on.
    let entries = vmd.ok(&[
        "journalctl",
        "--no-pager",
        "VM_NAME=talker",
        "VM_CONSOLE=1",
        "-o",
        "export",
    ]);
    let entries: Vec<&str> = entries
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(entries.len(), lines.len());
    for entry in entries {
        let fields: Vec<&str> = entry.lines().collect();
        for field in [
            "SYSLOG_IDENTIFIER=vmd-console",
            "PRIORITY=6",
            "VM_CONSOLE=1",
            "VM_NAME=talker",
        ] {
            assert!(fields.contains(&field), "no {field} in:\n{entry}");
        }
    }
}

/// vmd's Linux test kernel (tests/linux) through the daemon: `vmctl start`, its console in the
/// journal, and `systemctl stop` of its scope ending it within the helper's deadline. The kernel
/// has no ACPI (tests/linux/README.md), so it cannot see the power button: /init halts at its
/// end (instead of rebooting, which the daemon would answer with a fresh start), and the stop is
/// the helper's forced one once the deadline has passed.
#[test]
fn linux_through_the_daemon_logs_its_console_and_powers_off_at_systemctl_stop() {
    if !Path::new("/dev/kvm").exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and no /dev/kvm"
        );
        eprintln!("SKIPPED: /dev/kvm does not exist");
        return;
    }
    let kernel = common::linux::kernel();
    let Some(vmd) = Vmd::boot_with_images_on_disk(true) else {
        return;
    };
    let images = vmd._bound.as_ref().expect("images on disk").path();
    std::fs::copy(&kernel.vmlinux, images.join("vmlinux")).expect("copy the kernel");
    let vmlinux = format!("{IMAGES}/vmlinux");
    vmd.ok(&[
        "vmctl",
        "start",
        "penguin",
        "--define",
        "-k",
        &vmlinux,
        "-m",
        "128M",
        "--cmdline",
        "console=ttyS0 linux_guest_end=power-button",
    ]);
    let started = Instant::now();
    let boot_limit = Duration::from_secs(240);
    let unit = ["-u", "vmd-penguin.scope"];
    loop {
        let journal = vmd.ok(&["journalctl", "--no-pager", unit[0], unit[1]]);
        if journal.contains("linux-guest: waiting for the power button") {
            break;
        }
        assert!(
            !journal.contains("linux-guest: FAILED"),
            "the guest failed:\n{journal}"
        );
        assert!(
            started.elapsed() < boot_limit,
            "no \"linux-guest: waiting for the power button\" within {boot_limit:?}:\n{journal}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "linux-guest: waiting for the power button {:.1} s after vmctl start",
        started.elapsed().as_secs_f64()
    );
    let console = vmd.ok(&[
        "journalctl",
        "--no-pager",
        "VM_NAME=penguin",
        "VM_CONSOLE=1",
        "-o",
        "cat",
    ]);
    // Only /init's lines: the kernel's boot messages come in a burst, and lines journald does
    // not take at once are dropped rather than waited for.
    for line in [
        "linux-guest: ready",
        "linux-guest: no /dev/vda",
        "linux-guest: fork ok",
        "linux-guest: done",
    ] {
        assert!(console.contains(line), "no {line:?} in:\n{console}");
    }
    assert_eq!(vmd.property("penguin", "State"), "running");

    // SIGTERM: the helper presses the ACPI power button; Linux's button driver turns it into a
    // KEY_POWER event, /init powers off, and Linux's soft-off (\_S5) ends the VM well before
    // the helper's deadline (SIGTERM_SHUTDOWN_DEADLINE, 30 s).
    let stopping = Instant::now();
    vmd.ok(&["systemctl", "stop", "vmd-penguin.scope"]);
    vmd.wait_state("penguin", "stopped", Duration::from_secs(60));
    let took = stopping.elapsed();
    eprintln!("stopped {:.1} s after systemctl stop", took.as_secs_f64());
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(vmd.property("penguin", "LeaderPID"), "0");
    vmd.wait_journal(
        &["VM_NAME=penguin", "VM_CONSOLE=1"],
        "linux-guest: power button pressed",
    );
    vmd.wait_journal(&["VM_NAME=penguin"], "the guest powered off");
    let journal = vmd.ok(&["journalctl", "--no-pager", "VM_NAME=penguin"]);
    assert!(
        !journal.contains("did not power off in time"),
        "the helper stopped the guest at its deadline:\n{journal}"
    );
}

#[test]
fn bad_input_gets_named_errors_and_creates_nothing() {
    let Some(vmd) = Vmd::boot() else { return };
    let create = |name: &str, config: &[&str]| {
        // "--": names such as "-bad" are arguments, not options.
        let mut argv = vec![
            "busctl",
            "--",
            "call",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            "CreateVM",
            "sa{sv}",
            name,
        ];
        argv.extend(config);
        vmd.run(&argv)
    };
    vmd.ok(&["mkfifo", "/var/lib/vmd-test/fifo"]);
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("-bad", vec!["1", "Kernel", "s", GUEST], "invalid VM name"),
        (
            "has space",
            vec!["1", "Kernel", "s", GUEST],
            "invalid VM name",
        ),
        // Names machined would refuse in RegisterMachine (systemd's hostname_is_valid).
        ("a.", vec!["1", "Kernel", "s", GUEST], "invalid VM name"),
        ("a..b", vec!["1", "Kernel", "s", GUEST], "invalid VM name"),
        ("a-", vec!["1", "Kernel", "s", GUEST], "invalid VM name"),
        ("a_b", vec!["1", "Kernel", "s", GUEST], "invalid VM name"),
        (
            "ok",
            vec!["1", "Kernal", "s", GUEST],
            "unknown configuration key \"Kernal\"",
        ),
        (
            "ok",
            vec!["1", "Kernel", "u", "3"],
            "must be of D-Bus type s",
        ),
        ("ok", vec!["0"], "has no Kernel"),
        (
            "ok",
            vec!["2", "Kernel", "s", GUEST, "MemoryBytes", "t", "0"],
            "memory",
        ),
        (
            "ok",
            vec![
                "2",
                "Kernel",
                "s",
                GUEST,
                "MemoryBytes",
                "t",
                "18446744073709551615",
            ],
            "memory",
        ),
        (
            "ok",
            vec!["2", "Kernel", "s", GUEST, "VCPUs", "u", "0"],
            "vcpus",
        ),
        (
            "ok",
            vec!["1", "Kernel", "s", "/nonexistent"],
            "cannot use \"/nonexistent\" as the kernel",
        ),
        ("ok", vec!["1", "Kernel", "s", "/etc"], "not a regular file"),
        // Nobody writes to it: the daemon must not wait for a writer to open it.
        (
            "ok",
            vec!["1", "Kernel", "s", "/var/lib/vmd-test/fifo"],
            "it is a pipe or FIFO, not a regular file",
        ),
        (
            "ok",
            vec!["1", "Kernel", "s", "relative"],
            "must be absolute",
        ),
    ];
    for (name, config, expected) in cases {
        let output = create(name, &config);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name} {config:?} was accepted");
        assert!(
            stderr.contains(expected),
            "{name} {config:?}: expected {expected:?} in {stderr}"
        );
    }
    // The error names, as another client sees them.
    let gdbus = vmd.run(&[
        "gdbus",
        "call",
        "--system",
        "--dest",
        "org.vmd.vmd1",
        "--object-path",
        MANAGER,
        "--method",
        "org.vmd.vmd1.Manager.GetVM",
        "nothere",
    ]);
    assert!(String::from_utf8_lossy(&gdbus.stderr).contains("org.vmd.vmd1.Error.NoSuchVM"));
    let gdbus = vmd.run(&[
        "gdbus",
        "call",
        "--system",
        "--dest",
        "org.vmd.vmd1",
        "--object-path",
        MANAGER,
        "--method",
        "org.vmd.vmd1.Manager.CreateVM",
        "x",
        "{'Bogus': <'1'>}",
    ]);
    assert!(String::from_utf8_lossy(&gdbus.stderr).contains("org.vmd.vmd1.Error.InvalidArgument"));
    // Methods without arguments refuse a call with some, like any other wrong signature.
    let extra = vmd.run(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "ListVMs",
        "s",
        "surplus",
    ]);
    assert!(!extra.status.success(), "ListVMs took an argument");
    assert!(
        String::from_utf8_lossy(&extra.stderr).contains("Signature mismatch"),
        "{}",
        String::from_utf8_lossy(&extra.stderr)
    );

    // Nothing was created.
    assert_eq!(
        vmd.ok(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            "ListVMs"
        ])
        .trim(),
        "a(sso) 0"
    );
    assert_eq!(vmd.ok(&["ls", "-A", "/var/lib/vmd/vms"]).trim(), "");

    // Duplicates, wrong states, and non-root callers.
    vmd.create("one", "spin", &[]);
    assert!(
        String::from_utf8_lossy(
            &vmd.run(&[
                "gdbus",
                "call",
                "--system",
                "--dest",
                "org.vmd.vmd1",
                "--object-path",
                MANAGER,
                "--method",
                "org.vmd.vmd1.Manager.CreateVM",
                "one",
                &format!("{{'Kernel': <'{GUEST}'>}}")
            ])
            .stderr
        )
        .contains("org.vmd.vmd1.Error.VMExists")
    );
    assert!(
        vmd.fails(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            "/org/vmd/vmd1/vm/one",
            "org.vmd.vmd1.VM",
            "Pause"
        ])
        .contains("is defined")
    );
    vmd.ok(&["useradd", "-m", "tester"]);
    let listed = || {
        vmd.ok(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            "ListVMs",
        ])
    };
    let before = listed();
    let denied = gdbus_as(
        &vmd,
        "tester",
        "/org/vmd/vmd1/vm/one",
        "org.vmd.vmd1.VM.Start",
        &[],
    );
    assert_not_permitted(&denied, "org.vmd.vmd1.manage", "tester's Start");
    assert_eq!(vmd.property("one", "State"), "defined");
    assert_eq!(listed(), before);
    // Reading is for everyone.
    let read = vmd.systemd.exec_with(ExecOptions {
        argv: &[
            "busctl",
            "get-property",
            "org.vmd.vmd1",
            "/org/vmd/vmd1/vm/one",
            "org.vmd.vmd1.VM",
            "State",
        ],
        user: Some("tester"),
        ..Default::default()
    });
    assert!(read.status.success());

    // Defining a VM takes no pseudo-terminal (the host's are shared and few): starting it
    // does, and a start that cannot have one fails and leaves the VM as it was. The box has
    // its own devpts instance: cap it at the ptys in use, so that the next allocation fails
    // with ENOSPC (a running VM holds one: devpts takes max=0 for no limit).
    vmd.create("holder", "spin", &[]);
    vmd.call("holder", "Start");
    vmd.ok(&[
        "sh",
        "-c",
        "i=0; while [ -e /dev/pts/$i ]; do i=$((i + 1)); done; mount -o remount,max=$i /dev/pts",
    ]);
    vmd.create("nopty", "spin", &[]);
    let failed = vmd.fails(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        "/org/vmd/vmd1/vm/nopty",
        "org.vmd.vmd1.VM",
        "Start",
    ]);
    assert!(failed.contains("cannot create the console"), "{failed}");
    assert_eq!(vmd.property("nopty", "State"), "defined");
    vmd.call("nopty", "Remove");
    vmd.call("holder", "Kill");
    vmd.wait_state("holder", "stopped", LIMIT);
    vmd.call("holder", "Remove");
    let only_one = |vmd: &Vmd| {
        assert_eq!(
            vmd.ok(&[
                "busctl",
                "call",
                "org.vmd.vmd1",
                MANAGER,
                "org.vmd.vmd1.Manager",
                "ListVMs"
            ])
            .trim(),
            "a(sso) 1 \"one\" \"defined\" \"/org/vmd/vmd1/vm/one\""
        );
        assert_eq!(vmd.ok(&["ls", "-A", "/var/lib/vmd/vms"]).trim(), "one.toml");
        assert_eq!(
            vmd.ok(&["sh", "-c", "ls -A /var/lib/vmd/files 2>/dev/null || true"])
                .trim(),
            ""
        );
    };
    only_one(&vmd);
    vmd.ok(&["mount", "-o", "remount,max=1048576", "/dev/pts"]);
    vmd.ok(&["systemctl", "restart", "vmd.service"]);
    only_one(&vmd);
}

#[test]
fn definitions_persist_and_autostart_with_the_daemon() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.create("keeper", "spin", &["Autostart", "b", "true"]);
    vmd.create("passing", "spin", &["Transient", "b", "true"]);
    vmd.create("idle", "spin", &[]);
    let stored = vmd.ok(&["ls", "/var/lib/vmd/vms"]);
    assert_eq!(
        stored.split_whitespace().collect::<Vec<_>>(),
        vec!["idle.toml", "keeper.toml"]
    );
    // An administrator's definition.
    vmd.ok(&["sh", "-c", &format!(
        "mkdir -p /etc/vmd/vms && printf 'uuid = \"5f0e6a52-5c1b-4f57-9d0c-0f4f3d6c2a11\"\\nkernel = \"{GUEST}\"\\ncmdline = \"testguest=spin\"\\nmemory-bytes = 67108864\\nautostart = true\\n' > /etc/vmd/vms/admin.toml"
    )]);

    // Autostart can be switched off and back on over D-Bus, and is stored.
    vmd.ok(&[
        "busctl",
        "set-property",
        "org.vmd.vmd1",
        "/org/vmd/vmd1/vm/idle",
        "org.vmd.vmd1.VM",
        "Autostart",
        "b",
        "true",
    ]);
    assert!(
        vmd.ok(&["cat", "/var/lib/vmd/vms/idle.toml"])
            .contains("autostart = true")
    );
    vmd.ok(&[
        "busctl",
        "set-property",
        "org.vmd.vmd1",
        "/org/vmd/vmd1/vm/idle",
        "org.vmd.vmd1.VM",
        "Autostart",
        "b",
        "false",
    ]);
    assert!(
        vmd.ok(&["cat", "/var/lib/vmd/vms/idle.toml"])
            .contains("autostart = false")
    );

    // A VM that runs (paused) across the restart: the new daemon adopts it from the fd store.
    vmd.create("runner", "spin", &[]);
    vmd.call("runner", "Start");
    vmd.call("runner", "Pause");
    let runner_pid = vmd.property("runner", "LeaderPID");
    // A running transient VM has no file: its definition rides along in the fd store.
    vmd.create("ephemeral", "spin", &["Transient", "b", "true"]);
    vmd.call("ephemeral", "Start");
    let ephemeral_pid = vmd.property("ephemeral", "LeaderPID");
    let ephemeral_uuid = vmd.property("ephemeral", "UUID");

    vmd.ok(&["systemctl", "restart", "vmd.service"]);
    assert_eq!(vmd.property("ephemeral", "LeaderPID"), ephemeral_pid);
    assert_eq!(vmd.property("ephemeral", "UUID"), ephemeral_uuid);
    assert_eq!(vmd.property("ephemeral", "State"), "running");
    assert!(!vmd.ok(&["ls", "/var/lib/vmd/vms"]).contains("ephemeral"));
    vmd.call("ephemeral", "Shutdown");
    let start = Instant::now();
    while vmd
        .run(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            "GetVM",
            "s",
            "ephemeral",
        ])
        .status
        .success()
    {
        assert!(
            start.elapsed() < LIMIT,
            "the adopted transient VM outlived its guest"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(vmd.property("runner", "LeaderPID"), runner_pid);
    assert_eq!(vmd.property("runner", "State"), "paused");
    assert_eq!(vmd.property("runner", "Unit"), "vmd-runner.scope");
    vmd.call("runner", "Resume");
    assert_eq!(vmd.property("runner", "State"), "running");
    vmd.call("runner", "Shutdown");
    vmd.wait_state("runner", "stopped", LIMIT);
    assert_eq!(vmd.property("runner", "FailureReason"), "");
    // Reloaded: the stored and the administrator's VMs; the transient one is gone.
    let listed = vmd.ok(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "ListVMs",
    ]);
    assert!(listed.starts_with("a(sso) 4 "), "{listed}");
    assert!(!listed.contains("passing"));
    vmd.wait_state("keeper", "running", LIMIT);
    vmd.wait_state("admin", "running", LIMIT);
    assert_eq!(vmd.property("idle", "State"), "defined");
    // The administrator's definition is not the API's to remove.
    vmd.ok(&["systemctl", "stop", "vmd-admin.scope"]);
    vmd.wait_state("admin", "stopped", LIMIT);
    assert!(
        vmd.fails(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            "/org/vmd/vmd1/vm/admin",
            "org.vmd.vmd1.VM",
            "Remove"
        ])
        .contains("administrator")
    );
}

#[test]
fn socket_activation_serves_peer_to_peer_clients() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.ok(&["systemctl", "start", "vmd.socket"]);
    assert!(
        !vmd.run(&["systemctl", "is-active", "vmd.service"])
            .status
            .success()
    );
    // vmctl over the socket, not the bus: the connection starts the daemon.
    let status = vmd.ok(&["vmctl", "--socket", "/run/vmd/vmd.sock", "status"]);
    assert!(status.contains("NAME"), "{status}");
    assert_eq!(
        vmd.ok(&["systemctl", "is-active", "vmd.service"]).trim(),
        "active"
    );
    vmd.ok(&[
        "vmctl",
        "--socket",
        "/run/vmd/vmd.sock",
        "start",
        "sockvm",
        "--define",
        "-k",
        GUEST,
        "-m",
        "64M",
        "--cmdline",
        "testguest=spin",
    ]);
    let status = vmd.ok(&["vmctl", "--socket", "/run/vmd/vmd.sock", "status", "sockvm"]);
    assert!(
        status.contains("running") && status.contains("sockvm"),
        "{status}"
    );
    // The same VM on the system bus.
    assert_eq!(vmd.property("sockvm", "State"), "running");
}

#[test]
fn vmctl_drives_vms_like_openbsd_vmctl() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.ok(&[
        "vmctl",
        "start",
        "alpha",
        "--define",
        "-k",
        GUEST,
        "-m",
        "64M",
        "-p",
        "2",
        "--cmdline",
        "testguest=spin",
    ]);
    let status = vmd.ok(&["vmctl", "status"]);
    let header = status.lines().next().unwrap_or_default();
    for column in ["ID", "PID", "VCPUS", "MAXMEM", "STATE", "NAME"] {
        assert!(header.contains(column), "{status}");
    }
    let row = status
        .lines()
        .find(|l| l.contains("alpha"))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(
        row.contains("running") && row.contains("64.0M") && row.contains(" 2 "),
        "{row}"
    );
    vmd.ok(&["vmctl", "pause", "alpha"]);
    assert_eq!(vmd.property("alpha", "State"), "paused");
    vmd.ok(&["vmctl", "unpause", "alpha"]);
    assert_eq!(vmd.property("alpha", "State"), "running");

    // The console: guest output through OpenConsole, for several clients in turn, across a
    // guest reboot (which keeps the console).
    for _ in 0..2 {
        let mut console = vmd.systemd.spawn(&["vmctl", "console", "alpha"]);
        let lines = Lines::collect(console.stdout.take().expect("stdout"));
        lines.wait_for("testguest: spin heartbeat", LIMIT);
        let _ = console.kill();
        let _ = console.wait();
    }
    vmd.ok(&["vmctl", "stop", "-w", "alpha"]);
    assert_eq!(vmd.property("alpha", "State"), "stopped");
    let error = vmd.fails(&["vmctl", "pause", "alpha"]);
    assert!(
        error.starts_with("vmctl: ") && error.contains("stopped"),
        "{error}"
    );
    vmd.ok(&["vmctl", "remove", "alpha"]);
    assert!(
        vmd.fails(&["vmctl", "status", "alpha"])
            .contains("no VM named")
    );
}

/// What `tmux` shows of the session `session` in the box, a line each (trailing blanks gone).
fn screen(vmd: &Vmd, session: &str) -> String {
    vmd.ok(&["tmux", "capture-pane", "-p", "-t", session])
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the screen of `session` shows `needle`; returns the screen.
fn wait_screen(vmd: &Vmd, session: &str, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let shown = screen(vmd, session);
        if shown.contains(needle) {
            return shown;
        }
        assert!(
            start.elapsed() < LIMIT,
            "the screen never showed {needle:?}:\n{shown}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// vmctl's commands through the installed package: manual, ad-hoc (transient) VMs and their
/// failed starts, --define, show/status -r with reasons, IDs, info, autostart, sizes, stop of a
/// stopped VM, `stop -f && remove`.
#[test]
fn vmctl_commands_as_a_vmctl8_user_expects() {
    let Some(vmd) = Vmd::boot() else { return };
    // The manual is installed and found.
    let manual = vmd.ok(&["sh", "-c", "MANWIDTH=80 man -P cat vmctl | col -b"]);
    assert!(
        manual.contains("control the virtual machines of vmd"),
        "{manual}"
    );
    assert!(
        vmd.ok(&["sh", "-c", "man -P cat 5 vmd.toml | col -b"])
            .contains("[[disk]]"),
        "vmd.toml(5)"
    );

    // An ad-hoc VM whose start fails leaves nothing behind; the retry with a kernel works.
    let failed = vmd.run(&[
        "vmctl",
        "start",
        "adhoc",
        "-k",
        "/etc/hostname",
        "-m",
        "64M",
    ]);
    assert!(!failed.status.success(), "a text file booted");
    let error = String::from_utf8_lossy(&failed.stderr).into_owned();
    assert!(
        error.starts_with("vmctl: cannot start vm adhoc: "),
        "{error}"
    );
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(vmd.fails(&["vmctl", "status", "adhoc"]).contains("adhoc"));
    let started = vmd.run(&[
        "vmctl",
        "start",
        "adhoc",
        "-k",
        GUEST,
        "-m",
        "64.5M",
        "--cmdline",
        "testguest=spin",
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    // vmctl(8) rounds down to megabytes, and says so.
    assert!(
        String::from_utf8_lossy(&started.stderr).contains("vmctl: memory size rounded to 64.0M"),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    assert_eq!(vmd.property("adhoc", "MemoryBytes"), "67108864");
    // A bare number is bytes, as in vmctl(8): too small, and said so.
    assert!(
        vmd.fails(&["vmctl", "start", "tiny", "-k", GUEST, "-m", "64"])
            .contains("did you mean 64M?")
    );

    // A kept VM next to it; show is status; -r shows only running VMs.
    vmd.ok(&[
        "vmctl",
        "start",
        "kept",
        "--define",
        "-k",
        GUEST,
        "-m",
        "64M",
        "--cmdline",
        "testguest=spin",
    ]);
    vmd.ok(&["vmctl", "stop", "-w", "kept"]);
    let table = vmd.ok(&["vmctl", "show"]);
    assert!(
        table.contains(" kept") && table.contains(" adhoc"),
        "{table}"
    );
    let running = vmd.ok(&["vmctl", "status", "-r"]);
    assert!(
        running.contains(" adhoc") && !running.contains(" kept"),
        "{running}"
    );

    // IDs: the table's ID works wherever a VM is named.
    let id_of = |name: &str| -> String {
        let table = vmd.ok(&["vmctl", "status"]);
        let row = table
            .lines()
            .find(|line| line.split_whitespace().nth(8) == Some(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{table}"));
        row.split_whitespace().next().unwrap_or_default().to_owned()
    };
    let kept = id_of("kept");
    let info = vmd.ok(&["vmctl", "info", &kept]);
    for needle in [
        "name:       kept",
        "state:      stopped",
        "memory:     64.0M",
        "cmdline:    testguest=spin",
    ] {
        assert!(info.contains(needle), "{needle:?} not in:\n{info}");
    }
    vmd.ok(&["vmctl", "autostart", &kept, "on"]);
    assert_eq!(vmd.property("kept", "Autostart"), "true");
    vmd.ok(&["vmctl", "autostart", "kept", "off"]);
    assert_eq!(vmd.property("kept", "Autostart"), "false");

    // Stopping a stopped VM succeeds, as systemctl stop does.
    vmd.ok(&["vmctl", "stop", &kept]);
    vmd.ok(&["vmctl", "stop", "-f", "kept"]);

    // A failed VM shows why in the table.
    let broken = vmd.run(&[
        "vmctl",
        "start",
        "broken",
        "--define",
        "-k",
        "/etc/hostname",
    ]);
    assert!(!broken.status.success());
    let table = vmd.ok(&["vmctl", "status"]);
    let header = table.lines().next().unwrap_or_default();
    assert!(header.ends_with("REASON"), "{table}");
    let row = table
        .lines()
        .find(|line| line.split_whitespace().nth(8) == Some("broken"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("failed") && row.split_whitespace().count() > 10,
        "{row}"
    );

    // stop -f returns once the VM is down: remove right after works. The transient VM is
    // gone once stopped.
    vmd.ok(&[
        "sh",
        "-c",
        "vmctl stop -f adhoc && vmctl status adhoc; true",
    ]);
    vmd.ok(&["vmctl", "start", "kept"]);
    // The ID is the daemon's, and stays while VMs come and go (adhoc is gone now).
    assert_eq!(id_of("kept"), kept);
    assert_eq!(vmd.property("kept", "ID"), kept);
    // reboot asks the guest (spin powers off on the button, and vmd starts it again); reset
    // does not ask.
    let restarts = |count: &str| {
        let start = Instant::now();
        while vmd.property("kept", "Restarts") != count {
            assert!(start.elapsed() < LIMIT, "Restarts never became {count}");
            std::thread::sleep(Duration::from_millis(100));
        }
        vmd.wait_state("kept", "running", LIMIT);
    };
    vmd.ok(&["vmctl", "reboot", &kept]);
    restarts("1");
    vmd.ok(&["vmctl", "reset", "kept"]);
    restarts("2");
    vmd.ok(&["sh", "-c", "vmctl stop -f kept && vmctl remove kept"]);
    let table = vmd.ok(&["vmctl", "status"]);
    assert!(
        !table.contains(" kept") && !table.contains(" adhoc"),
        "{table}"
    );
    vmd.ok(&["vmctl", "remove", "broken"]);
}

/// `vmctl console` in a terminal (tmux in the box): the escapes, another escape character,
/// lines as the guest sent them, and the notice when the VM stops on a line of its own.
#[test]
fn vmctl_console_in_a_terminal() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.ok(&[
        "vmctl",
        "start",
        "term",
        "-k",
        GUEST,
        "-m",
        "64M",
        "--cmdline",
        "testguest=spin",
    ]);
    let tmux = |args: &[&str]| {
        let mut argv = vec!["tmux"];
        argv.extend(args);
        vmd.ok(&argv)
    };
    // A session for the whole test: the server would exit with its last session, and a new
    // session started meanwhile fails.
    tmux(&["new-session", "-d", "-s", "keep", "sleep 900"]);
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "c",
        "-x",
        "120",
        "-y",
        "40",
        "vmctl console term; sleep 600",
    ]);
    let shown = wait_screen(&vmd, "c", "testguest: spin heartbeat");
    assert!(
        shown.contains("Connected to vm term (type ~. to disconnect, ~? for help)"),
        "{shown}"
    );
    // Every guest line starts at the left margin: no staircase.
    let beats: Vec<&str> = shown.lines().filter(|l| l.contains("heartbeat")).collect();
    assert!(
        beats
            .iter()
            .all(|line| line.starts_with("testguest: spin heartbeat")),
        "{shown}"
    );
    // ~? lists the escapes; ~. leaves.
    tmux(&["send-keys", "-t", "c", "Enter", "~?"]);
    wait_screen(&vmd, "c", "~.  - disconnect");
    tmux(&["send-keys", "-t", "c", "Enter", "~."]);
    wait_screen(&vmd, "c", "[EOT]");
    tmux(&["kill-session", "-t", "c"]);

    // Another escape character: ~. is data then, ^]. leaves.
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "e",
        "-x",
        "120",
        "-y",
        "40",
        "vmctl console -e '^]' term; sleep 600",
    ]);
    wait_screen(&vmd, "e", "type ^]. to disconnect");
    tmux(&["send-keys", "-t", "e", "Enter", "C-]", "."]);
    wait_screen(&vmd, "e", "[EOT]");
    tmux(&["kill-session", "-t", "e"]);

    // The VM stops while attached: the notice has a line of its own.
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "s",
        "-x",
        "120",
        "-y",
        "40",
        "vmctl console term; sleep 600",
    ]);
    wait_screen(&vmd, "s", "heartbeat");
    vmd.ok(&["vmctl", "stop", "-w", "term"]);
    let shown = wait_screen(&vmd, "s", "vmctl: vm term stopped");
    assert!(
        shown
            .lines()
            .any(|line| line.starts_with("vmctl: vm term stopped")),
        "{shown}"
    );
    tmux(&["kill-server"]);

    // vmctl log reads the console lines vmd keeps in the journal (VM_NAME=, VM_CONSOLE=1),
    // of a VM that is gone too. Written here as vmd writes them, with logger.
    vmd.ok(&[
        "sh",
        "-c",
        "for entry in 'ghost first line' 'other not mine' 'ghost second line'; do \
             printf 'VM_NAME=%s\\nVM_CONSOLE=1\\nMESSAGE=%s\\n' \"${entry%% *}\" \"${entry#* }\" | \
             logger --journald; done",
    ]);
    let start = Instant::now();
    loop {
        let log = vmd.ok(&["vmctl", "log", "ghost"]);
        if log.contains("second line") {
            assert_eq!(log, "first line\nsecond line\n");
            break;
        }
        assert!(
            start.elapsed() < LIMIT,
            "vmctl log never showed the lines: {log:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        vmd.ok(&["vmctl", "log", "-n", "1", "ghost"]),
        "second line\n"
    );
}

/// Definitions as wholes: `vmctl load`, `info`'s definition, `edit` (unchanged, changed, a
/// bad edit refused and the VM kept as it was, an administrator's VM refused), `reload`; and
/// the console for one client at a time, `--force` taking it over.
#[test]
fn vmctl_load_edit_reload_and_one_console_client() {
    let Some(vmd) = Vmd::boot() else { return };
    let stderr = |output: &Output| String::from_utf8_lossy(&output.stderr).into_owned();
    vmd.ok(&[
        "sh",
        "-c",
        &format!(
            "printf 'kernel = \"{GUEST}\"\\ncmdline = \"testguest=spin\"\\nmemory-bytes = 67108864\\n' \
             > /root/loaded.toml"
        ),
    ]);
    vmd.ok(&["vmctl", "load", "/root/loaded.toml"]);
    assert_eq!(vmd.property("loaded", "DefinitionSource"), "vmd");
    let info = vmd.ok(&["vmctl", "info", "loaded"]);
    assert!(
        info.contains("# definition (vmd.toml(5))") && info.contains("testguest=spin"),
        "{info}"
    );

    // An editor that changes nothing: nothing done.
    let unchanged = vmd.run(&["env", "EDITOR=true", "vmctl", "edit", "loaded"]);
    assert!(unchanged.status.success(), "{}", stderr(&unchanged));
    assert!(
        stderr(&unchanged).contains("vm loaded unchanged"),
        "{}",
        stderr(&unchanged)
    );
    // A change is applied when the editor exits.
    let changed = vmd.run(&[
        "env",
        "EDITOR=sed -i s/^vcpus\\ =\\ 1$/vcpus\\ =\\ 2/",
        "vmctl",
        "edit",
        "loaded",
    ]);
    assert!(changed.status.success(), "{}", stderr(&changed));
    assert_eq!(vmd.property("loaded", "VCPUs"), "2");
    // A bad edit says why; not edited again (no answer), the VM stays as it was.
    let bad = vmd.run(&[
        "env",
        "EDITOR=sed -i s/^vcpus\\ =.*/vcpus\\ =\\ \\\"two\\\"/",
        "vmctl",
        "edit",
        "loaded",
    ]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("vcpus must be a whole number")
            && stderr(&bad).contains("vm loaded is unchanged"),
        "{}",
        stderr(&bad)
    );
    assert_eq!(vmd.property("loaded", "VCPUs"), "2");

    // The administrator's VMs: reload finds them; edit sends the user to the file.
    vmd.ok(&["install", "-d", "/etc/vmd/vms"]);
    vmd.ok(&[
        "sh",
        "-c",
        &format!(
            "printf 'uuid = \"0b7c1c8e-3f4e-4c3a-9f0e-2d3c4b5a6f70\"\\nkernel = \"{GUEST}\"\\n' \
             > /etc/vmd/vms/admin1.toml"
        ),
    ]);
    let reloaded = vmd.run(&["vmctl", "reload"]);
    assert!(reloaded.status.success(), "{}", stderr(&reloaded));
    assert!(
        stderr(&reloaded).contains("added: admin1"),
        "{}",
        stderr(&reloaded)
    );
    let refused = vmd.fails(&["env", "EDITOR=true", "vmctl", "edit", "admin1"]);
    assert!(refused.contains("/etc/vmd/vms/admin1.toml"), "{refused}");

    // One console client at a time; --force takes it over.
    vmd.ok(&["vmctl", "start", "loaded"]);
    let tmux = |args: &[&str]| {
        let mut argv = vec!["tmux"];
        argv.extend(args);
        vmd.ok(&argv)
    };
    tmux(&["new-session", "-d", "-s", "keep", "sleep 900"]);
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "one",
        "-x",
        "120",
        "-y",
        "40",
        "vmctl console loaded; sleep 600",
    ]);
    wait_screen(&vmd, "one", "heartbeat");
    let busy = vmd.fails(&["vmctl", "console", "loaded"]);
    assert!(
        busy.contains("vmctl console --force loaded takes it over"),
        "{busy}"
    );
    assert_eq!(busy.lines().count(), 1, "{busy}");
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "two",
        "-x",
        "120",
        "-y",
        "40",
        "vmctl console --force loaded; sleep 600",
    ]);
    wait_screen(&vmd, "two", "heartbeat");
    let first = wait_screen(&vmd, "one", "was taken over by another client");
    assert!(
        first
            .lines()
            .any(|line| line.starts_with("vmctl: the console of vm loaded was taken over")),
        "{first}"
    );
    tmux(&["kill-server"]);
    vmd.ok(&["sh", "-c", "vmctl stop -f loaded && vmctl remove loaded"]);
}

#[test]
fn the_served_interfaces_match_dbus_xml() {
    let Some(vmd) = Vmd::boot() else { return };
    let (served, documented) = served_and_documented_xml(&vmd);
    assert_eq!(api_members(&served), api_members(&documented));
}

/// The introspection XML the daemon serves for the manager and a VM (`probe`, created here),
/// and the one in `dbus/`.
fn served_and_documented_xml(vmd: &Vmd) -> (String, String) {
    vmd.create("probe", "spin", &[]);
    let mut served = String::new();
    for path in [MANAGER, &Vmd::vm_path("probe")] {
        served.push_str(&vmd.ok(&[
            "busctl",
            "introspect",
            "--xml-interface",
            "org.vmd.vmd1",
            path,
        ]));
    }
    let documented = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dbus/org.vmd.vmd1.xml"
    ))
    .expect("xml");
    (served, documented)
}

/// The org.vmd.vmd1 members of introspection XML, one normalized line per method, argument,
/// signal and property (comments, whitespace, attribute order and other interfaces ignored).
fn api_members(xml: &str) -> std::collections::BTreeSet<String> {
    let mut members = std::collections::BTreeSet::new();
    let mut interface = String::new();
    let mut member = String::new();
    let mut rest = xml;
    while let Some(start) = rest.find('<') {
        let Some(end) = rest[start..].find('>') else {
            break;
        };
        let tag = &rest[start + 1..start + end];
        rest = &rest[start + end + 1..];
        if tag.starts_with('!') || tag.starts_with('?') || tag.starts_with('/') {
            continue;
        }
        let (kind, attrs) = tag
            .trim_end_matches('/')
            .trim()
            .split_once(' ')
            .unwrap_or((tag, ""));
        let mut attributes: Vec<String> = attrs
            .split('"')
            .collect::<Vec<_>>()
            .chunks(2)
            .filter(|pair| pair.len() == 2)
            .map(|pair| format!("{}{}", pair[0].trim(), pair[1]))
            .collect();
        attributes.sort();
        let attributes = attributes.join(" ");
        match kind {
            "interface" => interface = attributes,
            "method" | "signal" | "property" => {
                member = format!("{kind} {attributes}");
                if interface.contains("org.vmd.vmd1") {
                    members.insert(format!("{interface} {member}"));
                }
            }
            "arg" if interface.contains("org.vmd.vmd1") => {
                members.insert(format!("{interface} {member} arg {attributes}"));
            }
            "annotation" if interface.contains("org.vmd.vmd1") => {
                members.insert(format!("{interface} {member} annotation {attributes}"));
            }
            _ => {}
        }
    }
    members
}

/// Runs a command in the box as `user`, bounded.
fn as_user(vmd: &Vmd, user: &str, argv: &[&str]) -> Output {
    let mut bounded = vec!["timeout", "120"];
    bounded.extend(argv);
    vmd.systemd.exec_with(ExecOptions {
        argv: &bounded,
        user: Some(user),
        ..Default::default()
    })
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Calls `method` (with its interface) on `path` as `user` through gdbus, which prints the
/// D-Bus error's name (busctl prints only its message).
fn gdbus_as(vmd: &Vmd, user: &str, path: &str, method: &str, args: &[&str]) -> Output {
    let mut argv = vec![
        "gdbus",
        "call",
        "--system",
        "--dest",
        "org.vmd.vmd1",
        "--object-path",
        path,
        "--method",
        method,
    ];
    argv.extend(args);
    as_user(vmd, user, &argv)
}

/// A refusal for want of authorization: the named error, with the polkit action it would take
/// in its sentence (a refusal for another reason, InvalidState say, does not pass).
fn assert_not_permitted(output: &Output, action: &str, what: &str) {
    let stderr = stderr_of(output);
    assert!(!output.status.success(), "{what} was allowed");
    assert!(
        stderr.contains("org.vmd.vmd1.Error.NotPermitted") && stderr.contains(action),
        "{what}: {stderr}"
    );
}

/// Writes a polkit rule and waits until polkitd has loaded it.
fn grant(vmd: &Vmd, file: &str, rule: &str, user: &str, action: &str) {
    let written = vmd.systemd.exec_with(ExecOptions {
        argv: &[
            "sh",
            "-c",
            &format!("mkdir -p /etc/polkit-1/rules.d && cat > /etc/polkit-1/rules.d/{file}"),
        ],
        stdin: Some(rule.as_bytes()),
        ..Default::default()
    });
    assert!(written.status.success(), "cannot write the rule {file}");
    // polkitd reloads rules through inotify; pkcheck tells when it has.
    let start = Instant::now();
    let check = format!("pkcheck --action-id {action} --process $$");
    while !as_user(vmd, user, &["sh", "-c", &check]).status.success() {
        assert!(start.elapsed() < LIMIT, "polkit never loaded {file}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Calls CreateVMWithFiles as alice with an fd of the given kind (dbus-python, a third client).
const FD_CLIENT: &str = r#"
import dbus, os, socket, sys
bus = dbus.SystemBus()
manager = dbus.Interface(bus.get_object("org.vmd.vmd1", "/org/vmd/vmd1"), "org.vmd.vmd1.Manager")
kind = sys.argv[1]
if kind == "dir":
    fd = os.open("/home/alice", os.O_RDONLY | os.O_DIRECTORY)
elif kind == "socket":
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = sock.fileno()
elif kind == "writeonly":
    fd = os.open("/home/alice/guest.elf", os.O_WRONLY)
else:
    fd = os.open("/home/alice/guest.elf", os.O_RDONLY)
try:
    manager.CreateVMWithFiles("fd-" + kind, {"MemoryBytes": dbus.UInt64(64 << 20)}, {"kernel": dbus.types.UnixFd(fd)})
    print("accepted")
except dbus.DBusException as e:
    print(e.get_dbus_name(), e.get_dbus_message())
    sys.exit(1)
"#;

#[test]
fn non_root_users_get_only_what_polkit_and_ownership_allow() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.ok(&["groupadd", "vmusers"]);
    vmd.ok(&["useradd", "-m", "alice"]);
    vmd.ok(&["useradd", "-m", "-G", "vmusers", "bob"]);
    vmd.ok(&[
        "install",
        "-o",
        "alice",
        "-m",
        "0644",
        GUEST,
        "/home/alice/guest.elf",
    ]);
    let alice_start = [
        "vmctl",
        "start",
        "a1",
        "--define",
        "-k",
        "/home/alice/guest.elf",
        "-m",
        "64M",
        "--cmdline",
        "testguest=spin",
    ];
    let list = || {
        vmd.ok(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            "ListVMs",
        ])
    };

    // Without a rule, nothing that changes anything.
    let refused = as_user(&vmd, "alice", &alice_start);
    assert!(!refused.status.success());
    assert!(
        stderr_of(&refused).contains("org.vmd.vmd1.create"),
        "{}",
        stderr_of(&refused)
    );
    let refused = as_user(&vmd, "alice", SHADOW_AS_KERNEL);
    assert!(
        stderr_of(&refused).contains("org.vmd.vmd1.create"),
        "{}",
        stderr_of(&refused)
    );
    assert_eq!(list().trim(), "a(sso) 0");

    // Allowed to create: alice's own VM, from fds she opened; never the daemon opening her paths.
    grant(
        &vmd,
        "50-alice-create.rules",
        "polkit.addRule(function(action, subject) {\n  if (action.id == \"org.vmd.vmd1.create\" && subject.user == \"alice\") return polkit.Result.YES;\n});\n",
        "alice",
        "org.vmd.vmd1.create",
    );
    let refused = as_user(&vmd, "alice", SHADOW_AS_KERNEL);
    assert!(
        stderr_of(&refused).contains("CreateVMWithFiles"),
        "{}",
        stderr_of(&refused)
    );
    assert_eq!(list().trim(), "a(sso) 0");
    for (kind, expected) in [
        ("dir", "directory"),
        ("socket", "socket"),
        ("writeonly", "writing only"),
    ] {
        let output = as_user(&vmd, "alice", &["/usr/bin/python3", "-c", FD_CLIENT, kind]);
        let printed = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(!output.status.success(), "{kind} fd accepted");
        assert!(
            printed.contains("org.vmd.vmd1.Error.InvalidArgument") && printed.contains(expected),
            "{kind}: {printed}"
        );
    }
    assert_eq!(list().trim(), "a(sso) 0");
    assert_eq!(
        vmd.ok(&["sh", "-c", "ls -A /var/lib/vmd/files 2>/dev/null || true"])
            .trim(),
        ""
    );

    let started = as_user(&vmd, "alice", &alice_start);
    assert!(started.status.success(), "{}", stderr_of(&started));
    assert_eq!(vmd.property("a1", "State"), "running");
    assert_eq!(vmd.property("a1", "Owner"), "alice");
    let uuid = vmd.property("a1", "UUID");
    assert_eq!(
        vmd.property("a1", "Kernel"),
        format!("/var/lib/vmd/files/{uuid}/kernel")
    );
    // Her own VM: she runs it without any more polkit rules.
    for argv in [
        &["vmctl", "pause", "a1"][..],
        &["vmctl", "unpause", "a1"],
        &["vmctl", "stop", "-w", "a1"],
        &["vmctl", "start", "a1"],
    ] {
        let output = as_user(&vmd, "alice", argv);
        assert!(output.status.success(), "{argv:?}: {}", stderr_of(&output));
    }
    // Someone else's VM: bob may not touch it, until his group may manage VMs. It runs, so
    // a call that got through would show (paused, stopped, restarted, gone); and each refusal
    // must be the authorization's, by name, not the state's.
    let a1 = "/org/vmd/vmd1/vm/a1";
    let running = (list(), vmd.property("a1", "LeaderPID"));
    assert!(running.0.contains("\"a1\" \"running\""), "{}", running.0);
    for method in [
        "Start",
        "Shutdown",
        "Kill",
        "Pause",
        "Resume",
        "Remove",
        "OpenConsole",
    ] {
        let refused = gdbus_as(&vmd, "bob", a1, &format!("org.vmd.vmd1.VM.{method}"), &[]);
        assert_not_permitted(&refused, "org.vmd.vmd1.manage", &format!("bob's {method}"));
        assert_eq!(
            (list(), vmd.property("a1", "LeaderPID")),
            running,
            "after bob's {method}"
        );
    }
    let refused = gdbus_as(
        &vmd,
        "bob",
        a1,
        "org.freedesktop.DBus.Properties.Set",
        &["org.vmd.vmd1.VM", "Autostart", "<true>"],
    );
    assert_not_permitted(&refused, "org.vmd.vmd1.manage", "bob's Autostart");
    assert_eq!(vmd.property("a1", "Autostart"), "false");
    assert!(
        vmd.ok(&["cat", "/var/lib/vmd/vms/a1.toml"])
            .contains("autostart = false")
    );
    // The owner may also set Autostart and Remove (README): what refuses alice's Remove of her
    // running VM is its state, not polkit.
    for value in ["<true>", "<false>"] {
        let set = gdbus_as(
            &vmd,
            "alice",
            a1,
            "org.freedesktop.DBus.Properties.Set",
            &["org.vmd.vmd1.VM", "Autostart", value],
        );
        assert!(
            set.status.success(),
            "alice's Autostart: {}",
            stderr_of(&set)
        );
    }
    assert_eq!(vmd.property("a1", "Autostart"), "false");
    let refused = gdbus_as(&vmd, "alice", a1, "org.vmd.vmd1.VM.Remove", &[]);
    assert!(!refused.status.success());
    assert!(
        stderr_of(&refused).contains("org.vmd.vmd1.Error.InvalidState"),
        "{}",
        stderr_of(&refused)
    );
    let stopped = as_user(&vmd, "alice", &["vmctl", "stop", "-w", "a1"]);
    assert!(stopped.status.success(), "{}", stderr_of(&stopped));
    let before = list();
    assert!(before.contains("\"a1\" \"stopped\""), "{before}");
    vmd.ok(&["test", "-f", "/var/lib/vmd/vms/a1.toml"]);
    vmd.ok(&["test", "-f", &format!("/var/lib/vmd/files/{uuid}/kernel")]);
    let refused = as_user(&vmd, "bob", &["vmctl", "start", "a1"]);
    assert!(!refused.status.success());
    assert!(
        stderr_of(&refused).contains("org.vmd.vmd1.manage for VM a1"),
        "{}",
        stderr_of(&refused)
    );
    assert_eq!(list(), before);
    grant(
        &vmd,
        "50-vmusers-manage.rules",
        "polkit.addRule(function(action, subject) {\n  if (action.id == \"org.vmd.vmd1.manage\" && subject.isInGroup(\"vmusers\")) return polkit.Result.YES;\n});\n",
        "bob",
        "org.vmd.vmd1.manage",
    );
    let allowed = as_user(&vmd, "bob", &["vmctl", "start", "a1"]);
    assert!(allowed.status.success(), "{}", stderr_of(&allowed));
    assert_eq!(vmd.property("a1", "State"), "running");
    // Reading stays open to everyone, and root can always act.
    assert!(
        as_user(&vmd, "alice", &["vmctl", "status"])
            .status
            .success()
    );
    vmd.ok(&["vmctl", "stop", "-w", "a1"]);
    vmd.ok(&["vmctl", "remove", "a1"]);
    assert_eq!(
        vmd.ok(&["sh", "-c", "ls -A /var/lib/vmd/files 2>/dev/null || true"])
            .trim(),
        ""
    );

    // The administrator's definitions name owners as users (and groups): alice, who holds no
    // manage rule, runs hers herself. One naming an unknown user does not load, and says why.
    vmd.ok(&[
        "sh",
        "-c",
        &format!(
            "mkdir -p /etc/vmd/vms && \
             printf 'uuid = \"1d6c0a9e-8f3b-4e52-9a41-7c2f5b0d3e18\"\\nkernel = \"{GUEST}\"\\ncmdline = \"testguest=spin\"\\nmemory-bytes = 67108864\\nowner = \"alice\"\\n' > /etc/vmd/vms/alices.toml && \
             printf 'uuid = \"6a1f0e2d-4b3c-4d5e-8f70-91a2b3c4d5e6\"\\nkernel = \"{GUEST}\"\\nowner = \"nosuchuser\"\\n' > /etc/vmd/vms/ghost.toml"
        ),
    ]);
    vmd.ok(&["systemctl", "restart", "vmd.service"]);
    assert_eq!(vmd.property("alices", "Owner"), "alice");
    let started = as_user(&vmd, "alice", &["vmctl", "start", "alices"]);
    assert!(started.status.success(), "{}", stderr_of(&started));
    assert_eq!(vmd.property("alices", "State"), "running");
    let stopped = as_user(&vmd, "alice", &["vmctl", "stop", "-w", "alices"]);
    assert!(stopped.status.success(), "{}", stderr_of(&stopped));
    assert_eq!(vmd.property("alices", "State"), "stopped");
    assert!(!list().contains("ghost"), "{}", list());
    vmd.wait_journal(&["-u", "vmd.service"], "ghost.toml: owner \"nosuchuser\"");
    vmd.wait_journal(&["-u", "vmd.service"], "there is no user \"nosuchuser\"");
}

#[test]
fn random_configs_and_names_never_create_anything_or_hurt_the_daemon() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let Some(vmd) = Vmd::boot() else { return };
    let (runtime, bus) = vmd.connect();

    let value = prop_oneof![
        any::<u32>().prop_map(zbus::OwnedVariant::from),
        any::<u64>().prop_map(zbus::OwnedVariant::from),
        any::<bool>().prop_map(zbus::OwnedVariant::from),
        any::<i32>().prop_map(zbus::OwnedVariant::from),
        // Paths that do not exist, so no combination can be valid.
        "[ -~]{0,40}".prop_map(
            |s| zbus::OwnedVariant::try_from(zbus::Variant::from(format!("/nonexistent/{s}")))
                .expect("string")
        ),
    ];
    let key = prop_oneof![
        Just("Kernel".to_string()),
        Just("Initrd".to_string()),
        Just("Cmdline".to_string()),
        Just("VCPUs".to_string()),
        Just("MemoryBytes".to_string()),
        Just("Autostart".to_string()),
        Just("Transient".to_string()),
        Just("Owner".to_string()),
        "[A-Za-z]{1,12}",
    ];
    let config = proptest::collection::vec((key, value), 0..6);
    let name = prop_oneof!["[A-Za-z0-9._-]{1,70}", "\\PC{0,20}"];
    let mut runner = TestRunner::new(Config {
        cases: 150,
        ..Config::default()
    });
    runner
        .run(&(name, config), |(name, config)| {
            let config: std::collections::HashMap<String, zbus::OwnedVariant> =
                config.into_iter().collect();
            let reply = runtime.block_on(bus.call_method(
                Some("org.vmd.vmd1"),
                MANAGER,
                Some("org.vmd.vmd1.Manager"),
                "CreateVM",
                &(name.as_str(), config),
            ));
            match reply {
                Err(zbus::Error::MethodError(error, _, _)) => {
                    prop_assert!(error.as_str().starts_with("org.vmd.vmd1.Error."), "{error}");
                }
                Err(other) => prop_assert!(false, "not a named error: {other}"),
                Ok(_) => prop_assert!(false, "accepted {name:?}"),
            }
            Ok(())
        })
        .expect("every random CreateVM is refused with a named error");
    assert_eq!(
        vmd.ok(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            "ListVMs"
        ])
        .trim(),
        "a(sso) 0"
    );
    assert_eq!(
        vmd.ok(&["systemctl", "is-active", "vmd.service"]).trim(),
        "active"
    );
    assert_eq!(vmd.ok(&["ls", "-A", "/var/lib/vmd/vms"]).trim(), "");
}

#[test]
fn start_and_remove_at_once_never_both_succeed() {
    let Some(vmd) = Vmd::boot() else { return };
    let (runtime, bus) = vmd.connect();
    let call = |path: &str, method: &'static str| {
        bus.call_method(
            Some("org.vmd.vmd1"),
            path.to_string(),
            Some("org.vmd.vmd1.VM"),
            method,
            &(),
        )
    };
    let error_name = |result: &zbus::Result<zbus::Message>| match result {
        Ok(_) => "ok".to_string(),
        Err(zbus::Error::MethodError(name, _, _)) => name.to_string(),
        // zbus turns org.freedesktop.DBus.Error.* into its own variant: "name: message".
        Err(other) => other
            .to_string()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    // Both calls leave on one connection back to back, so the daemon handles them at the same
    // time; whichever wins, the other must be refused and the outcome must be whole.
    for round in 0..12 {
        vmd.create("racer", "spin", &[]);
        let path = Vmd::vm_path("racer");
        let (start, remove) = if round % 2 == 0 {
            runtime.block_on(async { tokio::join!(call(&path, "Start"), call(&path, "Remove")) })
        } else {
            let (remove, start) = runtime
                .block_on(async { tokio::join!(call(&path, "Remove"), call(&path, "Start")) });
            (start, remove)
        };
        let (start, remove) = (error_name(&start), error_name(&remove));
        eprintln!("round {round}: Start {start}, Remove {remove}");
        let listed = vmd.ok(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            "ListVMs",
        ]);
        let scope = vmd.run(&["systemctl", "is-active", "vmd-racer.scope"]);
        if remove == "ok" {
            assert!(
                start == "org.vmd.vmd1.Error.NoSuchVM"
                    || start == "org.freedesktop.DBus.Error.UnknownObject"
                    || start == "org.freedesktop.DBus.Error.UnknownMethod",
                "round {round}: Remove succeeded and Start answered {start}"
            );
            assert_eq!(listed.trim(), "a(sso) 0", "round {round}");
            assert!(!scope.status.success(), "round {round}: a helper runs");
            assert_eq!(vmd.ok(&["ls", "-A", "/var/lib/vmd/vms"]).trim(), "");
        } else {
            assert_eq!(
                (start.as_str(), remove.as_str()),
                ("ok", "org.vmd.vmd1.Error.InvalidState"),
                "round {round}"
            );
            assert_eq!(vmd.property("racer", "State"), "running");
            vmd.call("racer", "Kill");
            vmd.wait_state("racer", "stopped", LIMIT);
            vmd.call("racer", "Remove");
        }
    }
}

#[test]
fn an_owner_starts_a_vm_with_only_their_own_rights_over_its_paths() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.ok(&["useradd", "-m", "carol"]);
    vmd.ok(&["install", "-d", "-o", "carol", "/home/carol/vm"]);
    vmd.ok(&[
        "install",
        "-o",
        "carol",
        "-m",
        "0644",
        GUEST,
        "/home/carol/vm/kernel",
    ]);
    // Root defines the VM for carol, with a kernel in a directory she can write to.
    vmd.ok(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "CreateVM",
        "sa{sv}",
        "c1",
        "4",
        "Kernel",
        "s",
        "/home/carol/vm/kernel",
        "Cmdline",
        "s",
        "testguest=spin",
        "MemoryBytes",
        "t",
        "67108864",
        "Owner",
        "s",
        "carol",
    ]);
    let started = as_user(&vmd, "carol", &["vmctl", "start", "c1"]);
    assert!(started.status.success(), "{}", stderr_of(&started));
    assert_eq!(vmd.property("c1", "State"), "running");
    vmd.ok(&["vmctl", "stop", "-w", "c1"]);

    // She swaps the kernel for a link to a file only root may read: starting it now must not
    // hand that file to her guest.
    let swapped = as_user(
        &vmd,
        "carol",
        &["ln", "-sfn", "/etc/shadow", "/home/carol/vm/kernel"],
    );
    assert!(swapped.status.success(), "{}", stderr_of(&swapped));
    let refused = as_user(&vmd, "carol", &["vmctl", "start", "c1"]);
    assert!(!refused.status.success(), "the swapped kernel was opened");
    let reason = vmd.property("c1", "FailureReason");
    assert!(
        reason.contains("/home/carol/vm/kernel")
            && reason.contains("as user carol")
            && reason.contains("Permission denied"),
        "{reason}"
    );
    assert_eq!(vmd.property("c1", "State"), "failed");
    assert_eq!(vmd.property("c1", "LeaderPID"), "0");
    // Root answers for its own starts: the daemon opens the path, and the guest (no ELF) fails.
    assert!(!vmd.run(&["vmctl", "start", "c1"]).status.success());
    let reason = vmd.property("c1", "FailureReason");
    assert!(!reason.contains("as user"), "{reason}");
}

/// Where root's disk images live in the box: the daemon may write only below /var/lib/vmd.
const IMAGES: &str = "/var/lib/vmd/images";

/// `busctl call ... CreateVM` of a test guest running `scenario` with one disk at `disk`.
fn create_with_disk(vmd: &Vmd, name: &str, scenario: &str, disk: &str) -> Output {
    let cmdline = format!("testguest={scenario}");
    vmd.run(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "CreateVM",
        "sa{sv}",
        name,
        "4",
        "Kernel",
        "s",
        GUEST,
        "Cmdline",
        "s",
        &cmdline,
        "MemoryBytes",
        "t",
        "67108864",
        "Disks",
        "aa{sv}",
        "1",
        "2",
        "Path",
        "s",
        disk,
        "Serial",
        "s",
        "vd-0",
    ])
}

#[test]
fn disks_from_vmctl_create_to_the_guest_and_back_through_the_daemon() {
    let Some(vmd) = Vmd::boot() else { return };
    let base = format!("{IMAGES}/base.raw");
    let top = format!("{IMAGES}/top.qcow2");
    vmd.ok(&["install", "-d", "-m", "0700", IMAGES]);
    vmd.ok(&["qemu-img", "create", "-q", "-f", "raw", &base, "4M"]);
    vmd.ok(&["vmctl", "create", "-b", "base.raw", &top]);

    // A guest fills the disk through the daemon, and powers off.
    vmd.ok(&[
        "vmctl",
        "start",
        "filler",
        "--define",
        "-k",
        GUEST,
        "-m",
        "64M",
        "--cmdline",
        "testguest=blk-fill=0xa5",
        "-d",
        &top,
    ]);
    vmd.ok(&["vmctl", "wait", "--timeout", "60", "filler"]);
    assert_eq!(vmd.property("filler", "FailureReason"), "");
    vmd.ok(&["qemu-img", "check", &top]);
    let read = vmd.ok(&["qemu-io", "-c", "read -P 0xa5 0 4M", &top]);
    assert!(read.contains("read 4194304/4194304"), "{read}");
    let untouched = vmd.ok(&["qemu-io", "-f", "raw", "-c", "read -P 0 0 4M", &base]);
    assert!(untouched.contains("read 4194304/4194304"), "{untouched}");
    let disks = vmd.property("filler", "Disks");
    assert!(
        disks.contains(&top) && disks.contains("\"auto\""),
        "{disks}"
    );
    let status = vmd.ok(&["vmctl", "status", "filler"]);
    assert!(status.contains(&format!("disk0: {top} (auto)")), "{status}");
    let stored = vmd.ok(&["cat", "/var/lib/vmd/vms/filler.toml"]);
    assert!(
        stored.contains("[[disk]]") && stored.contains(&top),
        "{stored}"
    );

    // A second VM on a disk in use is refused, and told which VM holds it.
    let created = create_with_disk(&vmd, "holder", "spin", &top);
    assert!(created.status.success(), "{}", stderr_of(&created));
    vmd.call("holder", "Start");
    assert_eq!(vmd.property("holder", "State"), "running");
    // A restarted daemon adopts holder, and still knows which files it holds.
    vmd.ok(&["systemctl", "restart", "vmd.service"]);
    vmd.wait_state("holder", "running", LIMIT);
    let start = |name: &str| {
        vmd.run(&[
            "gdbus",
            "call",
            "--system",
            "--dest",
            "org.vmd.vmd1",
            "--object-path",
            &Vmd::vm_path(name),
            "--method",
            "org.vmd.vmd1.VM.Start",
        ])
    };
    for (name, disk) in [("second", top.as_str()), ("base-writer", base.as_str())] {
        let created = create_with_disk(&vmd, name, "spin", disk);
        assert!(created.status.success(), "{}", stderr_of(&created));
        let refused = start(name);
        let stderr = stderr_of(&refused);
        assert!(
            !refused.status.success()
                && stderr.contains("org.vmd.vmd1.Error.DiskBusy")
                && stderr.contains("in use by VM holder")
                && stderr.contains(disk),
            "{name}: {stderr}"
        );
        assert_eq!(vmd.property(name, "State"), "failed");
        assert_eq!(vmd.property(name, "LeaderPID"), "0");
    }
    vmd.ok(&["vmctl", "stop", "-w", "--timeout", "60", "holder"]);
    let started = start("second");
    assert!(started.status.success(), "{}", stderr_of(&started));
    vmd.ok(&["vmctl", "stop", "-f", "-w", "--timeout", "60", "second"]);
}

#[test]
fn a_write_then_systemctl_stop_of_the_scope_is_on_disk() {
    // The guest keeps writing until the stop's deadline: its image must be on a disk (see
    // boot_with_images_on_disk).
    let Some(vmd) = Vmd::boot_with_images_on_disk(true) else {
        return;
    };
    vmd.ok(&["install", "-d", "-m", "0700", IMAGES]);
    // What a guest wrote before `systemctl stop` of its scope is in a consistent image.
    let big = format!("{IMAGES}/big.qcow2");
    vmd.ok(&["vmctl", "create", "-s", "1G", &big]);
    let created = create_with_disk(&vmd, "stopper", "blk-fill=0x77", &big);
    assert!(created.status.success(), "{}", stderr_of(&created));
    vmd.call("stopper", "Start");
    let mut console = vmd.systemd.spawn(&["vmctl", "console", "stopper"]);
    let lines = Lines::collect(console.stdout.take().expect("stdout"));
    lines.wait_for("testguest: scenario blk-fill", LIMIT);
    std::thread::sleep(Duration::from_millis(500));
    // The stop comes while the guest writes. The guest does not watch the power button, so it
    // may well finish its fill before the helper's shutdown deadline; either way the helper
    // flushes the disk on its way out.
    assert!(
        !lines.text().contains("blk-fill done"),
        "the guest finished before the stop:\n{}",
        lines.text()
    );
    vmd.ok(&["systemctl", "stop", "vmd-stopper.scope"]);
    vmd.wait_state("stopper", "stopped", LIMIT);
    let _ = console.kill();
    let _ = console.wait();
    vmd.ok(&["qemu-img", "check", &big]);
    let written = vmd.ok(&["qemu-io", "-c", "read -P 0x77 0 64k", &big]);
    assert!(written.contains("read 65536/65536"), "{written}");
}

#[test]
fn bad_disks_are_refused_and_change_nothing() {
    let Some(vmd) = Vmd::boot() else { return };
    let define = |disks: &[&str]| {
        let mut argv = vec![
            "gdbus",
            "call",
            "--system",
            "--dest",
            "org.vmd.vmd1",
            "--object-path",
            MANAGER,
            "--method",
            "org.vmd.vmd1.Manager.CreateVM",
            "bad",
        ];
        let config = format!("{{'Kernel': <'{GUEST}'>, 'Disks': <{}>}}", disks.join(""));
        argv.push(&config);
        let output = vmd.run(&argv);
        assert!(!output.status.success(), "{disks:?} accepted");
        stderr_of(&output)
    };
    for (disks, expected) in [
        (
            &["[{'Size': <uint64 1>}]"][..],
            "unknown key \"Size\" in disk 0",
        ),
        (
            &["[{'Path': <'/etc/hostname'>, 'ReadOnly': <'yes'>}]"],
            "ReadOnly of disk 0 must be of D-Bus type b",
        ),
        (
            &["[{'Path': <'/etc/hostname'>, 'Format': <'vmdk'>}]"],
            "unknown disk format \"vmdk\"",
        ),
        (&["[{'Format': <'raw'>}]"], "disk 0 has no Path"),
        (&["[{'Path': <'relative.img'>}]"], "must be absolute"),
        (
            &["[{'Path': <'/nonexistent/disk.img'>}]"],
            "cannot use disk 0",
        ),
        (
            &["[{'Path': <'/etc/hostname'>, 'Serial': <'a serial that is far too long'>}]"],
            "serial",
        ),
        (&["'/etc/hostname'"], "Disks must be of D-Bus type aa{sv}"),
    ] {
        let stderr = define(disks);
        assert!(
            stderr.contains("org.vmd.vmd1.Error.InvalidArgument") && stderr.contains(expected),
            "{disks:?}: {stderr}"
        );
    }
    assert_eq!(
        vmd.ok(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            "ListVMs"
        ])
        .trim(),
        "a(sso) 0"
    );
    assert_eq!(
        vmd.ok(&["sh", "-c", "ls -A /var/lib/vmd/vms 2>/dev/null || true"])
            .trim(),
        ""
    );
}

#[test]
fn a_users_qcow2_cannot_reach_files_the_user_cannot_read() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.ok(&["useradd", "-m", "alice"]);
    vmd.ok(&[
        "install",
        "-o",
        "alice",
        "-m",
        "0644",
        GUEST,
        "/home/alice/guest.elf",
    ]);
    grant(
        &vmd,
        "50-alice-create.rules",
        "polkit.addRule(function(action, subject) {\n  if (action.id == \"org.vmd.vmd1.create\" && subject.user == \"alice\") return polkit.Result.YES;\n});\n",
        "alice",
        "org.vmd.vmd1.create",
    );
    let as_alice = |argv: &[&str]| {
        let output = as_user(&vmd, "alice", argv);
        assert!(output.status.success(), "{argv:?}: {}", stderr_of(&output));
    };
    // Her own disk, made with vmctl, over a base of hers: fine, passed as fds.
    as_alice(&["vmctl", "create", "-s", "4M", "/home/alice/base.qcow2"]);
    as_alice(&[
        "vmctl",
        "create",
        "-b",
        "base.qcow2",
        "/home/alice/mine.qcow2",
    ]);
    let start = |name: &str, disk: &str, scenario: &str| {
        let cmdline = format!("testguest={scenario}");
        as_user(
            &vmd,
            "alice",
            &[
                "vmctl",
                "start",
                name,
                "--define",
                "-k",
                "/home/alice/guest.elf",
                "-m",
                "64M",
                "--cmdline",
                &cmdline,
                "-d",
                disk,
            ],
        )
    };
    let filled = start("mine", "/home/alice/mine.qcow2", "blk-fill=0x42");
    assert!(filled.status.success(), "{}", stderr_of(&filled));
    as_alice(&["vmctl", "wait", "--timeout", "60", "mine"]);
    let read = vmd.ok(&[
        "qemu-io",
        "-c",
        "read -P 0x42 0 4M",
        "/home/alice/mine.qcow2",
    ]);
    assert!(read.contains("read 4194304/4194304"), "{read}");
    assert!(
        vmd.property("mine", "Disks")
            .contains("/home/alice/mine.qcow2")
    );
    // The daemon keeps her passed disk across its own restart (systemd's fd store), and the
    // lock went with the helper: she starts the VM again and the guest writes the disk again.
    vmd.ok(&["systemctl", "restart", "vmd.service"]);
    let stored = vmd.ok(&[
        "systemctl",
        "show",
        "-P",
        "NFileDescriptorStore",
        "vmd.service",
    ]);
    assert_eq!(stored.trim(), "1", "only mine's disk is kept");
    as_alice(&["vmctl", "start", "mine"]);
    as_alice(&["vmctl", "wait", "--timeout", "60", "mine"]);
    assert_eq!(vmd.property("mine", "FailureReason"), "");
    let console = vmd.ok(&["vmctl", "console", "mine"]);
    assert!(
        console
            .matches("testguest: blk-fill done 8192 sectors")
            .count()
            >= 1,
        "{console}"
    );
    vmd.ok(&["qemu-img", "check", "/home/alice/mine.qcow2"]);

    // A qcow2 naming /etc/shadow as its backing file: opened with her rights, refused.
    as_alice(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/shadow",
        "-F",
        "raw",
        "/home/alice/evil.qcow2",
        "1M",
    ]);
    let refused = start("evil", "/home/alice/evil.qcow2", "blk-check=0");
    assert!(
        !refused.status.success(),
        "the shadow file was handed to the guest"
    );
    let reason = vmd.property("evil", "FailureReason");
    assert!(
        reason.contains("/etc/shadow")
            && reason.contains("Permission denied")
            && reason.contains("user alice"),
        "{reason}"
    );
    assert_eq!(vmd.property("evil", "State"), "failed");
    // Relative names climbing out resolve as paths too, and get the same answer.
    as_alice(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "../../etc/shadow",
        "-F",
        "raw",
        "/home/alice/climb.qcow2",
        "1M",
    ]);
    let refused = start("climb", "/home/alice/climb.qcow2", "blk-check=0");
    assert!(!refused.status.success());
    let reason = vmd.property("climb", "FailureReason");
    assert!(reason.contains("Permission denied"), "{reason}");
}

/// CPU time (user + system, clock ticks) of the main thread of process `pid` in the box.
fn main_thread_ticks(vmd: &Vmd, pid: &str) -> u64 {
    let stat = vmd.ok(&["cat", &format!("/proc/{pid}/task/{pid}/stat")]);
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// What `vmctl console NAME` shows within a few seconds when "ab" is typed: the guest's output,
/// and (a `spin` guest) "spin input 97" and "98" if the input reached it.
fn console_session(vmd: &Vmd, name: &str) -> String {
    let output = vmd.run(&[
        "sh",
        "-c",
        &format!("(sleep 0.5; printf ab; sleep 2.5) | timeout -s TERM 4 vmctl console {name}"),
    ]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until systemd no longer lists the unit.
fn wait_unit_gone(vmd: &Vmd, unit: &str) {
    let start = Instant::now();
    loop {
        let listed = vmd.ok(&["systemctl", "list-units", "--all", "--no-legend", unit]);
        if listed.trim().is_empty() {
            return;
        }
        assert!(start.elapsed() < LIMIT, "{unit} stayed: {listed}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The issue's soak: running VMs, their consoles and their states survive restarts and SIGKILLs
/// of the daemon back to back.
#[test]
fn vms_and_consoles_survive_restarts_and_kills_of_the_daemon() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.ok(&["systemctl", "start", "vmd.socket"]);
    let names = ["soak-1", "soak-2", "soak-3"];
    for name in names {
        vmd.create(name, "spin", &[]);
        vmd.call(name, "Start");
    }
    // A failed and a stopped VM keep their state and reason too.
    vmd.create("crashy", "crash", &[]);
    vmd.call("crashy", "Start");
    vmd.wait_state("crashy", "failed", LIMIT);
    let reason = vmd.property("crashy", "FailureReason");
    assert!(!reason.is_empty());
    vmd.create("done", "hello", &[]);
    vmd.call("done", "Start");
    vmd.wait_state("done", "stopped", LIMIT);
    let leaders: Vec<String> = names
        .iter()
        .map(|name| vmd.property(name, "LeaderPID"))
        .collect();

    let start = Instant::now();
    for round in 0..20 {
        vmd.ok(&["systemctl", "restart", "vmd.service"]);
        if round % 5 == 4 {
            // Now and then, let the new daemon take over before the next restart.
            assert_eq!(vmd.property("soak-1", "State"), "running");
        }
    }
    for _ in 0..20 {
        let pid = vmd.ok(&["systemctl", "show", "-P", "MainPID", "vmd.service"]);
        vmd.ok(&["systemctl", "kill", "-s", "KILL", "vmd.service"]);
        let killed = Instant::now();
        while vmd.ok(&["systemctl", "show", "-P", "MainPID", "vmd.service"]) == pid {
            assert!(killed.elapsed() < LIMIT, "vmd survived SIGKILL");
            std::thread::sleep(Duration::from_millis(20));
        }
        vmd.ok(&["systemctl", "start", "vmd.service"]);
    }
    eprintln!("40 restarts and kills in {:?}", start.elapsed());

    let mut lost = Vec::new();
    let mut broken = Vec::new();
    for (name, leader) in names.iter().zip(&leaders) {
        let (state, pid) = (vmd.property(name, "State"), vmd.property(name, "LeaderPID"));
        if state != "running" || &pid != leader {
            lost.push(format!("{name}: {state}, LeaderPID {pid} (was {leader})"));
            continue;
        }
        let console = console_session(&vmd, name);
        if !console.contains("testguest: spin heartbeat")
            || !console.contains("testguest: spin input 97")
            || !console.contains("testguest: spin input 98")
        {
            broken.push(format!("{name}:\n{console}"));
        }
        // An adopted helper's main thread sleeps in poll like a fresh one.
        let before = main_thread_ticks(&vmd, &pid);
        std::thread::sleep(Duration::from_secs(2));
        let used = main_thread_ticks(&vmd, &pid) - before;
        assert!(used < 20, "{name}'s helper used {used} ticks in 2 s");
    }
    eprintln!(
        "VMs lost: {}, consoles broken: {}",
        lost.len(),
        broken.len()
    );
    assert!(lost.is_empty(), "lost: {lost:#?}\n{}", vmd.journal_tail());
    assert!(broken.is_empty(), "broken consoles: {broken:#?}");
    assert_eq!(
        vmd.ok(&["systemctl", "is-active", "vmd.socket"]).trim(),
        "active"
    );
    assert_eq!(vmd.property("crashy", "State"), "failed");
    assert_eq!(vmd.property("crashy", "FailureReason"), reason);
    assert_eq!(vmd.property("done", "State"), "stopped");
    // A VM whose helper ends while no daemon runs is failed, with a reason, once one runs.
    let pid = vmd.property("soak-3", "LeaderPID");
    vmd.ok(&["systemctl", "stop", "vmd.service"]);
    let _ = vmd.run(&["kill", "-KILL", &pid]);
    // (Stopping vmd drops the fd store: the other VMs power off.)
    vmd.ok(&["systemctl", "start", "vmd.service"]);
    for name in names {
        let state = vmd.property(name, "State");
        assert!(state == "failed" || state == "stopped", "{name}: {state}");
    }
    assert_eq!(vmd.property("crashy", "FailureReason"), reason);
}

/// A client attached to a console stays attached while the daemon restarts (its end of the
/// relay waits in the fd store) and is killed: output reaches it and its input reaches the
/// guest afterwards, and a takeover still cuts it off.
#[test]
fn an_attached_console_client_survives_daemon_restarts() {
    use std::io::Write;
    let Some(vmd) = Vmd::boot() else { return };
    vmd.create("kept", "spin", &[]);
    vmd.call("kept", "Start");
    let mut console = vmd.systemd.spawn(&["vmctl", "console", "kept"]);
    let lines = Lines::collect(console.stdout.take().expect("stdout"));
    let errors = Lines::collect(console.stderr.take().expect("stderr"));
    lines.wait_for("testguest: spin heartbeat", LIMIT);
    let mut input = console.stdin.take().expect("stdin");
    let heartbeats = |lines: &Lines| {
        lines
            .snapshot()
            .iter()
            .filter(|line| line.contains("spin heartbeat"))
            .count()
    };
    for (round, stop) in ["restart", "kill"].into_iter().enumerate() {
        match stop {
            "restart" => vmd.ok(&["systemctl", "restart", "vmd.service"]),
            _ => {
                vmd.ok(&["systemctl", "kill", "-s", "KILL", "vmd.service"]);
                vmd.ok(&["systemctl", "start", "vmd.service"])
            }
        };
        assert_eq!(vmd.property("kept", "State"), "running");
        let before = heartbeats(&lines);
        let start = Instant::now();
        while heartbeats(&lines) <= before {
            assert!(
                start.elapsed() < LIMIT,
                "no output after the daemon's {stop}:\n{}\nvmctl said: {}\nfd store: {}",
                lines.text(),
                errors.text(),
                vmd.ok(&[
                    "systemctl",
                    "show",
                    "-P",
                    "NFileDescriptorStore",
                    "vmd.service"
                ]),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let key = b'x' + round as u8;
        input.write_all(&[key]).expect("type");
        input.flush().expect("flush");
        lines.wait_for(&format!("testguest: spin input {key}"), LIMIT);
    }
    // The restored client still holds the console: a second client is refused...
    let second = vmd.run(&["timeout", "5", "vmctl", "console", "kept"]);
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // ...and a takeover ends the first one's session.
    let mut taker = vmd.systemd.spawn(&["vmctl", "console", "--force", "kept"]);
    let taken = Lines::collect(taker.stdout.take().expect("stdout"));
    taken.wait_for("testguest: spin heartbeat", LIMIT);
    assert!(
        lines.wait_for_eof(Instant::now() + LIMIT),
        "the first client kept its console after a takeover"
    );
}

/// Kill right after Start, at varying delays: the VM ends stopped, no scope stays behind, and
/// it starts again.
#[test]
fn kill_while_starting_leaves_no_scope_and_the_vm_starts_again() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.create("quick", "spin", &[]);
    let path = Vmd::vm_path("quick");
    for round in 0..50 {
        let script = format!(
            "busctl call org.vmd.vmd1 {path} org.vmd.vmd1.VM Start 2>/dev/null & \
             sleep 0.00{delay}; busctl call org.vmd.vmd1 {path} org.vmd.vmd1.VM Kill 2>/dev/null; \
             wait; true",
            delay = round % 9
        );
        vmd.ok(&["sh", "-c", &script]);
        // The Kill may have come before the Start was taken: then the VM runs.
        let start = Instant::now();
        let state = loop {
            let state = vmd.property("quick", "State");
            if matches!(state.as_str(), "running" | "stopped" | "failed") {
                break state;
            }
            assert!(start.elapsed() < LIMIT, "round {round}: still {state}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_ne!(
            state,
            "failed",
            "round {round}: {}",
            vmd.property("quick", "FailureReason")
        );
        if state == "running" {
            // (Unless the script's Kill is just taking effect.)
            let _ = vmd.run(&[
                "busctl",
                "call",
                "org.vmd.vmd1",
                &path,
                "org.vmd.vmd1.VM",
                "Kill",
            ]);
            vmd.wait_state("quick", "stopped", LIMIT);
        }
        wait_unit_gone(&vmd, "vmd-quick.scope");
    }
    vmd.call("quick", "Start");
    assert_eq!(vmd.property("quick", "State"), "running");
}

/// `machinectl poweroff|reboot|terminate NAME`, or where machinectl is not installed what it
/// does: the same signal to the leader, or a stop of the scope.
fn machinectl(vmd: &Vmd, verb: &str, name: &str) {
    if vmd
        .run(&["sh", "-c", "command -v machinectl"])
        .status
        .success()
    {
        vmd.ok(&["machinectl", verb, name]);
        return;
    }
    let unit = format!("vmd-{name}.scope");
    match verb {
        "poweroff" => vmd.ok(&["systemctl", "kill", "-s", "SIGRTMIN+4", &unit]),
        "reboot" => vmd.ok(&["systemctl", "kill", "-s", "SIGINT", &unit]),
        _ => vmd.ok(&["systemctl", "stop", &unit]),
    };
}

/// machinectl's lifecycle commands, as systemd sends them to a VM's leader.
#[test]
fn machinectl_poweroff_reboot_and_terminate_end_where_they_should() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.create("mach", "spin", &[]);
    vmd.call("mach", "Start");
    machinectl(&vmd, "poweroff", "mach");
    vmd.wait_state("mach", "stopped", LIMIT);
    assert_eq!(vmd.property("mach", "FailureReason"), "");

    vmd.call("mach", "Start");
    let leader = vmd.property("mach", "LeaderPID");
    // One console across the reboot: the client sees both boots.
    let mut console = vmd.systemd.spawn(&["vmctl", "console", "mach"]);
    let lines = Lines::collect(console.stdout.take().expect("stdout"));
    lines.wait_for("testguest: spin heartbeat", LIMIT);
    machinectl(&vmd, "reboot", "mach");
    let start = Instant::now();
    while vmd.property("mach", "Restarts") != "1" || vmd.property("mach", "State") != "running" {
        assert!(start.elapsed() < LIMIT, "the VM did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(vmd.property("mach", "LeaderPID"), leader);
    let start = Instant::now();
    while lines.count("testguest: scenario spin") < 2 {
        assert!(start.elapsed() < LIMIT, "the console lost the second boot");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = console.kill();
    let _ = console.wait();

    machinectl(&vmd, "terminate", "mach");
    vmd.wait_state("mach", "stopped", LIMIT);
}

/// The helper's reason for failing wins the race with its exit, every time.
#[test]
fn a_failure_reason_is_never_lost_to_the_exit() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.ok(&[
        "sh",
        "-c",
        "head -c 65536 /dev/urandom > /var/lib/vmd-test/garbage",
    ]);
    vmd.ok(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "CreateVM",
        "sa{sv}",
        "garbage",
        "2",
        "Kernel",
        "s",
        "/var/lib/vmd-test/garbage",
        "MemoryBytes",
        "t",
        "67108864",
    ]);
    let mut generic = 0;
    for _ in 0..30 {
        vmd.fails(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            "/org/vmd/vmd1/vm/garbage",
            "org.vmd.vmd1.VM",
            "Start",
        ]);
        let reason = vmd.property("garbage", "FailureReason");
        if reason.contains("exit status") {
            generic += 1;
        }
    }
    assert_eq!(generic, 0, "the reason was lost {generic} times in 30");
}

// ---------------------------------------------------------------------------------------------
// Networking: switches, taps, interfaces

/// The box's network namespace is its own: the bridge and its address exist only in there.
const BRIDGE: &str = "vmdbr0";

/// A bridge with the address 10.200.9.1/24 (the host's side), and the switch `lan` on it,
/// whose group `vmnet` may attach VMs.
fn switch_lan(vmd: &Vmd) {
    vmd.ok(&[
        "ip",
        "link",
        "add",
        BRIDGE,
        "type",
        "bridge",
        "forward_delay",
        "0",
    ]);
    vmd.ok(&["ip", "addr", "add", "10.200.9.1/24", "dev", BRIDGE]);
    vmd.ok(&["ip", "link", "set", BRIDGE, "up"]);
    vmd.ok(&["groupadd", "vmnet"]);
    vmd.ok(&[
        "sh",
        "-c",
        &format!(
            "mkdir -p /etc/vmd/switches && printf 'bridge = \"{BRIDGE}\"\\ngroup = \"vmnet\"\\n' > /etc/vmd/switches/lan.toml"
        ),
    ]);
}

/// CreateVM with the test guest answering for `ip`, and `interfaces` after `Interfaces aa{sv}`.
fn create_networked(vmd: &Vmd, name: &str, scenario: &str, ip: &str, interfaces: &[&str]) {
    let cmdline = format!("testguest={scenario} ip={ip}");
    let mut argv = vec![
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "CreateVM",
        "sa{sv}",
        name,
        "4",
        "Kernel",
        "s",
        GUEST,
        "Cmdline",
        "s",
        &cmdline,
        "MemoryBytes",
        "t",
        "67108864",
        "Interfaces",
        "aa{sv}",
    ];
    argv.extend(interfaces);
    vmd.ok(&argv);
}

/// Pings `ip` three times from the box (the host side of the bridge); ping's summary.
fn ping(vmd: &Vmd, ip: &str) -> String {
    let output = vmd.run(&["ping", "-c", "3", "-W", "2", "-i", "0.3", ip]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until `ip` answers a ping (the guest has set up its device).
fn wait_for_answers(vmd: &Vmd, ip: &str) {
    let start = Instant::now();
    while !vmd
        .run(&["ping", "-c", "1", "-W", "1", ip])
        .status
        .success()
    {
        assert!(start.elapsed() < LIMIT, "{ip} never answered");
    }
}

/// Stops the VM from the way `stop` says (with its console attached) and returns the guest's
/// `answered` line.
fn answered_at_stop(vmd: &Vmd, name: &str, stop: &[&str]) -> String {
    let mut console = vmd.systemd.spawn(&["vmctl", "console", name]);
    let lines = Lines::collect(console.stdout.take().expect("stdout"));
    // The console is attached once vmctl has said so on stderr; a moment is enough here.
    std::thread::sleep(Duration::from_millis(500));
    vmd.ok(stop);
    let line = lines.wait_for(" answered ", LIMIT);
    let _ = console.kill();
    let _ = console.wait();
    line
}

fn ports_of_the_bridge(vmd: &Vmd) -> String {
    vmd.ok(&["ip", "-o", "link", "show", "master", BRIDGE])
}

#[test]
fn vms_on_a_switch_answer_the_host_and_a_spoofing_guest_reaches_nobody() {
    let Some(vmd) = Vmd::boot() else { return };
    switch_lan(&vmd);
    create_networked(
        &vmd,
        "web",
        "net",
        "10.200.9.2",
        &["1", "1", "Switch", "s", "lan"],
    );
    create_networked(
        &vmd,
        "db",
        "net",
        "10.200.9.3",
        &[
            "1",
            "2",
            "Switch",
            "s",
            "lan",
            "MAC",
            "s",
            "52:54:00:00:09:03",
        ],
    );
    create_networked(
        &vmd,
        "spoof",
        "net-spoof",
        "10.200.9.4",
        &["1", "1", "Switch", "s", "lan"],
    );
    // The property says where each interface goes, before anything runs.
    let interfaces = vmd.ok(&[
        "busctl",
        "get-property",
        "org.vmd.vmd1",
        &Vmd::vm_path("db"),
        "org.vmd.vmd1.VM",
        "Interfaces",
    ]);
    for expected in ["\"vt-db\"", "\"lan\"", "\"52:54:00:00:09:03\""] {
        assert!(interfaces.contains(expected), "{interfaces}");
    }
    for name in ["web", "db", "spoof"] {
        vmd.call(name, "Start");
        vmd.wait_state(name, "running", LIMIT);
    }
    // vmd.service has CAP_NET_ADMIN now; its helpers still keep no capability at all.
    let leader = vmd.property("web", "LeaderPID");
    let status = vmd.ok(&["cat", &format!("/proc/{leader}/status")]);
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            status.contains(&format!("{field}:\t0000000000000000")),
            "{field} of the helper: {status}"
        );
    }
    // It runs as vmd-vm, which the daemon looked up once and handed over (`--account`).
    let passwd = vmd.ok(&["getent", "passwd", "vmd-vm"]);
    let uid = passwd.split(':').nth(2).expect("uid field");
    let uids = format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}");
    assert!(status.contains(&uids), "no {uids:?} in {status}");
    let cmdline = vmd.ok(&["cat", &format!("/proc/{leader}/cmdline")]);
    assert!(
        cmdline.contains(&format!("--account\0vmd-vm:{uid}:")),
        "{cmdline:?}"
    );
    let ports = ports_of_the_bridge(&vmd);
    for tap in ["vt-web", "vt-db", "vt-spoof"] {
        assert!(
            ports.contains(&format!(" {tap}:")),
            "{tap} not on the bridge: {ports}"
        );
    }

    wait_for_answers(&vmd, "10.200.9.2");
    wait_for_answers(&vmd, "10.200.9.3");
    let web = ping(&vmd, "10.200.9.2");
    assert!(web.contains("3 received"), "{web}");
    let db = ping(&vmd, "10.200.9.3");
    assert!(db.contains("3 received"), "{db}");
    // db answers from the MAC it was given.
    let neighbour = vmd.ok(&["ip", "neigh", "show", "10.200.9.3"]);
    assert!(neighbour.contains("52:54:00:00:09:03"), "{neighbour}");
    // The spoofing guest, booted as long as the others, answers, but from another MAC: the
    // device drops that, so nobody hears it.
    let spoof = ping(&vmd, "10.200.9.4");
    assert!(spoof.contains(" 0 received"), "{spoof}");
    let spoofed = answered_at_stop(&vmd, "spoof", &["systemctl", "stop", "vmd-spoof.scope"]);
    assert!(!spoofed.contains("answered 0 arp"), "{spoofed}");
    vmd.wait_state("spoof", "stopped", LIMIT);

    // machined knows the VM's interface.
    let machine = vmd.ok(&["machinectl", "status", "web", "--no-pager"]);
    assert!(
        machine
            .lines()
            .any(|line| line.contains("Iface:") && line.contains("vt-web")),
        "{machine}"
    );
    // vmctl shows the interfaces.
    let status = vmd.ok(&["vmctl", "status", "db"]);
    assert!(
        status.contains("net0: vt-db (52:54:00:00:09:03, switch lan)"),
        "{status}"
    );

    // A stopped VM's tap is gone, and the others keep theirs.
    let answered = answered_at_stop(&vmd, "web", &["systemctl", "stop", "vmd-web.scope"]);
    assert!(
        answered.contains(" 3 echo") || answered.contains(" 4 echo"),
        "{answered}"
    );
    vmd.wait_state("web", "stopped", LIMIT);
    assert!(
        !vmd.run(&["ip", "link", "show", "vt-web"]).status.success(),
        "vt-web outlived its VM"
    );
    assert!(ports_of_the_bridge(&vmd).contains(" vt-db:"));
    // And a restart makes it again, under the same name, with the same MAC.
    vmd.call("web", "Start");
    vmd.wait_state("web", "running", LIMIT);
    wait_for_answers(&vmd, "10.200.9.2");
    for name in ["web", "db"] {
        vmd.call(name, "Kill");
        vmd.wait_state(name, "stopped", LIMIT);
    }
    let left = vmd.ok(&["ip", "-o", "link", "show"]);
    assert!(!left.contains("vt-"), "taps left behind: {left}");
}

#[test]
fn only_root_the_switch_group_or_polkit_may_attach_a_vm_to_a_switch() {
    let Some(vmd) = Vmd::boot() else { return };
    switch_lan(&vmd);
    vmd.ok(&["useradd", "-m", "alice"]);
    vmd.ok(&["useradd", "-m", "-G", "vmnet", "bob"]);
    for user in ["alice", "bob"] {
        vmd.ok(&[
            "install",
            "-o",
            user,
            "-m",
            "0644",
            GUEST,
            &format!("/home/{user}/guest.elf"),
        ]);
    }
    grant(
        &vmd,
        "50-create.rules",
        "polkit.addRule(function(action, subject) {\n  if (action.id == \"org.vmd.vmd1.create\" && (subject.user == \"alice\" || subject.user == \"bob\")) return polkit.Result.YES;\n});\n",
        "alice",
        "org.vmd.vmd1.create",
    );
    let start = |user: &str, name: &str, ip: &str| {
        let kernel = format!("/home/{user}/guest.elf");
        let cmdline = format!("testguest=net ip={ip}");
        as_user(
            &vmd,
            user,
            &[
                "vmctl",
                "start",
                name,
                "--define",
                "-k",
                &kernel,
                "-m",
                "64M",
                "--cmdline",
                &cmdline,
                "-n",
                "lan",
            ],
        )
    };

    // alice is not in the switch's group and has no polkit right: refused, nothing created.
    let refused = start("alice", "a1", "10.200.9.5");
    assert!(!refused.status.success(), "alice attached a VM to lan");
    let error = stderr_of(&refused);
    assert!(
        error.contains("org.vmd.vmd1.network") && error.contains("switch lan"),
        "{error}"
    );
    let refused = gdbus_as(
        &vmd,
        "alice",
        MANAGER,
        "org.vmd.vmd1.Manager.CreateVM",
        &[
            "a2",
            &format!("{{'Kernel': <'{GUEST}'>, 'Interfaces': <[{{'Switch': <'lan'>}}]>}}"),
        ],
    );
    assert_not_permitted(&refused, "org.vmd.vmd1.network", "CreateVM on lan as alice");
    let listed = vmd.ok(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "ListVMs",
    ]);
    assert_eq!(listed.trim(), "a(sso) 0");
    // A switch that does not exist is an invalid argument, for anyone.
    let unknown = gdbus_as(
        &vmd,
        "bob",
        MANAGER,
        "org.vmd.vmd1.Manager.CreateVM",
        &[
            "b0",
            &format!("{{'Kernel': <'{GUEST}'>, 'Interfaces': <[{{'Switch': <'wan'>}}]>}}"),
        ],
    );
    assert!(
        stderr_of(&unknown).contains("org.vmd.vmd1.Error.InvalidArgument")
            && stderr_of(&unknown).contains("no switch \"wan\""),
        "{}",
        stderr_of(&unknown)
    );

    // bob is in the switch's group.
    let started = start("bob", "b1", "10.200.9.6");
    assert!(started.status.success(), "{}", stderr_of(&started));
    vmd.wait_state("b1", "running", LIMIT);
    assert!(ports_of_the_bridge(&vmd).contains(" vt-b1:"));
    let reply = ping(&vmd, "10.200.9.6");
    assert!(reply.contains("3 received"), "{reply}");

    // alice with the polkit action.
    grant(
        &vmd,
        "50-network.rules",
        "polkit.addRule(function(action, subject) {\n  if (action.id == \"org.vmd.vmd1.network\" && subject.user == \"alice\") return polkit.Result.YES;\n});\n",
        "alice",
        "org.vmd.vmd1.network",
    );
    let started = start("alice", "a1", "10.200.9.5");
    assert!(started.status.success(), "{}", stderr_of(&started));
    vmd.wait_state("a1", "running", LIMIT);
    assert!(ports_of_the_bridge(&vmd).contains(" vt-a1:"));
}

/// Opens a tap (or, for "file", a plain file) itself and passes it to CreateVMWithFiles as
/// net0, with the test guest as the kernel (dbus-python, as a caller that is not vmd's).
const TAP_CLIENT: &str = r#"
import dbus, fcntl, os, struct, sys
kind, name, cmdline = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "tap":
    tap = os.open("/dev/net/tun", os.O_RDWR)
    # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; TUNSETIFF
    fcntl.ioctl(tap, 0x400454ca, struct.pack("16sH", b"mytap0", 0x0002 | 0x1000 | 0x4000))
else:
    tap = os.open("/etc/hostname", os.O_RDONLY)
kernel = os.open("/var/lib/vmd-test/testguest.elf", os.O_RDONLY)
bus = dbus.SystemBus()
manager = dbus.Interface(bus.get_object("org.vmd.vmd1", "/org/vmd/vmd1"), "org.vmd.vmd1.Manager")
try:
    manager.CreateVMWithFiles(name, {"MemoryBytes": dbus.UInt64(64 << 20), "Cmdline": cmdline},
                              {"kernel": dbus.types.UnixFd(kernel), "net0": dbus.types.UnixFd(tap)})
    print("accepted")
except dbus.DBusException as e:
    print(e.get_dbus_name(), e.get_dbus_message())
    sys.exit(1)
"#;

#[test]
fn a_tap_the_caller_opened_is_the_vms_interface() {
    let Some(vmd) = Vmd::boot() else { return };
    let refused = vmd.run(&[
        "/usr/bin/python3",
        "-c",
        TAP_CLIENT,
        "file",
        "notap",
        "testguest=net ip=10.200.10.2",
    ]);
    let printed = String::from_utf8_lossy(&refused.stdout).into_owned();
    assert!(
        printed.contains("org.vmd.vmd1.Error.InvalidArgument") && printed.contains("net0"),
        "{printed}"
    );
    vmd.ok(&[
        "/usr/bin/python3",
        "-c",
        TAP_CLIENT,
        "tap",
        "own",
        "testguest=net ip=10.200.10.2",
    ]);
    // The caller is gone; the daemon keeps the tap for the VM.
    vmd.ok(&["ip", "addr", "add", "10.200.10.1/24", "dev", "mytap0"]);
    vmd.ok(&["ip", "link", "set", "mytap0", "up"]);
    let interfaces = vmd.ok(&[
        "busctl",
        "get-property",
        "org.vmd.vmd1",
        &Vmd::vm_path("own"),
        "org.vmd.vmd1.VM",
        "Interfaces",
    ]);
    assert!(
        interfaces.contains("\"mytap0\"") && interfaces.contains("\"Passed\" b true"),
        "{interfaces}"
    );
    vmd.call("own", "Start");
    vmd.wait_state("own", "running", LIMIT);
    wait_for_answers(&vmd, "10.200.10.2");
    assert!(!vmd.run(&["ip", "link", "show", "vt-own"]).status.success());
    // Stopped, the VM keeps its tap for the next start.
    vmd.call("own", "Kill");
    vmd.wait_state("own", "stopped", LIMIT);
    vmd.ok(&["ip", "link", "show", "mytap0"]);
    vmd.call("own", "Start");
    vmd.wait_state("own", "running", LIMIT);
    wait_for_answers(&vmd, "10.200.10.2");
}

#[path = "daemon/client_api.rs"]
mod client_api;
