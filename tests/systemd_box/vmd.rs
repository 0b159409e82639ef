//! Putting vmd into a box: its package built from given binaries, and a seed directory with
//! the files a box needs at boot (the package, the test guest). Shared by the daemon tests,
//! the daemon benchmark and the daemon demo.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the vmd package from `vmd` and `vmctl` into `out` (packaging/build-deb.sh, which runs
/// no cargo when given the binaries); returns the .deb's path.
pub fn build_package(vmd: &Path, vmctl: &Path, out: &Path) -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/build-deb.sh");
    let output = Command::new(&script)
        .arg("--vmd")
        .arg(vmd)
        .arg("--vmctl")
        .arg(vmctl)
        .arg("--out")
        .arg(out)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "build-deb.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// A seed directory (for `BoxOptions::seed`) holding each host file at its path in the box.
pub fn seed_with(files: &[(&Path, &str)]) -> std::io::Result<tempfile::TempDir> {
    let seed = tempfile::tempdir()?;
    for (from, to) in files {
        let target = seed.path().join(to.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from, &target)?;
    }
    Ok(seed)
}
