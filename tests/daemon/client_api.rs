//! The API a desktop client lives on (issue 10): the object manager, IDs, Reboot and Reset,
//! Reload, defining and changing VMs, the manager's limits, read-only properties, the console
//! held by one client at a time, and the peer-to-peer socket with busctl and gdbus. Driven by
//! busctl, gdbus and a Python Gio client inside the private systemd, through the package.

use super::*;

/// `busctl --json=short call ...` on the manager's object manager.
fn managed_objects(vmd: &Vmd) -> serde_json::Value {
    let out = vmd.ok(&[
        "busctl",
        "--json=short",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.freedesktop.DBus.ObjectManager",
        "GetManagedObjects",
    ]);
    let value: serde_json::Value = serde_json::from_str(&out).expect("busctl's JSON");
    value["data"][0].clone()
}

/// The VM properties GetManagedObjects gives for `name`.
fn managed_vm(objects: &serde_json::Value, name: &str) -> serde_json::Value {
    objects[Vmd::vm_path(name)]["org.vmd.vmd1.VM"].clone()
}

#[test]
fn one_get_managed_objects_lists_every_vm_and_ids_are_never_reused() {
    let Some(vmd) = Vmd::boot() else { return };
    let mut monitor = vmd.systemd.spawn(&[
        "gdbus",
        "monitor",
        "--system",
        "--dest",
        "org.vmd.vmd1",
        "--object-path",
        MANAGER,
    ]);
    let monitor_lines = Lines::collect(monitor.stdout.take().expect("monitor stdout"));
    vmd.create("alpha", "spin", &[]);
    monitor_lines.wait_for("is owned by", LIMIT);
    vmd.create("beta", "spin", &["VCPUs", "u", "2"]);
    monitor_lines.wait_for("InterfacesAdded (objectpath '/org/vmd/vmd1/vm/beta'", LIMIT);

    let objects = managed_objects(&vmd);
    let alpha = managed_vm(&objects, "alpha");
    let beta = managed_vm(&objects, "beta");
    assert_eq!(alpha["Name"]["data"], "alpha", "{objects}");
    assert_eq!(alpha["State"]["data"], "defined");
    assert_eq!(beta["VCPUs"]["data"], 2);
    let alpha_id = alpha["ID"]["data"].as_u64().expect("alpha's ID");
    let beta_id = beta["ID"]["data"].as_u64().expect("beta's ID");
    assert_ne!(alpha_id, beta_id);
    assert_eq!(vmd.property("alpha", "ID"), alpha_id.to_string());

    // Removed: InterfacesRemoved, and its ID is not given again, even to a VM of its name.
    vmd.call("alpha", "Remove");
    monitor_lines.wait_for(
        "InterfacesRemoved (objectpath '/org/vmd/vmd1/vm/alpha', ['org.vmd.vmd1.VM'])",
        LIMIT,
    );
    vmd.create("alpha", "spin", &[]);
    let objects = managed_objects(&vmd);
    let again = managed_vm(&objects, "alpha")["ID"]["data"]
        .as_u64()
        .expect("ID");
    assert!(again > alpha_id.max(beta_id), "ID {again} reused");
    assert_eq!(
        managed_vm(&objects, "beta")["ID"]["data"].as_u64(),
        Some(beta_id),
        "IDs are stable"
    );
    let _ = monitor.kill();
}

#[test]
fn a_gio_client_lists_vms_in_one_call_and_sees_each_transition_once() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.create("desk", "spin", &[]);
    vmd.create("other", "spin", &[]);
    let out = vmd.ok(&[
        "/usr/bin/python3",
        "-c",
        include_str!("gio_client.py"),
        "desk",
    ]);
    let seen: serde_json::Value = serde_json::from_str(&out).expect("the client's JSON");
    assert_eq!(seen["listed"]["desk"]["State"], "defined", "{seen}");
    assert_eq!(seen["listed"]["other"]["State"], "defined", "{seen}");
    assert!(seen["listed"]["desk"]["ID"].as_u64().is_some());
    let states: Vec<&str> = seen["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .filter_map(|change| change["State"].as_str())
        .collect();
    assert_eq!(
        states,
        ["starting", "running", "stopping", "stopped"],
        "each transition in exactly one PropertiesChanged: {seen}"
    );
}

#[test]
fn reboot_and_reset_restart_the_vm_shutdown_of_a_stopped_vm_and_kill_then_remove_succeed() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.create("bounce", "spin", &[]);
    // Stopped already: Shutdown and Kill succeed, as systemctl stop does.
    vmd.call("bounce", "Shutdown");
    vmd.call("bounce", "Kill");
    assert_eq!(vmd.property("bounce", "State"), "defined");
    let mut journal = vmd.systemd.spawn(&[
        "journalctl",
        "--no-pager",
        "-f",
        "-n",
        "all",
        "-u",
        "vmd-bounce.scope",
        "-u",
        "vmd.service",
    ]);
    let lines = Lines::collect(journal.stdout.take().expect("journal stdout"));

    vmd.call("bounce", "Start");
    lines.wait_for("testguest: scenario spin", LIMIT);
    // Graceful: the guest (spin powers off on the power button) is asked, and comes back.
    vmd.call("bounce", "Reboot");
    assert_eq!(vmd.property("bounce", "State"), "running");
    let start = Instant::now();
    while vmd.property("bounce", "Restarts") != "1" {
        assert!(start.elapsed() < LIMIT, "no restart after Reboot");
        std::thread::sleep(Duration::from_millis(100));
    }
    vmd.wait_state("bounce", "running", LIMIT);
    lines.wait_for("the guest powered off", LIMIT);
    while lines.count("testguest: scenario spin") < 2 {
        assert!(start.elapsed() < LIMIT, "the guest did not boot again");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Hard: the helper resets at once.
    vmd.call("bounce", "Reset");
    while vmd.property("bounce", "Restarts") != "2" {
        assert!(start.elapsed() < LIMIT * 2, "no restart after Reset");
        std::thread::sleep(Duration::from_millis(100));
    }
    vmd.wait_state("bounce", "running", LIMIT);
    while lines.count("testguest: scenario spin") < 3 {
        assert!(
            start.elapsed() < LIMIT * 2,
            "the guest did not boot after Reset"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(lines.text().contains("resetting the VM"));

    // Reboot and Reset need a running VM.
    vmd.call("bounce", "Kill");
    // Kill returned: it is stopped, so Remove works at once.
    assert_eq!(vmd.property("bounce", "State"), "stopped");
    for method in ["Reboot", "Reset"] {
        let err = vmd.fails(&[
            "busctl",
            "call",
            "org.vmd.vmd1",
            &Vmd::vm_path("bounce"),
            "org.vmd.vmd1.VM",
            method,
        ]);
        assert!(err.contains("VM bounce is stopped"), "{err}");
    }
    vmd.call("bounce", "Remove");
    let _ = journal.kill();
}
