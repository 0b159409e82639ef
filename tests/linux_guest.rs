//! Linux under vmd with Linux's own virtio drivers: the project's test kernel (built from
//! Debian's `linux-source-6.1` by `tests/linux/build.sh`, cached under `target/linux/`) with its
//! own `/init` (`tests/linux/init.c`), booted as an ELF vmlinux and as a bzImage.
//!
//! The kernel carries the kvm_pvm workarounds (`tests/linux/README.md`), so these tests run on
//! kvm_pvm hosts and on hosts with hardware virtualization alike. The build needs Debian's
//! packages (the script installs them as root) and a few minutes the first time; the boots take
//! 15-30 s each on a kvm_pvm host, so they run one at a time.
//!
//! Where /dev/kvm is missing the tests say so and skip, except under `CI=true`, where every
//! missing part is a failure.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::linux::kernel;
use common::netns::NetNs;
use common::{Lines, RunningVm, VMD};

/// One boot, from start to the reboot at the end of /init (about 15-30 s on kvm_pvm).
const BOOT_LIMIT: Duration = Duration::from_secs(240);
const MEMORY: &str = "128M";
/// `vmd run`'s exit status when the guest asked to reboot, as /init does when it is done.
const EXIT_REBOOT: i32 = 75;
/// Where /init writes its pattern on /dev/vda, how much and what (tests/linux/init.c).
const PATTERN_OFFSET: u64 = 1 << 20;
const PATTERN_SIZE: u64 = 64 << 10;
const PATTERN_BYTE: u8 = 0xa5;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Why these tests cannot run here, if they cannot (a failure under CI=true).
fn unavailable() -> Option<String> {
    let reason = if !Path::new("/dev/kvm").exists() {
        "/dev/kvm does not exist"
    } else {
        return None;
    };
    assert!(!in_ci(), "CI=true and {reason}");
    Some(reason.into())
}

/// One Linux boot at a time: each keeps a CPU busy for its whole run on kvm_pvm.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Boots `kernel` under `vmd run` with the kernel command line `cmdline`; once the console
/// shows `signal_at` (if given), sends `vmd run` a SIGTERM. Returns the console, the exit code
/// and how long the guest took to print its ready line.
fn boot_with_vmd_run(
    kernel: &Path,
    cmdline: &str,
    signal_at: Option<&str>,
) -> (String, Option<i32>, Duration) {
    let started = Instant::now();
    let running = RunningVm::start(
        "",
        &[
            "--kernel",
            path_str(kernel),
            "--memory",
            MEMORY,
            "--cmdline",
            cmdline,
        ],
    );
    let ready = wait_ready(&running.console, started);
    if let Some(line) = signal_at {
        running.console.wait_for(line, BOOT_LIMIT);
        running.signal(libc::SIGTERM);
    }
    let finished = running.wait(BOOT_LIMIT);
    (
        format!("{}\nstderr:\n{}", finished.console, finished.stderr),
        finished.code,
        ready,
    )
}

fn wait_ready(console: &Lines, started: Instant) -> Duration {
    console.wait_for("linux-guest: ready", BOOT_LIMIT);
    let ready = started.elapsed();
    eprintln!(
        "linux-guest: ready {:.1} s after the start",
        ready.as_secs_f64()
    );
    ready
}

/// What /init reports on a machine without devices.
fn assert_plain_boot(console: &str) {
    for line in [
        "linux-guest: ready",
        "linux-guest: no /dev/vda",
        "linux-guest: no hwrng source",
        "linux-guest: no eth0, net check skipped",
        "linux-guest: fork ok",
        "linux-guest: done",
    ] {
        assert!(console.contains(line), "no {line:?} in:\n{console}");
    }
    assert!(!console.contains("FAILED"), "{console}");
    // vmd's CMOS clock answers at once (without it Linux polls the floating ports for seconds).
    assert!(
        !console.contains("Unable to read current time from RTC"),
        "{console}"
    );
}

/// The ELF kernel, with vmd's ACPI tables: Linux loads the DSDT and finds the fixed-feature
/// power button; `vmd run`'s SIGTERM presses it, /init (which waits for it, as logind would)
/// powers off, and Linux's ACPI soft-off through `\_S5` ends `vmd run` with status 0.
#[test]
fn the_elf_kernel_boots_to_init_and_powers_off_at_the_power_button() {
    if let Some(reason) = unavailable() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let kernel = kernel();
    let _one = one_at_a_time();
    let (console, code, _) = boot_with_vmd_run(
        &kernel.vmlinux,
        "console=ttyS0 linux_guest_end=power-button",
        Some("linux-guest: waiting for the power button"),
    );
    assert_plain_boot(&console);
    for line in [
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "ACPI: 1 ACPI AML tables successfully acquired and loaded",
        "ACPI: PM: (supports S0 S5)",
        "ACPI: button: Power Button [PWRF]",
        "linux-guest: power button pressed",
        "ACPI: PM: Preparing to enter system sleep state S5",
    ] {
        assert!(console.contains(line), "no {line:?} in:\n{console}");
    }
    assert_eq!(code, Some(0), "{console}");
}

#[test]
fn the_bzimage_boots_to_init_and_reboots() {
    if let Some(reason) = unavailable() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let kernel = kernel();
    let _one = one_at_a_time();
    let (console, code, _) = boot_with_vmd_run(&kernel.bzimage, "console=ttyS0", None);
    assert_plain_boot(&console);
    assert_eq!(code, Some(EXIT_REBOOT), "{console}");
}

/// Runs a QEMU tool, failing the test with its output if it fails.
fn tool(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (apt-get install qemu-utils): {e}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{text}"
    );
    text
}

/// The guest's and the host's addresses on the test network (tests/common/netns.rs keeps the
/// tests' networks in 10.200.0.0/16, inside namespaces of their own).
const GUEST_IP: &str = "10.200.12.2";
const HOST_IP: &str = "10.200.12.1";

#[test]
fn linux_drives_a_qcow2_disk_a_tap_and_entropy() {
    if let Some(reason) = unavailable() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let kernel = kernel();
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", path_str(&base), "8M"],
    );
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 0 8M", path_str(&base)],
    );
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(&base),
            "-F",
            "raw",
            path_str(&top),
        ],
    );
    let ns = NetNs::new("linux");
    ns.exec(&[
        "ip", "tuntap", "add", "dev", "lg0", "mode", "tap", "vnet_hdr",
    ]);
    ns.address("lg0", &format!("{HOST_IP}/24"));

    let _one = one_at_a_time();
    let started = Instant::now();
    let disk = format!("{},format=qcow2", path_str(&top));
    let cmdline = format!("console=ttyS0 ip={GUEST_IP}/24 peer={HOST_IP}");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, VMD, "run"])
        .args(["--kernel", path_str(&kernel.vmlinux), "--memory", MEMORY])
        .args(["--cpus", "2"])
        .args(["--cmdline", &cmdline, "--disk", &disk])
        .args(["--net", "tap=lg0", "--entropy"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmd run");
    let running = RunningVm::watch(child);
    wait_ready(&running.console, started);
    let finished = running.wait(BOOT_LIMIT);
    let console = format!("{}\nstderr:\n{}", finished.console, finished.stderr);
    // What Linux said about the devices, for the record.
    for line in console.lines().filter(|l| {
        ["virtio", "vda", "random", "eth0", "linux-guest"]
            .iter()
            .any(|word| l.contains(word))
    }) {
        eprintln!("console: {line}");
    }
    for line in [
        // The second vCPU, found in vmd's MADT and started with INIT/SIPI.
        "smp: Brought up 1 node, 2 CPUs",
        "linux-guest: ready",
        // Sector 0 comes from the raw base, through the qcow2 top.
        "linux-guest: vda first byte 42",
        "linux-guest: vda ok",
        "linux-guest: hwrng source virtio_rng.0",
        "linux-guest: rng ok",
        &format!("linux-guest: eth0 up, address {GUEST_IP}/24"),
        &format!("linux-guest: net: echo answered by {HOST_IP}"),
        "linux-guest: net ok",
        "linux-guest: fork ok",
        "linux-guest: done",
    ] {
        assert!(console.contains(line), "no {line:?} in:\n{console}");
    }
    assert!(!console.contains("FAILED"), "{console}");
    assert_eq!(finished.code, Some(EXIT_REBOOT), "{console}");

    // The pattern is in the top image, the image is consistent, the base is untouched.
    tool("qemu-img", &["check", path_str(&top)]);
    let read = |byte: u8, offset: u64, len: u64| format!("read -P {byte:#x} {offset} {len}");
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-r",
            "-c",
            &read(PATTERN_BYTE, PATTERN_OFFSET, PATTERN_SIZE),
            path_str(&top),
        ],
    );
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            &read(0x42, 0, 8 << 20),
            path_str(&base),
        ],
    );
    let map = tool("qemu-img", &["map", "--output=json", path_str(&top)]);
    assert!(
        map.contains(&format!("\"start\": {PATTERN_OFFSET}")),
        "the top image holds no data at {PATTERN_OFFSET}:\n{map}"
    );
}

/// Register name prefixes of SSE/AVX/MMX/x87 state.
const FPU_REGISTERS: &[&str] = &["%xmm", "%ymm", "%zmm", "%mm", "%st"];

/// /init must never dirty the FPU/SSE state: under kvm_pvm the kernel cannot restore it with
/// xrstor (the kernel runs with `noxsave`) and its fwait was removed; a process without that
/// state never needs either.
#[test]
fn init_uses_no_fpu_or_sse_state() {
    if unavailable().is_some() && !in_ci() {
        eprintln!("SKIPPED: the kernel is only built where it can run");
        return;
    }
    let init = &kernel().init;
    let objdump = std::env::var("OBJDUMP").unwrap_or_else(|_| "objdump".into());
    let output = Command::new(&objdump)
        .args(["-d", "-w", "--no-show-raw-insn"])
        .arg(init)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {objdump}: {e}"));
    assert!(output.status.success(), "{objdump} failed");
    let listing = String::from_utf8(output.stdout).expect("utf-8");
    let instructions: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|line| line.split_once(":\t"))
        .filter(|(address, _)| {
            let address = address.trim();
            !address.is_empty() && address.chars().all(|c| c.is_ascii_hexdigit())
        })
        .map(|(_, text)| {
            let text = text.trim();
            (text.split_whitespace().next().unwrap_or(""), text)
        })
        .collect();
    assert!(
        instructions.len() > 100 && instructions.iter().any(|(m, _)| *m == "syscall"),
        "the disassembly of {} is not understood:\n{listing}",
        init.display()
    );
    let bad: Vec<&str> = instructions
        .iter()
        .filter(|(mnemonic, text)| {
            mnemonic.starts_with('f')
                || [
                    "emms", "ldmxcsr", "stmxcsr", "xsave", "xrstor", "fxsave", "fxrstor",
                ]
                .iter()
                .any(|m| mnemonic.starts_with(m))
                || FPU_REGISTERS.iter().any(|reg| text.contains(reg))
        })
        .map(|(_, text)| *text)
        .collect();
    assert!(
        bad.is_empty(),
        "{} uses FPU/SSE state:\n{}",
        init.display(),
        bad.join("\n")
    );
}
