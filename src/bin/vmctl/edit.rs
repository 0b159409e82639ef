//! `vmctl edit NAME` and `vmctl load FILE`: whole definitions, as TOML (vmd.toml(5)).
//!
//! `edit` works as `virsh edit`: the VM's `Definition` goes into a temporary file, the user's
//! editor runs on it, and once it exits the new definition is sent to the daemon with
//! `VM.Update`, each TOML key as its D-Bus config key. An unchanged file changes nothing. A
//! definition that cannot be read, or that the daemon refuses, is reported, and the user
//! chooses between editing it again and keeping the VM as it was.

use std::{
    collections::HashMap,
    fs::OpenOptions,
    io::{self, BufRead, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use zbus::Variant;

use crate::{
    commands::Ctx,
    error::{VmctlError, describe},
    proxies,
};

const SUCCESS: u8 = 0;

/// `vmctl edit`.
pub async fn edit(ctx: &Ctx, word: &str) -> Result<u8, VmctlError> {
    let target = ctx.vm(word).await?;
    let properties = proxies::vm_properties(&ctx.conn, target.path.clone()).await?;
    let name = target.name.as_str();
    let Some(original) = properties.str("Definition") else {
        return Err(VmctlError::Message(
            "this vmd does not give definitions to edit (no Definition property)".to_owned(),
        ));
    };
    match properties.str("DefinitionSource") {
        Some("admin") => {
            return Err(VmctlError::Message(format!(
                "vm {name} is defined by the administrator in /etc/vmd/vms/{name}.toml; \
                 edit that file, then run vmctl reload"
            )));
        }
        Some("transient") => {
            return Err(VmctlError::Message(format!(
                "vm {name} is transient: it has no definition to keep"
            )));
        }
        _ => {}
    }
    let file = TempFile::create(name, original)?;
    loop {
        run_editor(&file.path)?;
        let edited = std::fs::read_to_string(&file.path).map_err(|error| {
            VmctlError::io(format!("cannot read {}", file.path.display()), error)
        })?;
        if edited == original {
            ctx.note(format_args!("vm {name} unchanged"));
            return Ok(SUCCESS);
        }
        let applied = match config_from_toml(&edited, original) {
            Ok(config) => target
                .vm
                .update(config.as_dbus())
                .await
                .map_err(|e| describe(&e)),
            Err(reason) => Err(reason),
        };
        match applied {
            Ok(()) => {
                ctx.note(format_args!("vm {name} changed"));
                return Ok(SUCCESS);
            }
            Err(reason) => {
                eprintln!("vmctl: the new definition of vm {name} is not usable: {reason}");
                if !ask("Edit it again? [y/N] ")? {
                    return Err(VmctlError::Message(format!(
                        "vm {name} is unchanged; your edit is lost"
                    )));
                }
            }
        }
    }
}

/// `vmctl load FILE`: `DefineVM` with the file's text; the VM is named after the file.
pub async fn load(ctx: &Ctx, file: &Path) -> Result<u8, VmctlError> {
    let text = std::fs::read_to_string(file)
        .map_err(|error| VmctlError::io(format!("cannot read {}", file.display()), error))?;
    let name = vm_name_of(file)?;
    ctx.manager.define_vm(&with_name(&text, &name)).await?;
    ctx.note(format_args!("vm {name} defined from {}", file.display()));
    Ok(SUCCESS)
}

/// The definition with `name = NAME` first, unless it names its VM itself.
fn with_name(text: &str, name: &str) -> String {
    let named = text
        .parse::<toml::Table>()
        .is_ok_and(|table| table.contains_key("name"));
    if named {
        text.to_owned()
    } else {
        format!("name = \"{name}\"\n{text}")
    }
}

/// The VM a definition file defines: its name without `.toml`.
fn vm_name_of(file: &Path) -> Result<String, VmctlError> {
    let stem = file
        .file_name()
        .and_then(|name| name.to_str())
        .map(|name| name.strip_suffix(".toml").unwrap_or(name))
        .unwrap_or_default();
    vmd::protocol::validate_vm_name(stem).map_err(|error| {
        VmctlError::Message(format!(
            "{} does not name a VM (the file is NAME.toml): {error}",
            file.display()
        ))
    })?;
    Ok(stem.to_owned())
}

/// The editor: $VISUAL, $EDITOR, else Debian's `editor`, else vi. Run through the shell, so
/// that `EDITOR="code --wait"` works.
fn run_editor(path: &Path) -> Result<(), VmctlError> {
    let editor = ["VISUAL", "EDITOR"]
        .iter()
        .filter_map(|var| std::env::var(var).ok())
        .find(|value| !value.trim().is_empty())
        .unwrap_or_else(|| {
            if Path::new("/usr/bin/editor").exists() {
                "editor".to_owned()
            } else {
                "vi".to_owned()
            }
        });
    let status = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(path)
        .status()
        .map_err(|error| VmctlError::io(format!("cannot run the editor {editor}"), error))?;
    if !status.success() {
        return Err(VmctlError::Message(format!(
            "the editor {editor} failed ({status}); nothing changed"
        )));
    }
    Ok(())
}

/// Asks a yes/no question on the terminal; no terminal, or end of input, is no.
fn ask(question: &str) -> Result<bool, VmctlError> {
    eprint!("{question}");
    let _ = io::stderr().flush();
    let mut answer = String::new();
    match io::stdin().lock().read_line(&mut answer) {
        Ok(_) => Ok(matches!(answer.trim(), "y" | "Y" | "yes")),
        Err(error) => Err(VmctlError::io("cannot read the answer", error)),
    }
}

/// The temporary copy of a definition being edited, removed when dropped.
struct TempFile {
    path: PathBuf,
}

impl TempFile {
    fn create(name: &str, text: &str) -> Result<Self, VmctlError> {
        let dir = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        let path = dir.join(format!("vmctl-edit-{name}-{}.toml", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|error| VmctlError::io(format!("cannot create {}", path.display()), error))?;
        let file_path = Self { path };
        file.write_all(text.as_bytes()).map_err(|error| {
            VmctlError::io(format!("cannot write {}", file_path.path.display()), error)
        })?;
        Ok(file_path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A definition as `VM.Update` takes it: D-Bus config keys and values.
#[derive(Debug, PartialEq)]
pub struct Config(Vec<(&'static str, Value)>);

/// One config value.
#[derive(Debug, PartialEq)]
pub enum Value {
    Str(String),
    U32(u32),
    U64(u64),
    Bool(bool),
    Dicts(Vec<Vec<(&'static str, Value)>>),
}

impl Config {
    pub fn as_dbus(&self) -> HashMap<&'static str, Variant<'_>> {
        self.0
            .iter()
            .map(|(key, value)| (*key, value.as_dbus()))
            .collect()
    }
}

impl Value {
    fn as_dbus(&self) -> Variant<'_> {
        match self {
            Value::Str(text) => Variant::from(text.as_str()),
            Value::U32(n) => Variant::from(*n),
            Value::U64(n) => Variant::from(*n),
            Value::Bool(flag) => Variant::from(*flag),
            Value::Dicts(dicts) => Variant::from(
                dicts
                    .iter()
                    .map(|dict| {
                        dict.iter()
                            .map(|(key, value)| (*key, value.as_dbus()))
                            .collect::<HashMap<&str, Variant<'_>>>()
                    })
                    .collect::<Vec<_>>(),
            ),
        }
    }
}

/// The config of an edited definition. Keys are those of vmd.toml(5); a key the user removed
/// goes back to its default (an empty initrd is none). The uuid may not change.
pub fn config_from_toml(edited: &str, original: &str) -> Result<Config, String> {
    let table: toml::Table = edited
        .parse()
        .map_err(|error: toml::de::Error| error.message().to_owned())?;
    let before: Option<toml::Table> = original.parse().ok();
    let text_of =
        |table: &toml::Table, key: &str| table.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    if let Some(before) = &before {
        for key in ["uuid", "name"] {
            if text_of(before, key) != text_of(&table, key) {
                return Err(format!("the {key} of a VM cannot change"));
            }
        }
    }
    let mut config = Vec::new();
    let text = |key: &str, value: &toml::Value| {
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{key} must be a string"))
    };
    let number = |key: &str, value: &toml::Value| {
        value
            .as_integer()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| format!("{key} must be a whole number"))
    };
    let flag = |key: &str, value: &toml::Value| {
        value
            .as_bool()
            .ok_or_else(|| format!("{key} must be true or false"))
    };
    for (key, value) in &table {
        match key.as_str() {
            "uuid" | "name" => {}
            "kernel" => config.push(("Kernel", Value::Str(text(key, value)?))),
            "initrd" => config.push(("Initrd", Value::Str(text(key, value)?))),
            "cmdline" => config.push(("Cmdline", Value::Str(text(key, value)?))),
            "vcpus" => {
                let n = u32::try_from(number(key, value)?)
                    .map_err(|_| "vcpus is too large".to_owned())?;
                config.push(("VCPUs", Value::U32(n)));
            }
            "memory-bytes" => config.push(("MemoryBytes", Value::U64(number(key, value)?))),
            "autostart" => config.push(("Autostart", Value::Bool(flag(key, value)?))),
            "entropy" => config.push(("Entropy", Value::Bool(flag(key, value)?))),
            "owner" => config.push(("Owner", Value::Str(text(key, value)?))),
            "disk" => config.push(("Disks", Value::Dicts(tables(key, value, disk_key)?))),
            "interface" => config.push((
                "Interfaces",
                Value::Dicts(tables(key, value, interface_key)?),
            )),
            other => {
                return Err(format!(
                    "unknown key {other:?} (see vmd.toml(5): kernel, initrd, cmdline, vcpus, \
                     memory-bytes, autostart, owner, entropy, [[disk]], [[interface]])"
                ));
            }
        }
    }
    // Removed keys: back to the defaults (vmd.toml(5)).
    for (key, dbus, default) in [
        ("initrd", "Initrd", Value::Str(String::new())),
        ("cmdline", "Cmdline", Value::Str("console=ttyS0".to_owned())),
        ("vcpus", "VCPUs", Value::U32(1)),
        ("memory-bytes", "MemoryBytes", Value::U64(512 << 20)),
        ("autostart", "Autostart", Value::Bool(false)),
        ("entropy", "Entropy", Value::Bool(false)),
        ("disk", "Disks", Value::Dicts(Vec::new())),
        ("interface", "Interfaces", Value::Dicts(Vec::new())),
    ] {
        if !table.contains_key(key) {
            config.push((dbus, default));
        }
    }
    if !table.contains_key("kernel") {
        return Err("a VM needs a kernel".to_owned());
    }
    Ok(Config(config))
}

/// A `[[disk]]` key as its D-Bus name, and its value.
fn disk_key(key: &str, value: &toml::Value) -> Result<(&'static str, Value), String> {
    let text = || value.as_str().map(|s| Value::Str(s.to_owned()));
    let converted = match key {
        "path" => ("Path", text()),
        "format" => ("Format", text()),
        "serial" => ("Serial", text()),
        "read-only" => ("ReadOnly", value.as_bool().map(Value::Bool)),
        other => {
            return Err(format!(
                "unknown key {other:?} in a [[disk]] (see vmd.toml(5))"
            ));
        }
    };
    match converted {
        (dbus, Some(value)) => Ok((dbus, value)),
        (_, None) => Err(format!("{key} of a [[disk]] has the wrong type")),
    }
}

/// An `[[interface]]` key as its D-Bus name, and its value.
fn interface_key(key: &str, value: &toml::Value) -> Result<(&'static str, Value), String> {
    let converted = match key {
        "switch" => ("Switch", value.as_str().map(|s| Value::Str(s.to_owned()))),
        "mac" => ("MAC", value.as_str().map(|s| Value::Str(s.to_owned()))),
        "locked-lladdr" => ("LockedLladdr", value.as_bool().map(Value::Bool)),
        other => {
            return Err(format!(
                "unknown key {other:?} in an [[interface]] (see vmd.toml(5))"
            ));
        }
    };
    match converted {
        (dbus, Some(value)) => Ok((dbus, value)),
        (_, None) => Err(format!("{key} of an [[interface]] has the wrong type")),
    }
}

type KeyConverter = fn(&str, &toml::Value) -> Result<(&'static str, Value), String>;

/// An array of tables (`[[disk]]`) as a list of dicts.
fn tables(
    what: &str,
    value: &toml::Value,
    convert: KeyConverter,
) -> Result<Vec<Vec<(&'static str, Value)>>, String> {
    let array = value
        .as_array()
        .ok_or_else(|| format!("{what} must be written as [[{what}]] tables"))?;
    array
        .iter()
        .map(|entry| {
            let table = entry
                .as_table()
                .ok_or_else(|| format!("{what} must be written as [[{what}]] tables"))?;
            table
                .iter()
                // Written by vmd for what was passed as an fd; not settings to send back.
                .filter(|(key, _)| !matches!(key.as_str(), "passed" | "passed-tap"))
                .map(|(key, value)| convert(key, value))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = r#"name = "web"
uuid = "3f0c2a8e-5b1d-4e7a-9c4f-1a2b3c4d5e6f"
kernel = "/boot/vmlinuz"
cmdline = "console=ttyS0"
vcpus = 1
memory-bytes = 536870912
"#;

    fn get<'a>(config: &'a Config, key: &str) -> Option<&'a Value> {
        config.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    #[test]
    fn keys_become_config_keys() {
        let edited = format!(
            "{ORIGINAL}initrd = \"/boot/initrd\"\nautostart = true\n\n[[disk]]\npath = \"/srv/a.qcow2\"\nread-only = true\n\n[[interface]]\nswitch = \"lan\"\n"
        )
        .replace("vcpus = 1", "vcpus = 4");
        let config = config_from_toml(&edited, ORIGINAL).expect("config");
        assert_eq!(get(&config, "VCPUs"), Some(&Value::U32(4)));
        assert_eq!(
            get(&config, "Initrd"),
            Some(&Value::Str("/boot/initrd".into()))
        );
        assert_eq!(get(&config, "Autostart"), Some(&Value::Bool(true)));
        assert_eq!(
            get(&config, "Disks"),
            Some(&Value::Dicts(vec![vec![
                ("Path", Value::Str("/srv/a.qcow2".into())),
                ("ReadOnly", Value::Bool(true)),
            ]]))
        );
        assert_eq!(
            get(&config, "Interfaces"),
            Some(&Value::Dicts(vec![vec![(
                "Switch",
                Value::Str("lan".into())
            )]]))
        );
        assert!(get(&config, "uuid").is_none());
        let dbus = config.as_dbus();
        assert_eq!(dbus["VCPUs"], Variant::from(4u32));
    }

    #[test]
    fn removed_keys_go_back_to_their_defaults() {
        let edited = ORIGINAL
            .replace("vcpus = 1\n", "")
            .replace("cmdline = \"console=ttyS0\"\n", "");
        let config = config_from_toml(&edited, ORIGINAL).expect("config");
        assert_eq!(get(&config, "VCPUs"), Some(&Value::U32(1)));
        assert_eq!(get(&config, "Initrd"), Some(&Value::Str(String::new())));
        assert_eq!(get(&config, "Disks"), Some(&Value::Dicts(Vec::new())));
    }

    #[test]
    fn bad_edits_say_why() {
        for (edited, reason) in [
            ("kernel = ", "string"),
            (
                "vcpus = \"two\"\nkernel = \"/k\"",
                "vcpus must be a whole number",
            ),
            ("kernal = \"/k\"", "unknown key \"kernal\""),
            ("cmdline = \"x\"", "a VM needs a kernel"),
            (
                "kernel = \"/k\"\n[[disk]]\npth = \"/x\"",
                "unknown key \"pth\" in a [[disk]]",
            ),
        ] {
            let with_uuid = format!(
                "name = \"web\"\nuuid = \"3f0c2a8e-5b1d-4e7a-9c4f-1a2b3c4d5e6f\"\n{edited}"
            );
            let error = config_from_toml(&with_uuid, ORIGINAL).expect_err(edited);
            assert!(error.contains(reason), "{edited:?}: {error}");
        }
        let error = config_from_toml(&ORIGINAL.replace("3f0c2a8e", "00000000"), ORIGINAL)
            .expect_err("uuid");
        assert_eq!(error, "the uuid of a VM cannot change");
        let error =
            config_from_toml(&ORIGINAL.replace("\"web\"", "\"www\""), ORIGINAL).expect_err("name");
        assert_eq!(error, "the name of a VM cannot change");
    }

    #[test]
    fn files_name_their_vm() {
        assert_eq!(
            vm_name_of(Path::new("/etc/x/web.toml")).expect("name"),
            "web"
        );
        assert_eq!(
            vm_name_of(Path::new("db.prod.toml")).expect("name"),
            "db.prod"
        );
        assert!(vm_name_of(Path::new("a_b.toml")).is_err());
    }
}
