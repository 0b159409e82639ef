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
    // One console client across the restarts: it sees every boot.
    let mut console = vmd.systemd.spawn(&["vmctl", "console", "bounce"]);
    let console_lines = Lines::collect(console.stdout.take().expect("console stdout"));
    console_lines.wait_for("testguest: spin heartbeat", LIMIT);
    // Graceful: the guest (spin powers off on the power button) is asked, and comes back.
    vmd.call("bounce", "Reboot");
    // The VM never stops on the way: the guest may already be powered off and the next helper
    // starting by now.
    let state = vmd.property("bounce", "State");
    assert!(["running", "starting"].contains(&state.as_str()), "{state}");
    let start = Instant::now();
    while vmd.property("bounce", "Restarts") != "1" {
        assert!(start.elapsed() < LIMIT, "no restart after Reboot");
        std::thread::sleep(Duration::from_millis(100));
    }
    vmd.wait_state("bounce", "running", LIMIT);
    lines.wait_for("the guest powered off", LIMIT);
    while console_lines.count("testguest: scenario spin") < 2 {
        assert!(start.elapsed() < LIMIT, "the guest did not boot again");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Hard: the helper resets at once, without asking the guest.
    vmd.call("bounce", "Reset");
    while vmd.property("bounce", "Restarts") != "2" {
        assert!(start.elapsed() < LIMIT * 2, "no restart after Reset");
        std::thread::sleep(Duration::from_millis(100));
    }
    vmd.wait_state("bounce", "running", LIMIT);
    while console_lines.count("testguest: scenario spin") < 3 {
        assert!(
            start.elapsed() < LIMIT * 2,
            "the guest did not boot after Reset"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lines.wait_for("resetting the VM", LIMIT);
    let _ = console.kill();
    let _ = console.wait();

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
        assert!(err.contains("VM bounce: it is stopped"), "{err}");
    }
    vmd.call("bounce", "Remove");
    let _ = journal.kill();
}

/// `gdbus call` as root; its stderr names the D-Bus error.
fn gdbus(vmd: &Vmd, path: &str, method: &str, args: &[&str]) -> Output {
    gdbus_as(vmd, "root", path, method, args)
}

fn write_file(vmd: &Vmd, path: &str, text: &str) {
    vmd.ok(&[
        "sh",
        "-c",
        &format!("mkdir -p \"$(dirname {path})\" && printf '%s' \"$1\" > {path}"),
        "sh",
        text,
    ]);
}

fn admin_definition(vcpus: u32, uuid: &str) -> String {
    format!(
        "uuid = \"{uuid}\"\nkernel = \"{GUEST}\"\ncmdline = \"testguest=spin\"\nvcpus = {vcpus}\nmemory-bytes = 67108864\n"
    )
}

#[test]
fn reload_define_update_limits_and_read_only_properties() {
    let Some(vmd) = Vmd::boot() else { return };
    write_file(
        &vmd,
        "/etc/vmd/vms/adm.toml",
        &admin_definition(1, "6f1c7a43-6d59-4a38-9a64-0c1b2f0e9a01"),
    );
    vmd.ok(&["systemctl", "start", "vmd.service"]);
    assert_eq!(vmd.property("adm", "DefinitionSource"), "admin");

    // An administrator's definition cannot be changed over D-Bus.
    let refused = gdbus(
        &vmd,
        &Vmd::vm_path("adm"),
        "org.vmd.vmd1.VM.Update",
        &["{'VCPUs': <uint32 2>}"],
    );
    let stderr = stderr_of(&refused);
    assert!(
        stderr.contains("org.vmd.vmd1.Error.NotPermitted") && stderr.contains("/etc/vmd/vms"),
        "{stderr}"
    );

    // systemctl reload: a changed file changes its VM, a new file defines one.
    write_file(
        &vmd,
        "/etc/vmd/vms/adm.toml",
        &admin_definition(2, "6f1c7a43-6d59-4a38-9a64-0c1b2f0e9a01"),
    );
    write_file(
        &vmd,
        "/etc/vmd/vms/adm2.toml",
        &admin_definition(1, "6f1c7a43-6d59-4a38-9a64-0c1b2f0e9a02"),
    );
    let adm_id = vmd.property("adm", "ID");
    vmd.ok(&["systemctl", "reload", "vmd.service"]);
    assert_eq!(vmd.property("adm", "VCPUs"), "2");
    assert_eq!(
        vmd.property("adm", "ID"),
        adm_id,
        "a changed VM keeps its ID"
    );
    assert_eq!(vmd.property("adm2", "DefinitionSource"), "admin");
    // A file gone: its VM goes; an invalid file changes nothing.
    vmd.ok(&["rm", "/etc/vmd/vms/adm2.toml"]);
    write_file(&vmd, "/etc/vmd/vms/adm.toml", "vcpus = \"many\"\n");
    let reloaded = vmd.ok(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "Reload",
    ]);
    assert_eq!(reloaded.trim(), "asasas 0 0 1 \"adm2\"");
    assert_eq!(vmd.property("adm", "VCPUs"), "2");
    // SIGHUP reloads too (with RELOADING=1 and READY=1 around it).
    write_file(
        &vmd,
        "/etc/vmd/vms/adm.toml",
        &admin_definition(3, "6f1c7a43-6d59-4a38-9a64-0c1b2f0e9a01"),
    );
    vmd.ok(&["systemctl", "kill", "-s", "HUP", "vmd.service"]);
    let start = Instant::now();
    while vmd.property("adm", "VCPUs") != "3" {
        assert!(start.elapsed() < LIMIT, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        vmd.ok(&["systemctl", "is-active", "vmd.service"]).trim(),
        "active"
    );

    // DefineVM: a whole definition in the files' format, with its name.
    let toml = format!(
        "name = \"def\"\nkernel = \"{GUEST}\"\ncmdline = \"testguest=spin\"\nmemory-bytes = 67108864\n"
    );
    let defined = vmd.ok(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "DefineVM",
        "s",
        &toml,
    ]);
    assert_eq!(defined.trim(), "o \"/org/vmd/vmd1/vm/def\"");
    assert_eq!(vmd.property("def", "DefinitionSource"), "vmd");
    let definition = vmd.ok(&[
        "busctl",
        "--json=short",
        "get-property",
        "org.vmd.vmd1",
        &Vmd::vm_path("def"),
        "org.vmd.vmd1.VM",
        "Definition",
    ]);
    let definition: serde_json::Value = serde_json::from_str(&definition).expect("JSON");
    let definition = definition["data"].as_str().expect("a string").to_string();
    assert!(definition.starts_with("name = \"def\"\n"), "{definition}");
    assert!(
        definition.contains("memory-bytes = 67108864"),
        "{definition}"
    );
    // The Definition property is what DefineVM takes: the name exists now.
    let exists = gdbus(
        &vmd,
        MANAGER,
        "org.vmd.vmd1.Manager.DefineVM",
        &[&format!("{definition:?}")],
    );
    assert!(
        stderr_of(&exists).contains("org.vmd.vmd1.Error.VMExists"),
        "{}",
        stderr_of(&exists)
    );
    let transient = vmd.create("fleeting", "spin", &["Transient", "b", "true"]);
    assert!(!transient.is_empty());
    assert_eq!(vmd.property("fleeting", "DefinitionSource"), "transient");

    // Update: checked as CreateVM checks, stored, and used at the next start.
    for bad in [
        "{'VCPUs': <uint32 0>}",
        "{'MemoryBytes': <uint64 1000>}",
        "{'Speed': <uint32 1>}",
        "{'Kernel': <'relative/kernel'>}",
        "{'Transient': <true>}",
    ] {
        let refused = gdbus(&vmd, &Vmd::vm_path("def"), "org.vmd.vmd1.VM.Update", &[bad]);
        assert!(
            stderr_of(&refused).contains("org.vmd.vmd1.Error.InvalidArgument"),
            "{bad}: {}",
            stderr_of(&refused)
        );
    }
    assert_eq!(vmd.property("def", "MemoryBytes"), "67108864");
    assert_eq!(vmd.property("def", "VCPUs"), "1");
    let mut monitor = vmd.systemd.spawn(&[
        "gdbus",
        "monitor",
        "--system",
        "--dest",
        "org.vmd.vmd1",
        "--object-path",
        &Vmd::vm_path("def"),
    ]);
    let monitor_lines = Lines::collect(monitor.stdout.take().expect("monitor stdout"));
    monitor_lines.wait_for("is owned by", LIMIT);
    let updated = gdbus(
        &vmd,
        &Vmd::vm_path("def"),
        "org.vmd.vmd1.VM.Update",
        &["{'MemoryBytes': <uint64 134217728>, 'VCPUs': <uint32 2>}"],
    );
    assert!(updated.status.success(), "{}", stderr_of(&updated));
    monitor_lines.wait_for("'MemoryBytes': <uint64 134217728>", LIMIT);
    assert_eq!(vmd.property("def", "VCPUs"), "2");
    let stored = vmd.ok(&["cat", "/var/lib/vmd/vms/def.toml"]);
    assert!(stored.contains("memory-bytes = 134217728"), "{stored}");
    vmd.call("def", "Start");
    // The new memory (128 MiB, plus the scope's 128 MiB for the VMM) is in use.
    assert_eq!(
        vmd.ok(&["systemctl", "show", "-P", "MemoryMax", "vmd-def.scope"])
            .trim(),
        "268435456"
    );
    vmd.call("def", "Kill");
    let _ = monitor.kill();

    // The limits a client builds its form from.
    let manager_property = |name: &str| {
        vmd.ok(&[
            "busctl",
            "get-property",
            "org.vmd.vmd1",
            MANAGER,
            "org.vmd.vmd1.Manager",
            name,
        ])
        .trim()
        .to_string()
    };
    assert_eq!(manager_property("MemoryBytesMin"), "t 16777216");
    assert_eq!(manager_property("MemoryBytesMax"), "t 1099511627776");
    assert_eq!(manager_property("MemoryBytesAlign"), "t 2097152");
    assert_eq!(manager_property("VCPUsMax"), "u 254");
    assert_eq!(manager_property("DefaultMemoryBytes"), "t 536870912");
    assert_eq!(manager_property("DefaultVCPUs"), "u 1");
    assert_eq!(
        manager_property("Version"),
        format!("s \"{}\"", env!("CARGO_PKG_VERSION"))
    );

    // Read-only properties say so; an unknown one is unknown.
    let set = |property: &str, value: &str| {
        stderr_of(&gdbus(
            &vmd,
            &Vmd::vm_path("def"),
            "org.freedesktop.DBus.Properties.Set",
            &["org.vmd.vmd1.VM", property, value],
        ))
    };
    let read_only = set("MemoryBytes", "<uint64 134217728>");
    assert!(
        read_only.contains("org.freedesktop.DBus.Error.PropertyReadOnly"),
        "{read_only}"
    );
    let unknown = set("Colour", "<'blue'>");
    assert!(
        unknown.contains("org.freedesktop.DBus.Error.UnknownProperty"),
        "{unknown}"
    );
    let manager_set = stderr_of(&gdbus(
        &vmd,
        MANAGER,
        "org.freedesktop.DBus.Properties.Set",
        &["org.vmd.vmd1.Manager", "VCPUsMax", "<uint32 1000>"],
    ));
    assert!(
        manager_set.contains("org.freedesktop.DBus.Error.PropertyReadOnly"),
        "{manager_set}"
    );
    // Autostart stays writable.
    vmd.ok(&[
        "busctl",
        "set-property",
        "org.vmd.vmd1",
        &Vmd::vm_path("def"),
        "org.vmd.vmd1.VM",
        "Autostart",
        "b",
        "true",
    ]);
    assert_eq!(vmd.property("def", "Autostart"), "true");
}

/// The polkit line of each org.vmd.vmd1 method's comment, by interface and method.
fn polkit_lines(xml: &str) -> std::collections::BTreeMap<String, String> {
    let mut lines = std::collections::BTreeMap::new();
    let mut interface = String::new();
    let mut comment = String::new();
    let mut rest = xml;
    while let Some(start) = rest.find('<') {
        rest = &rest[start..];
        if let Some(body) = rest.strip_prefix("<!--") {
            let end = body.find("-->").expect("comment end");
            comment = body[..end].to_string();
            rest = &body[end..];
            continue;
        }
        let end = rest.find('>').expect("tag end");
        let tag = &rest[1..end];
        rest = &rest[end..];
        let name = tag
            .split("name=\"")
            .nth(1)
            .and_then(|n| n.split('"').next())
            .unwrap_or_default();
        if tag.starts_with("interface ") {
            interface = name.to_string();
        } else if tag.starts_with("method ") && interface.starts_with("org.vmd.vmd1") {
            let polkit = comment
                .split("Polkit:")
                .nth(1)
                .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            lines.insert(format!("{interface}.{name}"), polkit);
        }
        if !tag.starts_with("annotation") {
            comment.clear();
        }
    }
    lines
}

#[test]
fn every_method_says_which_polkit_action_it_needs_in_the_served_xml_and_dbus_xml() {
    let Some(vmd) = Vmd::boot() else { return };
    let (served, documented) = served_and_documented_xml(&vmd);
    let served = polkit_lines(&served);
    let documented = polkit_lines(&documented);
    assert!(served.len() >= 17, "{served:?}");
    for (method, polkit) in &served {
        assert!(
            !polkit.is_empty(),
            "{method} does not say its polkit action"
        );
        // Every action named is one the policy defines.
        for word in polkit.split([' ', ',', ';', '(', ')']) {
            if word.starts_with("org.vmd.vmd1.") {
                let word = word.trim_end_matches('.');
                assert!(
                    [
                        "org.vmd.vmd1.create",
                        "org.vmd.vmd1.manage",
                        "org.vmd.vmd1.host-files",
                        "org.vmd.vmd1.network"
                    ]
                    .contains(&word),
                    "{method}: {word}"
                );
            }
        }
    }
    assert_eq!(served, documented);
}

#[test]
fn a_start_failure_is_one_line_in_the_journal_in_the_users_words() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.ok(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "CreateVM",
        "sa{sv}",
        "notakernel",
        "2",
        "Kernel",
        "s",
        "/etc/os-release",
        "MemoryBytes",
        "t",
        "67108864",
    ]);
    let err = vmd.fails(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        &Vmd::vm_path("notakernel"),
        "org.vmd.vmd1.VM",
        "Start",
    ]);
    assert!(err.contains("VM notakernel failed to start"), "{err}");
    assert!(!err.contains("Invalid bzImage: Invalid bzImage"), "{err}");
    vmd.wait_journal(&["-u", "vmd.service"], "VM notakernel failed:");
    // Let every message of that start arrive.
    std::thread::sleep(Duration::from_secs(1));
    let journal = vmd.ok(&["journalctl", "--no-pager", "-o", "cat", "-u", "vmd.service"]);
    let lines: Vec<&str> = journal
        .lines()
        .filter(|line| line.contains("notakernel"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(!lines[0].contains("Failed("), "{}", lines[0]);
    assert!(
        !lines[0].contains("Invalid bzImage: Invalid bzImage"),
        "{}",
        lines[0]
    );
    // Method names are not the user's words.
    let err = vmd.fails(&[
        "busctl",
        "call",
        "org.vmd.vmd1",
        &Vmd::vm_path("notakernel"),
        "org.vmd.vmd1.VM",
        "Pause",
    ]);
    assert!(
        err.contains("cannot pause VM notakernel: it is failed"),
        "{err}"
    );
}

#[test]
fn one_console_client_at_a_time_and_busctl_and_gdbus_on_the_socket() {
    let Some(vmd) = Vmd::boot() else { return };
    vmd.ok(&["systemctl", "start", "vmd.socket"]);
    const ADDRESS: &str = "unix:path=/run/vmd/vmd.sock";
    // busctl and gdbus take the socket for a bus: they say Hello, and are answered.
    let listed = vmd.ok(&[
        "busctl",
        "--address",
        ADDRESS,
        "call",
        "org.vmd.vmd1",
        MANAGER,
        "org.vmd.vmd1.Manager",
        "ListVMs",
    ]);
    assert_eq!(listed.trim(), "a(sso) 0");
    vmd.create("talker", "spin", &[]);
    let state = vmd.ok(&[
        "gdbus",
        "call",
        "--address",
        ADDRESS,
        "--dest",
        "org.vmd.vmd1",
        "--object-path",
        &Vmd::vm_path("talker"),
        "--method",
        "org.freedesktop.DBus.Properties.Get",
        "org.vmd.vmd1.VM",
        "State",
    ]);
    assert_eq!(state.trim(), "(<'defined'>,)");
    let state = vmd.ok(&[
        "busctl",
        "--address",
        ADDRESS,
        "call",
        "org.vmd.vmd1",
        &Vmd::vm_path("talker"),
        "org.freedesktop.DBus.Properties",
        "Get",
        "ss",
        "org.vmd.vmd1.VM",
        "State",
    ]);
    assert_eq!(state.trim(), "v s \"defined\"");

    // The console: a first client holds it; a second is refused, naming the first; a forced
    // one takes it, and the first client's console ends.
    vmd.call("talker", "Start");
    let mut first = vmd.systemd.spawn(&["vmctl", "console", "talker"]);
    let first_lines = Lines::collect(first.stdout.take().expect("stdout"));
    first_lines.wait_for("testguest: spin heartbeat", LIMIT);
    let busy = gdbus(
        &vmd,
        &Vmd::vm_path("talker"),
        "org.vmd.vmd1.VM.OpenConsole",
        &[],
    );
    let stderr = stderr_of(&busy);
    assert!(
        stderr.contains("org.vmd.vmd1.Error.ConsoleBusy") && stderr.contains("user root"),
        "{stderr}"
    );
    let second = vmd.run(&[
        "sh",
        "-c",
        &format!(
            "exec 3>&1; busctl call --json=short org.vmd.vmd1 {} org.vmd.vmd1.VM OpenConsoleForce >/dev/null && echo taken",
            Vmd::vm_path("talker")
        ),
    ]);
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("taken"),
        "{}",
        stderr_of(&second)
    );
    // The first client's console ended: vmctl console returns.
    let start = Instant::now();
    loop {
        match first.try_wait().expect("wait") {
            Some(_) => break,
            None => {
                assert!(start.elapsed() < LIMIT, "the first client kept the console");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    // busctl has exited, closing its fd: the console is free again.
    let start = Instant::now();
    loop {
        let again = gdbus(
            &vmd,
            &Vmd::vm_path("talker"),
            "org.vmd.vmd1.VM.OpenConsole",
            &[],
        );
        if again.status.success() {
            break;
        }
        assert!(start.elapsed() < LIMIT, "{}", stderr_of(&again));
        std::thread::sleep(Duration::from_millis(100));
    }
    vmd.call("talker", "Kill");
}
