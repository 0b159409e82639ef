//! virtio-net, vmd against QEMU, printed as medians over repeated runs: the test guest's `net`
//! scenario (it answers ARP and ICMP echo) on a tap in a network namespace this benchmark makes
//! (10.200.11.0/24 and 10.200.12.0/24 inside it, nothing leaves it), and the host's `ping`:
//! - the round trip of single pings (`ping -i 0.02`), in microseconds;
//! - a flood of echo requests the guest answers (`ping -f`), in replies per second.
//!
//! vmd runs through the real launcher with the tap's fd (as the daemon passes it); QEMU runs
//! `-M microvm,accel=kvm` with `-device virtio-net-device` on a tap of its own in the same
//! namespace, with the same test guest ELF. The ratio column is vmd / QEMU for rates and QEMU /
//! vmd for round trips, so above 1 always means vmd is faster. Without `qemu-system-x86_64` the
//! QEMU column is skipped.
//!
//! Run with `cargo bench --bench net` (`VMD_BENCH_RUNS` sets the repeat count, default 5).
//! Under `cargo test` one small round checks that it works.

#[path = "../tests/common/netns.rs"]
#[allow(dead_code)]
mod netns;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use netns::NetNs;
use vmd::launch::{HelperSpawn, Launcher};
use vmd::protocol::{Event, HelperFds, InterfaceConfig, Request, VmConfig};

const VMD: &str = env!("CARGO_BIN_EXE_vmd");
const TESTGUEST: &str = env!("VMD_TESTGUEST_ELF");
const QEMU: &str = "qemu-system-x86_64";
const MAC: &str = "52:54:00:12:34:56";
const LINE_TIMEOUT: Duration = Duration::from_secs(60);

/// What one round sends.
struct Load {
    pings: u32,
    flood: u32,
}

/// One round's figures.
struct Figures {
    rtt_us: f64,
    replies_per_s: f64,
}

/// Waits for a console line starting with `prefix` from a reader thread's channel.
fn wait_line(lines: &mpsc::Receiver<String>, prefix: &str) {
    loop {
        match lines.recv_timeout(LINE_TIMEOUT) {
            Ok(line) if line.starts_with(prefix) => return,
            Ok(_) => {}
            Err(err) => panic!("no console line {prefix:?}: {err}"),
        }
    }
}

/// Reads console lines on a thread of their own.
fn console_lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

/// Pings `ip` from the namespace: the average single round trip, then the flood rate.
fn measure(ns: &NetNs, ip: &str, load: &Load) -> Figures {
    let count = load.pings.to_string();
    let ping = ns.exec(&["ping", "-q", "-c", &count, "-i", "0.02", "-W", "2", ip]);
    let text = String::from_utf8_lossy(&ping.stdout);
    // "rtt min/avg/max/mdev = 0.412/0.530/0.801/0.061 ms"
    let rtt_ms: f64 = text
        .lines()
        .find_map(|l| l.split_once(" = ").filter(|(k, _)| k.starts_with("rtt")))
        .and_then(|(_, v)| v.split('/').nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no round trip in ping's output:\n{text}"));
    let count = load.flood.to_string();
    let flood = ns.run(&["ping", "-q", "-f", "-c", &count, "-W", "1", ip]);
    let text = String::from_utf8_lossy(&flood.stdout);
    // "2000 packets transmitted, 2000 received, 0% packet loss, time 1234ms"
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no summary in ping -f's output:\n{text}"));
    let received: f64 = summary
        .split(", ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let time_ms: f64 = summary
        .rsplit("time ")
        .next()
        .and_then(|t| t.trim_end_matches("ms").parse().ok())
        .unwrap_or(f64::INFINITY);
    Figures {
        rtt_us: rtt_ms * 1000.0,
        replies_per_s: received / (time_ms / 1000.0),
    }
}

/// One round under vmd: the helper gets a tap of the namespace as `net0`.
fn run_vmd(launcher: &Launcher, ns: &NetNs, load: &Load) -> Figures {
    let tap = ns.tap("vt0");
    let _ = ns.run(&["ip", "addr", "flush", "dev", "vt0"]);
    ns.address("vt0", "10.200.11.1/24");
    let (console, helper_console) = UnixStream::pair().expect("socketpair");
    let kvm: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("/dev/kvm")
        .into();
    let fds = HelperFds {
        kvm,
        kernel: File::open(TESTGUEST).expect("test guest").into(),
        initrd: None,
        disks: Vec::new(),
        nets: vec![tap],
        console: Some(helper_console.into()),
    };
    let helper = launcher
        .spawn(HelperSpawn {
            fds: fds.into_spawn_list(),
            args: vec!["vm".into()],
        })
        .expect("spawn helper");
    let config = VmConfig {
        name: "bench-net".into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        cmdline: "testguest=net ip=10.200.11.2".into(),
        disks: Vec::new(),
        entropy: false,
        interfaces: vec![InterfaceConfig {
            mac: MAC.parse().expect("MAC"),
            locked_lladdr: true,
        }],
    };
    helper
        .control
        .send_request(&Request::Start { config })
        .expect("start");
    let first = helper.control.recv_event_timeout(LINE_TIMEOUT);
    assert!(
        matches!(first, Ok(Some(Event::Created))),
        "helper: {first:?}"
    );
    let lines = console_lines(console);
    wait_line(&lines, "testguest: net mac");
    let figures = measure(ns, "10.200.11.2", load);
    let _ = helper
        .control
        .send_request(&Request::Shutdown { deadline_ms: 5000 });
    wait_line(&lines, "testguest: net answered");
    let _ = helper.wait();
    figures
}

/// One round under QEMU's microvm, on a tap QEMU makes in the namespace.
fn run_qemu(ns: &NetNs, load: &Load) -> Figures {
    let mut child: Child = Command::new("ip")
        .args(["netns", "exec", &ns.name, QEMU])
        .args(["-M", "microvm,accel=kvm,acpi=off", "-m", "64", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(["-kernel", TESTGUEST])
        .args([
            "-append",
            "console=ttyS0 testguest=net ip=10.200.12.2 net-seconds=600",
        ])
        .args([
            "-netdev",
            "tap,id=n0,ifname=qt0,script=no,downscript=no",
            "-device",
        ])
        .arg(format!("virtio-net-device,netdev=n0,mac={MAC}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let lines = console_lines(child.stdout.take().expect("stdout"));
    wait_line(&lines, "testguest: net mac");
    ns.address("qt0", "10.200.12.1/24");
    let figures = measure(ns, "10.200.12.2", load);
    let _ = child.kill();
    let _ = child.wait();
    figures
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn medians(rounds: &[Figures]) -> Figures {
    Figures {
        rtt_us: median(&mut rounds.iter().map(|f| f.rtt_us).collect::<Vec<_>>()),
        replies_per_s: median(&mut rounds.iter().map(|f| f.replies_per_s).collect::<Vec<_>>()),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let bench = args.iter().any(|a| a == "--bench");
    let (runs, load) = if bench {
        let runs = std::env::var("VMD_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(5);
        (
            runs,
            Load {
                pings: 50,
                flood: 2000,
            },
        )
    } else {
        (
            1,
            Load {
                pings: 3,
                flood: 100,
            },
        )
    };
    if std::env::var_os("VMD_LOG").is_none() {
        // SAFETY: still single-threaded; the helpers inherit the variable.
        unsafe { std::env::set_var("VMD_LOG", "warn") };
    }
    let launcher = Launcher::from_path(Path::new(VMD)).expect("vmd binary");
    let ns = NetNs::new("bench");
    println!(
        "virtio-net benchmark: medians of {runs} run(s) of the test guest's net scenario on a tap; \
         {} single pings, a flood of {}",
        load.pings, load.flood
    );
    let vmd: Vec<Figures> = (0..runs).map(|_| run_vmd(&launcher, &ns, &load)).collect();
    let vmd = medians(&vmd);
    let qemu = if on_path(QEMU) {
        let rounds: Vec<Figures> = (0..runs).map(|_| run_qemu(&ns, &load)).collect();
        Some(medians(&rounds))
    } else {
        println!("  {QEMU} not found on PATH: the QEMU column is skipped");
        None
    };
    println!(
        "  {:<28} {:>12} {:>12} {:>10}",
        "", "vmd", "QEMU microvm", "speed-up"
    );
    let row = |name: &str, ours: f64, theirs: Option<f64>, higher_is_better: bool| {
        let (theirs, ratio) = match theirs {
            Some(theirs) => {
                let ratio = if higher_is_better {
                    ours / theirs
                } else {
                    theirs / ours
                };
                (format!("{theirs:.1}"), format!("{ratio:.2}"))
            }
            None => ("-".into(), "-".into()),
        };
        println!("  {name:<28} {ours:>12.1} {theirs:>12} {ratio:>10}");
    };
    row(
        "ping round trip, µs",
        vmd.rtt_us,
        qemu.as_ref().map(|q| q.rtt_us),
        false,
    );
    row(
        "ping flood, replies/s",
        vmd.replies_per_s,
        qemu.as_ref().map(|q| q.replies_per_s),
        true,
    );
    if on_path("firecracker") {
        println!("  note: firecracker is on PATH but not measured by this benchmark");
    }
}
