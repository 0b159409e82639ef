//! vmctl's command line, checked from outside without a daemon: help, usage errors (exit 2) and
//! a clean `vmctl: ...` failure (exit 1) when the bus or the socket is not there.

mod common;

use common::qemu_tool;
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
        "start",
        "stop",
        "pause",
        "unpause",
        "reboot",
        "reset",
        "status",
        "info",
        "console",
        "log",
        "wait",
        "remove",
        "autostart",
        "edit",
        "load",
        "reload",
        "create",
    ] {
        assert!(
            help.lines()
                .any(|line| line.trim_start().starts_with(command)),
            "{command} missing from:\n{help}"
        );
    }
    assert!(help.contains("--socket"), "{help}");
    assert!(help.contains("[alias: show]"), "{help}");
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
        "--interfaces",
        "-i",
        "--switch",
        "-n",
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
        (&["start"], "<NAME|ID>"),
        (&["start", "web", "--bogus"], "--bogus"),
        (&["start", ".etc", "-k", "/k"], "no '.' at the start or end"),
        (&["start", "a/b"], "only ASCII letters, digits"),
        (&["start", "web", "-m", "lots"], "invalid memory size"),
        (&["start", "web", "-p", "0"], "--cpus"),
        (&["stop"], "<NAME|ID>"),
        (&["stop", "web", "--all"], "cannot be used with"),
        (&["stop", "web", "--timeout", "3"], "--wait"),
        (
            &["stop", "web", "-w", "-t", "3"],
            "unexpected argument '-t'",
        ),
        (&["console"], "<NAME|ID>"),
        (&["wait", "web", "--timeout", "soon"], "invalid value"),
        (&["start", "web", "-m", "512"], "did you mean 512M?"),
        (&["console", "web", "-e", "xy"], "not an escape character"),
        (&["autostart", "web", "maybe"], "neither on nor off"),
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
        &["show"],
        &["info", "web"],
        &["reboot", "web"],
        &["reset", "3"],
        &["autostart", "web", "on"],
        &["reload"],
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

/// A stand-in for vmd on a peer-to-peer socket, to check the calls `vmctl start` makes to define
/// a VM: GetVM answers NoSuchVM, the two create calls log what they got, Start succeeds.
mod fake_vmd {
    use std::{
        collections::HashMap,
        io::Read,
        os::fd::AsFd,
        path::Path,
        sync::{Arc, Mutex},
    };

    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use zbus::{OwnedFd, OwnedObjectPath, OwnedVariant, interface};

    /// The calls the fake daemon received, one line each.
    pub type Log = Arc<Mutex<Vec<String>>>;

    const VM_PATH: &str = "/org/vmd/vmd1/vm/web";

    #[derive(Debug, zbus::DBusError)]
    #[zbus(prefix = "org.vmd.vmd1.Error")]
    enum Error {
        #[zbus(error)]
        ZBus(zbus::Error),
        NoSuchVM(String),
    }

    fn sorted(config: &HashMap<String, OwnedVariant>) -> Vec<String> {
        let mut entries: Vec<String> = config
            .iter()
            .map(|(key, value)| {
                if let Ok(text) = <&str>::try_from(value) {
                    format!("{key}={text:?}")
                } else if let Ok(flag) = bool::try_from(value) {
                    format!("{key}={flag}")
                } else {
                    format!("{key}={}", u32::try_from(value).expect("a u"))
                }
            })
            .collect();
        entries.sort();
        entries
    }

    struct Manager(Log);

    #[interface(name = "org.vmd.vmd1.Manager")]
    impl Manager {
        #[zbus(name = "GetVM")]
        fn get_vm(&self, name: String) -> Result<OwnedObjectPath, Error> {
            Err(Error::NoSuchVM(format!("No VM named {name:?}.")))
        }

        #[zbus(name = "CreateVM")]
        fn create_vm(
            &self,
            name: String,
            config: HashMap<String, OwnedVariant>,
        ) -> OwnedObjectPath {
            let line = format!("CreateVM {name} {}", sorted(&config).join(" "));
            self.0.lock().expect("log").push(line);
            OwnedObjectPath::try_from(VM_PATH).expect("path")
        }

        #[zbus(name = "CreateVMWithFiles")]
        fn create_vm_with_files(
            &self,
            name: String,
            config: HashMap<String, OwnedVariant>,
            files: HashMap<String, OwnedFd>,
        ) -> OwnedObjectPath {
            let mut contents: Vec<String> = files
                .iter()
                .map(|(key, fd)| {
                    let flags =
                        OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).expect("flags"));
                    let mode = if flags & OFlag::O_ACCMODE == OFlag::O_RDONLY {
                        "ro"
                    } else {
                        "rw"
                    };
                    let mut text = String::new();
                    std::fs::File::from(fd.as_fd().try_clone_to_owned().expect("dup"))
                        .read_to_string(&mut text)
                        .expect("read");
                    format!("{key}({mode})={text}")
                })
                .collect();
            contents.sort();
            let line = format!(
                "CreateVMWithFiles {name} {} files: {}",
                sorted(&config).join(" "),
                contents.join(" ")
            );
            self.0.lock().expect("log").push(line);
            OwnedObjectPath::try_from(VM_PATH).expect("path")
        }
    }

    struct Vm(Log);

    #[interface(name = "org.vmd.vmd1.VM")]
    impl Vm {
        fn start(&self) {
            self.0.lock().expect("log").push("Start".to_owned());
        }
    }

    /// Serves every connection to `socket` from a thread of its own until the test ends.
    pub fn serve(socket: &Path, log: Log) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(async { tokio::net::UnixListener::bind(socket) })
            .expect("bind");
        std::thread::spawn(move || {
            runtime.block_on(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let log = log.clone();
                    tokio::spawn(async move {
                        let stream = stream.into_std().expect("std stream");
                        let connection = zbus::connection::Builder::unix_stream(stream)
                            .server(zbus::Guid::generate())
                            .p2p()
                            .serve_at("/org/vmd/vmd1", Manager(log.clone()))
                            .serve_at(VM_PATH, Vm(log))
                            .build()
                            .await
                            .expect("handshake");
                        connection.closed().await;
                    });
                }
            })
        });
    }
}

/// `vmctl start` as root names the kernel and initrd by path (CreateVM); as anyone else it opens
/// them itself and passes read-only fds (CreateVMWithFiles), and cannot-open is a clean failure.
#[test]
fn start_passes_files_as_fds_unless_root() {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};

    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root, to run vmctl as another user");
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().expect("tempdir");
    // The unprivileged vmctl must reach the socket and the files.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = dir.path().join("vmd.sock");
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd");
    let secret = dir.path().join("secret");
    std::fs::write(&kernel, "KERNEL").expect("write");
    std::fs::write(&initrd, "INITRD").expect("write");
    std::fs::write(&secret, "SECRET").expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let log = fake_vmd::Log::default();
    fake_vmd::serve(&socket, log.clone());
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");

    let path = |path: &std::path::Path| path.to_str().expect("utf-8").to_owned();
    let start = |uid: Option<u32>, kernel: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vmctl"));
        command.args([
            "--socket",
            &path(&socket),
            "start",
            "web",
            "-k",
            kernel,
            "--initrd",
            &path(&initrd),
            "-p",
            "2",
        ]);
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        let output = command.output().expect("run vmctl");
        let calls = std::mem::take(&mut *log.lock().expect("log"));
        (output, calls)
    };

    let (output, calls) = start(None, &path(&kernel));
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(
        calls,
        [
            format!(
                "CreateVM web Initrd={:?} Kernel={:?} Transient=true VCPUs=2",
                path(&initrd),
                path(&kernel)
            ),
            "Start".to_owned(),
        ]
    );

    let (output, calls) = start(Some(NOBODY), &path(&kernel));
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(
        calls,
        [
            "CreateVMWithFiles web Transient=true VCPUs=2 files: initrd(ro)=INITRD kernel(ro)=KERNEL",
            "Start",
        ]
    );

    // A file the user cannot read is never handed to the daemon.
    let (output, calls) = start(Some(NOBODY), &path(&secret));
    assert_clean_failure(
        &output,
        &format!(
            "vmctl: cannot open the kernel {}: Permission denied",
            path(&secret)
        ),
    );
    assert!(calls.is_empty(), "{calls:?}");
}

#[test]
fn create_makes_images_qemu_img_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |name: &str| dir.path().join(name).display().to_string();
    qemu_tool("qemu-img", &["--version"]);
    let created = vmctl(&["create", "-s", "64M", &at("disk.qcow2")]);
    assert_eq!(created.status.code(), Some(0), "{}", stderr(&created));
    qemu_tool("qemu-img", &["check", &at("disk.qcow2")]);
    let info = qemu_tool("qemu-img", &["info", &at("disk.qcow2")]);
    assert!(
        info.contains("file format: qcow2") && info.contains("(67108864 bytes)"),
        "{info}"
    );

    // An overlay: the base recorded as given, the size the base's.
    let overlay = vmctl(&["create", "-b", "disk.qcow2", &at("overlay.qcow2")]);
    assert_eq!(overlay.status.code(), Some(0), "{}", stderr(&overlay));
    qemu_tool("qemu-img", &["check", &at("overlay.qcow2")]);
    let info = qemu_tool("qemu-img", &["info", &at("overlay.qcow2")]);
    assert!(
        info.contains("backing file: disk.qcow2")
            && info.contains("backing file format: qcow2")
            && info.contains("(67108864 bytes)"),
        "{info}"
    );

    // A copy of the overlay's contents, converted to raw, then back to a larger qcow2.
    qemu_tool(
        "qemu-io",
        &["-c", "write -P 0x5a 1M 3M", &at("overlay.qcow2")],
    );
    let raw = vmctl(&["create", "-i", &at("overlay.qcow2"), &at("copy.img")]);
    assert_eq!(raw.status.code(), Some(0), "{}", stderr(&raw));
    qemu_tool(
        "qemu-img",
        &[
            "compare",
            "-F",
            "raw",
            &at("overlay.qcow2"),
            &at("copy.img"),
        ],
    );
    let grown = vmctl(&["create", "-i", &at("copy.img"), "-s", "1.5G", "qcow2:"]);
    assert_eq!(
        grown.status.code(),
        Some(1),
        "no file named: {}",
        stderr(&grown)
    );
    let grown = vmctl(&[
        "create",
        "-i",
        &at("copy.img"),
        "-s",
        "1.5G",
        &at("grown.qcow2"),
    ]);
    assert_eq!(grown.status.code(), Some(0), "{}", stderr(&grown));
    qemu_tool("qemu-img", &["check", &at("grown.qcow2")]);
    let info = qemu_tool("qemu-img", &["info", &at("grown.qcow2")]);
    assert!(
        info.contains("(1610612736 bytes)") && !info.contains("backing"),
        "{info}"
    );
    let read = qemu_tool("qemu-io", &["-c", "read -P 0x5a 1M 3M", &at("grown.qcow2")]);
    assert!(read.contains("read 3145728/3145728"));

    // The format from a prefix: raw despite the name.
    let prefixed = vmctl(&["create", "-s", "1", &format!("raw:{}", at("plain.qcow2"))]);
    assert_eq!(prefixed.status.code(), Some(0), "{}", stderr(&prefixed));
    let info = qemu_tool("qemu-img", &["info", &at("plain.qcow2")]);
    assert!(
        info.contains("file format: raw") && info.contains("(1048576 bytes)"),
        "{info}"
    );
}

#[test]
fn create_refuses_to_overwrite_and_explains_bad_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(at("taken.qcow2"), b"precious").expect("write");
    assert_clean_failure(
        &vmctl(&["create", "-s", "64M", &at("taken.qcow2")]),
        "does not overwrite",
    );
    assert_eq!(std::fs::read(at("taken.qcow2")).expect("read"), b"precious");
    assert_clean_failure(&vmctl(&["create", &at("new.img")]), "-s");
    assert_clean_failure(
        &vmctl(&["create", "-b", &at("taken.qcow2"), &at("raw.img")]),
        "only a qcow2 image can have a base",
    );
    assert_clean_failure(
        &vmctl(&["create", "-i", &at("missing.img"), &at("copy.img")]),
        "cannot open",
    );
    assert!(!dir.path().join("copy.img").exists());
    for args in [
        &["create", "-s", "lots", "x.img"][..],
        &["create", "-s", "0", "x.img"],
        &["create", "-b", "a", "-i", "b", "x.qcow2"],
        &["create"],
    ] {
        let output = vmctl(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}
