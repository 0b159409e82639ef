//! vmd's Linux test kernel (`tests/linux/`), built once per test binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The built kernel: vmlinux, and the bzImage and /init beside it.
pub struct Kernel {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub init: PathBuf,
}

/// Builds the kernel with `tests/linux/build.sh` (or finds its cached build) once per test
/// binary; a failed build fails the test.
pub fn kernel() -> &'static Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/linux/build.sh");
        let output = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{} failed:\n{stdout}{}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let vmlinux = PathBuf::from(stdout.lines().last().expect("build.sh printed nothing"));
        let dir = vmlinux.parent().expect("vmlinux has a directory");
        let kernel = Kernel {
            bzimage: dir.join("bzImage"),
            init: dir.join("init"),
            vmlinux: vmlinux.clone(),
        };
        for path in [&kernel.vmlinux, &kernel.bzimage, &kernel.init] {
            assert!(path.is_file(), "{} was not built", path.display());
        }
        kernel
    })
}
