//! Build script: assembles the end-to-end test guest (`tests/guest/`) with the C compiler.
//!
//! The guest ELF is written to `$OUT_DIR/testguest.elf` and copied to
//! `target/<profile>/testguest.elf`; `VMD_TESTGUEST_ELF` (compile-time environment of every
//! target of this package) holds the absolute path of the copy.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_SOURCE: &str = "tests/guest/testguest.S";
const GUEST_LINKER_SCRIPT: &str = "tests/guest/testguest.ld";
const GUEST_ELF: &str = "testguest.elf";
const STARTUP_SYMBOLS: &str = "build/startup-symbols.txt";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={GUEST_SOURCE}");
    println!("cargo:rerun-if-changed={GUEST_LINKER_SCRIPT}");
    println!("cargo:rerun-if-env-changed=CC");
    // Relative relocations packed as DT_RELR (glibc 2.36, binutils 2.38): the dynamic loader
    // applies them several times faster at every start of `vmd` (each VM's helper is one), and
    // the table is a fraction of the size. PIE and full RELRO stay as they are.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is not set"));
    order_startup_symbols(&manifest_dir);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is not set"));
    let built = out_dir.join(GUEST_ELF);
    build_guest(&manifest_dir, &built);

    // OUT_DIR is target/<profile>/build/vmd-HASH/out: put the copy in target/<profile>.
    let profile_dir = out_dir.ancestors().nth(3).unwrap_or_else(|| {
        panic!(
            "cannot find the target profile directory above OUT_DIR {}",
            out_dir.display()
        )
    });
    let copy = profile_dir.join(GUEST_ELF);
    // Replace rather than overwrite in place: a running test may have the old file open.
    let staging = profile_dir.join(format!("{GUEST_ELF}.{}.tmp", std::process::id()));
    fs::copy(&built, &staging)
        .and_then(|_| fs::rename(&staging, &copy))
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), copy.display()));
    let copy = copy.canonicalize().unwrap_or(copy);
    println!("cargo:rustc-env=VMD_TESTGUEST_ELF={}", copy.display());
}

/// Places the functions `vmd run` executes together at the start of `.text`
/// (`build/startup-symbols.sh` lists them): the kernel maps 16 pages around each page fault in
/// the binary, so a start-up path spread over the whole text maps most of it. Only LLD takes a
/// symbol ordering file; it is what rustc links x86_64 Linux binaries with since 1.90, unless
/// RUSTFLAGS choose another linker. Names the build does not have are skipped silently.
fn order_startup_symbols(manifest_dir: &Path) {
    println!("cargo:rerun-if-changed={STARTUP_SYMBOLS}");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let target = env::var("TARGET").unwrap_or_default();
    let rustflags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" || rustflags.contains("link") || !rustc_links_with_lld()
    {
        return;
    }
    let symbols = manifest_dir.join(STARTUP_SYMBOLS);
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        symbols.display()
    );
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// Whether `$RUSTC` is 1.90 or newer, whose x86_64 Linux target links with its own LLD.
fn rustc_links_with_lld() -> bool {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(output) = Command::new(rustc).arg("-V").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&output.stdout);
    let mut numbers = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}

/// Assembles and links the test guest with `$CC` (default `gcc`), panicking with the
/// compiler's output if that fails.
fn build_guest(manifest_dir: &Path, output: &Path) {
    let cc = env::var("CC")
        .ok()
        .filter(|cc| !cc.trim().is_empty())
        .unwrap_or_else(|| "gcc".into());
    // `CC` may carry arguments ("ccache gcc", "gcc -m64").
    let mut words = cc.split_whitespace();
    let program = words.next().expect("CC is blank");
    let source = manifest_dir.join(GUEST_SOURCE);
    let script = manifest_dir.join(GUEST_LINKER_SCRIPT);

    let mut cmd = Command::new(program);
    cmd.args(words)
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-ffreestanding",
            "-fno-pic",
        ])
        .arg(format!("-Wl,-T,{}", script.display()))
        .args([
            "-Wl,--build-id=none",
            "-Wl,-z,max-page-size=0x1000",
            "-Wl,-z,noexecstack",
        ])
        .arg("-Wa,--fatal-warnings")
        .arg("-o")
        .arg(output)
        .arg(&source);

    let result = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run the C compiler `{program}` to build the test guest {}: {e} \
             (install gcc, or set CC)",
            source.display()
        )
    });
    if !result.status.success() {
        panic!(
            "building the test guest {} failed ({}):\n{:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            source.display(),
            result.status,
            cmd,
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    // Surface warnings the compiler printed on success.
    for line in String::from_utf8_lossy(&result.stderr).lines() {
        println!("cargo:warning=testguest: {line}");
    }
}
