//! The main job, end to end on a host whose PID 1 is not systemd: boot a private systemd with its
//! own system bus (tests/systemd_box), install the vmd package there, start a VM over D-Bus with
//! vmctl, show its console and the `vmctl status` table, stop it, and clean everything up.
//!
//! `cargo build --release && cargo run --release --example daemon_demo` (as root).

#[path = "../tests/systemd_box/mod.rs"]
#[allow(dead_code)]
mod systemd_box;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use systemd_box::{BoxOptions, SystemdBox};

const GUEST: &str = "/var/lib/vmd-demo/testguest.elf";
const DEB: &str = "/var/cache/vmd-demo/vmd.deb";

fn main() -> anyhow::Result<()> {
    SystemdBox::supported()
        .map_err(|reason| anyhow::anyhow!("cannot boot a private systemd: {reason}"))?;
    // The binaries cargo built next to this example: target/<profile>/{vmd,vmctl,testguest.elf}.
    let exe = std::env::current_exe().context("where am I")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the example is not in target/<profile>/examples")?;
    let [vmd, vmctl, guest] = ["vmd", "vmctl", "testguest.elf"].map(|f| profile_dir.join(f));
    for file in [&vmd, &vmctl, &guest] {
        if !file.exists() {
            bail!(
                "{} is missing: run `cargo build --release` first",
                file.display()
            );
        }
    }

    let packages = tempfile::tempdir()?;
    let deb = systemd_box::vmd::build_package(&vmd, &vmctl, packages.path())
        .map_err(anyhow::Error::msg)?;
    let seed = systemd_box::vmd::seed_with(&[(&deb, DEB), (&guest, GUEST)])?;
    println!("==> booting a private systemd with its own system bus");
    let systemd = SystemdBox::boot(BoxOptions {
        seed: vec![seed.path().to_path_buf()],
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let run = |argv: &[&str]| -> anyhow::Result<String> {
        println!("# {}", argv.join(" "));
        let output = systemd.exec(argv);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "{argv:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(stdout)
    };

    println!("==> installing the vmd package");
    run(&["dpkg", "-i", DEB])?;
    println!("==> starting a VM over D-Bus (vmd is started by bus activation)");
    run(&[
        "vmctl",
        "start",
        "demo",
        "-k",
        GUEST,
        "-m",
        "64M",
        "-p",
        "2",
        "--cmdline",
        "testguest=spin",
    ])?;
    println!("==> its console, for three seconds");
    let mut console = systemd.spawn(&["vmctl", "console", "demo"]);
    std::thread::sleep(Duration::from_secs(3));
    let _ = console.kill();
    let mut shown = String::new();
    if let Some(mut out) = console.stdout.take() {
        let _ = out.read_to_string(&mut shown);
    }
    let _ = console.wait();
    print!("{}", shown.replace('\r', ""));
    println!("==> vmctl status");
    print!("{}", run(&["vmctl", "status"])?);
    print!(
        "{}",
        run(&[
            "systemctl",
            "status",
            "--no-pager",
            "--lines=0",
            "vmd-demo.scope"
        ])?
    );
    println!("==> stopping it (ACPI power button) and cleaning up");
    run(&["vmctl", "stop", "-w", "demo"])?;
    print!("{}", run(&["vmctl", "status"])?);
    systemd.stop().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    println!("==> done: the private systemd is gone and the host is unchanged");
    Ok(())
}
