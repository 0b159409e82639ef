//! vmctl's command line, checked from outside without a daemon: help, usage errors (exit 2) and
//! a clean `vmctl: ...` failure (exit 1) when the bus or the socket is not there.

use std::process::{Command, Output};

fn vmctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .args(args)
        // Never reach a real system bus from a test.
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            "unix:path=/nonexistent/vmctl-test-bus",
        )
        .output()
        .expect("run vmctl")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A failure reported as one `vmctl: ` line, not as a panic or a debug dump.
fn assert_clean_failure(output: &Output, expected: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(1), "stderr: {err}");
    assert!(err.starts_with("vmctl: "), "stderr: {err}");
    assert!(err.contains(expected), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("Error {"),
        "stderr: {err}"
    );
    assert!(stdout(output).is_empty(), "stdout: {}", stdout(output));
}

#[test]
fn help_lists_the_commands() {
    let output = vmctl(&["--help"]);
    assert_eq!(output.status.code(), Some(0));
    let help = stdout(&output);
    for command in [
        "start", "stop", "pause", "unpause", "status", "console", "wait", "remove",
    ] {
        assert!(
            help.lines()
                .any(|line| line.trim_start().starts_with(command)),
            "{command} missing from:\n{help}"
        );
    }
    assert!(help.contains("--socket"), "{help}");
}

#[test]
fn subcommand_help_shows_the_options() {
    let output = vmctl(&["start", "--help"]);
    assert_eq!(output.status.code(), Some(0));
    let help = stdout(&output);
    for option in [
        "--kernel",
        "-k",
        "--initrd",
        "-i",
        "--memory",
        "-m",
        "--cpus",
        "-p",
        "--console",
        "-c",
        "--cmdline",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
    let output = vmctl(&["stop", "--help"]);
    let help = stdout(&output);
    for option in ["--all", "--force", "--wait", "--timeout"] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    for (args, expected) in [
        (&[][..], "Usage"),
        (&["frobnicate"], "unrecognized subcommand"),
        (&["start"], "<NAME>"),
        (&["start", "web", "--bogus"], "--bogus"),
        (
            &["start", ".etc", "-k", "/k"],
            "must start with an ASCII letter or digit",
        ),
        (&["start", "a/b"], "only ASCII letters, digits"),
        (&["start", "web", "-m", "lots"], "is not a size"),
        (&["start", "web", "-p", "0"], "--cpus"),
        (&["stop"], "<NAME>"),
        (&["stop", "web", "--all"], "cannot be used with"),
        (&["stop", "web", "--timeout", "3"], "--wait"),
        (&["console"], "<NAME>"),
        (&["wait", "web", "-t", "soon"], "invalid value"),
    ] {
        let output = vmctl(args);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn no_system_bus_is_a_clean_failure() {
    for args in [
        &["status"][..],
        &["status", "web"],
        &["start", "web"],
        &["stop", "-a"],
        &["pause", "web"],
        &["console", "web"],
        &["wait", "web"],
        &["remove", "web"],
    ] {
        let output = vmctl(args);
        assert_clean_failure(
            &output,
            "cannot connect to the system bus at unix:path=/nonexistent/vmctl-test-bus: \
             No such file or directory",
        );
    }
}

#[test]
fn missing_socket_is_a_clean_failure() {
    let output = vmctl(&["--socket", "/nonexistent/vmd.sock", "status"]);
    assert_clean_failure(
        &output,
        "cannot connect to /nonexistent/vmd.sock: No such file or directory",
    );
}

#[test]
fn a_socket_nobody_listens_on_is_a_clean_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vmd.sock");
    // Bound but not listening: connect(2) is refused.
    let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
    let output = vmctl(&["--socket", path.to_str().expect("utf-8"), "status"]);
    drop(socket);
    assert_clean_failure(&output, "cannot connect to ");
}
