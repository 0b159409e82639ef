//! Linux boot time: the project's test kernel (`tests/linux/build.sh`, with its own `/init`)
//! under `vmd run`, against QEMU `-M microvm,accel=kvm` and, when there is one, Firecracker, in
//! the same run, the VMMs taking turns. Each boot has 1 vCPU, 128 MiB and the command line
//! `console=ttyS0` (the kernel's built-in line carries the rest). Printed as medians:
//! - to the first kernel console line ("Linux version ..."), from the VMM's start;
//! - to `linux-guest: ready`, printed by `/init` as it starts.
//!
//! vmd and Firecracker boot the ELF vmlinux; QEMU loads an ELF kernel only through a PVH note,
//! which this kernel has not (no Xen guest support), so QEMU boots the bzImage (its payload is
//! uncompressed). Firecracker is `$VMD_BENCH_FIRECRACKER` or `firecracker` on PATH, with
//! `$VMD_BENCH_FIRECRACKER_ARGS` added to its arguments.
//!
//! Run with `cargo bench --bench linux_boot` (`VMD_BENCH_RUNS` sets the boots per VMM, default
//! 3; a boot takes 10-30 s on a kvm_pvm host). Under `cargo test` no Linux boots unless
//! `VMD_BENCH_LINUX=1` asks for one vmd boot.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[path = "../tests/common/linux.rs"]
mod linux;
use linux::Kernel;

const VMD: &str = env!("CARGO_BIN_EXE_vmd");
const QEMU: &str = "qemu-system-x86_64";
const MEMORY_MIB: u32 = 128;
const CMDLINE: &str = "console=ttyS0";
const FIRST_LINE: &str = "Linux version";
const READY: &str = "linux-guest: ready";
const DONE: &str = "linux-guest: done";
/// Longest a boot may take before the benchmark gives up on it.
const BOOT_LIMIT: Duration = Duration::from_secs(240);

/// One boot's figures.
#[derive(Clone, Copy)]
struct Boot {
    first_line: Duration,
    ready: Duration,
}

/// A VMM and how it boots the kernel.
enum Vmm {
    Vmd,
    Qemu,
    Firecracker(PathBuf),
}

impl Vmm {
    fn name(&self) -> &'static str {
        match self {
            Vmm::Vmd => "vmd run (vmlinux)",
            Vmm::Qemu => "QEMU microvm (bzImage)",
            Vmm::Firecracker(_) => "Firecracker (vmlinux)",
        }
    }

    fn command(&self, kernel: &Kernel, scratch: &Path) -> Command {
        match self {
            Vmm::Vmd => {
                let mut command = Command::new(VMD);
                command
                    .args(["run", "--kernel"])
                    .arg(&kernel.vmlinux)
                    .args(["--memory", &format!("{MEMORY_MIB}M"), "--cmdline", CMDLINE]);
                command
            }
            Vmm::Qemu => {
                let mut command = Command::new(QEMU);
                command
                    // Without microvm's own (hardware-reduced) ACPI tables: with them, this
                    // kernel stalls in its timer set-up after "tsc: Marking TSC unstable" on
                    // kvm_pvm; without, it finds QEMU's MP table.
                    .args(["-M", "microvm,accel=kvm,acpi=off"])
                    .args(["-cpu", "host", "-smp", "1"])
                    .args(["-m", &format!("{MEMORY_MIB}M")])
                    .args(["-nodefaults", "-no-user-config", "-nographic"])
                    .args(["-serial", "stdio", "-no-reboot", "-kernel"])
                    .arg(&kernel.bzimage)
                    .args(["-append", CMDLINE]);
                command
            }
            Vmm::Firecracker(binary) => {
                let config = scratch.join("firecracker.json");
                let json = format!(
                    r#"{{"boot-source":{{"kernel_image_path":"{}","boot_args":"{CMDLINE}"}},
"drives":[],"machine-config":{{"vcpu_count":1,"mem_size_mib":{MEMORY_MIB}}}}}"#,
                    kernel.vmlinux.display()
                );
                std::fs::write(&config, json).expect("write the Firecracker configuration");
                let mut command = Command::new(binary);
                command
                    .args(["--no-api", "--level", "Warning", "--config-file"])
                    .arg(&config)
                    // As in the helper bench: e.g. `--no-seccomp` for a glibc build, whose
                    // system calls Firecracker's musl filter does not allow.
                    .args(
                        std::env::var("VMD_BENCH_FIRECRACKER_ARGS")
                            .unwrap_or_default()
                            .split_whitespace(),
                    );
                command
            }
        }
    }
}

/// Console lines with the time each arrived, read on a thread of their own.
fn console_lines(child: &mut Child) -> mpsc::Receiver<(Instant, String)> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    receiver
}

/// Boots once; stops the VMM once /init is done (QEMU's microvm has no i8042, so the guest's
/// reboot would otherwise take Linux's slow fallbacks).
fn boot(vmm: &Vmm, kernel: &Kernel, scratch: &Path) -> Boot {
    let started = Instant::now();
    let mut child = vmm
        .command(kernel, scratch)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", vmm.name()));
    let lines = console_lines(&mut child);
    let mut first_line = None;
    let mut ready = None;
    let mut console = String::new();
    while let Some(left) = BOOT_LIMIT.checked_sub(started.elapsed()) {
        let Ok((at, line)) = lines.recv_timeout(left) else {
            break;
        };
        console.push_str(&line);
        console.push('\n');
        if first_line.is_none() && line.contains(FIRST_LINE) {
            first_line = Some(at - started);
        }
        if ready.is_none() && line.contains(READY) {
            ready = Some(at - started);
        }
        if line.contains(DONE) {
            break;
        }
    }
    // Give a VMM that exits by itself on the guest's reboot a moment, then end it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    match (first_line, ready) {
        (Some(first_line), Some(ready)) => Boot { first_line, ready },
        _ => panic!(
            "{} did not boot to {READY:?} within {BOOT_LIMIT:?}:\n{console}",
            vmm.name()
        ),
    }
}

fn find_firecracker() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("VMD_BENCH_FIRECRACKER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("firecracker"))
        .find(|candidate| candidate.is_file())
}

fn have_qemu() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let bench = args.iter().any(|a| a == "--bench");
    if !bench && std::env::var_os("VMD_BENCH_LINUX").is_none() {
        println!("linux_boot: test mode boots no Linux (VMD_BENCH_LINUX=1 asks for one vmd boot)");
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        panic!("linux_boot: /dev/kvm does not exist");
    }
    let runs: usize = if bench {
        std::env::var("VMD_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(3)
    } else {
        1
    };
    if std::env::var_os("VMD_LOG").is_none() {
        // SAFETY: still single-threaded; the VMMs started later inherit the variable.
        unsafe { std::env::set_var("VMD_LOG", "warn") };
    }
    let kernel = linux::kernel();
    let scratch = tempfile::tempdir().expect("scratch directory");

    let mut vmms = vec![Vmm::Vmd];
    if bench {
        if have_qemu() {
            vmms.push(Vmm::Qemu);
        } else {
            println!("linux_boot: no {QEMU}, the QEMU column is skipped");
        }
        match find_firecracker() {
            Some(path) => vmms.push(Vmm::Firecracker(path)),
            None => println!(
                "linux_boot: no firecracker on PATH and VMD_BENCH_FIRECRACKER unset, \
                 the Firecracker column is skipped"
            ),
        }
    }

    let mut boots: Vec<Vec<Boot>> = vec![Vec::new(); vmms.len()];
    for _ in 0..runs {
        for (vmm, samples) in vmms.iter().zip(&mut boots) {
            samples.push(boot(vmm, kernel, scratch.path()));
        }
    }

    println!(
        "Linux boot ({runs} boots each, alternating; 1 vCPU, {MEMORY_MIB} MiB, {})",
        kernel.vmlinux.display()
    );
    println!(
        "  {:<26} {:>14} {:>14} {:>12}",
        "", "first line", "/init ready", "vmd / this"
    );
    let mut vmd_ready = None;
    for (vmm, samples) in vmms.iter().zip(&boots) {
        let first = median(&mut samples.iter().map(|b| b.first_line).collect::<Vec<_>>());
        let ready = median(&mut samples.iter().map(|b| b.ready).collect::<Vec<_>>());
        let base = *vmd_ready.get_or_insert(ready);
        println!(
            "  {:<26} {:>12.2} s {:>12.2} s {:>12.2}",
            vmm.name(),
            first.as_secs_f64(),
            ready.as_secs_f64(),
            base.as_secs_f64() / ready.as_secs_f64()
        );
    }
    println!("  (medians; below 1 in the last column means vmd reached /init sooner)");
}
