//! What a VM's lifecycle looked like last (State, FailureReason, Restarts), one small file per
//! VM in `/var/lib/vmd/state/<name>.state`, so that a restarted daemon shows a failed VM as
//! failed, with its reason, until it is started again. Files are written atomically (temp file,
//! fsync, rename) by one thread of their own, in order, off the runtime's thread.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use super::lifecycle::VmState;

/// One VM's record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StateRecord {
    state: String,
    #[serde(default)]
    failure_reason: String,
    #[serde(default)]
    restarts: u32,
}

impl StateRecord {
    pub fn new(state: VmState, failure_reason: &str, restarts: u32) -> StateRecord {
        StateRecord {
            state: state.as_str().to_string(),
            failure_reason: failure_reason.to_string(),
            restarts,
        }
    }

    /// The recorded state; `None` for a name this daemon does not know.
    pub fn state(&self) -> Option<VmState> {
        VmState::parse(&self.state)
    }

    pub fn failure_reason(&self) -> &str {
        &self.failure_reason
    }

    pub fn restarts(&self) -> u32 {
        self.restarts
    }
}

enum Job {
    Save(String, StateRecord),
    Remove(String),
}

pub struct StateFiles {
    dir: PathBuf,
    writer: mpsc::Sender<Job>,
}

impl StateFiles {
    pub fn new(dir: PathBuf) -> StateFiles {
        let (writer, queue) = mpsc::channel();
        let thread_dir = dir.clone();
        let spawned = std::thread::Builder::new()
            .name("state-files".into())
            .spawn(move || write_all(&thread_dir, queue));
        if let Err(err) = spawned {
            tracing::warn!("cannot start the state file writer: {err}; VM states will not persist");
        }
        StateFiles { dir, writer }
    }

    fn path_of(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.state"))
    }

    /// The record of VM `name`, if there is a readable one.
    pub fn load(&self, name: &str) -> Option<StateRecord> {
        let path = Self::path_of(&self.dir, name);
        let text = fs::read_to_string(&path).ok()?;
        match toml::from_str(&text) {
            Ok(record) => Some(record),
            Err(err) => {
                tracing::warn!("ignoring {}: {err}", path.display());
                None
            }
        }
    }

    /// Queues writing the record of VM `name`.
    pub fn save(&self, name: &str, record: StateRecord) {
        let _ = self.writer.send(Job::Save(name.to_string(), record));
    }

    /// Queues removing the record of VM `name`.
    pub fn remove(&self, name: &str) {
        let _ = self.writer.send(Job::Remove(name.to_string()));
    }
}

fn write_all(dir: &Path, queue: mpsc::Receiver<Job>) {
    while let Ok(write) = queue.recv() {
        match write {
            Job::Save(name, record) => {
                if let Err(err) = save(dir, &name, &record) {
                    tracing::warn!("cannot record the state of VM {name}: {err}");
                }
            }
            Job::Remove(name) => match fs::remove_file(StateFiles::path_of(dir, &name)) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => tracing::warn!("cannot remove the state of VM {name}: {err}"),
            },
        }
    }
}

fn save(dir: &Path, name: &str, record: &StateRecord) -> std::io::Result<()> {
    let text = toml::to_string(record).map_err(std::io::Error::other)?;
    fs::create_dir_all(dir)?;
    let temp = dir.join(format!(".{name}.state.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    fs::rename(&temp, StateFiles::path_of(dir, name))?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_for(files: &StateFiles, name: &str, want: Option<&StateRecord>) {
        let start = Instant::now();
        while files.load(name).as_ref() != want {
            assert!(start.elapsed() < Duration::from_secs(10), "never {want:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn records_read_back_and_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = StateFiles::new(dir.path().join("state"));
        assert_eq!(files.load("web"), None);
        let failed = StateRecord::new(VmState::Failed, "the guest \"crashed\"\nbadly", 2);
        files.save("web", failed.clone());
        wait_for(&files, "web", Some(&failed));
        let record = files.load("web").expect("record");
        assert_eq!(record.state(), Some(VmState::Failed));
        assert_eq!(record.failure_reason(), "the guest \"crashed\"\nbadly");
        assert_eq!(record.restarts(), 2);
        // The last write wins.
        let stopped = StateRecord::new(VmState::Stopped, "", 0);
        files.save("web", stopped.clone());
        wait_for(&files, "web", Some(&stopped));
        files.remove("web");
        wait_for(&files, "web", None);
    }

    #[test]
    fn a_bad_record_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("web.state"), "state = [").expect("write");
        fs::write(dir.path().join("odd.state"), "state = \"dancing\"").expect("write");
        let files = StateFiles::new(dir.path().to_path_buf());
        assert_eq!(files.load("web"), None);
        assert_eq!(files.load("odd").expect("record").state(), None);
    }
}
