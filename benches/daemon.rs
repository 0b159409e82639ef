//! Daemon figures, printed as medians: D-Bus `Start` → first console byte of a VM (beside
//! Firecracker's bare exec → first byte of the same guest, when a `firecracker` is on PATH or in
//! `VMD_BENCH_FIRECRACKER`), and density: 100 VMs started concurrently (time until all run, the
//! daemon's RSS then, and each helper's private memory, USS from `/proc/PID/smaps_rollup`). The
//! daemon runs in a private systemd (tests/systemd_box) with the package installed; this process
//! talks to it over that systemd's system bus, as a D-Bus client on the host.
//!
//! Run with `cargo bench --bench daemon` as root (`VMD_BENCH_RUNS` sets the repeat count,
//! `VMD_BENCH_VMS` the number of VMs started at once).
//! Under `cargo test` it runs once, with 3 VMs for the density figures.

#[path = "../tests/systemd_box/mod.rs"]
#[allow(dead_code)]
mod systemd_box;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use systemd_box::{BoxOptions, SystemdBox};
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

const GUEST: &str = "/var/lib/vmd-bench/testguest.elf";
const DEB: &str = "/var/cache/vmd-bench/vmd.deb";
/// VMs started at once for the density figures (`cargo bench`, unless `VMD_BENCH_VMS` says
/// otherwise); 3 under `cargo test`.
const DENSITY_VMS: usize = 100;
/// What the issue asks of the density figures.
const DENSITY_TARGET: Duration = Duration::from_secs(10);
const DAEMON_RSS_TARGET_KIB: u64 = 30 << 10;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // Under `cargo test` (no --bench) one quick round checks that it works.
    let bench = args.iter().any(|a| a == "--bench");
    let runs: usize = if bench {
        std::env::var("VMD_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10)
    } else {
        1
    };
    let concurrent_vms = if bench {
        std::env::var("VMD_BENCH_VMS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&vms| vms > 0)
            .unwrap_or(DENSITY_VMS)
    } else {
        3
    };
    let firecracker_first_byte = firecracker_first_byte(runs);
    if let Err(reason) = SystemdBox::supported() {
        println!("daemon benchmark skipped: cannot boot a private systemd here: {reason}");
        return;
    }
    let packages = tempfile::tempdir().expect("tempdir");
    let deb = systemd_box::vmd::build_package(
        Path::new(env!("CARGO_BIN_EXE_vmd")),
        Path::new(env!("CARGO_BIN_EXE_vmctl")),
        packages.path(),
    )
    .expect("build the package");
    let seed =
        systemd_box::vmd::seed_with(&[(&deb, DEB), (Path::new(env!("VMD_TESTGUEST_ELF")), GUEST)])
            .expect("seed");
    let systemd = SystemdBox::boot(BoxOptions {
        seed: vec![seed.path().to_path_buf()],
        ..Default::default()
    })
    .expect("boot");
    assert!(
        systemd.exec(&["dpkg", "-i", DEB]).status.success(),
        "dpkg -i"
    );

    // One thread, as in vmd: the bench's vmd binary is built with the bench's tokio features, and
    // a multi-thread runtime there would bring libm back into every vmd process it measures.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let bus = zbus::connection::Builder::address(systemd.bus_address().as_str())
            .build()
            .await
            .expect("connect to the box's bus");

        let mut first_byte = Vec::new();
        for run in 0..runs {
            let name = format!("first{run}");
            let vm = create(&bus, &name, "hello").await;
            // A console exists from the moment the VM is starting, so it is opened while the
            // Start call is on its way; the guest's first byte waits in the terminal until read.
            let start = Instant::now();
            let starting = {
                let (bus, vm) = (bus.clone(), vm.clone());
                tokio::spawn(async move { call(&bus, &vm, "Start").await })
            };
            let console = open_console_once_starting(&bus, &vm).await;
            let reader = std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                let _ = nix::unistd::read(&console, &mut byte);
                Instant::now()
            });
            starting.await.expect("start task");
            let first = reader.join().expect("reader");
            first_byte.push(first.duration_since(start));
        }

        let mut all_running = Vec::new();
        let mut rss = Vec::new();
        let mut helpers_uss = Vec::new();
        for round in 0..runs.div_ceil(5) {
            let mut vms = Vec::new();
            for i in 0..concurrent_vms {
                vms.push(create(&bus, &format!("many{round}x{i}"), "spin").await);
            }
            let start = Instant::now();
            let starts = vms.iter().map(|vm| {
                let (bus, vm) = (bus.clone(), vm.clone());
                tokio::spawn(async move { call(&bus, &vm, "Start").await })
            });
            for start in starts.collect::<Vec<_>>() {
                start.await.expect("start task");
            }
            all_running.push(start.elapsed());
            rss.push(daemon_rss_kib(&systemd));
            helpers_uss = helpers_uss_kib(&systemd);
            assert_eq!(
                helpers_uss.len(),
                concurrent_vms,
                "one helper per running VM scope"
            );
            for vm in &vms {
                call(&bus, vm, "Kill").await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }

        println!(
            "vmd daemon benchmark ({runs} runs of Start -> first console byte, {} of {concurrent_vms} VMs at once)",
            all_running.len()
        );
        let first_byte = median(&mut first_byte);
        println!(
            "  D-Bus Start -> first console byte  median {:>8.2} ms",
            first_byte.as_secs_f64() * 1e3
        );
        match firecracker_first_byte {
            Some(firecracker) => println!(
                "  Firecracker exec -> first byte     median {:>8.2} ms; vmd (D-Bus) / Firecracker (bare) {:.2}x (target <= 1.0)",
                firecracker.as_secs_f64() * 1e3,
                first_byte.as_secs_f64() / firecracker.as_secs_f64()
            ),
            None => println!(
                "  Firecracker: none on PATH and VMD_BENCH_FIRECRACKER is not set; no ratio"
            ),
        }
        let all_running = median(&mut all_running);
        println!(
            "  {concurrent_vms} VMs started concurrently, all running  median {:>8.2} ms ({:.2}x of the {} s target)",
            all_running.as_secs_f64() * 1e3,
            all_running.as_secs_f64() / DENSITY_TARGET.as_secs_f64(),
            DENSITY_TARGET.as_secs()
        );
        let rss = median(&mut rss);
        println!(
            "  daemon RSS with {concurrent_vms} VMs running      median {rss:>8} KiB ({:.2}x of the {} MiB target)",
            rss as f64 / DAEMON_RSS_TARGET_KIB as f64,
            DAEMON_RSS_TARGET_KIB >> 10
        );
        let mut sorted = helpers_uss.clone();
        sorted.sort();
        println!(
            "  helper USS with {concurrent_vms} VMs running: min {} KiB, median {} KiB, max {} KiB, total {} KiB",
            sorted[0],
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1],
            sorted.iter().sum::<u64>()
        );
        for chunk in helpers_uss.chunks(20) {
            let line: Vec<String> = chunk.iter().map(u64::to_string).collect();
            println!("    {}", line.join(" "));
        }
    });
    let _ = systemd.stop();
}

async fn create(bus: &Connection, name: &str, scenario: &str) -> OwnedObjectPath {
    let mut config: HashMap<&str, OwnedVariant> = HashMap::new();
    let value = |v: Variant<'_>| OwnedVariant::try_from(v).expect("variant");
    config.insert("Kernel", value(Variant::from(GUEST)));
    config.insert(
        "Cmdline",
        value(Variant::from(format!("testguest={scenario}"))),
    );
    config.insert("MemoryBytes", value(Variant::from(64u64 << 20)));
    config.insert("Transient", value(Variant::from(true)));
    let reply = bus
        .call_method(
            Some("org.vmd.vmd1"),
            "/org/vmd/vmd1",
            Some("org.vmd.vmd1.Manager"),
            "CreateVM",
            &(name, config),
        )
        .await
        .expect("CreateVM");
    reply.body().deserialize().expect("object path")
}

async fn call(bus: &Connection, vm: &OwnedObjectPath, method: &str) -> zbus::Message {
    bus.call_method(
        Some("org.vmd.vmd1"),
        vm.as_str(),
        Some("org.vmd.vmd1.VM"),
        method,
        &(),
    )
    .await
    .unwrap_or_else(|e| panic!("{method}: {e}"))
}

async fn open_console_once_starting(bus: &Connection, vm: &OwnedObjectPath) -> OwnedFd {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = bus
            .call_method(
                Some("org.vmd.vmd1"),
                vm.as_str(),
                Some("org.vmd.vmd1.VM"),
                "OpenConsole",
                &(),
            )
            .await;
        match reply {
            Ok(reply) => {
                return reply
                    .body()
                    .deserialize::<zbus::OwnedFd>()
                    .expect("console fd")
                    .into();
            }
            Err(e) if Instant::now() > deadline => panic!("OpenConsole: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_micros(200)).await,
        }
    }
}

/// Each running helper's USS (Private_Clean + Private_Dirty + Private_Hugetlb of
/// `/proc/PID/smaps_rollup`, so guest memory the guest never touched is not counted), in KiB,
/// one per running VM scope (the box's cgroup v2 hierarchy is at /sys/fs/cgroup/unified).
fn helpers_uss_kib(systemd: &SystemdBox) -> Vec<u64> {
    let script = r#"for unit in $(systemctl list-units --plain --no-legend --state=running 'vmd-*.scope' | awk '{ print $1 }'); do
  for pid in $(cat "/sys/fs/cgroup/unified$(systemctl show -P ControlGroup "$unit")/cgroup.procs"); do
    awk '/^Private_/ { kib += $2 } END { print kib }' "/proc/$pid/smaps_rollup"
  done
done"#;
    let output = systemd.exec(&["sh", "-c", script]);
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "read the helpers' smaps_rollup: {output:?}"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            line.trim()
                .parse()
                .unwrap_or_else(|_| panic!("a USS that is not a number: {line:?}"))
        })
        .collect()
}

/// Firecracker's exec → first console byte of `testguest=hello` (median of `runs`), when there
/// is a Firecracker to run.
fn firecracker_first_byte(runs: usize) -> Option<Duration> {
    let firecracker = std::env::var_os("VMD_BENCH_FIRECRACKER")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|dir| dir.join("firecracker"))
                .find(|path| path.is_file())
        })?;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("hello.json");
    let guest = env!("VMD_TESTGUEST_ELF");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{guest}", "boot_args": "testguest=hello"}},
"drives": [], "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}}}}"#
        ),
    )
    .expect("write the Firecracker configuration");
    let mut times = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = std::process::Command::new(&firecracker)
            .args(["--no-api", "--level", "Error"])
            // As in benches/helper.rs: e.g. `--no-seccomp` for a glibc build.
            .args(
                std::env::var("VMD_BENCH_FIRECRACKER_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .arg("--config-file")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start Firecracker");
        let mut byte = [0u8; 1];
        let n = std::io::Read::read(&mut child.stdout.take().expect("stdout"), &mut byte)
            .expect("read Firecracker's console");
        times.push(start.elapsed());
        assert_eq!(n, 1, "Firecracker printed nothing");
        let _ = child.kill();
        let _ = child.wait();
    }
    Some(median(&mut times))
}

fn daemon_rss_kib(systemd: &SystemdBox) -> u64 {
    let pid = String::from_utf8_lossy(
        &systemd
            .exec(&["systemctl", "show", "-P", "MainPID", "vmd.service"])
            .stdout,
    )
    .trim()
    .to_string();
    let status = String::from_utf8_lossy(
        &systemd
            .exec(&["cat", &format!("/proc/{pid}/status")])
            .stdout,
    )
    .into_owned();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn median<T: Copy + Ord>(values: &mut [T]) -> T {
    values.sort();
    values[values.len() / 2]
}
