//! A throw-away systemd with its own system bus, for integration tests of the vmd daemon, on
//! hosts whose PID 1 is not systemd (this project's CI).
//!
//! ```ignore
//! mod systemd_box;
//! use systemd_box::{BoxOptions, SystemdBox};
//!
//! if let Err(reason) = SystemdBox::supported() {
//!     eprintln!("skipped: {reason}");
//!     return;
//! }
//! let sb = SystemdBox::boot(BoxOptions { seed: vec![seed_dir], ..BoxOptions::default() })?;
//! let out = sb.exec_ok(&["systemctl", "start", "vmd.service"]);
//! ```
//!
//! # What a box is
//!
//! systemd runs as PID 1 of its own PID namespace, with its own mount, UTS, IPC and network
//! namespaces (only `lo`), and boots `vmd-box.target`: basic.target, dbus and logind
//! (systemd-machined starts on demand when the host has it installed). Nothing it does reaches
//! the host:
//!
//! - its root is an overlay whose lower layer is the host's `/` and whose upper layer is a
//!   tmpfs, so unit files, D-Bus and polkit files, users made with `useradd`, tmpfiles' purge of
//!   /tmp: all of it lands in RAM and vanishes with the box;
//! - it has a fresh /proc (its /proc/sys read-only), the host's /sys with a read-only top (so
//!   udev, sysctl and binfmt skip themselves), a private /sys/fs/cgroup holding binds of the
//!   host's hierarchies, a private /dev with fresh device nodes (null zero full random urandom
//!   tty kvm net/tun vhost-net vhost-vsock fuse, a new devpts instance), and its own /run;
//! - units that would act on the host's kernel state or start host services are masked, and
//!   the journal is volatile;
//! - its processes live in a cgroup subtree of their own, `/vmd-box-<test pid>-<n>` in every
//!   hierarchy, which systemd takes as its root; boxes run side by side without seeing each
//!   other, one per test is fine (boot 0.5-1 s, stop 0.1-0.2 s).
//!
//! Stopping a box (explicitly, or on drop, also when the test panics, which then prints the
//! box's journal) powers it off, kills what is left, and removes its cgroups and state
//! directory. If the test process itself dies, the kernel kills the box (PR_SET_PDEATHSIG on
//! `unshare`); its empty cgroups and state directory are removed by the next boot on the host
//! ([`sweep_stale`]).
//!
//! Hosts without systemd as PID 1, as root, with a hybrid or legacy cgroup layout only
//! ([`SystemdBox::supported`]): a pure cgroup2 host or a systemd host would need a delegated
//! cgroup subtree, which this harness does not implement.
//!
//! # Running things in the box
//!
//! [`SystemdBox::exec`] runs a command in all the box's namespaces (`nsenter --all`) with a
//! clean environment, as root or as a user of the box; [`SystemdBox::spawn`] starts a
//! long-running one ([`BoxChild`]). Give a command its own transient scope
//! ([`ExecOptions::scope`]) when it is the client of a test: then its PID, cgroup, polkit
//! subject and journal fields are real. The box's system bus is also reachable from the host
//! ([`SystemdBox::bus_address`]), but callers from the host have PID 0 in the box: good for
//! smoke tests only. Files of the box are reachable through [`SystemdBox::host_path`], its
//! journal through [`SystemdBox::journal`] (systemd's own messages are in it from the start of
//! journald on; its console is the null device).
//!
//! Bind the cargo target directory into the box ([`BoxOptions::binds`]) rather than relying on
//! the overlay's lower layer: host files that change after the box booted are undefined
//! behaviour for overlayfs, and what the box writes there never reaches the host.
//!
//! Layout: this file (the box's life), `exec.rs` (commands in the box), `host.rs` (host
//! facts, cgroups, pidfds), `state.rs` (the state directory: plan, masks, seed) and
//! `stage2.sh` (the box's first PID 1, which mounts its file systems and execs systemd).
// Each user of the harness (a test binary, an example) uses another part of it. Some also
// allow dead_code where they include it, which clippy would call a duplicate.
#![allow(dead_code, clippy::duplicated_attributes)]

mod exec;
mod host;
mod state;
pub mod vmd;

use std::ffi::CString;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use exec::{BoxChild, ExecOptions};

/// How long a box may take from `unshare` until systemd reports running (or degraded).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long stage 2 may take until it has exec'd systemd (≈ 0.1 s in practice).
const STAGE2_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a clean poweroff may take before the box is killed.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the kernel gets to tear down what was killed.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// What to put into a box. `BoxOptions::default()` boots a plain box.
#[derive(Clone, Debug, Default)]
pub struct BoxOptions {
    /// Directories whose contents are copied onto the box's / before it boots (unit files,
    /// D-Bus policy and activation files, polkit actions and rules...). Later ones win.
    /// Existing directories of the box keep their mode and owner.
    pub seed: Vec<PathBuf>,
    /// Read-write bind mounts, host path → box path (e.g. the cargo target directory, a
    /// results directory). Not into /tmp, /var/tmp, /run, /proc, /sys or /dev of the box.
    pub binds: Vec<(PathBuf, PathBuf)>,
    /// Units to mask on top of the harness's own masks.
    pub mask: Vec<String>,
}

/// Why a box could not be booted or did not stop cleanly. Its `Debug` is its message (plus
/// causes), so that `boot(...).expect(...)` prints a readable journal.
#[derive(thiserror::Error)]
pub enum BoxError {
    #[error("this host cannot run a systemd box: {0}")]
    Unsupported(String),
    #[error("invalid box option: {0}")]
    InvalidOption(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("the box died while booting ({status}); stage 2's trace:\n{console}")]
    Died { status: String, console: String },
    #[error("stage 2 did not exec systemd within {seconds} s; its trace:\n{console}")]
    StageTwoTimeout { seconds: u64, console: String },
    #[error(
        "the box did not finish booting within {seconds} s (system state {state:?}); \
         jobs:\n{jobs}\njournal:\n{journal}"
    )]
    BootTimeout {
        seconds: u64,
        state: String,
        jobs: String,
        journal: String,
    },
    #[error("the box did not stop cleanly: {0}")]
    Teardown(String),
}

impl fmt::Debug for BoxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> BoxError {
    let context = context.into();
    move |source| BoxError::Io { context, source }
}

/// Removes what boxes of test processes that no longer exist left behind (their empty cgroups
/// and state directories). Every boot does this first; a test that kills a test process on
/// purpose can call it too.
pub fn sweep_stale() {
    host::sweep_stale(&std::env::temp_dir());
}

/// A booted box. Dropping it stops it (see [`SystemdBox::stop`]).
pub struct SystemdBox {
    /// `vmd-box-<test pid>-<n>`: the name of its cgroup subtree and state directory.
    name: String,
    state: PathBuf,
    cgroup: Option<host::BoxCgroup>,
    unshare: Option<Unshare>,
    /// The box's PID 1 (systemd) as the host sees it, once stage 2 has exec'd it.
    pid1: Option<(u32, host::PidFd)>,
    torn_down: bool,
}

/// The `unshare` that started the box, kept as our own child by a keeper thread.
struct Unshare {
    pid: u32,
    pidfd: host::PidFd,
    /// Its wait status, sent by the keeper thread once it has reaped it. (In a mutex only to
    /// make the box `Sync`: it is only used through `&mut`.)
    exit: Mutex<Receiver<io::Result<ExitStatus>>>,
    status: Option<String>,
    keeper: Option<JoinHandle<()>>,
}

impl Unshare {
    /// Whether `unshare` has exited (and been reaped), waiting up to `timeout` for it.
    fn wait(&mut self, timeout: Duration) -> bool {
        if self.status.is_none() {
            let exit = self
                .exit
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            self.status = match exit.recv_timeout(timeout) {
                Ok(Ok(status)) => Some(status.to_string()),
                Ok(Err(error)) => Some(format!("wait failed: {error}")),
                Err(RecvTimeoutError::Disconnected) => Some("gone".into()),
                Err(RecvTimeoutError::Timeout) => None,
            };
        }
        if self.status.is_some()
            && let Some(keeper) = self.keeper.take()
        {
            let _ = keeper.join();
        }
        self.status.is_some()
    }
}

static BOXES: AtomicU32 = AtomicU32::new(0);

impl SystemdBox {
    /// Whether this host can run boxes: root, no systemd as the host's PID 1, a hybrid or
    /// legacy cgroup layout with a name=systemd hierarchy, overlayfs, and the programs used.
    /// `Err` tells why not, for a test to print when it skips.
    pub fn supported() -> Result<(), String> {
        host::check_support()
    }

    /// Boots a box and waits (at most 60 s) until `systemctl is-system-running` says
    /// `running` or `degraded`.
    pub fn boot(options: BoxOptions) -> Result<SystemdBox, BoxError> {
        Self::supported().map_err(BoxError::Unsupported)?;
        let state_parent = std::env::temp_dir();
        host::sweep_stale(&state_parent);
        let name = format!(
            "{}{}-{}",
            host::NAME_PREFIX,
            std::process::id(),
            BOXES.fetch_add(1, Ordering::Relaxed)
        );
        let hierarchies = host::hierarchies().map_err(io_error("cannot read mountinfo"))?;
        let mut sb = SystemdBox {
            state: state_parent.join(&name),
            name,
            cgroup: None,
            unshare: None,
            pid1: None,
            torn_down: false,
        };
        // From here on, dropping `sb` (on an error) undoes whatever was set up.
        state::prepare(&sb.state, &options, &hierarchies)?;
        let cgroup = host::BoxCgroup::create(&sb.name, &hierarchies).map_err(io_error(format!(
            "cannot create the cgroups of {}",
            sb.name
        )))?;
        let procs = cgroup.procs_files();
        sb.cgroup = Some(cgroup);
        sb.unshare = Some(sb.start_unshare(procs)?);
        sb.pid1 = Some(sb.wait_for_systemd()?);
        sb.wait_until_running()?;
        Ok(sb)
    }

    /// Starts `unshare`, which forks the box's first PID 1 (stage2.sh) into new namespaces.
    ///
    /// `unshare` gets PR_SET_PDEATHSIG=SIGKILL, so that the box dies with the test process.
    /// That signal fires when the *thread* that forked it exits, so a keeper thread forks it
    /// and stays in `wait` until it has exited: the thread lives exactly as long as the box.
    /// `--kill-child` passes the SIGKILL on to the box's PID 1, whose death takes the whole
    /// PID namespace with it.
    fn start_unshare(&self, procs: Vec<CString>) -> Result<Unshare, BoxError> {
        let console = File::create(self.state.join("console.log"))
            .map_err(io_error("cannot create console.log"))?;
        let console_too = console
            .try_clone()
            .map_err(io_error("cannot dup console.log"))?;
        let mut command = Command::new(host::tool("unshare").expect("checked by supported()"));
        command
            .args([
                "--pid",
                "--fork",
                "--kill-child=SIGKILL",
                "--mount",
                "--propagation",
            ])
            .args(["private", "--uts", "--ipc", "--net", "/bin/sh"])
            .arg(self.state.join("stage2.sh"))
            .arg(&self.state)
            .env_clear()
            .env("PATH", exec::BOX_PATH)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_too);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls
        // are allowed: `enter_cgroup_and_tie_to_parent` only makes system calls (prctl,
        // getppid, open, write, close) on memory prepared before the fork, and allocates
        // nothing.
        unsafe {
            command.pre_exec(move || enter_cgroup_and_tie_to_parent(&procs, parent));
        }

        let (started_tx, started_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = mpsc::channel();
        let keeper = thread::Builder::new()
            .name("vmd-box-keeper".into())
            .spawn(move || {
                // The pidfd is opened before the child can be reaped, so it cannot name
                // another process that reused the pid.
                let spawned = command.spawn().and_then(|child| {
                    let pidfd = host::PidFd::open(child.id())?;
                    Ok((child, pidfd))
                });
                match spawned {
                    Ok((mut child, pidfd)) => {
                        let _ = started_tx.send(Ok((child.id(), pidfd)));
                        let _ = exit_tx.send(child.wait());
                    }
                    Err(error) => {
                        let _ = started_tx.send(Err(error));
                    }
                }
            })
            .map_err(io_error("cannot start the keeper thread"))?;
        let started = started_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the keeper thread ended early")));
        let (pid, pidfd) = started.map_err(io_error("cannot start unshare"))?;
        Ok(Unshare {
            pid,
            pidfd,
            exit: Mutex::new(exit_rx),
            status: None,
            keeper: Some(keeper),
        })
    }

    /// Waits until stage 2 (the first PID 1 of the namespace, `unshare`'s only child) has
    /// exec'd systemd.
    fn wait_for_systemd(&mut self) -> Result<(u32, host::PidFd), BoxError> {
        let deadline = Instant::now() + STAGE2_TIMEOUT;
        let unshare = self.unshare.as_ref().map_or(0, |unshare| unshare.pid);
        loop {
            if let Some(pid) = host::children(unshare).first().copied()
                && let Ok(pidfd) = host::PidFd::open(pid)
            {
                // Checked after opening the pidfd: the pid still names that child.
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim_end() == "systemd" && host::parent_pid(pid) == Some(unshare) {
                    return Ok((pid, pidfd));
                }
            }
            if self.unshare_exited(Duration::from_millis(20)) {
                return Err(self.died());
            }
            if Instant::now() > deadline {
                return Err(BoxError::StageTwoTimeout {
                    seconds: STAGE2_TIMEOUT.as_secs(),
                    console: self.console(),
                });
            }
        }
    }

    /// Polls `systemctl is-system-running` until the boot is over.
    fn wait_until_running(&mut self) -> Result<(), BoxError> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let state = self
                .try_exec(&["systemctl", "is-system-running"])
                .map(|output| text(&output.stdout).trim().to_owned())
                .unwrap_or_default();
            if matches!(state.as_str(), "running" | "degraded") {
                return Ok(());
            }
            if self.unshare_exited(Duration::from_millis(50)) {
                return Err(self.died());
            }
            if Instant::now() > deadline {
                let jobs = self.try_exec(&["systemctl", "list-jobs", "--no-pager"]);
                return Err(BoxError::BootTimeout {
                    seconds: BOOT_TIMEOUT.as_secs(),
                    state,
                    jobs: jobs.map(|output| text(&output.stdout)).unwrap_or_default(),
                    journal: self.journal(),
                });
            }
        }
    }

    /// Runs a command in the box as root (see [`ExecOptions`] for its environment) and
    /// returns its output. Blocks until it exits: bound it inside (`timeout 10 cmd`) if it
    /// may hang.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.exec_with(ExecOptions {
            argv,
            ..ExecOptions::default()
        })
    }

    /// [`exec`](Self::exec), and panics (with its status, stdout and stderr) unless the command
    /// succeeded; returns its stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let output = self.exec(argv);
        assert!(
            output.status.success(),
            "`{}` failed in the box ({})\nstdout:\n{}\nstderr:\n{}",
            argv.join(" "),
            output.status,
            text(&output.stdout),
            text(&output.stderr),
        );
        text(&output.stdout)
    }

    /// Runs a command in the box as `options` say and returns its output.
    pub fn exec_with(&self, options: ExecOptions<'_>) -> Output {
        exec::command(self.pid(), &options)
            .and_then(|command| exec::run(command, options.stdin))
            .unwrap_or_else(|error| panic!("cannot run {:?} in the box: {error}", options.argv))
    }

    /// Starts a long-running command in the box (a console client, a signal watcher...), with
    /// stdin, stdout and stderr piped: read its output, a full pipe blocks it. Dropping the
    /// [`BoxChild`] kills the command; stopping the box does too.
    pub fn spawn(&self, argv: &[&str]) -> BoxChild {
        self.spawn_with(ExecOptions {
            argv,
            ..ExecOptions::default()
        })
    }

    /// [`spawn`](Self::spawn) as `options` say.
    pub fn spawn_with(&self, options: ExecOptions<'_>) -> BoxChild {
        exec::command(self.pid(), &options)
            .and_then(|command| exec::spawn(command, options.stdin))
            .unwrap_or_else(|error| panic!("cannot start {:?} in the box: {error}", options.argv))
    }

    /// The host path of a file in the box, through `/proc/PID/root` (root only): read or write
    /// the box's files with it. Writes land in the box's overlay, not on the host.
    pub fn host_path(&self, path_in_box: &str) -> PathBuf {
        let relative = path_in_box.trim_start_matches('/');
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(relative)
    }

    /// The D-Bus address of the box's system bus, reachable from the host by any uid (for
    /// `DBUS_SYSTEM_BUS_ADDRESS` or zbus). Callers from the host have PID 0 in the box, so
    /// they cannot pass PIDs, and polkit sees no process: use it for smoke tests.
    pub fn bus_address(&self) -> String {
        let socket = self.state.join("dbus/system_bus_socket");
        format!("unix:path={}", socket.display())
    }

    /// The box's whole journal as text (`journalctl -b -o short-precise`), for failure
    /// reports. Never panics: a failure to read it is described in the text.
    pub fn journal(&self) -> String {
        let argv = [
            "timeout",
            "10",
            "journalctl",
            "-b",
            "-o",
            "short-precise",
            "--no-pager",
        ];
        match self.try_exec(&argv) {
            Ok(output) if output.status.success() => text(&output.stdout),
            Ok(output) => format!(
                "(journalctl failed: {})\n{}{}",
                output.status,
                text(&output.stdout),
                text(&output.stderr)
            ),
            Err(error) => format!("(cannot run journalctl in the box: {error})"),
        }
    }

    /// The host's PID of the box's PID 1 (systemd).
    pub fn pid(&self) -> u32 {
        self.pid1.as_ref().map_or(0, |(pid, _)| *pid)
    }

    /// `vmd-box-<test pid>-<n>`: the name of the box's cgroup subtree (`/sys/fs/cgroup/*/NAME`,
    /// the prefix of every `ControlGroup` in the box) and of its state directory.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The box's state directory on the host (see state.rs); removed when the box stops.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Powers the box off (at most 10 s), kills what is left, waits until the kernel has torn
    /// its namespaces down, and removes its cgroups and state directory. `Err` says what was
    /// not clean (a poweroff that had to be cut short, something that could not be removed).
    /// Dropping a box does the same, and prints its journal first if the test is panicking.
    pub fn stop(mut self) -> Result<(), BoxError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), BoxError> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Ok(());
        }
        let mut problems = Vec::new();
        if let Err(problem) = self.end_processes() {
            problems.push(problem);
            if !self.unshare_exited(Duration::ZERO) {
                // Something may still run in the box: leave its cgroups and files alone.
                return Err(BoxError::Teardown(problems.join("; ")));
            }
        }
        if let Some(cgroup) = &mut self.cgroup
            && let Err(problem) = cgroup.remove(KILL_TIMEOUT)
        {
            problems.push(problem);
        }
        if let Err(error) = fs::remove_dir_all(&self.state)
            && error.kind() != io::ErrorKind::NotFound
        {
            problems.push(format!("cannot remove {}: {error}", self.state.display()));
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(BoxError::Teardown(problems.join("; "))),
        }
    }

    /// Ends the box: a clean poweroff if it has booted, then SIGKILL to its PID 1 (the kernel
    /// then kills the whole PID namespace), then to `unshare`, until `unshare` has exited.
    fn end_processes(&mut self) -> Result<(), String> {
        if self.unshare.is_none() || self.unshare_exited(Duration::ZERO) {
            return Ok(());
        }
        let mut problem = Ok(());
        if let Some((_, pid1)) = &self.pid1 {
            self.end_commands();
            // systemd starts poweroff.target on SIGRTMIN+4. Sent from here rather than with
            // `systemctl poweroff`, which would itself be a command with a parent outside the
            // box at shutdown (see `end_commands`). In a container, poweroff ends with
            // systemd's exit, which takes the namespace with it.
            let _ = pid1.signal(libc::SIGRTMIN() + 4);
            if self.unshare_exited(POWEROFF_TIMEOUT) {
                return Ok(());
            }
            problem = Err(format!(
                "poweroff did not finish within {} s; killed",
                POWEROFF_TIMEOUT.as_secs()
            ));
        }
        if let Some((_, pid1)) = &self.pid1 {
            let _ = pid1.kill();
        }
        if self.unshare_exited(KILL_TIMEOUT) {
            return problem;
        }
        if let Some(unshare) = &self.unshare {
            let _ = unshare.pidfd.kill();
        }
        match self.unshare_exited(KILL_TIMEOUT) {
            true => problem,
            false => Err("unshare survived SIGKILL".into()),
        }
    }

    /// Kills the box's processes whose parent is outside the box (commands of `exec` or
    /// `spawn` still running) and waits until they have been reaped. systemd-shutdown would
    /// wait for them until its 90 s timeout: it re-checks who is left only when it gets a
    /// SIGCHLD, and those go to the parent outside.
    fn end_commands(&self) {
        let pid1 = self.pid();
        let Some(namespace) = host::pid_namespace(pid1) else {
            return;
        };
        let in_box = |pid: u32| host::pid_namespace(pid).as_ref() == Some(&namespace);
        let commands: Vec<(u32, u64)> = host::processes()
            .into_iter()
            .filter(|&pid| pid != pid1 && in_box(pid))
            .filter(|&pid| host::parent_pid(pid).is_some_and(|parent| !in_box(parent)))
            .filter_map(|pid| {
                let pidfd = host::PidFd::open(pid).ok()?;
                pidfd.kill().ok()?;
                Some((pid, host::start_time(pid)?))
            })
            .collect();
        // Reaped: gone from /proc (or its pid reused by another process).
        let deadline = Instant::now() + KILL_TIMEOUT;
        while commands
            .iter()
            .any(|&(pid, start)| host::start_time(pid) == Some(start))
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn try_exec(&self, argv: &[&str]) -> io::Result<Output> {
        let options = ExecOptions {
            argv,
            ..ExecOptions::default()
        };
        exec::run(exec::command(self.pid(), &options)?, None)
    }

    fn unshare_exited(&mut self, timeout: Duration) -> bool {
        self.unshare
            .as_mut()
            .is_none_or(|unshare| unshare.wait(timeout))
    }

    fn console(&self) -> String {
        fs::read_to_string(self.state.join("console.log")).unwrap_or_default()
    }

    /// The error for a box whose `unshare` exited while it was booting.
    fn died(&self) -> BoxError {
        BoxError::Died {
            status: self
                .unshare
                .as_ref()
                .and_then(|unshare| unshare.status.clone())
                .unwrap_or_default(),
            console: self.console(),
        }
    }
}

impl Drop for SystemdBox {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        if thread::panicking() && self.pid1.is_some() {
            eprintln!(
                "---- journal of {} ----\n{}---- end of journal ----",
                self.name,
                self.journal()
            );
        }
        if let Err(error) = self.teardown() {
            eprintln!("vmd-box {}: {error}", self.name);
        }
    }
}

/// Runs in the forked child before it execs `unshare`: ties it to the keeper thread with
/// PR_SET_PDEATHSIG and moves it into the box's cgroups (writing `0` moves the writer).
/// Only async-signal-safe system calls on memory prepared before the fork.
fn enter_cgroup_and_tie_to_parent(procs: &[CString], parent: u32) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The parent may have died between fork and prctl; then nobody would kill us.
    // SAFETY: getppid has no arguments and cannot fail.
    if u32::try_from(unsafe { libc::getppid() }).ok() != Some(parent) {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    for path in procs {
        // SAFETY: `path` is a NUL-terminated string that lives until after the exec.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: writes one byte from a static buffer to the descriptor opened above.
        let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let error = io::Error::last_os_error();
        // SAFETY: closes the descriptor opened above, which nothing else uses.
        unsafe { libc::close(fd) };
        if written != 1 {
            return Err(error);
        }
    }
    Ok(())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
