//! `vmctl info NAME`: every property of one VM in user terms, then its definition.

use std::fmt::Write as _;

use crate::{
    commands::{Ctx, disk_lines, interface_lines, owner, print_out},
    error::VmctlError,
    proxies::{self, VmProperties},
    table::format_size,
};

/// Properties shown by [`render`] in their own words; any other property is shown as the
/// daemon gave it, so that nothing a newer daemon adds goes unseen.
const SHOWN: &[&str] = &[
    "Name",
    "ID",
    "State",
    "FailureReason",
    "UUID",
    "Unit",
    "LeaderPID",
    "Owner",
    "VCPUs",
    "MemoryBytes",
    "Kernel",
    "Initrd",
    "Cmdline",
    "Entropy",
    "Autostart",
    "Restarts",
    "Disks",
    "Interfaces",
    "Definition",
    "DefinitionSource",
];

pub async fn info(ctx: &Ctx, word: &str) -> Result<u8, VmctlError> {
    let target = ctx.vm(word).await?;
    let properties = proxies::vm_properties(&ctx.conn, target.path).await?;
    print_out(&render(&properties))?;
    Ok(0)
}

/// The text of `vmctl info`.
pub fn render(p: &VmProperties) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{label:<12}{value}");
    };
    let text = |name: &str| {
        p.str(name)
            .filter(|value| !value.is_empty())
            .unwrap_or("-")
            .to_owned()
    };
    let yes_no = |name: &str| match p.bool(name) {
        Some(true) => "yes".to_owned(),
        Some(false) => "no".to_owned(),
        None => "-".to_owned(),
    };
    line("name:", text("Name"));
    if let Some(id) = p.u32("ID") {
        line("id:", id.to_string());
    }
    line("state:", text("State"));
    if p.str("FailureReason").is_some_and(|r| !r.is_empty()) {
        line("reason:", text("FailureReason"));
    }
    line("uuid:", text("UUID"));
    line("unit:", text("Unit"));
    line(
        "pid:",
        p.u32("LeaderPID")
            .filter(|&pid| pid != 0)
            .map_or("-".to_owned(), |pid| pid.to_string()),
    );
    line("owner:", owner(p));
    line(
        "vcpus:",
        p.u32("VCPUs").map_or("-".to_owned(), |n| n.to_string()),
    );
    line(
        "memory:",
        p.u64("MemoryBytes").map_or("-".to_owned(), format_size),
    );
    line("kernel:", text("Kernel"));
    line("initrd:", text("Initrd"));
    line("cmdline:", text("Cmdline"));
    line("entropy:", yes_no("Entropy"));
    line("autostart:", yes_no("Autostart"));
    line(
        "restarts:",
        p.u32("Restarts").map_or("-".to_owned(), |n| n.to_string()),
    );
    if let Some(source) = p.str("DefinitionSource") {
        let said = match source {
            "admin" => "the administrator's, in /etc/vmd/vms (read-only here)",
            "vmd" => "stored by vmd, in /var/lib/vmd/vms",
            "transient" => "none kept: the VM is forgotten when it stops",
            other => other,
        };
        line("defined:", said.to_owned());
    }
    let mut others: Vec<(&String, String)> =
        p.0.iter()
            .filter(|(name, _)| !SHOWN.contains(&name.as_str()))
            .map(|(name, value)| (name, plain(value)))
            .collect();
    others.sort();
    for (name, value) in others {
        line(&format!("{}:", name.to_lowercase()), value);
    }
    out.push_str(&disk_lines(p));
    out.push_str(&interface_lines(p));
    if let Some(definition) = p.str("Definition").filter(|d| !d.is_empty()) {
        out.push_str("\n# definition (vmd.toml(5))\n");
        out.push_str(definition);
        if !definition.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// A property of a kind vmctl does not know, as plainly as its type allows.
fn plain(value: &zbus::Variant<'_>) -> String {
    use zbus::Variant as Value;
    match value {
        Value::Str(text) => text.to_string(),
        Value::Bool(flag) => if *flag { "yes" } else { "no" }.to_owned(),
        Value::U8(n) => n.to_string(),
        Value::U16(n) => n.to_string(),
        Value::U32(n) => n.to_string(),
        Value::U64(n) => n.to_string(),
        Value::I16(n) => n.to_string(),
        Value::I32(n) => n.to_string(),
        Value::I64(n) => n.to_string(),
        Value::F64(n) => n.to_string(),
        Value::ObjectPath(path) => path.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use zbus::{OwnedVariant, Variant};

    use super::*;

    #[test]
    fn every_property_in_user_terms() {
        let entries: Vec<(&str, Variant<'_>)> = vec![
            ("Name", Variant::from("web")),
            ("ID", Variant::from(3u32)),
            ("State", Variant::from("failed")),
            ("FailureReason", Variant::from("cannot load the kernel")),
            ("MemoryBytes", Variant::from(512u64 << 20)),
            ("VCPUs", Variant::from(2u32)),
            ("Autostart", Variant::from(false)),
            ("Owner", Variant::from("alice")),
            ("DefinitionSource", Variant::from("vmd")),
            ("Definition", Variant::from("memory = \"512M\"")),
            ("Frobs", Variant::from(7u32)),
        ];
        let properties = VmProperties(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_owned(), OwnedVariant::try_from(v).expect("owned")))
                .collect::<HashMap<_, _>>(),
        );
        let text = render(&properties);
        for expected in [
            "name:       web\n",
            "id:         3\n",
            "state:      failed\n",
            "reason:     cannot load the kernel\n",
            "memory:     512M\n",
            "vcpus:      2\n",
            "owner:      alice\n",
            "autostart:  no\n",
            "pid:        -\n",
            "defined:    stored by vmd",
            "frobs:      7\n",
            "\n# definition (vmd.toml(5))\nmemory = \"512M\"\n",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }
}
