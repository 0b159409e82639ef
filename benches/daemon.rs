//! Daemon figures, printed as medians: D-Bus `Start` → first console byte of a VM, and 20 VMs
//! started concurrently (time until all run, and the daemon's RSS then). The daemon runs in a
//! private systemd (tests/systemd_box) with the package installed; this process talks to it
//! over that systemd's system bus, as a D-Bus client on the host.
//!
//! Run with `cargo bench --bench daemon` as root (`VMD_BENCH_RUNS` sets the repeat count).

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
const CONCURRENT_VMS: usize = 20;

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

    let runtime = tokio::runtime::Builder::new_multi_thread()
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
        for round in 0..runs.div_ceil(5) {
            let mut vms = Vec::new();
            for i in 0..CONCURRENT_VMS {
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
            for vm in &vms {
                call(&bus, vm, "Kill").await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }

        println!(
            "vmd daemon benchmark ({runs} runs of Start -> first console byte, {} of {CONCURRENT_VMS} VMs at once)",
            all_running.len()
        );
        println!("  D-Bus Start -> first console byte  median {:>8.2} ms", median(&mut first_byte).as_secs_f64() * 1e3);
        println!("  {CONCURRENT_VMS} VMs started concurrently, all running  median {:>8.2} ms", median(&mut all_running).as_secs_f64() * 1e3);
        println!("  daemon RSS with {CONCURRENT_VMS} VMs running      median {:>8} KiB", median(&mut rss));
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
