//! vmctl's command line, after OpenBSD's vmctl(8).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::size::Size;

/// Control the VMs of vmd, the virtual machine manager.
#[derive(Debug, Parser)]
#[command(
    name = "vmctl",
    version,
    after_help = "vmctl talks to vmd (org.vmd.vmd1) on the system bus, or over vmd's own socket \
                  with --socket. Exit status: 0 on success, 1 on failure (for `wait`: the VM \
                  failed), 2 on a usage error."
)]
pub struct Cli {
    /// Talk to vmd over its socket (peer-to-peer D-Bus, e.g. /run/vmd/vmd.sock) instead of the
    /// system bus.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Print no progress notes on stderr (errors are still printed).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a VM; with -k, an ad-hoc one if vmd has none of that name.
    ///
    /// An ad-hoc VM is forgotten once it stops, unless --define keeps its definition.
    Start(StartArgs),
    /// Stop a VM (or all with -a): ask the guest to power off, or kill it with -f.
    Stop(StopArgs),
    /// Pause a running VM.
    Pause(VmArg),
    /// Resume a paused VM.
    Unpause(VmArg),
    /// Ask the guest to reboot (as pressing Ctrl-Alt-Del).
    Reboot(VmArg),
    /// Reset a VM at once, as the reset button does (the guest is not asked).
    Reset(VmArg),
    /// Show the VMs (or one) in a table.
    #[command(visible_alias = "show")]
    Status(StatusArgs),
    /// Show everything about one VM: its state, settings and definition.
    Info(VmArg),
    /// Attach to a VM's serial console; type ~. at the start of a line to leave, ~? for help.
    Console(ConsoleArgs),
    /// Show the guest's console output kept in the journal (also from before vmctl attached).
    Log(LogArgs),
    /// Wait until a VM has stopped; exit status 1 if it failed.
    Wait(WaitArgs),
    /// Forget a VM that is not running, and its stored definition.
    Remove(VmArg),
    /// Start the VM with vmd (on) or not (off).
    Autostart(AutostartArgs),
    /// Edit a VM's definition in $EDITOR; it is applied when the file is saved.
    Edit(VmArg),
    /// Define a VM from a definition file (TOML, see vmd.toml(5)); the VM is named after the
    /// file unless the file names it.
    Load(LoadArgs),
    /// Make vmd read /etc/vmd/vms again, and say what changed.
    Reload,
    /// Create a disk image (raw or qcow2); needs no daemon.
    Create(CreateArgs),
}

/// `vmctl console`.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// The VM's name or ID.
    #[arg(value_name = "NAME|ID", value_parser = parse_vm)]
    pub vm: String,

    /// The escape character instead of ~: a character, ^X for a control character, or
    /// "none" for no escapes at all.
    #[arg(short = 'e', value_name = "CHAR", value_parser = parse_escape)]
    pub escape: Option<EscapeChar>,

    /// Take the console over from the client that has it.
    #[arg(long)]
    pub force: bool,
}

/// `vmctl log`.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// The VM's name or ID.
    #[arg(value_name = "NAME|ID", value_parser = parse_vm)]
    pub vm: String,

    /// Keep showing new output as the guest writes it.
    #[arg(short, long)]
    pub follow: bool,

    /// Show only the last N lines.
    #[arg(short = 'n', long, value_name = "N")]
    pub lines: Option<u32>,
}

/// `vmctl autostart`.
#[derive(Debug, Args)]
pub struct AutostartArgs {
    /// The VM's name or ID.
    #[arg(value_name = "NAME|ID", value_parser = parse_vm)]
    pub vm: String,

    /// on or off.
    #[arg(value_name = "on|off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub on: bool,
}

/// `vmctl load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The definition file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// The console's escape character: a byte, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeChar {
    /// This byte at the start of a line begins an escape.
    Byte(u8),
    /// No escapes: everything goes to the guest.
    None,
}

/// `vmctl create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The new image, `[raw:|qcow2:]PATH`: without a prefix, qcow2 if PATH ends in .qcow2,
    /// else raw. An existing file is not overwritten.
    #[arg(value_name = "DISK")]
    pub disk: String,

    /// Make a qcow2 image over this base image (recorded as given, relative to DISK's
    /// directory); only the changes go to DISK, and its size is the base's.
    #[arg(short = 'b', value_name = "BASE", conflicts_with = "input")]
    pub base: Option<PathBuf>,

    /// Copy INPUT (raw or qcow2) into the new image, converting as needed.
    #[arg(short = 'i', value_name = "INPUT")]
    pub input: Option<PathBuf>,

    /// The size: a number with K, M, G or T (fractions allowed, as 1.5G); a bare number is
    /// megabytes. Rounded up to whole megabytes.
    #[arg(short = 's', value_name = "SIZE", value_parser = crate::create::parse_disk_size)]
    pub size: Option<u64>,
}

/// A command that takes one VM, by name or by the ID `vmctl status` shows.
#[derive(Debug, Args)]
pub struct VmArg {
    /// The VM's name or ID.
    #[arg(value_name = "NAME|ID", value_parser = parse_vm)]
    pub vm: String,
}

/// `vmctl start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The VM's name (or ID, to start a VM vmd knows).
    #[arg(value_name = "NAME|ID", value_parser = parse_name)]
    pub name: String,

    /// Kernel to boot (bzImage or ELF); required to define a new VM. -b is vmctl(8)'s
    /// spelling.
    #[arg(short, long, short_alias = 'b', value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk (no short option: -i is vmctl(8)'s interface count).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    pub cmdline: Option<String>,

    /// Guest memory, e.g. 512M, 1.5G; a bare number is bytes, as in vmctl(8). Rounded down to
    /// whole megabytes.
    #[arg(short, long, value_name = "SIZE", value_parser = parse_memory)]
    pub memory: Option<Size>,

    /// Number of vCPUs.
    #[arg(short = 'p', long = "cpus", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub cpus: Option<u32>,

    /// Attach to the console once the VM has started.
    #[arg(short, long)]
    pub console: bool,

    /// With -c: the console's escape character (see `vmctl console -e`).
    #[arg(short = 'e', value_name = "CHAR", value_parser = parse_escape, requires = "console")]
    pub escape: Option<EscapeChar>,

    /// A disk image, `[raw:|qcow2:]PATH` (repeatable, in guest order); without a prefix its
    /// format is detected (qcow2 if it has the qcow2 magic, else raw).
    #[arg(short = 'd', long = "disk", value_name = "DISK")]
    pub disks: Vec<String>,

    /// Give the VM this many network interfaces (at least one per -n); those not attached to
    /// a switch get a tap of their own (vt-NAME, vt-NAME-1...).
    #[arg(short = 'i', long = "interfaces", value_name = "COUNT",
          value_parser = clap::value_parser!(u32).range(1..=4))]
    pub interfaces: Option<u32>,

    /// Add a network interface attached to this switch (repeatable; the administrator's
    /// /etc/vmd/switches/SWITCH.toml).
    #[arg(short = 'n', long = "switch", value_name = "SWITCH")]
    pub switches: Vec<String>,

    /// Keep the definition of a VM this command defines (vmd then knows it after it stops,
    /// as `vmctl load` would).
    #[arg(long)]
    pub define: bool,
}

impl StartArgs {
    /// Whether any option that only applies when defining the VM was given.
    pub fn has_config(&self) -> bool {
        self.kernel.is_some()
            || self.initrd.is_some()
            || self.cmdline.is_some()
            || self.memory.is_some()
            || self.cpus.is_some()
            || !self.disks.is_empty()
            || self.interfaces.is_some()
            || !self.switches.is_empty()
    }

    /// Each interface's switch, in guest order (vmctl(8)'s meaning: one interface per -n, on
    /// that switch, and then free ones up to -i COUNT).
    pub fn interface_switches(&self) -> Vec<Option<String>> {
        let count = (self.interfaces.unwrap_or(0) as usize).max(self.switches.len());
        let mut interfaces: Vec<Option<String>> = self.switches.iter().cloned().map(Some).collect();
        interfaces.resize(count, None);
        interfaces
    }
}

/// `vmctl stop`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("waiting").args(["force", "wait"]).multiple(true)))]
pub struct StopArgs {
    /// The VM's name or ID.
    #[arg(value_name = "NAME|ID", value_parser = parse_vm,
          required_unless_present = "all", conflicts_with = "all")]
    pub vm: Option<String>,

    /// Stop every VM that is starting, running or paused.
    #[arg(short, long)]
    pub all: bool,

    /// Kill the VM at once instead of asking the guest to power off; returns once it is
    /// stopped.
    #[arg(short, long)]
    pub force: bool,

    /// Wait until the VM has stopped.
    #[arg(short, long)]
    pub wait: bool,

    /// With -w or -f: give up waiting after this many seconds (exit status 1).
    #[arg(long, value_name = "SECONDS", requires = "waiting")]
    pub timeout: Option<u64>,
}

/// `vmctl status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Show only running VMs (starting, running, paused, stopping).
    #[arg(short)]
    pub running: bool,

    /// Show only this VM.
    #[arg(value_name = "NAME|ID", value_parser = parse_vm)]
    pub vm: Option<String>,
}

/// `vmctl wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The VM's name or ID.
    #[arg(value_name = "NAME|ID", value_parser = parse_vm)]
    pub vm: String,

    /// Give up after this many seconds (exit status 1).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// A VM name, checked against vmd's rule before anything is sent.
fn parse_name(text: &str) -> Result<String, String> {
    vmd::protocol::validate_vm_name(text)
        .map(|()| text.to_owned())
        .map_err(|error| error.to_string())
}

/// A VM's name, or an ID (digits, which are also a valid name).
fn parse_vm(text: &str) -> Result<String, String> {
    parse_name(text)
}

/// A memory size as vmctl(8) takes it ([`Size`]).
fn parse_memory(text: &str) -> Result<Size, String> {
    Size::parse(text, "memory")
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("{text:?} is neither on nor off")),
    }
}

/// `-e`: `~`, `^]` (a control character), `none`.
fn parse_escape(text: &str) -> Result<EscapeChar, String> {
    let bad = || format!("{text:?} is not an escape character (a character, ^X, or none)");
    match text.as_bytes() {
        b"none" => Ok(EscapeChar::None),
        [byte] if byte.is_ascii() && !byte.is_ascii_control() => Ok(EscapeChar::Byte(*byte)),
        [b'^', letter] => match letter.to_ascii_uppercase() {
            upper @ b'@'..=b'_' => Ok(EscapeChar::Byte(upper - b'@')),
            b'?' => Ok(EscapeChar::Byte(0x7f)),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmctl").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn start_takes_openbsd_like_flags() {
        let cli = parse(&[
            "start",
            "web",
            "-k",
            "vmlinuz",
            "--initrd",
            "initrd",
            "-m",
            "1G",
            "-p",
            "2",
            "-c",
            "--cmdline",
            "-v console=ttyS0",
        ])
        .expect("parses");
        let Command::Start(start) = cli.command else {
            panic!("not start: {cli:?}");
        };
        assert_eq!(start.name, "web");
        assert_eq!(start.kernel, Some(PathBuf::from("vmlinuz")));
        assert_eq!(start.initrd, Some(PathBuf::from("initrd")));
        assert_eq!(start.memory.map(|size| size.bytes), Some(1 << 30));
        assert_eq!(start.cpus, Some(2));
        assert_eq!(start.cmdline.as_deref(), Some("-v console=ttyS0"));
        assert!(start.console && start.has_config());
    }

    #[test]
    fn interfaces_are_switched_first_then_free() {
        let start = |args: &[&str]| match parse(args).expect("parses").command {
            Command::Start(start) => start,
            other => panic!("not start: {other:?}"),
        };
        let both = start(&["start", "web", "-n", "lan", "-i", "3", "-n", "dmz"]);
        assert_eq!(
            both.interface_switches(),
            [Some("lan".to_owned()), Some("dmz".to_owned()), None]
        );
        assert!(both.has_config());
        assert_eq!(
            start(&["start", "web", "-i", "2"]).interface_switches(),
            [None, None]
        );
        // -i below the number of -n: every -n still gets its interface.
        assert_eq!(
            start(&["start", "web", "-i", "1", "-n", "a", "-n", "b"]).interface_switches(),
            [Some("a".to_owned()), Some("b".to_owned())]
        );
        assert!(start(&["start", "web"]).interface_switches().is_empty());
        for bad in [
            &["start", "web", "-i", "0"][..],
            &["start", "web", "-i", "5"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn global_options_go_anywhere() {
        let cli = parse(&["status", "--socket", "/run/vmd/vmd.sock", "-q"]).expect("parses");
        assert_eq!(cli.socket, Some(PathBuf::from("/run/vmd/vmd.sock")));
        assert!(cli.quiet);
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        for args in [
            &["start", "a/b"][..],
            &["start", "-x"],
            &["start", "web", "-m", "lots"],
            &["start", "web", "-m", "0"],
            &["start", "web", "-p", "0"],
            &["stop"],
            &["stop", "web", "-a"],
            &["stop", "web", "-t", "5"],
            &["start", "web", "-m", "512"],
            &["start", "web", "-e", "^]"],
            &["console", "web", "-e", "ab"],
            &["autostart", "web", "maybe"],
            &["wait"],
            &["frobnicate"],
        ] {
            let error = parse(args).expect_err(&format!("{args:?} parses"));
            assert_ne!(error.kind(), ErrorKind::DisplayHelp, "{args:?}");
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn show_is_status_and_takes_r() {
        let cli = parse(&["show", "-r"]).expect("parses");
        let Command::Status(status) = cli.command else {
            panic!("not status: {cli:?}");
        };
        assert!(status.running && status.vm.is_none());
    }

    #[test]
    fn console_escape_characters() {
        let escape = |text: &str| match parse(&["console", "web", "-e", text])
            .expect("parses")
            .command
        {
            Command::Console(args) => args.escape,
            other => panic!("not console: {other:?}"),
        };
        assert_eq!(escape("%"), Some(EscapeChar::Byte(b'%')));
        assert_eq!(escape("^]"), Some(EscapeChar::Byte(0x1d)));
        assert_eq!(escape("^a"), Some(EscapeChar::Byte(1)));
        assert_eq!(escape("none"), Some(EscapeChar::None));
    }

    #[test]
    fn stop_all_and_wait_with_timeout() {
        let cli = parse(&["stop", "-afw", "--timeout", "30"]).expect("parses");
        let Command::Stop(stop) = cli.command else {
            panic!("not stop: {cli:?}");
        };
        assert!(stop.all && stop.force && stop.wait);
        assert_eq!((stop.vm, stop.timeout), (None, Some(30)));
    }
}
