//! Running commands in a box: the `nsenter` command line, and [`BoxChild`] for long-running
//! commands.
//!
//! A command runs as a child of a host-side `nsenter` that has joined all the box's
//! namespaces. That parent must outlive it: when a process of the box loses a parent that
//! lives outside the box, the kernel re-parents it to the *host's* init, not to the box's
//! systemd. systemd-shutdown then waits for it at poweroff: it sends every process SIGTERM and
//! re-checks who is left only when it gets a SIGCHLD, which for such a process never comes, so
//! it sleeps until its 90 s timeout. Hence [`BoxChild::kill`] kills the command, not `nsenter`,
//! and the box kills leftover commands before it powers off.

use std::fs;
use std::io::{self, Write};
use std::process::{
    Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio,
};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::host::{self, PidFd};

/// PATH in the box (stage 2 gives systemd the same).
pub(super) const BOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How to run a command in the box: `ExecOptions { argv: &[...], ..Default::default() }`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecOptions<'a> {
    /// The command and its arguments, looked up in the box's PATH.
    pub argv: &'a [&'a str],
    /// Run as this user of the box (uid, primary group, supplementary groups, HOME, USER and
    /// LOGNAME from the box's /etc/passwd) instead of root.
    pub user: Option<&'a str>,
    /// Variables added to the clean environment (PATH, LANG=C.UTF-8, SYSTEMD_PAGER= (none),
    /// SYSTEMD_COLORS=0, TERM=dumb). Nothing of the test's environment is passed on.
    pub env: &'a [(&'a str, &'a str)],
    /// Run in a transient scope of its own (`systemd-run --scope`): the command then sits in
    /// the box's cgroup tree, so systemd, logind, polkit and machined know its PID. Without it,
    /// it stays in the test's cgroups on the host (its PID namespace is the box's either way).
    pub scope: bool,
    /// Working directory in the box (default `/`).
    pub cwd: Option<&'a str>,
    /// Bytes for the command's stdin, which is then closed. Without them, stdin is empty for
    /// `exec` and a pipe held by the caller for `spawn`.
    pub stdin: Option<&'a [u8]>,
}

/// The host-side command line that runs `options` in the box whose PID 1 is `pid1`:
/// `nsenter --all` into its namespaces, `systemd-run --scope` if asked for, `setpriv` for the
/// user and for SIGKILL when `nsenter` dies, `env -C` for the working directory, the command.
pub(super) fn command(pid1: u32, options: &ExecOptions<'_>) -> io::Result<Command> {
    let nsenter = host::tool("nsenter").ok_or_else(|| io::Error::other("nsenter is missing"))?;
    let mut command = Command::new(nsenter);
    command
        .args(["--target", &pid1.to_string(), "--all", "--"])
        .env_clear()
        .env("PATH", BOX_PATH)
        .env("LANG", "C.UTF-8")
        .env("SYSTEMD_PAGER", "")
        .env("SYSTEMD_COLORS", "0")
        .env("TERM", "dumb");
    if options.scope {
        command.args(["systemd-run", "--quiet", "--scope", "--"]);
    }
    command.arg("setpriv");
    if let Some(user) = options.user {
        // The box's passwd, not the host's: users made in the box exist only there.
        let passwd = fs::read_to_string(format!("/proc/{pid1}/root/etc/passwd"))?;
        let account = Account::find(&passwd, user)
            .ok_or_else(|| io::Error::other(format!("no user {user:?} in the box")))?;
        command
            .arg(format!("--reuid={}", account.uid))
            .arg(format!("--regid={}", account.gid))
            .arg("--init-groups")
            .env("HOME", account.home)
            .env("USER", user)
            .env("LOGNAME", user);
    }
    // After the user switch (which would clear it), so setpriv sets it last.
    command.args(["--pdeathsig", "KILL", "--"]);
    if let Some(cwd) = options.cwd {
        command.args(["env", "-C", cwd, "--"]);
    }
    command.args(options.argv).envs(options.env.iter().copied());
    Ok(command)
}

/// Runs a command line from [`command`] to its end and collects its output.
pub(super) fn run(mut command: Command, stdin: Option<&[u8]>) -> io::Result<Output> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    if let Some(bytes) = stdin {
        feed(child.stdin.take().expect("piped"), bytes);
    }
    child.wait_with_output()
}

/// Starts a command line from [`command`] with piped stdio.
pub(super) fn spawn(mut command: Command, stdin: Option<&[u8]>) -> io::Result<BoxChild> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut nsenter = command.spawn()?;
    let mut child = BoxChild {
        command: None,
        stdin: nsenter.stdin.take(),
        stdout: nsenter.stdout.take(),
        stderr: nsenter.stderr.take(),
        nsenter,
    };
    if let Some(bytes) = stdin {
        feed(child.stdin.take().expect("piped"), bytes);
    }
    Ok(child)
}

/// A command running in the box, started by [`SystemdBox::spawn`](super::SystemdBox::spawn).
/// Signals go to the command itself; its exit status is reported by its `nsenter`, which
/// dies the same way. Dropping it kills the command (and reaps it).
pub struct BoxChild {
    /// The host-side parent of the command.
    nsenter: Child,
    /// The command, once found among `nsenter`'s children.
    command: Option<PidFd>,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

impl BoxChild {
    /// Sends `signal` to the command (nothing if it has exited already).
    pub fn signal(&mut self, signal: Signal) -> io::Result<()> {
        match self.command()? {
            Some(command) => command.signal(signal as i32),
            None => Ok(()),
        }
    }

    /// SIGKILL to the command, then waits for it.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait()
    }

    /// Waits for the command to exit (closing its stdin first, if still held).
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        drop(self.stdin.take());
        self.nsenter.wait()
    }

    /// The command's exit status if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.nsenter.try_wait()
    }

    /// The command: the only child of `nsenter` (which has forked it into the box's PID
    /// namespace, where it execs its way down to the command). `None` once it has exited.
    fn command(&mut self) -> io::Result<Option<&PidFd>> {
        let parent = self.nsenter.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.command.is_none() {
            if self.nsenter.try_wait()?.is_some() {
                return Ok(None);
            }
            if let Some(pid) = host::children(parent).first().copied()
                && let Ok(pidfd) = PidFd::open(pid)
                // Checked after opening the pidfd: the pid still names that child.
                && host::parent_pid(pid) == Some(parent)
            {
                self.command = Some(pidfd);
            } else if Instant::now() > deadline {
                return Err(io::Error::other("nsenter did not start the command"));
            } else {
                thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(self.command.as_ref())
    }
}

impl Drop for BoxChild {
    fn drop(&mut self) {
        if let Ok(None) = self.nsenter.try_wait() {
            let _ = self.kill();
        }
    }
}

/// A user of the box.
struct Account {
    uid: String,
    gid: String,
    home: String,
}

impl Account {
    /// The entry of `user` in the text of a passwd file.
    fn find(passwd: &str, user: &str) -> Option<Account> {
        let fields: Vec<&str> = passwd
            .lines()
            .map(|line| line.split(':').collect::<Vec<_>>())
            .find(|fields| fields.len() == 7 && fields[0] == user)?;
        Some(Account {
            uid: fields[2].to_owned(),
            gid: fields[3].to_owned(),
            home: fields[5].to_owned(),
        })
    }
}

/// Writes `bytes` to a child's stdin from a thread of its own (a child that writes a lot
/// before it reads cannot deadlock us), then closes it.
fn feed(mut stdin: ChildStdin, bytes: &[u8]) {
    let bytes = bytes.to_vec();
    thread::spawn(move || {
        let _ = stdin.write_all(&bytes);
    });
}
