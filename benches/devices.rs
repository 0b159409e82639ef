//! virtio-blk throughput, vmd against QEMU, printed as medians over repeated runs of the test
//! guest on one raw image (made with `qemu-img create -f raw`, then filled):
//! - sequential reads in 128 KiB requests (`testguest=blk-read=MIB`), in MB/s;
//! - random 4 KiB reads (`testguest=blk-iops=N`), in requests per second;
//!
//! each timed between the guest's `start` and `done` console lines, so boot and device set-up
//! are left out. vmd runs through the real launcher (fork + exec of `vmd vm` with the disk fd);
//! QEMU runs `-M microvm,accel=kvm` with `-device virtio-blk-device` and the same test guest ELF
//! (its PVH entry), its serial console on stdout. Both read the image through the host's page
//! cache (QEMU's default `cache=writeback`; vmd's preadv). The ratio column is vmd / QEMU, so
//! above 1 means vmd is faster. Without `qemu-system-x86_64` the QEMU column is skipped.
//!
//! Run with `cargo bench --bench devices` (set `VMD_BENCH_RUNS` to change the repeat count,
//! default 5). Under `cargo test` one small round checks that it works.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmd::launch::{HelperSpawn, Launcher};
use vmd::protocol::{DiskConfig, DiskFds, Event, HelperFds, ImageFormat, Request, VmConfig};

const VMD: &str = env!("CARGO_BIN_EXE_vmd");
const TESTGUEST: &str = env!("VMD_TESTGUEST_ELF");
const QEMU: &str = "qemu-system-x86_64";
const GUEST_MEMORY_MIB: u64 = 64;

/// What one round measures.
struct Sizes {
    image_mib: u64,
    read_mib: u64,
    iops_requests: u64,
}

/// The console lines of one run, each with the time the read that completed it returned.
struct Console {
    lines: Vec<(Instant, String)>,
}

impl Console {
    fn read_all(pipe: impl Read) -> Console {
        let mut lines = Vec::new();
        for line in BufReader::new(pipe).split(b'\n') {
            let Ok(line) = line else { break };
            lines.push((
                Instant::now(),
                String::from_utf8_lossy(&line).trim_end().to_string(),
            ));
        }
        Console { lines }
    }

    fn at(&self, prefix: &str) -> Option<Instant> {
        self.lines
            .iter()
            .find(|(_, line)| line.starts_with(prefix))
            .map(|(t, _)| *t)
    }

    /// The time from the scenario's `start` line to its `done` line.
    fn elapsed(&self, name: &str, done: &str) -> Duration {
        let start = self.at(&format!("testguest: {name} start"));
        let end = self.at(&format!("testguest: {name} done {done}"));
        match (start, end) {
            (Some(start), Some(end)) => end - start,
            _ => panic!("no {name} start/done lines; console:\n{}", self.text()),
        }
    }

    fn text(&self) -> String {
        self.lines
            .iter()
            .map(|(_, line)| format!("{line}\n"))
            .collect()
    }
}

/// One guest run under vmd's helper with `image` as disk 0.
fn run_vmd(launcher: &Launcher, image: &Path, scenario: &str) -> Console {
    let open = |path: &Path, write: bool| -> OwnedFd {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
            .into()
    };
    let (console, helper_console) = UnixStream::pair().expect("socketpair");
    let fds = HelperFds {
        kvm: open(Path::new("/dev/kvm"), true),
        kernel: File::open(TESTGUEST).expect("test guest").into(),
        initrd: None,
        disks: vec![DiskFds {
            image: open(image, true),
            bases: Vec::new(),
        }],
        nets: Vec::new(),
        console: Some(helper_console.into()),
    };
    let config = VmConfig {
        name: "bench-devices".into(),
        vcpus: 1,
        memory_bytes: GUEST_MEMORY_MIB << 20,
        cmdline: format!("testguest={scenario}"),
        disks: vec![DiskConfig {
            format: ImageFormat::Raw,
            read_only: false,
            serial: String::new(),
            backing: Vec::new(),
        }],
        entropy: false,
        interfaces: Vec::new(),
    };
    let helper = launcher
        .spawn(HelperSpawn {
            fds: fds.into_spawn_list(),
            args: vec!["vm".into()],
        })
        .expect("spawn helper");
    helper
        .control
        .send_request(&Request::Start { config })
        .expect("start");
    let created = helper.control.recv_event_timeout(Duration::from_secs(30));
    assert!(matches!(created, Ok(Some(Event::Created))), "{created:?}");
    let console = Console::read_all(console);
    let status = nix::sys::wait::waitpid(helper.pid, None).expect("waitpid");
    assert_eq!(
        status,
        nix::sys::wait::WaitStatus::Exited(helper.pid, 0),
        "helper; console:\n{}",
        console.text()
    );
    console
}

/// One guest run under QEMU's microvm with `image` as the first virtio-blk device.
fn run_qemu(image: &Path, scenario: &str) -> Console {
    let mut child = Command::new(QEMU)
        .args(["-M", "microvm,accel=kvm,acpi=off"])
        .args(["-m", &GUEST_MEMORY_MIB.to_string()])
        .args(["-smp", "1", "-nodefaults", "-no-user-config", "-nographic"])
        .args(["-no-reboot", "-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(["-kernel", TESTGUEST])
        .args(["-append", &format!("console=ttyS0 testguest={scenario}")])
        .arg("-drive")
        .arg(format!(
            "id=d0,file={},format=raw,if=none",
            image.to_str().expect("UTF-8 temp path")
        ))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu");
    let console = Console::read_all(child.stdout.take().expect("stdout"));
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    let status = child.wait().expect("wait qemu");
    // isa-debug-exit with 0 exits with (0 << 1) | 1.
    assert_eq!(
        status.code(),
        Some(1),
        "qemu: {stderr}; console:\n{}",
        console.text()
    );
    console
}

/// A raw image of `mib` MiB made by qemu-img, then filled with non-zero data so that reads
/// are not of holes.
fn make_image(dir: &Path, mib: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    let output = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&path)
        .arg(format!("{mib}M"))
        .output()
        .expect("run qemu-img (apt-get install qemu-utils)");
    assert!(output.status.success(), "qemu-img: {output:?}");
    let mut file = OpenOptions::new().write(true).open(&path).expect("image");
    let mut chunk = vec![0u8; 1 << 20];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&chunk).expect("fill image");
    }
    file.sync_all().expect("sync image");
    path
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// MB/s (10^6 bytes) and requests per second of one engine.
struct Figures {
    read_mb_s: f64,
    iops: f64,
}

fn measure(sizes: &Sizes, runs: usize, mut run: impl FnMut(&str) -> Console) -> Figures {
    let read = format!("blk-read={}", sizes.read_mib);
    let iops = format!("blk-iops={}", sizes.iops_requests);
    let mut rates = Vec::new();
    let mut requests = Vec::new();
    for _ in 0..runs {
        let seconds = run(&read)
            .elapsed("blk-read", &format!("{} MiB", sizes.read_mib))
            .as_secs_f64();
        rates.push((sizes.read_mib << 20) as f64 / seconds / 1e6);
        let seconds = run(&iops)
            .elapsed("blk-iops", &sizes.iops_requests.to_string())
            .as_secs_f64();
        requests.push(sizes.iops_requests as f64 / seconds);
    }
    Figures {
        read_mb_s: median(&mut rates),
        iops: median(&mut requests),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        // Test harnesses ask for a listing; there is nothing to list.
        return;
    }
    // `cargo bench` passes --bench; under `cargo test` one quick round checks that it works.
    let bench = args.iter().any(|a| a == "--bench");
    let (runs, sizes) = if bench {
        let runs = std::env::var("VMD_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or(5);
        let sizes = Sizes {
            image_mib: 128,
            read_mib: 64,
            iops_requests: 4000,
        };
        (runs, sizes)
    } else {
        let sizes = Sizes {
            image_mib: 4,
            read_mib: 2,
            iops_requests: 100,
        };
        (1, sizes)
    };
    if std::env::var_os("VMD_LOG").is_none() {
        // SAFETY: still single-threaded; the helpers inherit the variable.
        unsafe { std::env::set_var("VMD_LOG", "warn") };
    }
    let launcher = Launcher::from_path(Path::new(VMD)).expect("vmd binary");
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path(), sizes.image_mib);

    println!(
        "virtio-blk benchmark: medians of {runs} run(s), raw image of {} MiB (page cache), \
         blk-read={} (128 KiB requests), blk-iops={} (4 KiB random)",
        sizes.image_mib, sizes.read_mib, sizes.iops_requests
    );
    let vmd = measure(&sizes, runs, |scenario| {
        run_vmd(&launcher, &image, scenario)
    });
    let qemu = if on_path(QEMU) {
        Some(measure(&sizes, runs, |scenario| run_qemu(&image, scenario)))
    } else {
        println!("  {QEMU} not found on PATH: the QEMU column is skipped");
        None
    };

    println!(
        "  {:<28} {:>12} {:>12} {:>10}",
        "", "vmd", "QEMU microvm", "vmd/QEMU"
    );
    let row = |name: &str, ours: f64, theirs: Option<f64>| {
        let (theirs, ratio) = match theirs {
            Some(theirs) => (format!("{theirs:.1}"), format!("{:.2}", ours / theirs)),
            None => ("-".into(), "-".into()),
        };
        println!("  {name:<28} {ours:>12.1} {theirs:>12} {ratio:>10}");
    };
    row(
        "sequential 128 KiB, MB/s",
        vmd.read_mb_s,
        qemu.as_ref().map(|q| q.read_mb_s),
    );
    row(
        "random 4 KiB, IOPS",
        vmd.iops,
        qemu.as_ref().map(|q| q.iops),
    );
    if on_path("firecracker") {
        println!("  note: firecracker is on PATH but not measured by this benchmark");
    }
}
