//! Helper start-up and exit-handling figures, printed as medians over repeated runs of the test
//! guest through the real launcher (fork + exec of `vmd vm` with LISTEN_FDS):
//! - exec → first console byte of `testguest=hello`;
//! - total run time of `hello` (spawn → helper reaped);
//! - helper peak RSS (from wait4's rusage);
//! - port-I/O exits per second with `testguest=exits=N` (console timestamps around the loop).
//!
//! Run with `cargo bench --bench helper` (set `VMD_BENCH_RUNS` to change the repeat count).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
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
    let launcher = Launcher::from_path(Path::new(VMD)).expect("vmd binary");

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
}
