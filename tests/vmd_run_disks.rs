//! `vmd run --disk` end to end: images made by qemu-img, opened and locked by `vmd run` with its
//! user's rights, read and written by the test guest through the real helper, and checked
//! afterwards with qemu-img and qemu-io.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{RunningVm, qemu_tool, run_scenario};

const LIMIT: Duration = Duration::from_secs(120);

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn a_guest_writes_the_top_of_a_chain_and_reads_it_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, top) = (path(dir.path(), "base.raw"), path(dir.path(), "top.qcow2"));
    qemu_tool("qemu-img", &["create", "-q", "-f", "raw", &base, "2M"]);
    qemu_tool(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &top,
        ],
    );
    let disk = format!("{top},serial=vd-top");
    let fill = run_scenario("blk-fill=0xa5", &["--disk", &disk], LIMIT);
    assert!(
        fill.console
            .contains("testguest: blk-fill done 4096 sectors"),
        "{}\n{}",
        fill.console,
        fill.stderr
    );
    assert_eq!(fill.code, Some(0), "{}", fill.stderr);
    qemu_tool("qemu-img", &["check", &top]);
    let read = qemu_tool("qemu-io", &["-c", "read -P 0xa5 0 2M", &top]);
    assert!(read.contains("read 2097152/2097152"), "{read}");
    // The base is untouched: still all zeroes.
    let base_read = qemu_tool("qemu-io", &["-f", "raw", "-c", "read -P 0 0 2M", &base]);
    assert!(base_read.contains("read 2097152/2097152"));

    let check = run_scenario("blk-check=0xa5", &["--disk", &format!("{top},ro")], LIMIT);
    assert!(
        check
            .console
            .contains("testguest: blk-check ok 4096 sectors"),
        "{}\n{}",
        check.console,
        check.stderr
    );
    let id = run_scenario("blk-id", &["--disk", &disk], LIMIT);
    assert!(
        id.console.contains("testguest: blk-id vd-top"),
        "{}",
        id.console
    );
    let ro = run_scenario("blk-ro", &["--disk", &format!("{top},ro")], LIMIT);
    assert!(
        ro.console.contains("testguest: blk-ro ok"),
        "{}",
        ro.console
    );
}

#[test]
fn a_disk_in_use_is_refused_until_its_vm_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, top) = (
        path(dir.path(), "base.qcow2"),
        path(dir.path(), "top.qcow2"),
    );
    qemu_tool("qemu-img", &["create", "-q", "-f", "qcow2", &base, "1M"]);
    qemu_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &top,
        ],
    );
    let vm = RunningVm::start("spin", &["--disk", &top]);
    vm.console.wait_for("testguest: spin heartbeat", LIMIT);

    // Neither a second writer nor a reader of the written image, nor a writer of its base.
    for disk in [top.clone(), format!("{top},ro"), base.clone()] {
        let refused = run_scenario("hello", &["--disk", &disk], LIMIT);
        assert_eq!(refused.code, Some(1), "{disk}: {}", refused.stderr);
        assert!(
            refused
                .stderr
                .contains("is in use by another VM or program"),
            "{disk}: {}",
            refused.stderr
        );
        assert!(
            !refused.console.contains("testguest"),
            "{}",
            refused.console
        );
    }
    // Readers of the base share it.
    let shared = run_scenario("hello", &["--disk", &format!("{base},ro")], LIMIT);
    assert_eq!(shared.code, Some(0), "{}", shared.stderr);

    vm.signal(libc::SIGTERM);
    let ended = vm.wait(LIMIT);
    assert_eq!(ended.code, Some(0), "{}", ended.stderr);
    // The lock went with the helper.
    let after = run_scenario("hello", &["--disk", &top], LIMIT);
    assert_eq!(after.code, Some(0), "{}", after.stderr);
}

#[test]
fn bad_disks_are_clear_errors_before_anything_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let looped = path(dir.path(), "loop.qcow2");
    qemu_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "loop.qcow2",
            "-F",
            "qcow2",
            &looped,
            "1M",
        ],
    );
    let protocol = path(dir.path(), "protocol.qcow2");
    qemu_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nbd:localhost:10809",
            "-F",
            "raw",
            &protocol,
            "1M",
        ],
    );
    for (disk, expected) in [
        (looped.as_str(), "loops"),
        (protocol.as_str(), "only local file names"),
        ("/nonexistent/disk.img", "No such file"),
        ("/dev/null", "not a regular file"),
    ] {
        let run = run_scenario("hello", &["--disk", disk], LIMIT);
        assert_eq!(run.code, Some(1), "{disk}: {}", run.stderr);
        assert!(run.stderr.contains(expected), "{disk}: {}", run.stderr);
    }
    let run = run_scenario("hello", &["--disk", "x,format=vmdk"], LIMIT);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
}

#[test]
fn entropy_reaches_the_guest() {
    let run = run_scenario("rng", &["--entropy"], LIMIT);
    let line = run
        .console
        .lines()
        .find_map(|line| line.strip_prefix("testguest: rng "))
        .unwrap_or_else(|| panic!("{}\n{}", run.console, run.stderr))
        .trim()
        .to_string();
    assert_eq!(line.len(), 64, "{line}");
    assert!(line.bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
}
