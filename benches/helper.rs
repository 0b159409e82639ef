//! Helper start-up and exit-handling figures, printed as medians over repeated runs of the test
//! guest through the real launcher (fork + exec of `vmd vm` with LISTEN_FDS):
//! - exec → first console byte of `testguest=hello`;
//! - total run time of `hello` (spawn → helper reaped);
//! - helper peak RSS (from wait4's rusage);
//! - port-I/O exits per second with `testguest=exits=N` (console timestamps around the loop).
//!
//! Then whole VMMs side by side on the same guest (`testguest=reboot`, 128 MiB, 1 vCPU), runs
//! alternating between them: `vmd run` (or the build `VMD_BENCH_VMD` names), Firecracker (a
//! `firecracker` on PATH or the one `VMD_BENCH_FIRECRACKER` names; left out with a message when
//! there is none) and QEMU's microvm (`qemu-system-x86_64`, through the guest's PVH note, with
//! `testguest=hello`: microvm has no i8042 to reset through, so it powers off). For each:
//! process start → first guest byte on stdout, process start → exit after the guest's reset
//! or power-off, peak RSS (GNU time's `%M`: the process and its children), and the private
//! memory (USS, from `/proc/PID/smaps_rollup`) of the process running the guest once
//! `testguest=spin` runs. vmd's ratio to each peer is printed (below 1: vmd is faster or
//! smaller). benches/README.md says where the time and memory go.
//!
//! Run with `cargo bench --bench helper` (set `VMD_BENCH_RUNS` to change the repeat count).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmd::launch::{HelperProcess, HelperSpawn, Launcher};
use vmd::protocol::{Event, Request, VmConfig};

const VMD: &str = env!("CARGO_BIN_EXE_vmd");
const TESTGUEST: &str = env!("VMD_TESTGUEST_ELF");
const EXITS: u64 = 20_000;

struct Sample {
    first_byte: Duration,
    total: Duration,
    peak_rss_kib: i64,
    console: Vec<u8>,
    /// Arrival time of each console line, from spawn.
    lines: Vec<(Duration, String)>,
}

fn run_once(launcher: &Launcher, scenario: &str) -> Sample {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("/dev/kvm");
    let kernel = File::open(TESTGUEST).expect("test guest");
    let (mut console, helper_console) = UnixStream::pair().expect("socketpair");
    let fds: Vec<(String, OwnedFd)> = vec![
        ("kvm".into(), kvm.into()),
        ("kernel".into(), kernel.into()),
        ("console".into(), helper_console.into()),
    ];
    let start = Instant::now();
    let helper = launcher
        .spawn(HelperSpawn {
            fds,
            args: vec!["vm".into()],
        })
        .expect("spawn");
    let config = VmConfig {
        name: "bench".into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        cmdline: format!("testguest={scenario}"),
        disks: Vec::new(),
        entropy: false,
        interfaces: Vec::new(),
    };
    helper
        .control
        .send_request(&Request::Start { config })
        .expect("start");
    let created = helper.control.recv_event_timeout(Duration::from_secs(30));
    assert!(matches!(created, Ok(Some(Event::Created))), "{created:?}");

    let mut output = Vec::new();
    let mut lines = Vec::new();
    let mut partial = Vec::new();
    let mut first_byte = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = console.read(&mut buf).expect("read console");
        if n == 0 {
            break;
        }
        let now = start.elapsed();
        first_byte.get_or_insert(now);
        output.extend_from_slice(&buf[..n]);
        // A line is timed by the read that completed it.
        partial.extend_from_slice(&buf[..n]);
        while let Some(end) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            lines.push((now, String::from_utf8_lossy(&line).trim_end().to_string()));
        }
    }
    let peak_rss_kib = reap(&helper);
    Sample {
        first_byte: first_byte.unwrap_or_default(),
        total: start.elapsed(),
        peak_rss_kib,
        console: output,
        lines,
    }
}

/// Waits for the helper and returns its peak RSS in KiB.
fn reap(helper: &HelperProcess) -> i64 {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for the kernel to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid pointers to locals.
    let pid = unsafe { libc::wait4(helper.pid.as_raw(), &mut status, 0, &mut usage) };
    assert_eq!(pid, helper.pid.as_raw(), "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "helper status {status:#x}"
    );
    let _ = helper.pidfd.as_raw_fd();
    usage.ru_maxrss
}

fn median<T: Copy + Ord>(values: &mut [T]) -> T {
    values.sort();
    values[values.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        // Test harnesses ask for a listing; there is nothing to list.
        return;
    }
    // `cargo bench` passes --bench; under `cargo test` one quick round checks that it works.
    let runs: usize = if args.iter().any(|a| a == "--bench") {
        std::env::var("VMD_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20)
    } else {
        1
    };
    if std::env::var_os("VMD_LOG").is_none() {
        // SAFETY: still single-threaded; the helpers inherit the variable.
        unsafe { std::env::set_var("VMD_LOG", "warn") };
    }
    // As the daemon launches: the helpers' account looked up once, here.
    let launcher = Launcher::from_path(Path::new(VMD))
        .expect("vmd binary")
        .resolve_account();

    let mut first = Vec::new();
    let mut total = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        let sample = run_once(&launcher, "hello");
        assert!(
            String::from_utf8_lossy(&sample.console).contains("testguest: hello"),
            "unexpected console output"
        );
        first.push(sample.first_byte);
        total.push(sample.total);
        rss.push(sample.peak_rss_kib);
    }

    let mut rates = Vec::new();
    for _ in 0..runs.div_ceil(4) {
        let sample = run_once(&launcher, &format!("exits={EXITS}"));
        let at = |needle: &str| {
            sample
                .lines
                .iter()
                .find(|(_, line)| line.contains(needle))
                .map(|(t, _)| *t)
                .expect("marker line")
        };
        let elapsed = at("testguest: exits done") - at(&format!("testguest: exits={EXITS} start"));
        rates.push((EXITS as f64 / elapsed.as_secs_f64()) as u64);
    }

    println!(
        "vmd helper benchmark ({runs} runs of testguest=hello, {} of exits={EXITS})",
        rates.len()
    );
    println!(
        "  exec -> first console byte   median {:>8.2} ms",
        median(&mut first).as_secs_f64() * 1e3
    );
    println!(
        "  total run (spawn -> reaped)  median {:>8.2} ms",
        median(&mut total).as_secs_f64() * 1e3
    );
    println!(
        "  helper peak RSS              median {:>8} KiB",
        median(&mut rss)
    );
    println!(
        "  port I/O exits per second    median {:>8}",
        median(&mut rates)
    );

    print_startup_symbols_found();
    compare_peers(runs);
}

/// Guest memory of the side-by-side runs, in MiB.
const PEER_MEMORY_MIB: u64 = 128;

/// A VMM that runs the test guest as one process with the guest console on stdout.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    Vmd,
    Firecracker,
    Qemu,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Vmd => "vmd run",
            Peer::Firecracker => "Firecracker",
            Peer::Qemu => "QEMU microvm",
        }
    }
}

/// What the peers need on this machine; `None` for one that is missing.
struct Peers {
    firecracker: Option<PathBuf>,
    qemu: Option<PathBuf>,
    /// Firecracker's configuration files, one per scenario.
    dir: tempfile::TempDir,
}

impl Peers {
    fn find() -> Peers {
        let firecracker = std::env::var_os("VMD_BENCH_FIRECRACKER")
            .map(PathBuf::from)
            .or_else(|| on_path("firecracker"));
        match &firecracker {
            Some(path) if path.is_file() => {}
            Some(path) => panic!(
                "VMD_BENCH_FIRECRACKER names {}, which is not a file",
                path.display()
            ),
            None => println!(
                "  Firecracker: none on PATH and VMD_BENCH_FIRECRACKER is not set; left out"
            ),
        }
        let qemu = on_path("qemu-system-x86_64");
        if qemu.is_none() {
            println!("  QEMU: no qemu-system-x86_64 on PATH; left out");
        }
        Peers {
            firecracker,
            qemu,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn available(&self) -> Vec<Peer> {
        let mut peers = vec![Peer::Vmd];
        if self.firecracker.is_some() {
            peers.push(Peer::Firecracker);
        }
        if self.qemu.is_some() {
            peers.push(Peer::Qemu);
        }
        peers
    }

    /// The command line that boots the test guest with `testguest=<scenario>` under `peer`.
    fn argv(&self, peer: Peer, scenario: &str) -> Vec<OsString> {
        let cmdline = format!("testguest={scenario}");
        let memory = format!("{PEER_MEMORY_MIB}M");
        match peer {
            Peer::Vmd => {
                // VMD_BENCH_VMD: another build of vmd to compare (e.g. before a change).
                let vmd = std::env::var_os("VMD_BENCH_VMD").unwrap_or_else(|| VMD.into());
                let mut argv = vec![vmd];
                argv.extend(
                    [
                        "run", "--kernel", TESTGUEST, "--cpus", "1", "--memory", &memory,
                    ]
                    .map(OsString::from),
                );
                argv.extend(["--cmdline".into(), cmdline.into()]);
                argv
            }
            Peer::Firecracker => {
                let config = self.dir.path().join(format!("{scenario}.json"));
                let text = format!(
                    r#"{{"boot-source": {{"kernel_image_path": "{TESTGUEST}", "boot_args": "{cmdline}"}},
"drives": [],
"machine-config": {{"vcpu_count": 1, "mem_size_mib": {PEER_MEMORY_MIB}}}}}"#
                );
                std::fs::write(&config, text).expect("write the Firecracker configuration");
                let firecracker = self.firecracker.clone().expect("checked by available()");
                let mut argv = vec![firecracker.into_os_string()];
                argv.extend(["--no-api", "--level", "Error"].map(OsString::from));
                argv.extend(firecracker_extra_args());
                argv.push("--config-file".into());
                argv.push(config.into_os_string());
                argv
            }
            Peer::Qemu => {
                let qemu = self.qemu.clone().expect("checked by available()");
                let mut argv = vec![qemu.into_os_string()];
                argv.extend(
                    [
                        "-M",
                        "microvm,accel=kvm",
                        "-cpu",
                        "host",
                        "-m",
                        &memory,
                        "-smp",
                        "1",
                    ]
                    .map(OsString::from),
                );
                // qboot (not SeaBIOS, which prints a banner on the serial port) when installed.
                if Path::new(QBOOT).is_file() {
                    argv.extend(["-bios", QBOOT].map(OsString::from));
                }
                argv.extend(
                    [
                        "-nodefaults",
                        "-no-user-config",
                        "-nographic",
                        "-no-reboot",
                        "-serial",
                        "stdio",
                        "-kernel",
                        TESTGUEST,
                        "-append",
                        &cmdline,
                    ]
                    .map(OsString::from),
                );
                argv
            }
        }
    }

    /// The scenario that prints a line and then ends the VM: QEMU's microvm has no i8042 to
    /// reset through, so it powers off instead (through its ACPI GED); Firecracker only ends on
    /// the i8042 reset.
    fn ending_scenario(peer: Peer) -> &'static str {
        match peer {
            Peer::Qemu => "hello",
            Peer::Vmd | Peer::Firecracker => "reboot",
        }
    }
}

/// QEMU's minimal firmware for microvm (Debian's qemu-system-data).
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
/// GNU time: its `%M` is the peak RSS of the process it runs (and its children), measured from
/// a process of its own size. A VMM spawned from this (larger) process would inherit this
/// process's high-water mark in wait4's `ru_maxrss`, which survives exec.
const GNU_TIME: &str = "/usr/bin/time";

/// `VMD_BENCH_FIRECRACKER_ARGS`: more arguments for Firecracker, split at whitespace (e.g.
/// `--no-seccomp` for a glibc build, whose syscalls its musl filter does not allow).
fn firecracker_extra_args() -> Vec<OsString> {
    std::env::var("VMD_BENCH_FIRECRACKER_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(OsString::from)
        .collect()
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// One whole-process run of `testguest=reboot`.
struct PeerRun {
    first_byte: Duration,
    exit: Duration,
    peak_rss_kib: i64,
}

fn run_peer(peers: &Peers, peer: Peer) -> PeerRun {
    let rss_file = peers.dir.path().join("peak-rss");
    let mut command = Command::new(GNU_TIME);
    command
        .args(["-f", "%M", "-o"])
        .arg(&rss_file)
        .args(peers.argv(peer, Peers::ending_scenario(peer)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("run {GNU_TIME} (apt-get install time): {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut output = Vec::new();
    let mut first_byte = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buf).expect("read the console");
        if n == 0 {
            break;
        }
        first_byte.get_or_insert_with(|| start.elapsed());
        output.extend_from_slice(&buf[..n]);
    }
    let status = child.wait().expect("wait");
    let exit = start.elapsed();
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    let console = String::from_utf8_lossy(&output);
    assert!(
        console.contains("testguest: rebooting") || console.contains("testguest: hello"),
        "{}: the guest did not end ({status}); console:\n{console}\nstderr:\n{stderr}",
        peer.name(),
    );
    let peak_rss_kib = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|text| text.lines().last()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{GNU_TIME} wrote no peak RSS; stderr:\n{stderr}"));
    PeerRun {
        first_byte: first_byte.unwrap_or_default(),
        exit,
        peak_rss_kib,
    }
}

/// The private memory (USS: Private_Clean + Private_Dirty + Private_Hugetlb) of `pid`, in KiB.
fn uss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/smaps_rollup: {e}"));
    text.lines()
        .filter(|line| line.starts_with("Private_"))
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// The USS of the process that runs the guest (for `vmd run`, its helper, the one child) and
/// of the whole run (`vmd run` and its helper), once `testguest=spin` has said it runs.
fn peer_uss(peers: &Peers, peer: Peer) -> (u64, u64) {
    let argv = peers.argv(peer, "spin");
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command.spawn().expect("start the VMM");
    let mut console = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.contains("spin heartbeat") {
        line.clear();
        let n = console.read_line(&mut line).expect("read the console");
        assert!(n > 0, "{}: the guest did not start spinning", peer.name());
    }
    let pid = child.id();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let helpers: Vec<u32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let (guest, whole) = match (peer, helpers.as_slice()) {
        (Peer::Vmd, [helper]) => {
            let helper = uss_kib(*helper);
            (helper, helper + uss_kib(pid))
        }
        (Peer::Vmd, other) => panic!("vmd run has children {other:?}, not one helper"),
        _ => {
            let own = uss_kib(pid);
            (own, own)
        }
    };
    for helper in helpers {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(helper as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    (guest, whole)
}

/// How many of the functions `build/startup-symbols.txt` lists for the linker to place together
/// this vmd binary has: a list gone stale (renamed functions, new dependency versions, another
/// toolchain) shows here as a higher peak RSS would, and `build/startup-symbols.sh` renews it.
fn print_startup_symbols_found() {
    let listed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/build/startup-symbols.txt"
    ))
    .expect("build/startup-symbols.txt");
    let defined = match Command::new("nm").args(["--defined-only", VMD]).output() {
        Ok(output) if output.status.success() => output.stdout,
        _ => {
            println!("start-up symbol order: cannot run nm on {VMD}; not checked");
            return;
        }
    };
    let defined: std::collections::HashSet<&str> = std::str::from_utf8(&defined)
        .expect("nm prints UTF-8")
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .collect();
    let listed: Vec<&str> = listed.lines().filter(|name| !name.is_empty()).collect();
    let found = listed.iter().filter(|name| defined.contains(*name)).count();
    println!(
        "start-up symbol order: this vmd has {found} of the {} functions build/startup-symbols.txt lists (the release and the bench build name some differently)",
        listed.len()
    );
}

/// Runs every available peer `runs` times, alternating, and prints the figures and vmd's ratios.
fn compare_peers(runs: usize) {
    println!(
        "side by side: testguest=reboot (QEMU: hello, which powers off), {PEER_MEMORY_MIB} MiB, 1 vCPU, {runs} alternating runs each (medians)"
    );
    let peers = Peers::find();
    let available = peers.available();
    let mut samples: Vec<Vec<PeerRun>> = available.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (peer, samples) in available.iter().zip(&mut samples) {
            samples.push(run_peer(&peers, *peer));
        }
    }
    let uss: Vec<(u64, u64)> = available.iter().map(|p| peer_uss(&peers, *p)).collect();
    struct Figures {
        first_byte_ms: f64,
        exit_ms: f64,
        peak_rss_kib: i64,
        uss_kib: u64,
    }
    let figures: Vec<Figures> = samples
        .iter_mut()
        .zip(&uss)
        .map(|(samples, (guest_uss, _))| Figures {
            first_byte_ms: median(&mut samples.iter().map(|s| s.first_byte).collect::<Vec<_>>())
                .as_secs_f64()
                * 1e3,
            exit_ms: median(&mut samples.iter().map(|s| s.exit).collect::<Vec<_>>()).as_secs_f64()
                * 1e3,
            peak_rss_kib: median(&mut samples.iter().map(|s| s.peak_rss_kib).collect::<Vec<_>>()),
            uss_kib: *guest_uss,
        })
        .collect();
    println!(
        "  {:<14} {:>16} {:>16} {:>14} {:>18}",
        "", "first byte (ms)", "exit (ms)", "peak RSS (KiB)", "guest USS (KiB)"
    );
    for (peer, f) in available.iter().zip(&figures) {
        println!(
            "  {:<14} {:>16.2} {:>16.2} {:>14} {:>18}",
            peer.name(),
            f.first_byte_ms,
            f.exit_ms,
            f.peak_rss_kib,
            f.uss_kib
        );
    }
    println!(
        "  (vmd run's guest USS is its helper's; with the vmd run front end too: {} KiB)",
        uss[0].1
    );
    let vmd = &figures[0];
    for (peer, f) in available.iter().zip(&figures).skip(1) {
        println!(
            "  vmd / {:<13} first byte {:.2}x (target <= 0.8), exit {:.2}x (target <= 0.5), peak RSS {:.2}x (target <= 0.7), guest USS {:.2}x",
            peer.name(),
            vmd.first_byte_ms / f.first_byte_ms,
            vmd.exit_ms / f.exit_ms,
            vmd.peak_rss_kib as f64 / f.peak_rss_kib as f64,
            vmd.uss_kib as f64 / f.uss_kib as f64,
        );
    }
}
