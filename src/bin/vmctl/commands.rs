//! One function per vmctl command. Each returns the exit status, or the error to print.
//!
//! Progress notes ("started vm web successfully") go to stderr, one line each, unless `-q`;
//! stdout carries only what was asked for (the status table, the console).

use std::{
    collections::HashMap,
    fmt::Display,
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::time::Instant;
use zbus::{Connection, OwnedObjectPath, Variant};

use crate::{
    cli::{Cli, Command, StartArgs, StatusArgs, StopArgs, WaitArgs},
    connect::connect,
    console,
    error::{VmctlError, is_gone, is_no_such_vm},
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
    let ctx = Ctx::connect(cli.socket.as_deref(), cli.quiet).await?;
    match cli.command {
        Command::Start(args) => start(&ctx, args).await,
        Command::Stop(args) => stop(&ctx, args).await,
        Command::Pause(args) => pause(&ctx, &args.name).await,
        Command::Unpause(args) => unpause(&ctx, &args.name).await,
        Command::Status(args) => status(&ctx, args).await,
        Command::Console(args) => attach_console(&ctx, &args.name).await,
        Command::Wait(args) => wait(&ctx, args).await,
        Command::Remove(args) => remove(&ctx, &args.name).await,
    }
}

/// What every command needs: the connection, the manager, and whether to be quiet.
struct Ctx {
    conn: Connection,
    manager: ManagerProxy<'static>,
    quiet: bool,
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
    fn note(&self, message: impl Display) {
        if !self.quiet {
            eprintln!("vmctl: {message}");
        }
    }

    /// The object path and a proxy of the VM called `name`.
    async fn vm(&self, name: &str) -> Result<(OwnedObjectPath, VmProxy<'static>), VmctlError> {
        let path = self.manager.get_vm(name).await?;
        let vm = proxies::vm(&self.conn, path.clone()).await?;
        Ok((path, vm))
    }
}

/// `vmctl start`: define the VM if needed, start it, and with `-c` attach to its console.
async fn start(ctx: &Ctx, args: StartArgs) -> Result<u8, VmctlError> {
    let config = NewVm::from_args(&args)?;
    let path = match ctx.manager.get_vm(&args.name).await {
        Ok(path) => {
            if args.has_config() {
                let current = proxies::vm_properties(&ctx.conn, path.clone()).await?;
                config.check_matches(&args.name, &current)?;
            }
            path
        }
        Err(error) if is_no_such_vm(&error) => {
            if config.kernel.is_none() {
                return Err(VmctlError::Message(format!(
                    "vm {} does not exist; give its kernel with -k to define it",
                    args.name
                )));
            }
            ctx.manager.create_vm(&args.name, config.to_dbus()).await?
        }
        Err(error) => return Err(error.into()),
    };
    let vm = proxies::vm(&ctx.conn, path.clone()).await?;
    vm.start().await?;
    ctx.note(format_args!("started vm {} successfully", args.name));
    if args.console {
        console::attach(&ctx.conn, &vm, &args.name, path, ctx.quiet).await
    } else {
        Ok(SUCCESS)
    }
}

/// The definition `vmctl start` gives a new VM: only what was on the command line, so the
/// daemon's defaults apply to the rest.
#[derive(Debug, Default, PartialEq)]
struct NewVm {
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    vcpus: Option<u32>,
    memory: Option<u64>,
}

impl NewVm {
    fn from_args(args: &StartArgs) -> Result<Self, VmctlError> {
        Ok(Self {
            kernel: args
                .kernel
                .as_deref()
                .map(|p| host_path("kernel", p))
                .transpose()?,
            initrd: args
                .initrd
                .as_deref()
                .map(|p| host_path("initrd", p))
                .transpose()?,
            cmdline: args.cmdline.clone(),
            vcpus: args.cpus,
            memory: args.memory,
        })
    }

    /// The `a{sv}` of `CreateVM`.
    fn to_dbus(&self) -> HashMap<&'static str, Variant<'_>> {
        let mut config = HashMap::new();
        if let Some(kernel) = &self.kernel {
            config.insert("Kernel", Variant::from(kernel.as_str()));
        }
        if let Some(initrd) = &self.initrd {
            config.insert("Initrd", Variant::from(initrd.as_str()));
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
        config
    }

    /// For a VM that exists already: refuses options that differ from its definition, since
    /// starting it would silently ignore them. A property the daemon does not report is not
    /// compared.
    fn check_matches(&self, name: &str, current: &VmProperties) -> Result<(), VmctlError> {
        let mut differences = Vec::new();
        let mut compare = |what: &str, wanted: Option<String>, actual: Option<String>| {
            if let (Some(wanted), Some(actual)) = (wanted, actual)
                && wanted != actual
            {
                differences.push(format!("{what} {actual:?}, not {wanted:?}"));
            }
        };
        let text = |value: Option<&str>| value.map(str::to_owned);
        compare("kernel", self.kernel.clone(), text(current.str("Kernel")));
        compare("initrd", self.initrd.clone(), text(current.str("Initrd")));
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

/// A host path for the daemon to open: relative paths are resolved against the current
/// directory (the daemon's is not ours); absolute ones are passed as given.
fn host_path(what: &str, path: &Path) -> Result<String, VmctlError> {
    let absolute: PathBuf = if path.is_absolute() {
        path.to_owned()
    } else {
        std::fs::canonicalize(path)
            .map_err(|error| VmctlError::io(format!("{what} {}", path.display()), error))?
    };
    absolute
        .into_os_string()
        .into_string()
        .map_err(|path| VmctlError::Message(format!("{what} path {path:?} is not valid UTF-8")))
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
        let Some(name) = args.name else {
            return Err(VmctlError::Message("give a VM name or -a".to_owned()));
        };
        let path = ctx.manager.get_vm(&name).await?;
        vec![StopTarget {
            name,
            path,
            request: true,
        }]
    };
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
        let watcher = if args.wait {
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
            if let Err(error) = request_stop(ctx, &target, args.force).await {
                report(error)?;
                continue;
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

async fn request_stop(ctx: &Ctx, target: &StopTarget, force: bool) -> Result<(), VmctlError> {
    let vm = proxies::vm(&ctx.conn, target.path.clone()).await?;
    if force {
        vm.kill().await?;
    } else {
        vm.shutdown().await?;
    }
    Ok(())
}

/// `vmctl pause`.
async fn pause(ctx: &Ctx, name: &str) -> Result<u8, VmctlError> {
    let (_, vm) = ctx.vm(name).await?;
    vm.pause().await?;
    ctx.note(format_args!("paused vm {name} successfully"));
    Ok(SUCCESS)
}

/// `vmctl unpause`.
async fn unpause(ctx: &Ctx, name: &str) -> Result<u8, VmctlError> {
    let (_, vm) = ctx.vm(name).await?;
    vm.resume().await?;
    ctx.note(format_args!("unpaused vm {name} successfully"));
    Ok(SUCCESS)
}

/// `vmctl remove`.
async fn remove(ctx: &Ctx, name: &str) -> Result<u8, VmctlError> {
    let (_, vm) = ctx.vm(name).await?;
    vm.remove().await?;
    ctx.note(format_args!("removed vm {name}"));
    Ok(SUCCESS)
}

/// `vmctl console`.
async fn attach_console(ctx: &Ctx, name: &str) -> Result<u8, VmctlError> {
    let (path, vm) = ctx.vm(name).await?;
    console::attach(&ctx.conn, &vm, name, path, ctx.quiet).await
}

/// `vmctl wait`: 0 once the VM has stopped (or was never started, or is gone), 1 if it failed.
async fn wait(ctx: &Ctx, args: WaitArgs) -> Result<u8, VmctlError> {
    let path = ctx.manager.get_vm(&args.name).await?;
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
            eprintln!("vmctl: vm {} failed: {reason}", args.name);
            Ok(FAILURE)
        }
        None => Err(VmctlError::Message(format!(
            "timed out waiting for vm {} to stop",
            args.name
        ))),
    }
}

/// `vmctl status`: the table of all VMs, or of one.
async fn status(ctx: &Ctx, args: StatusArgs) -> Result<u8, VmctlError> {
    let vms = ctx.manager.list_vms().await?;
    if let Some(name) = &args.name
        && !vms.iter().any(|(listed, _, _)| listed == name)
    {
        // Let the daemon say why (its NoSuchVM sentence). Should the VM have been defined
        // since ListVMs, the table just has no row for it.
        ctx.manager.get_vm(name).await?;
    }
    let mut rows = Vec::new();
    for (index, (name, state, path)) in vms.into_iter().enumerate() {
        if args.name.as_ref().is_some_and(|wanted| *wanted != name) {
            continue;
        }
        let properties = match proxies::vm_properties(&ctx.conn, path).await {
            Ok(properties) => properties,
            // Removed since ListVMs: leave it out, keep the others' IDs.
            Err(error) if is_gone(&error) => continue,
            Err(error) => return Err(error.into()),
        };
        rows.push(status_row(index + 1, name, state, &properties));
    }
    print_out(&table::render(&rows))?;
    Ok(SUCCESS)
}

fn status_row(id: usize, name: String, state: String, properties: &VmProperties) -> StatusRow {
    StatusRow {
        id,
        pid: properties.u32("LeaderPID"),
        vcpus: properties.u32("VCPUs"),
        max_mem: properties.u64("MemoryBytes"),
        cur_mem: None,
        tty: None,
        owner: owner(properties),
        state,
        name,
    }
}

/// The `Owner` property: a user name as is, a uid as its user's name; `root` while the daemon
/// has no owners.
fn owner(properties: &VmProperties) -> String {
    if let Some(owner) = properties.str("Owner").filter(|owner| !owner.is_empty()) {
        return owner.to_owned();
    }
    match properties.u32("Owner") {
        Some(uid) => nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map_or_else(|| uid.to_string(), |user| user.name),
        None => "root".to_owned(),
    }
}

/// Writes `text` to stdout; a closed stdout (`vmctl status | head -1`) is not an error.
fn print_out(text: &str) -> Result<(), VmctlError> {
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
    fn owner_defaults_to_root_and_accepts_a_name_or_a_uid() {
        assert_eq!(owner(&properties(&[])), "root");
        assert_eq!(
            owner(&properties(&[("Owner", Variant::from("alice"))])),
            "alice"
        );
        assert_eq!(
            owner(&properties(&[("Owner", Variant::from(0u32))])),
            "root"
        );
        assert_eq!(
            owner(&properties(&[("Owner", Variant::from(4_000_000_000u32))])),
            "4000000000"
        );
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
        }
    }

    #[test]
    fn create_config_has_only_what_was_given() {
        let vm = new_vm();
        let config = vm.to_dbus();
        let mut keys: Vec<&str> = config.keys().copied().collect();
        keys.sort_unstable();
        assert_eq!(keys, ["Cmdline", "Kernel", "MemoryBytes", "VCPUs"]);
        assert_eq!(config["VCPUs"], Variant::from(2u32));
        assert_eq!(config["MemoryBytes"], Variant::from(1u64 << 30));
        assert!(NewVm::default().to_dbus().is_empty());
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
        assert!(new_vm().check_matches("web", &same).is_ok());
        // What the daemon does not report is not compared.
        assert!(new_vm().check_matches("web", &properties(&[])).is_ok());

        let other = properties(&[
            ("Kernel", Variant::from("/boot/vmlinuz")),
            ("MemoryBytes", Variant::from(512u64 << 20)),
            ("VCPUs", Variant::from(1u32)),
        ]);
        let error = new_vm()
            .check_matches("web", &other)
            .expect_err("differs")
            .to_string();
        assert_eq!(
            error,
            "vm web already exists with vcpus \"1\", not \"2\", memory \"512M\", not \"1.0G\"; \
             remove it first to change its definition"
        );
    }

    #[test]
    fn host_paths_become_absolute() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"").expect("write");
        let absolute = host_path("kernel", &kernel).expect("absolute path");
        assert_eq!(absolute, kernel.to_str().expect("utf-8"));
        // A missing relative path is reported with what it was for.
        let error = host_path("initrd", Path::new("no/such/initrd"))
            .expect_err("missing")
            .to_string();
        assert_eq!(error, "initrd no/such/initrd: No such file or directory");
    }
}
