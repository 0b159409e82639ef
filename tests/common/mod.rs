//! Shared helpers for the end-to-end tests: running `vmd` and the test guest, and watching a
//! guest's console while it runs.
#![allow(dead_code)]

pub mod linux;
pub mod netns;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const VMD: &str = env!("CARGO_BIN_EXE_vmd");
pub const TESTGUEST: &str = env!("VMD_TESTGUEST_ELF");

/// `vmd run` with the test guest and a scenario, plus extra arguments (which may replace the
/// default `--kernel`, `--memory` and `--cmdline`).
pub fn vmd_run_command(scenario: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(VMD);
    command.arg("run");
    let cmdline = format!("testguest={scenario}");
    for (option, default) in [
        ("--kernel", TESTGUEST),
        ("--memory", "64M"),
        ("--cmdline", cmdline.as_str()),
    ] {
        if !extra.contains(&option) {
            command.args([option, default]);
        }
    }
    command
        .args(extra)
        .env("VMD_LOG", "info")
        .stdin(Stdio::null());
    command
}

/// The finished run: exit code, stdout (the guest console) and stderr.
pub struct Finished {
    pub code: Option<i32>,
    pub console: String,
    pub stderr: String,
}

/// Runs a scenario to its end (bounded by `limit`, after which the run is killed and the test
/// fails).
pub fn run_scenario(scenario: &str, extra: &[&str], limit: Duration) -> Finished {
    let child = vmd_run_command(scenario, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmd run");
    let running = RunningVm::watch(child);
    running.wait(limit)
}

/// What a reader thread has collected so far.
#[derive(Default)]
struct Collected {
    lines: Vec<String>,
    /// The pipe reached EOF (or failed): no more lines will come.
    ended: bool,
}

/// Lines collected from a pipe by a background thread.
#[derive(Clone, Default)]
pub struct Lines {
    inner: Arc<(Mutex<Collected>, Condvar)>,
    reader: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Lines {
    pub fn collect(pipe: impl Read + Send + 'static) -> Lines {
        let lines = Lines::default();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            let (lock, cond) = &*sink.inner;
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lock.lock().unwrap().lines.push(line);
                cond.notify_all();
            }
            lock.lock().unwrap().ended = true;
            cond.notify_all();
        });
        *lines.reader.lock().unwrap() = Some(reader);
        lines
    }

    /// Waits for the pipe's EOF (every writer gone) and joins the reader thread; false if the
    /// EOF has not come by `deadline`.
    pub fn wait_for_eof(&self, deadline: Instant) -> bool {
        let (lock, cond) = &*self.inner;
        let mut collected = lock.lock().unwrap();
        while !collected.ended {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            collected = cond.wait_timeout(collected, deadline - now).unwrap().0;
        }
        drop(collected);
        if let Some(reader) = self.reader.lock().unwrap().take() {
            reader.join().expect("reader thread panicked");
        }
        true
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    pub fn text(&self) -> String {
        self.snapshot().join("\n")
    }

    /// Waits until a line contains `needle`; panics with everything seen after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.inner;
        let mut collected = lock.lock().unwrap();
        loop {
            if let Some(line) = collected.lines.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline && !collected.ended,
                "no line containing {needle:?} within {timeout:?}{}; got:\n{}",
                if collected.ended {
                    " (the pipe ended)"
                } else {
                    ""
                },
                collected.lines.join("\n")
            );
            collected = cond.wait_timeout(collected, deadline - now).unwrap().0;
        }
    }

    pub fn count(&self, needle: &str) -> usize {
        self.snapshot()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

/// A `vmd run` in progress, with its console and stderr being collected.
pub struct RunningVm {
    pub child: Child,
    pub console: Lines,
    pub stderr: Lines,
}

impl RunningVm {
    pub fn watch(mut child: Child) -> RunningVm {
        let console = Lines::collect(child.stdout.take().expect("stdout piped"));
        let stderr = Lines::collect(child.stderr.take().expect("stderr piped"));
        RunningVm {
            child,
            console,
            stderr,
        }
    }

    pub fn start(scenario: &str, extra: &[&str]) -> RunningVm {
        let child = vmd_run_command(scenario, extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmd run");
        RunningVm::watch(child)
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill with a pid of our own child and a valid signal number.
        let ret = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(ret, 0, "kill failed");
    }

    /// The helper process: the only child of `vmd run`.
    pub fn helper_pid(&self) -> u32 {
        let pid = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            if let Some(first) = children.split_whitespace().next() {
                return first.parse().expect("pid");
            }
            assert!(Instant::now() < deadline, "vmd run has no helper child");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the end, including EOF on stdout and stderr, which the helper may hold after
    /// `vmd run` itself is gone (killing the run and failing after `limit`).
    pub fn wait(mut self, limit: Duration) -> Finished {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "vmd run did not finish within {limit:?}\nconsole:\n{}\nstderr:\n{}",
                    self.console.text(),
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for (name, lines) in [("stdout", &self.console), ("stderr", &self.stderr)] {
            assert!(
                lines.wait_for_eof(deadline),
                "{name} of vmd run still open {limit:?} after it started\nconsole:\n{}\nstderr:\n{}",
                self.console.text(),
                self.stderr.text()
            );
        }
        Finished {
            code: status.code(),
            console: self.console.text(),
            stderr: self.stderr.text(),
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Fields of /proc/PID/status as (name, value) pairs.
pub fn proc_status(pid: u32, task: Option<u32>) -> Vec<(String, String)> {
    let path = match task {
        Some(tid) => format!("/proc/{pid}/task/{tid}/status"),
        None => format!("/proc/{pid}/status"),
    };
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

pub fn status_field(status: &[(String, String)], name: &str) -> String {
    status
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {name} in status"))
}

pub fn exists(path: &str) -> bool {
    Path::new(path).exists()
}

/// Runs one of QEMU's image tools (`qemu-img`, `qemu-io`), which the suite installs
/// (`tests/run-all.sh`); fails the test with the tool's output if it is missing or fails.
pub fn qemu_tool(tool: &str, args: &[&str]) -> String {
    let output = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (apt-get install qemu-utils): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{tool} {args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
