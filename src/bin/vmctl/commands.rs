//! One function per vmctl command. Each returns the exit status, or the error to print.
//!
//! Progress notes ("started vm web successfully") go to stderr, one line each, unless `-q`;
//! stdout carries only what was asked for (the status table, the console).

use std::{
    collections::HashMap,
    fmt::Display,
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::time::Instant;
use vmd::protocol::ImageFormat;
use zbus::{Connection, Fd, OwnedObjectPath, OwnedVariant, Variant};

use crate::{
    cli::{Cli, Command, ConsoleArgs, EscapeChar, StartArgs, StatusArgs, StopArgs, WaitArgs},
    connect::connect,
    console,
    error::{VmctlError, is_gone, is_invalid_state, is_no_such_vm},
    proxies::{self, ManagerProxy, VmProperties, VmProxy},
    table::{self, StatusRow, format_size},
    watch::{Down, Watcher},
};

/// Exit status: success.
const SUCCESS: u8 = 0;
/// Exit status: a failure (also: the VM failed, for `wait`).
const FAILURE: u8 = 1;

/// Connects to the daemon and runs the command.
pub async fn run(cli: Cli) -> Result<u8, VmctlError> {
    // Disk images are vmctl's own work: no daemon needed.
    if let Command::Create(args) = cli.command {
        let done = crate::create::create(args).await?;
        if !cli.quiet {
            eprintln!("{done}");
        }
        return Ok(SUCCESS);
    }
    let ctx = Ctx::connect(cli.socket.as_deref(), cli.quiet).await?;
    match cli.command {
        Command::Start(args) => start(&ctx, args).await,
        Command::Stop(args) => stop(&ctx, args).await,
        Command::Pause(args) => pause(&ctx, &args.vm).await,
        Command::Unpause(args) => unpause(&ctx, &args.vm).await,
        Command::Reboot(args) => reboot(&ctx, &args.vm).await,
        Command::Reset(args) => reset(&ctx, &args.vm).await,
        Command::Status(args) => status(&ctx, args).await,
        Command::Info(args) => crate::info::info(&ctx, &args.vm).await,
        Command::Console(args) => attach_console(&ctx, args).await,
        Command::Log(args) => crate::log::log(&ctx, args).await,
        Command::Wait(args) => wait(&ctx, args).await,
        Command::Remove(args) => remove(&ctx, &args.vm).await,
        Command::Autostart(args) => autostart(&ctx, &args.vm, args.on).await,
        Command::Edit(args) => crate::edit::edit(&ctx, &args.vm).await,
        Command::Load(args) => crate::edit::load(&ctx, &args.file).await,
        Command::Reload => reload(&ctx).await,
        Command::Create(_) => Ok(SUCCESS),
    }
}

/// What every command needs: the connection, the manager, and whether to be quiet.
pub struct Ctx {
    pub conn: Connection,
    pub manager: ManagerProxy<'static>,
    quiet: bool,
}

/// A VM a command acts on, found by name or ID.
pub struct Target {
    pub name: String,
    pub path: OwnedObjectPath,
    pub vm: VmProxy<'static>,
}

impl Ctx {
    async fn connect(socket: Option<&Path>, quiet: bool) -> Result<Self, VmctlError> {
        let conn = connect(socket).await?;
        let manager = proxies::manager(&conn).await?;
        Ok(Self {
            conn,
            manager,
            quiet,
        })
    }

    /// A progress note on stderr.
    pub fn note(&self, message: impl Display) {
        if !self.quiet {
            eprintln!("vmctl: {message}");
        }
    }

    /// The VM called `word`, or whose ID (as `vmctl status` shows it) is `word`. A number is
    /// an ID first, as in vmctl(8); a VM whose name is that number is found when no VM has
    /// that ID.
    pub async fn vm(&self, word: &str) -> Result<Target, VmctlError> {
        let (name, path) = self.find(word).await?;
        let vm = proxies::vm(&self.conn, path.clone()).await?;
        Ok(Target { name, path, vm })
    }

    /// The name and object path of the VM `word` names or numbers.
    pub async fn find(&self, word: &str) -> Result<(String, OwnedObjectPath), VmctlError> {
        if let Ok(id) = word.parse::<u32>() {
            let listed = proxies::list(&self.conn).await?;
            if let Some(vm) = listed.into_iter().find(|vm| vm.id == id) {
                return Ok((vm.name, vm.path));
            }
            return match self.manager.get_vm(word).await {
                Ok(path) => Ok((word.to_owned(), path)),
                Err(error) if is_no_such_vm(&error) => Err(VmctlError::Message(format!(
                    "no VM has the ID {id} or the name {word}"
                ))),
                Err(error) => Err(error.into()),
            };
        }
        let path = self.manager.get_vm(word).await?;
        Ok((word.to_owned(), path))
    }
}

/// `vmctl start`: start a VM; with -k and no such VM, define it first, transient unless
/// `--define` (vmctl(8)'s ad-hoc VM, gone once it stops); with `-c` attach to its console.
async fn start(ctx: &Ctx, args: StartArgs) -> Result<u8, VmctlError> {
    if let Some(warning) = args.memory.and_then(|size| size.warning()) {
        eprintln!("vmctl: {warning}");
    }
    let config = NewVm::from_args(&args)?;
    // The daemon opens host paths only for root; anyone else opens the kernel and initrd here and
    // passes the fds (DESIGN.md, "Authorization").
    let by_path = nix::unistd::geteuid().is_root();
    let (name, path, created) = match ctx.find(&args.name).await {
        Ok((name, path)) => {
            if args.has_config() {
                let current = proxies::vm_properties(&ctx.conn, path.clone()).await?;
                config.check_matches(&name, &current, by_path)?;
            }
            (name, path, false)
        }
        Err(VmctlError::Bus(error)) if is_no_such_vm(&error) => {
            let Some(kernel) = &config.kernel else {
                return Err(VmctlError::Message(format!(
                    "there is no vm {}; give a kernel with -k to start one",
                    args.name
                )));
            };
            let transient = !args.define;
            let path = if by_path {
                let mut dbus = config.to_dbus()?;
                dbus.insert("Transient", Variant::from(transient));
                ctx.manager.create_vm(&args.name, dbus).await?
            } else {
                let files = PassedFiles::open(kernel, config.initrd.as_deref(), &config.disks)?;
                let mut settings = config.settings()?;
                settings.insert("Transient", Variant::from(transient));
                ctx.manager
                    .create_vm_with_files(&args.name, settings, files.to_dbus())
                    .await?
            };
            (args.name.clone(), path, transient)
        }
        Err(error) => return Err(error),
    };
    let vm = proxies::vm(&ctx.conn, path.clone()).await?;
    if let Err(error) = vm.start().await {
        if created {
            // An ad-hoc VM that never ran leaves nothing behind, so that a retry (with the
            // right kernel, say) starts afresh.
            let _ = vm.remove().await;
        }
        return Err(VmctlError::Message(format!(
            "cannot start vm {name}: {}",
            crate::error::describe(&error)
        )));
    }
    ctx.note(format_args!("started vm {name} successfully"));
    if args.console {
        let options = console::Options {
            escape: args.escape.unwrap_or(EscapeChar::Byte(b'~')),
            force: false,
            quiet: ctx.quiet,
        };
        console::attach(&ctx.conn, &vm, &name, path, options).await
    } else {
        Ok(SUCCESS)
    }
}

/// The definition `vmctl start` gives a new VM: only what was on the command line, so the
/// daemon's defaults apply to the rest.
#[derive(Debug, Default, PartialEq)]
struct NewVm {
    /// Absolute (see [`absolute_path`]).
    kernel: Option<PathBuf>,
    /// Absolute (see [`absolute_path`]).
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    vcpus: Option<u32>,
    memory: Option<u64>,
    /// `-d`: the format when a prefix gave one, and the path, absolute.
    disks: Vec<(Option<ImageFormat>, PathBuf)>,
    /// `-i` and `-n`: each interface's switch, if any.
    interfaces: Vec<Option<String>>,
}

impl NewVm {
    fn from_args(args: &StartArgs) -> Result<Self, VmctlError> {
        Ok(Self {
            kernel: args
                .kernel
                .as_deref()
                .map(|p| absolute_path("kernel", p))
                .transpose()?,
            initrd: args
                .initrd
                .as_deref()
                .map(|p| absolute_path("initrd", p))
                .transpose()?,
            cmdline: args.cmdline.clone(),
            vcpus: args.cpus,
            memory: args.memory.map(|size| size.bytes),
            disks: args
                .disks
                .iter()
                .map(|disk| {
                    let (format, path) = disk_name(disk);
                    Ok((format, absolute_path("disk", &path)?))
                })
                .collect::<Result<_, VmctlError>>()?,
            interfaces: args.interface_switches(),
        })
    }

    /// The `Interfaces` entries: `Switch` for those on a switch, defaults for the rest.
    fn interface_entries(&self) -> Vec<HashMap<String, OwnedVariant>> {
        self.interfaces
            .iter()
            .map(|switch| {
                switch
                    .iter()
                    .map(|switch| {
                        (
                            "Switch".to_owned(),
                            OwnedVariant::from(zbus::Str::from(switch.clone())),
                        )
                    })
                    .collect()
            })
            .collect()
    }

    /// The `Disks` entries: each disk's format, and its path when `with_paths` (else it goes
    /// as the fd `disk<i>`).
    fn disk_entries(
        &self,
        with_paths: bool,
    ) -> Result<Vec<HashMap<String, OwnedVariant>>, VmctlError> {
        self.disks
            .iter()
            .map(|(format, path)| {
                let mut entry = HashMap::new();
                let format = format.map_or("auto".to_owned(), |f| f.to_string());
                entry.insert(
                    "Format".to_owned(),
                    OwnedVariant::from(zbus::Str::from(format)),
                );
                if with_paths {
                    let path = utf8("disk", path)?.to_owned();
                    entry.insert("Path".to_owned(), OwnedVariant::from(zbus::Str::from(path)));
                }
                Ok(entry)
            })
            .collect()
    }

    /// The `a{sv}` of `CreateVMWithFiles`: everything but the kernel and initrd, which go as
    /// fds ([`PassedFiles`]).
    fn settings(&self) -> Result<HashMap<&'static str, Variant<'_>>, VmctlError> {
        let mut config = HashMap::new();
        if !self.disks.is_empty() {
            config.insert("Disks", Variant::from(self.disk_entries(false)?));
        }
        if !self.interfaces.is_empty() {
            config.insert("Interfaces", Variant::from(self.interface_entries()));
        }
        if let Some(cmdline) = &self.cmdline {
            config.insert("Cmdline", Variant::from(cmdline.as_str()));
        }
        if let Some(vcpus) = self.vcpus {
            config.insert("VCPUs", Variant::from(vcpus));
        }
        if let Some(memory) = self.memory {
            config.insert("MemoryBytes", Variant::from(memory));
        }
        Ok(config)
    }

    /// The `a{sv}` of `CreateVM`: the settings, and the kernel and initrd as paths for the
    /// daemon to open.
    fn to_dbus(&self) -> Result<HashMap<&'static str, Variant<'_>>, VmctlError> {
        let mut config = self.settings()?;
        if !self.disks.is_empty() {
            config.insert("Disks", Variant::from(self.disk_entries(true)?));
        }
        if let Some(kernel) = &self.kernel {
            config.insert("Kernel", Variant::from(utf8("kernel", kernel)?));
        }
        if let Some(initrd) = &self.initrd {
            config.insert("Initrd", Variant::from(utf8("initrd", initrd)?));
        }
        Ok(config)
    }

    /// For a VM that exists already: refuses options that differ from its definition, since
    /// starting it would silently ignore them. A property the daemon does not report is not
    /// compared, nor are the kernel and initrd unless `compare_files` (they are compared by
    /// path, which says nothing when they were passed as fds: the daemon then reports the path
    /// of its own copy).
    fn check_matches(
        &self,
        name: &str,
        current: &VmProperties,
        compare_files: bool,
    ) -> Result<(), VmctlError> {
        let mut differences = Vec::new();
        let mut compare = |what: &str, wanted: Option<String>, actual: Option<String>| {
            if let (Some(wanted), Some(actual)) = (wanted, actual)
                && wanted != actual
            {
                differences.push(format!("{what} {actual:?}, not {wanted:?}"));
            }
        };
        let text = |value: Option<&str>| value.map(str::to_owned);
        if compare_files {
            let path = |path: &Option<PathBuf>| {
                path.as_deref()
                    .map(|path| path.to_string_lossy().into_owned())
            };
            compare("kernel", path(&self.kernel), text(current.str("Kernel")));
            compare("initrd", path(&self.initrd), text(current.str("Initrd")));
            let wanted: Vec<String> = self
                .disks
                .iter()
                .map(|(_, path)| path.to_string_lossy().into_owned())
                .collect();
            let actual = current.disks().map(|disks| {
                let paths: Vec<String> = disks
                    .iter()
                    .map(|disk| disk_str(disk, "Path").unwrap_or_default())
                    .collect();
                paths.join(" ")
            });
            if !wanted.is_empty() {
                compare("disks", Some(wanted.join(" ")), actual);
            }
        } else if !self.disks.is_empty() {
            // Passed disks show where their files lay, which need not be the path given here:
            // only their number says something.
            compare(
                "disks",
                Some(self.disks.len().to_string()),
                current.disks().map(|disks| disks.len().to_string()),
            );
        }
        if !self.interfaces.is_empty() {
            let switches = |switches: Vec<String>| format!("[{}]", switches.join(", "));
            let wanted = self
                .interfaces
                .iter()
                .map(|switch| switch.clone().unwrap_or_default())
                .collect();
            let actual = current.interfaces().map(|interfaces| {
                switches(
                    interfaces
                        .iter()
                        .map(|interface| disk_str(interface, "Switch").unwrap_or_default())
                        .collect(),
                )
            });
            compare("interfaces on switches", Some(switches(wanted)), actual);
        }
        compare(
            "cmdline",
            self.cmdline.clone(),
            text(current.str("Cmdline")),
        );
        compare(
            "vcpus",
            self.vcpus.map(|n| n.to_string()),
            current.u32("VCPUs").map(|n| n.to_string()),
        );
        compare(
            "memory",
            self.memory.map(format_size),
            current.u64("MemoryBytes").map(format_size),
        );
        if differences.is_empty() {
            return Ok(());
        }
        Err(VmctlError::Message(format!(
            "vm {name} already exists with {}; remove it first to change its definition",
            differences.join(", ")
        )))
    }
}

/// The error for a kernel or initrd that cannot be opened (or found).
fn cannot_open(what: &str, path: &Path, error: io::Error) -> VmctlError {
    VmctlError::io(format!("cannot open the {what} {}", path.display()), error)
}

/// A kernel or initrd path made absolute: relative paths are resolved against the current
/// directory (the daemon's is not ours); absolute ones are kept as given.
fn absolute_path(what: &str, path: &Path) -> Result<PathBuf, VmctlError> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    std::fs::canonicalize(path).map_err(|error| cannot_open(what, path, error))
}

/// A path to send over D-Bus, where paths are strings.
fn utf8<'a>(what: &str, path: &'a Path) -> Result<&'a str, VmctlError> {
    path.to_str()
        .ok_or_else(|| VmctlError::Message(format!("{what} path {path:?} is not valid UTF-8")))
}

/// The format a `-d` prefix gives (`raw:`, `qcow2:`), and the path.
fn disk_name(disk: &str) -> (Option<ImageFormat>, PathBuf) {
    match disk.split_once(':') {
        Some(("raw", path)) => (Some(ImageFormat::Raw), path.into()),
        Some(("qcow2", path)) => (Some(ImageFormat::Qcow2), path.into()),
        _ => (None, disk.into()),
    }
}

/// A string entry of one disk of the `Disks` property.
fn disk_str(disk: &HashMap<String, OwnedVariant>, key: &str) -> Option<String> {
    disk.get(key)
        .and_then(|value| <&str>::try_from(value).ok())
        .map(str::to_owned)
}

/// The kernel, initrd and disks as vmctl opened them, with its user's rights, for
/// `CreateVMWithFiles`.
#[derive(Debug)]
struct PassedFiles {
    kernel: File,
    initrd: Option<File>,
    disks: Vec<File>,
}

impl PassedFiles {
    fn open(
        kernel: &Path,
        initrd: Option<&Path>,
        disks: &[(Option<ImageFormat>, PathBuf)],
    ) -> Result<Self, VmctlError> {
        Ok(Self {
            kernel: open_passed_file("kernel", kernel)?,
            initrd: initrd
                .map(|path| open_passed_file("initrd", path))
                .transpose()?,
            disks: disks
                .iter()
                .map(|(_, path)| open_passed_disk(path))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The `a{sh}` of `CreateVMWithFiles`. The fds are borrowed: the call sends copies, and
    /// vmctl's own close when `self` is dropped.
    fn to_dbus(&self) -> HashMap<String, Fd<'_>> {
        let mut files = HashMap::from([("kernel".to_owned(), Fd::from(&self.kernel))]);
        if let Some(initrd) = &self.initrd {
            files.insert("initrd".to_owned(), Fd::from(initrd));
        }
        for (index, disk) in self.disks.iter().enumerate() {
            files.insert(format!("disk{index}"), Fd::from(disk));
        }
        files
    }
}

/// Opens a disk image to pass: read-write, only a regular file.
fn open_passed_disk(path: &Path) -> Result<File, VmctlError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|error| cannot_open("disk", path, error))?;
    let metadata = file
        .metadata()
        .map_err(|error| cannot_open("disk", path, error))?;
    if !metadata.is_file() {
        return Err(VmctlError::Message(format!(
            "cannot open the disk {}: not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// Opens a file to pass to the daemon: read-only, and only a regular file. `O_NONBLOCK` keeps a
/// FIFO from hanging vmctl in open(2) (it does not affect regular files); `O_NOCTTY` keeps a
/// terminal from becoming ours.
fn open_passed_file(what: &str, path: &Path) -> Result<File, VmctlError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|error| cannot_open(what, path, error))?;
    let metadata = file
        .metadata()
        .map_err(|error| cannot_open(what, path, error))?;
    if metadata.is_dir() {
        return Err(cannot_open(
            what,
            path,
            io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    if !metadata.is_file() {
        return Err(VmctlError::Message(format!(
            "cannot open the {what} {}: not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// One VM `vmctl stop` acts on.
struct StopTarget {
    name: String,
    path: OwnedObjectPath,
    /// Whether to call Shutdown/Kill; `false` for a VM that is already stopping (`-aw`).
    request: bool,
}

/// `vmctl stop`: Shutdown (or Kill with `-f`) one VM or all active ones, and with `-w` wait
/// until they are down. With `-a`, a failure on one VM does not keep the others from stopping.
async fn stop(ctx: &Ctx, args: StopArgs) -> Result<u8, VmctlError> {
    let targets = if args.all {
        active_vms(ctx, args.force).await?
    } else {
        let Some(word) = args.vm else {
            return Err(VmctlError::Message("give a VM name or -a".to_owned()));
        };
        let (name, path) = ctx.find(&word).await?;
        vec![StopTarget {
            name,
            path,
            request: true,
        }]
    };
    // `stop -f` returns once the VM is down, so that `vmctl stop -f x && vmctl remove x` works.
    let wait = args.wait || args.force;
    let single = !args.all;
    let mut status = SUCCESS;
    let mut report = |error: VmctlError| -> Result<(), VmctlError> {
        if single {
            return Err(error);
        }
        eprintln!("vmctl: {error}");
        status = FAILURE;
        Ok(())
    };

    let mut waiting = Vec::new();
    for target in targets {
        // Subscribe first, so that a VM going down right away is not missed.
        let watcher = if wait {
            match Watcher::new(&ctx.conn, target.path.clone()).await {
                Ok(watcher) => Some(watcher),
                Err(error) => {
                    report(error)?;
                    continue;
                }
            }
        } else {
            None
        };
        if target.request {
            match request_stop(ctx, &target, args.force).await {
                Ok(Stop::Requested) => {}
                // Already down: what the user wanted, as `systemctl stop` of a stopped unit.
                Ok(Stop::NotRunning) => {
                    ctx.note(format_args!("vm {} is not running", target.name));
                    continue;
                }
                Err(error) => {
                    report(error)?;
                    continue;
                }
            }
            if args.force {
                ctx.note(format_args!("killed vm {}", target.name));
            } else {
                ctx.note(format_args!("requested vm {} to shut down", target.name));
            }
        }
        if let Some(watcher) = watcher {
            waiting.push((target.name, watcher));
        }
    }

    let deadline = args
        .timeout
        .map(|seconds| Instant::now() + Duration::from_secs(seconds));
    for (name, mut watcher) in waiting {
        match watcher.wait_down_until(deadline).await {
            Ok(Some(Down::Failed(reason))) if !reason.is_empty() => {
                ctx.note(format_args!("vm {name} stopped (failed: {reason})"));
            }
            Ok(Some(_)) => ctx.note(format_args!("vm {name} stopped")),
            Ok(None) => report(VmctlError::Message(format!(
                "timed out waiting for vm {name} to stop"
            )))?,
            Err(error) => report(error)?,
        }
    }
    Ok(status)
}

/// The VMs `stop -a` acts on: starting, running or paused ones; also stopping ones, which are
/// only waited for unless `force` kills them.
async fn active_vms(ctx: &Ctx, force: bool) -> Result<Vec<StopTarget>, VmctlError> {
    let vms = ctx.manager.list_vms().await?;
    Ok(vms
        .into_iter()
        .filter_map(|(name, state, path)| {
            let request = match state.as_str() {
                "starting" | "running" | "paused" => true,
                "stopping" => force,
                _ => return None,
            };
            Some(StopTarget {
                name,
                path,
                request,
            })
        })
        .collect())
}

/// What a stop request came to.
enum Stop {
    Requested,
    /// The VM was not running (stopped, failed, never started, or gone).
    NotRunning,
}

async fn request_stop(ctx: &Ctx, target: &StopTarget, force: bool) -> Result<Stop, VmctlError> {
    let vm = proxies::vm(&ctx.conn, target.path.clone()).await?;
    let result = if force {
        vm.kill().await
    } else {
        vm.shutdown().await
    };
    match result {
        Ok(()) => Ok(Stop::Requested),
        Err(error) if is_gone(&error) => Ok(Stop::NotRunning),
        Err(error) if is_invalid_state(&error) => match vm.state().await {
            Ok(state) if matches!(state.as_str(), "stopped" | "failed" | "defined") => {
                Ok(Stop::NotRunning)
            }
            _ => Err(error.into()),
        },
        Err(error) => Err(error.into()),
    }
}

/// `vmctl pause`.
async fn pause(ctx: &Ctx, word: &str) -> Result<u8, VmctlError> {
    let target = ctx.vm(word).await?;
    target.vm.pause().await?;
    ctx.note(format_args!("paused vm {} successfully", target.name));
    Ok(SUCCESS)
}

/// `vmctl unpause`.
async fn unpause(ctx: &Ctx, word: &str) -> Result<u8, VmctlError> {
    let target = ctx.vm(word).await?;
    target.vm.resume().await?;
    ctx.note(format_args!("unpaused vm {} successfully", target.name));
    Ok(SUCCESS)
}

/// `vmctl reboot`: the guest is asked, as with Ctrl-Alt-Del.
async fn reboot(ctx: &Ctx, word: &str) -> Result<u8, VmctlError> {
    let target = ctx.vm(word).await?;
    target.vm.reboot().await?;
    ctx.note(format_args!("asked vm {} to reboot", target.name));
    Ok(SUCCESS)
}

/// `vmctl reset`: a hard reset, the guest is not asked.
async fn reset(ctx: &Ctx, word: &str) -> Result<u8, VmctlError> {
    let target = ctx.vm(word).await?;
    target.vm.reset().await?;
    ctx.note(format_args!("reset vm {}", target.name));
    Ok(SUCCESS)
}

/// `vmctl remove`.
async fn remove(ctx: &Ctx, word: &str) -> Result<u8, VmctlError> {
    let target = ctx.vm(word).await?;
    target.vm.remove().await?;
    ctx.note(format_args!("removed vm {}", target.name));
    Ok(SUCCESS)
}

/// `vmctl autostart NAME on|off`.
async fn autostart(ctx: &Ctx, word: &str, on: bool) -> Result<u8, VmctlError> {
    let target = ctx.vm(word).await?;
    target.vm.set_autostart(on).await?;
    let now = if on { "starts" } else { "does not start" };
    ctx.note(format_args!("vm {} {now} with vmd now", target.name));
    Ok(SUCCESS)
}

/// `vmctl reload`: the daemon re-reads /etc/vmd/vms.
async fn reload(ctx: &Ctx) -> Result<u8, VmctlError> {
    let (added, changed, removed) = ctx.manager.reload().await?;
    if added.is_empty() && changed.is_empty() && removed.is_empty() {
        ctx.note("reloaded; no definition changed");
    }
    for (what, names) in [("added", added), ("changed", changed), ("removed", removed)] {
        if !names.is_empty() {
            ctx.note(format_args!("{what}: {}", names.join(", ")));
        }
    }
    Ok(SUCCESS)
}

/// `vmctl console`.
async fn attach_console(ctx: &Ctx, args: ConsoleArgs) -> Result<u8, VmctlError> {
    let target = ctx.vm(&args.vm).await?;
    let options = console::Options {
        escape: args.escape.unwrap_or(EscapeChar::Byte(b'~')),
        force: args.force,
        quiet: ctx.quiet,
    };
    console::attach(&ctx.conn, &target.vm, &target.name, target.path, options).await
}

/// `vmctl wait`: 0 once the VM has stopped (or was never started, or is gone), 1 if it failed.
async fn wait(ctx: &Ctx, args: WaitArgs) -> Result<u8, VmctlError> {
    let (name, path) = ctx.find(&args.vm).await?;
    let mut watcher = Watcher::new(&ctx.conn, path).await?;
    let deadline = args
        .timeout
        .map(|seconds| Instant::now() + Duration::from_secs(seconds));
    match watcher.wait_down_until(deadline).await? {
        Some(Down::Stopped | Down::Gone) => Ok(SUCCESS),
        Some(Down::Failed(reason)) => {
            let reason = if reason.is_empty() {
                "no reason given".to_owned()
            } else {
                reason
            };
            eprintln!("vmctl: vm {name} failed: {reason}");
            Ok(FAILURE)
        }
        None => Err(VmctlError::Message(format!(
            "timed out waiting for vm {name} to stop"
        ))),
    }
}

/// `vmctl status`: the table of all VMs (`-r`: the running ones), or of one.
async fn status(ctx: &Ctx, args: StatusArgs) -> Result<u8, VmctlError> {
    let wanted = match &args.vm {
        Some(word) => Some(ctx.find(word).await?.0),
        None => None,
    };
    let vms = proxies::list(&ctx.conn).await?;
    let mut rows = Vec::new();
    let mut details = String::new();
    for vm in vms {
        if wanted.as_ref().is_some_and(|wanted| *wanted != vm.name) {
            continue;
        }
        if args.running && !is_running(vm.state()) {
            continue;
        }
        if wanted.is_some() {
            details = disk_lines(&vm.properties) + &interface_lines(&vm.properties);
        }
        rows.push(status_row(
            vm.id,
            vm.name.clone(),
            vm.state().to_owned(),
            &vm.properties,
        ));
    }
    print_out(&table::render(&rows))?;
    print_out(&details)?;
    Ok(SUCCESS)
}

/// Whether a VM in `state` counts as running for `status -r`.
fn is_running(state: &str) -> bool {
    matches!(state, "starting" | "running" | "paused" | "stopping")
}

fn status_row(id: u32, name: String, state: String, properties: &VmProperties) -> StatusRow {
    StatusRow {
        id,
        pid: properties.u32("LeaderPID"),
        vcpus: properties.u32("VCPUs"),
        max_mem: properties.u64("MemoryBytes"),
        cur_mem: None,
        tty: None,
        owner: owner(properties),
        reason: properties
            .str("FailureReason")
            .filter(|reason| !reason.is_empty() && !is_running(&state))
            .map(str::to_owned),
        state,
        name,
    }
}

/// One line per disk, for `vmctl status NAME`: `disk0: PATH (FORMAT[, read-only][, serial
/// S][, passed])`.
pub fn disk_lines(properties: &VmProperties) -> String {
    let Some(disks) = properties.disks() else {
        return String::new();
    };
    let mut out = String::new();
    for (index, disk) in disks.iter().enumerate() {
        let mut notes = vec![disk_str(disk, "Format").unwrap_or_else(|| "auto".to_owned())];
        let flag = |key: &str| disk.get(key).and_then(|v| bool::try_from(v).ok()) == Some(true);
        if flag("ReadOnly") {
            notes.push("read-only".to_owned());
        }
        if let Some(serial) = disk_str(disk, "Serial").filter(|s| !s.is_empty()) {
            notes.push(format!("serial {serial}"));
        }
        if flag("Passed") {
            notes.push("passed".to_owned());
        }
        let path = disk_str(disk, "Path").unwrap_or_default();
        out.push_str(&format!("disk{index}: {path} ({})\n", notes.join(", ")));
    }
    out
}

/// One line per network interface, for `vmctl status NAME`: `net0: TAP (MAC[, switch S][,
/// lladdr unlocked][, passed])`.
pub fn interface_lines(properties: &VmProperties) -> String {
    let Some(interfaces) = properties.interfaces() else {
        return String::new();
    };
    let mut out = String::new();
    for (index, interface) in interfaces.iter().enumerate() {
        let flag = |key: &str| interface.get(key).and_then(|v| bool::try_from(v).ok());
        let mut notes = vec![disk_str(interface, "MAC").unwrap_or_default()];
        if let Some(switch) = disk_str(interface, "Switch").filter(|s| !s.is_empty()) {
            notes.push(format!("switch {switch}"));
        }
        if flag("LockedLladdr") == Some(false) {
            notes.push("lladdr unlocked".to_owned());
        }
        if flag("Passed") == Some(true) {
            notes.push("passed".to_owned());
        }
        let tap = disk_str(interface, "Tap").unwrap_or_default();
        out.push_str(&format!("net{index}: {tap} ({})\n", notes.join(", ")));
    }
    out
}

/// The `Owner` property (`user` or `user:group`); `root` when it is empty (a root-owned VM) or
/// missing (a daemon older than owners).
pub fn owner(properties: &VmProperties) -> String {
    properties
        .str("Owner")
        .filter(|owner| !owner.is_empty())
        .unwrap_or("root")
        .to_owned()
}

/// Writes `text` to stdout; a closed stdout (`vmctl status | head -1`) is not an error.
pub fn print_out(text: &str) -> Result<(), VmctlError> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() != io::ErrorKind::BrokenPipe => {
            Err(VmctlError::io("cannot write to stdout", error))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use zbus::OwnedVariant;

    use super::*;

    fn properties(entries: &[(&str, Variant<'_>)]) -> VmProperties {
        VmProperties(
            entries
                .iter()
                .map(|(name, value)| {
                    let value = OwnedVariant::try_from(value).expect("owned");
                    ((*name).to_owned(), value)
                })
                .collect(),
        )
    }

    #[test]
    fn owner_is_the_property_or_root() {
        let owner_of = |value: &str| owner(&properties(&[("Owner", Variant::from(value))]));
        assert_eq!(owner_of("tester"), "tester");
        assert_eq!(owner_of("tester:vmusers"), "tester:vmusers");
        // Root-owned VMs, and daemons without owners.
        assert_eq!(owner_of(""), "root");
        assert_eq!(owner(&properties(&[])), "root");
    }

    #[test]
    fn status_rows_take_the_properties() {
        let row = status_row(
            3,
            "web".into(),
            "running".into(),
            &properties(&[
                ("LeaderPID", Variant::from(4242u32)),
                ("VCPUs", Variant::from(2u32)),
                ("MemoryBytes", Variant::from(512u64 << 20)),
            ]),
        );
        assert_eq!(
            row,
            StatusRow {
                id: 3,
                pid: Some(4242),
                vcpus: Some(2),
                max_mem: Some(512 << 20),
                cur_mem: None,
                tty: None,
                owner: "root".into(),
                state: "running".into(),
                name: "web".into(),
                reason: None,
            }
        );
    }

    fn new_vm() -> NewVm {
        NewVm {
            kernel: Some("/boot/vmlinuz".into()),
            initrd: None,
            cmdline: Some("console=ttyS0".into()),
            vcpus: Some(2),
            memory: Some(1 << 30),
            disks: Vec::new(),
            interfaces: Vec::new(),
        }
    }

    #[test]
    fn interfaces_go_to_the_daemon_and_show_in_status() {
        let vm = NewVm {
            interfaces: vec![Some("lan".into()), None],
            ..new_vm()
        };
        let entries = vm.interface_entries();
        assert_eq!(entries.len(), 2);
        assert_eq!(disk_str(&entries[0], "Switch").as_deref(), Some("lan"));
        assert!(entries[1].is_empty());
        assert!(vm.settings().expect("settings").contains_key("Interfaces"));
        assert!(
            !new_vm()
                .settings()
                .expect("settings")
                .contains_key("Interfaces")
        );

        let entry = |pairs: Vec<(&str, Variant<'_>)>| -> HashMap<String, OwnedVariant> {
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), OwnedVariant::try_from(v).expect("owned")))
                .collect()
        };
        let shown = properties(&[(
            "Interfaces",
            Variant::from(vec![
                entry(vec![
                    ("Tap", Variant::from("vt-web")),
                    ("MAC", Variant::from("52:54:00:00:00:01")),
                    ("Switch", Variant::from("lan")),
                    ("LockedLladdr", Variant::from(true)),
                    ("Passed", Variant::from(false)),
                ]),
                entry(vec![
                    ("Tap", Variant::from("vt-web-1")),
                    ("MAC", Variant::from("52:54:00:00:00:02")),
                    ("Switch", Variant::from("")),
                    ("LockedLladdr", Variant::from(false)),
                    ("Passed", Variant::from(false)),
                ]),
            ]),
        )]);
        assert_eq!(
            interface_lines(&shown),
            "net0: vt-web (52:54:00:00:00:01, switch lan)\nnet1: vt-web-1 (52:54:00:00:00:02, lladdr unlocked)\n"
        );
    }

    fn sorted_keys<V>(map: &HashMap<&'static str, V>) -> Vec<&'static str> {
        let mut keys: Vec<&str> = map.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn create_config_has_only_what_was_given() {
        let vm = new_vm();
        let config = vm.to_dbus().expect("config");
        assert_eq!(
            sorted_keys(&config),
            ["Cmdline", "Kernel", "MemoryBytes", "VCPUs"]
        );
        assert_eq!(config["Kernel"], Variant::from("/boot/vmlinuz"));
        assert_eq!(config["VCPUs"], Variant::from(2u32));
        assert_eq!(config["MemoryBytes"], Variant::from(1u64 << 30));
        let with_initrd = NewVm {
            initrd: Some("/boot/initrd".into()),
            ..new_vm()
        };
        let config = with_initrd.to_dbus().expect("config");
        assert_eq!(config["Initrd"], Variant::from("/boot/initrd"));
        assert!(NewVm::default().to_dbus().expect("config").is_empty());
    }

    #[test]
    fn config_for_passed_files_has_no_paths() {
        let vm = NewVm {
            initrd: Some("/boot/initrd".into()),
            ..new_vm()
        };
        let settings = vm.settings().expect("settings");
        assert_eq!(sorted_keys(&settings), ["Cmdline", "MemoryBytes", "VCPUs"]);
        assert_eq!(settings["Cmdline"], Variant::from("console=ttyS0"));
        assert!(NewVm::default().settings().expect("settings").is_empty());
    }

    #[test]
    fn disks_go_as_paths_or_as_formats_beside_fds() {
        let vm = NewVm {
            disks: vec![
                (Some(ImageFormat::Qcow2), "/srv/a.qcow2".into()),
                (None, "/srv/b.img".into()),
            ],
            ..new_vm()
        };
        let by_path = vm.disk_entries(true).expect("entries");
        assert_eq!(
            disk_str(&by_path[0], "Path").as_deref(),
            Some("/srv/a.qcow2")
        );
        assert_eq!(disk_str(&by_path[0], "Format").as_deref(), Some("qcow2"));
        assert_eq!(disk_str(&by_path[1], "Format").as_deref(), Some("auto"));
        let passed = vm.disk_entries(false).expect("entries");
        assert!(passed.iter().all(|entry| !entry.contains_key("Path")));
        assert!(sorted_keys(&vm.to_dbus().expect("config")).contains(&"Disks"));
        assert_eq!(
            disk_name("raw:x.qcow2"),
            (Some(ImageFormat::Raw), "x.qcow2".into())
        );
        assert_eq!(disk_name("x.qcow2"), (None, "x.qcow2".into()));
        let properties = VmProperties(HashMap::from([(
            "Disks".to_owned(),
            OwnedVariant::try_from(Variant::from(by_path)).expect("owned"),
        )]));
        assert_eq!(
            disk_lines(&properties),
            "disk0: /srv/a.qcow2 (qcow2)\ndisk1: /srv/b.img (auto)\n"
        );
    }

    #[test]
    fn paths_sent_over_dbus_must_be_utf8() {
        use std::{ffi::OsStr, os::unix::ffi::OsStrExt};

        let vm = NewVm {
            kernel: Some(OsStr::from_bytes(b"/boot/vmlinuz-\xff").into()),
            ..new_vm()
        };
        let error = vm.to_dbus().expect_err("not UTF-8").to_string();
        assert_eq!(
            error,
            "kernel path \"/boot/vmlinuz-\\xFF\" is not valid UTF-8"
        );
        // Passed as an fd, the path need not be a string.
        assert_eq!(
            sorted_keys(&vm.settings().expect("settings")),
            ["Cmdline", "MemoryBytes", "VCPUs"]
        );
    }

    #[test]
    fn existing_vm_must_match_the_options_given() {
        let same = properties(&[
            ("Kernel", Variant::from("/boot/vmlinuz")),
            ("Initrd", Variant::from("/boot/initrd")),
            ("Cmdline", Variant::from("console=ttyS0")),
            ("VCPUs", Variant::from(2u32)),
            ("MemoryBytes", Variant::from(1u64 << 30)),
        ]);
        assert!(new_vm().check_matches("web", &same, true).is_ok());
        // What the daemon does not report is not compared.
        assert!(
            new_vm()
                .check_matches("web", &properties(&[]), true)
                .is_ok()
        );

        let other = properties(&[
            ("Kernel", Variant::from("/boot/vmlinuz")),
            ("MemoryBytes", Variant::from(512u64 << 20)),
            ("VCPUs", Variant::from(1u32)),
        ]);
        let error = new_vm()
            .check_matches("web", &other, true)
            .expect_err("differs")
            .to_string();
        assert_eq!(
            error,
            "vm web already exists with vcpus \"1\", not \"2\", memory \"512M\", not \"1.0G\"; \
             remove it first to change its definition"
        );

        // Disks: by path for root, by number for passed ones.
        let one_disk = NewVm {
            disks: vec![(None, "/srv/a.qcow2".into())],
            ..NewVm::default()
        };
        let entry = |path: &str| {
            HashMap::from([(
                "Path".to_owned(),
                OwnedVariant::from(zbus::Str::from(path.to_owned())),
            )])
        };
        let with = |paths: &[&str]| {
            let disks: Vec<HashMap<String, OwnedVariant>> =
                paths.iter().map(|path| entry(path)).collect();
            properties(&[("Disks", Variant::from(disks))])
        };
        assert!(
            one_disk
                .check_matches("d", &with(&["/srv/a.qcow2"]), true)
                .is_ok()
        );
        let error = one_disk
            .check_matches("d", &with(&["/srv/b.qcow2"]), true)
            .expect_err("differs")
            .to_string();
        assert!(
            error.contains("disks \"/srv/b.qcow2\", not \"/srv/a.qcow2\""),
            "{error}"
        );
        assert!(
            one_disk
                .check_matches("d", &with(&["/home/u/a.qcow2"]), false)
                .is_ok()
        );
        let error = one_disk
            .check_matches("d", &with(&[]), false)
            .expect_err("differs")
            .to_string();
        assert!(error.contains("disks \"0\", not \"1\""), "{error}");
    }

    #[test]
    fn passed_files_are_not_compared_by_path() {
        // A VM defined from fds reports the path of the daemon's copy.
        let copied = properties(&[
            ("Kernel", Variant::from("/var/lib/vmd/files/web/kernel")),
            ("Cmdline", Variant::from("console=ttyS0")),
        ]);
        assert!(new_vm().check_matches("web", &copied, false).is_ok());
        let error = new_vm()
            .check_matches("web", &copied, true)
            .expect_err("differs")
            .to_string();
        assert!(error.contains("kernel \"/var/lib/vmd/files/web/kernel\", not \"/boot/vmlinuz\""));
        // The other options still are.
        let other = properties(&[("Cmdline", Variant::from("quiet"))]);
        assert!(new_vm().check_matches("web", &other, false).is_err());
    }

    #[test]
    fn relative_paths_become_absolute() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"").expect("write");
        assert_eq!(absolute_path("kernel", &kernel).expect("absolute"), kernel);
        let relative = Path::new("src/../Cargo.toml");
        assert_eq!(
            absolute_path("kernel", relative).expect("absolute"),
            std::fs::canonicalize("Cargo.toml").expect("canonicalize")
        );
        // A missing relative path is reported with what it was for.
        let error = absolute_path("initrd", Path::new("no/such/initrd"))
            .expect_err("missing")
            .to_string();
        assert_eq!(
            error,
            "cannot open the initrd no/such/initrd: No such file or directory"
        );
    }

    #[test]
    fn passed_files_are_opened_read_only() {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        use zbus::zvariant::Type;

        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinuz");
        let initrd = dir.path().join("initrd");
        std::fs::write(&kernel, b"kernel").expect("write");
        std::fs::write(&initrd, b"initrd").expect("write");

        let disk = dir.path().join("disk.qcow2");
        std::fs::write(&disk, b"disk").expect("write");
        let files =
            PassedFiles::open(&kernel, Some(&initrd), &[(None, disk.clone())]).expect("open");
        let map = files.to_dbus();
        assert_eq!(HashMap::<String, Fd<'_>>::SIGNATURE.to_string(), "a{sh}");
        let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["disk0", "initrd", "kernel"]);
        assert_eq!(map["kernel"], Fd::from(&files.kernel));
        for (name, fd) in &map {
            let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).expect("flags"));
            // Disks are written by the guest; the kernel and initrd only read.
            let expected = if name == "disk0" {
                OFlag::O_RDWR
            } else {
                OFlag::O_RDONLY
            };
            assert_eq!(flags & OFlag::O_ACCMODE, expected, "{name}");
        }

        let files = PassedFiles::open(&kernel, None, &[]).expect("open");
        assert_eq!(files.to_dbus().keys().collect::<Vec<_>>(), ["kernel"]);
    }

    #[test]
    fn unusable_passed_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"kernel").expect("write");
        let open = |kernel: &Path, initrd: Option<&Path>| {
            PassedFiles::open(kernel, initrd, &[])
                .expect_err("unusable")
                .to_string()
        };

        let missing = dir.path().join("missing");
        assert_eq!(
            open(&missing, None),
            format!(
                "cannot open the kernel {}: No such file or directory",
                missing.display()
            )
        );
        assert_eq!(
            open(&kernel, Some(&missing)),
            format!(
                "cannot open the initrd {}: No such file or directory",
                missing.display()
            )
        );
        assert_eq!(
            open(dir.path(), None),
            format!(
                "cannot open the kernel {}: Is a directory",
                dir.path().display()
            )
        );
        // A FIFO neither hangs vmctl nor is passed.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        assert_eq!(
            open(&fifo, None),
            format!(
                "cannot open the kernel {}: not a regular file",
                fifo.display()
            )
        );
    }
}
