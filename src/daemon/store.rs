//! Where definitions live: `/etc/vmd/vms/*.toml` (written by the administrator, read-only to
//! the daemon) and `/var/lib/vmd/vms/*.toml` (created over D-Bus). Writes are atomic: a
//! temporary file in the same directory, fsync, rename, fsync of the directory.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::definition::VmDefinition;

/// Where a definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `/etc/vmd/vms`: the administrator's; the API may not change or remove it.
    Admin,
    /// Created over the API and stored in the state directory.
    Api,
}

/// Errors from writing or removing a stored definition.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create {0}")]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("cannot remove {0}")]
    Remove(PathBuf, #[source] std::io::Error),
}

pub struct Store {
    admin_dir: PathBuf,
    state_dir: PathBuf,
}

impl Store {
    /// `admin_dir` is e.g. /etc/vmd/vms, `state_dir` /var/lib/vmd/vms.
    pub fn new(admin_dir: PathBuf, state_dir: PathBuf) -> Store {
        Store {
            admin_dir,
            state_dir,
        }
    }

    /// Every valid definition; invalid files are logged and skipped. An administrator's
    /// definition hides a stored one of the same name.
    pub fn load_all(&self) -> Vec<(VmDefinition, Origin)> {
        let mut definitions: Vec<(VmDefinition, Origin)> = Vec::new();
        for (dir, origin) in [
            (&self.admin_dir, Origin::Admin),
            (&self.state_dir, Origin::Api),
        ] {
            for definition in load_dir(dir) {
                if definitions.iter().any(|(d, _)| d.name == definition.name) {
                    tracing::warn!(
                        "ignoring {}/{}.toml: {} already defines a VM of that name",
                        dir.display(),
                        definition.name,
                        self.admin_dir.display()
                    );
                    continue;
                }
                definitions.push((definition, origin));
            }
        }
        definitions
    }

    /// Where copies of files passed as fds are kept for the VM with this UUID. Keyed by UUID,
    /// not name: two concurrent creations of one name never share (or delete) a directory.
    pub fn files_dir(&self, uuid: &uuid::Uuid) -> PathBuf {
        self.state_dir
            .with_file_name("files")
            .join(uuid.to_string())
    }

    /// Forgets the copied files of the VM with this UUID (none is fine).
    pub fn remove_files(&self, uuid: &uuid::Uuid) {
        let dir = self.files_dir(uuid);
        if let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{name}.toml"))
    }

    /// Stores a definition atomically.
    pub fn save(&self, definition: &VmDefinition) -> Result<(), StoreError> {
        fs::create_dir_all(&self.state_dir)
            .map_err(|e| StoreError::CreateDir(self.state_dir.clone(), e))?;
        let path = self.path_of(&definition.name);
        let temp = self
            .state_dir
            .join(format!(".{}.toml.tmp", definition.name));
        // Never replace a stored definition with something that failed to serialize.
        let text = definition
            .to_toml()
            .map_err(|e| StoreError::Write(path.clone(), std::io::Error::other(e)))?;
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            File::open(&self.state_dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&temp);
            StoreError::Write(path.clone(), e)
        })
    }

    /// Forgets a stored definition (a missing file is fine).
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Remove(path, e)),
        }
    }
}

fn load_dir(dir: &Path) -> Vec<VmDefinition> {
    read_dir(dir)
        .into_iter()
        .filter_map(|(_, definition)| definition)
        .collect()
}

/// Each `*.toml` file of `dir` by name (sorted), with its definition, or `None` when it cannot
/// be read or is invalid (logged).
fn read_dir(dir: &Path) -> Vec<(String, Option<VmDefinition>)> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!("cannot read {}: {e}", dir.display());
            return Vec::new();
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let name = path.file_stem()?.to_str()?.to_string();
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    tracing::warn!("cannot read {}: {e}", path.display());
                    return Some((name, None));
                }
            };
            match VmDefinition::from_toml(&name, &text) {
                Ok(definition) => Some((name, Some(definition))),
                Err(e) => {
                    tracing::warn!("ignoring {}: {e}", path.display());
                    Some((name, None))
                }
            }
        })
        .collect()
}

impl Store {
    /// The administrator's definitions as the files are now, for a reload: each file's name
    /// with its definition, or `None` for a file that cannot be used (logged), whose VM a
    /// reload leaves as it is.
    pub fn read_admin(&self) -> Vec<(String, Option<VmDefinition>)> {
        read_dir(&self.admin_dir)
    }

    pub fn admin_dir(&self) -> &Path {
        &self.admin_dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(name: &str) -> VmDefinition {
        VmDefinition {
            name: name.into(),
            uuid: uuid::Uuid::new_v4(),
            kernel: "/boot/vmlinuz".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            autostart: true,
            owner_uid: None,
            owner_gid: None,
            transient: false,
            disks: Vec::new(),
            entropy: false,
            interfaces: Vec::new(),
        }
    }

    #[test]
    fn saved_definitions_load_back_and_admin_ones_win() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = Store::new(root.path().join("etc"), root.path().join("lib"));
        store.save(&definition("a")).expect("save");
        store.save(&definition("b")).expect("save");
        fs::create_dir_all(root.path().join("etc")).unwrap();
        let mut admin = definition("b");
        admin.vcpus = 3;
        fs::write(root.path().join("etc/b.toml"), admin.to_toml().unwrap()).unwrap();
        fs::write(root.path().join("etc/broken.toml"), "kernel = 3").unwrap();
        let loaded = store.load_all();
        let names: Vec<_> = loaded
            .iter()
            .map(|(d, o)| (d.name.as_str(), *o, d.vcpus))
            .collect();
        assert_eq!(names, vec![("b", Origin::Admin, 3), ("a", Origin::Api, 1)]);
        store.remove("a").expect("remove");
        store.remove("a").expect("removing twice is fine");
        assert_eq!(store.load_all().len(), 1);
        // No temporary files are left behind.
        let leftovers: Vec<_> = fs::read_dir(root.path().join("lib")).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }
}
