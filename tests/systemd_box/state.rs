//! The box's state directory on the host, written before the box starts:
//!
//! ```text
//! STATE/stage2.sh     the box's first PID 1 (stage2.sh in this directory)
//! STATE/plan/         what stage 2 mounts and copies, one entry a line, fields tab-separated
//! STATE/seed/         the harness's own seed: masks, journald, default target, hostname, machine id
//! STATE/dbus/         bound on the box's /run/dbus: the system bus socket, seen from the host
//! STATE/mnt/          mount point of the box's scratch tmpfs (mounted in the box's namespace only)
//! STATE/console.log   stage 2's trace (systemd's own console is the null device)
//! ```
//!
//! The mounts all live in the box's mount namespace, so on the host this directory only ever
//! holds plain files, and removing it is enough.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use super::BoxError;
use super::BoxOptions;
use super::host::{self, Hierarchy};

/// The unit the box boots (stage2.sh names it too): basic.target plus the system bus and
/// logind.
const TARGET: &str = "vmd-box.target";

const TARGET_UNIT: &str = "\
[Unit]
Description=vmd test box (basic system, D-Bus, logind)
Requires=basic.target
Wants=dbus.service systemd-logind.service
After=basic.target dbus.service systemd-logind.service
AllowIsolate=yes
";

/// The journal lives in the box's /run and disappears with it; nothing goes to the host's
/// /var/log/journal (the lower layer is not written, but a volatile journal is also faster).
const JOURNALD_DROP_IN: &str = "[Journal]\nStorage=volatile\n";

/// The box's hostname (its own UTS namespace).
const HOSTNAME: &str = "vmd-box";

/// Units masked in every box: they would act on host-global kernel state (modules, sysctl,
/// binfmt, udev, the clock) or start host services (postgresql is enabled on the CI host).
const SAFETY_MASK: &[&str] = &[
    "postgresql.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-sysctl.service",
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
    "console-getty.service",
    "getty.target",
];

/// Units masked only because a test box does not need them: boot is faster and quieter.
const SPEED_MASK: &[&str] = &[
    "systemd-tmpfiles-setup-dev.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "systemd-random-seed.service",
    "systemd-repart.service",
    "systemd-pcrphase-sysinit.service",
    "systemd-pcrphase.service",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "systemd-journal-flush.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "ldconfig.service",
    "systemd-hwdb-update.service",
    "systemd-journal-catalog-update.service",
    "systemd-ask-password-console.path",
    "systemd-ask-password-wall.path",
];

/// Box paths that must not receive bind mounts: tmpfiles purges /tmp and /var/tmp at boot,
/// and /proc, /sys, /dev and /run are the box's own file systems.
const NO_BIND_UNDER: &[&str] = &["/tmp", "/var/tmp", "/run", "/proc", "/sys", "/dev"];

/// Creates and fills the state directory `state` (which must not exist yet).
pub(super) fn prepare(
    state: &Path,
    options: &BoxOptions,
    hierarchies: &[Hierarchy],
) -> Result<(), BoxError> {
    // Check the options before anything is created.
    let binds = options
        .binds
        .iter()
        .map(|(src, dst)| check_bind(src, dst))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seeds = vec![state.join("seed")];
    for seed in &options.seed {
        seeds.push(check_seed(seed)?);
    }
    for unit in &options.mask {
        if unit.is_empty() || unit.contains(['/', '\n', '\t', ' ']) {
            return Err(BoxError::InvalidOption(format!(
                "{unit:?} is not a unit name"
            )));
        }
    }

    let io = |what: &str| {
        let context = format!(
            "cannot {what} in the box's state directory {}",
            state.display()
        );
        move |source| BoxError::Io { context, source }
    };
    // 0755: the bus socket below must be reachable by non-root host users too.
    for dir in [state.to_owned(), state.join("dbus")] {
        fs::create_dir(&dir).map_err(io("create a directory"))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(io("set permissions"))?;
    }
    fs::create_dir(state.join("mnt")).map_err(io("create a directory"))?;
    fs::write(state.join("stage2.sh"), include_str!("stage2.sh")).map_err(io("write stage2.sh"))?;
    write_plan(&state.join("plan"), hierarchies, &binds, &seeds).map_err(io("write the plan"))?;
    write_seed(&state.join("seed"), &options.mask).map_err(io("write the harness's seed"))?;
    Ok(())
}

/// The lists stage 2 reads.
fn write_plan(
    plan: &Path,
    hierarchies: &[Hierarchy],
    binds: &[(PathBuf, PathBuf)],
    seeds: &[PathBuf],
) -> io::Result<()> {
    fn write_lines(path: PathBuf, lines: impl IntoIterator<Item = String>) -> io::Result<()> {
        let text: String = lines.into_iter().map(|line| line + "\n").collect();
        fs::write(path, text)
    }
    fs::create_dir(plan)?;
    let placeholders = host::cgroup_placeholders(hierarchies)?;
    write_lines(
        plan.join("cgroup-binds"),
        hierarchies.iter().map(|h| h.name.clone()),
    )?;
    write_lines(plan.join("cgroup-placeholders"), placeholders.dirs)?;
    write_lines(
        plan.join("cgroup-links"),
        placeholders
            .links
            .into_iter()
            .map(|(link, target)| format!("{link}\t{target}")),
    )?;
    write_lines(
        plan.join("devices"),
        host::device_nodes().into_iter().map(|node| {
            let host::DeviceNode {
                path,
                mode,
                uid,
                gid,
                major,
                minor,
            } = node;
            format!("{path}\t{mode:o}\t{uid}\t{gid}\t{major}\t{minor}")
        }),
    )?;
    write_lines(
        plan.join("binds"),
        binds
            .iter()
            .map(|(src, dst)| format!("{}\t{}", src.display(), dst.display())),
    )?;
    write_lines(
        plan.join("seeds"),
        seeds.iter().map(|seed| seed.display().to_string()),
    )
}

/// The harness's own seed, copied onto the box's / before the test's seeds.
fn write_seed(seed: &Path, extra_masks: &[String]) -> io::Result<()> {
    let units = seed.join("etc/systemd/system");
    fs::create_dir_all(&units)?;
    let masks = SAFETY_MASK.iter().chain(SPEED_MASK).copied();
    for unit in masks.chain(extra_masks.iter().map(String::as_str)) {
        match symlink("/dev/null", units.join(unit)) {
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }
    fs::write(units.join(TARGET), TARGET_UNIT)?;
    let journald = seed.join("etc/systemd/journald.conf.d");
    fs::create_dir_all(&journald)?;
    fs::write(journald.join("vmd-box.conf"), JOURNALD_DROP_IN)?;
    fs::write(seed.join("etc/hostname"), format!("{HOSTNAME}\n"))?;
    // A machine id of its own (the host's would do, but two boxes would then share one).
    let machine_id = uuid::Uuid::new_v4().simple().to_string();
    fs::write(seed.join("etc/machine-id"), machine_id + "\n")
}

/// A seed must be an existing directory; returns its canonical path.
fn check_seed(seed: &Path) -> Result<PathBuf, BoxError> {
    let canonical = seed.canonicalize().map_err(|source| BoxError::Io {
        context: format!("seed directory {}", seed.display()),
        source,
    })?;
    if !canonical.is_dir() {
        return Err(BoxError::InvalidOption(format!(
            "seed {} is not a directory",
            seed.display()
        )));
    }
    check_plan_path(&canonical)?;
    Ok(canonical)
}

/// A bind's source must exist; its destination must be a plain absolute path outside the
/// box's own file systems and outside the directories tmpfiles purges.
fn check_bind(src: &Path, dst: &Path) -> Result<(PathBuf, PathBuf), BoxError> {
    let canonical = src.canonicalize().map_err(|source| BoxError::Io {
        context: format!("bind source {}", src.display()),
        source,
    })?;
    let invalid =
        |why: &str| BoxError::InvalidOption(format!("bind destination {}: {why}", dst.display()));
    if !dst.is_absolute() || dst == Path::new("/") {
        return Err(invalid("must be an absolute path below /"));
    }
    if dst
        .components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
    {
        return Err(invalid("must not contain . or .."));
    }
    if let Some(root) = NO_BIND_UNDER.iter().find(|root| dst.starts_with(root)) {
        return Err(invalid(&format!(
            "nothing may be bound under {root} in the box"
        )));
    }
    check_plan_path(&canonical)?;
    check_plan_path(dst)?;
    Ok((canonical, dst.to_owned()))
}

/// Paths go into tab-separated, line-based plan files.
fn check_plan_path(path: &Path) -> Result<(), BoxError> {
    match path.to_str() {
        Some(text) if !text.contains(['\n', '\t']) => Ok(()),
        _ => Err(BoxError::InvalidOption(format!(
            "{} is not valid UTF-8 or contains a tab or newline",
            path.display()
        ))),
    }
}
