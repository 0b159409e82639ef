//! vmctl: the command-line client of vmd, after OpenBSD's vmctl(8).
//!
//! It talks to the daemon over D-Bus (`org.vmd.vmd1`, see `dbus/org.vmd.vmd1.xml`), on the system
//! bus or peer-to-peer over vmd's socket (`--socket`). Exit status: 0 on success; 1 on a failure,
//! printed as one `vmctl: ...` line on stderr (and for `wait`, when the VM failed); 2 on a usage
//! error; 128 + N when a console session ends on signal N.
//!
//! The modules live in `src/bin/vmctl/` (a binary's root file resolves `mod x;` next to itself,
//! hence the `#[path]`s).

#[path = "vmctl/cli.rs"]
mod cli;
#[path = "vmctl/commands.rs"]
mod commands;
#[path = "vmctl/connect.rs"]
mod connect;
#[path = "vmctl/console.rs"]
mod console;
#[path = "vmctl/create.rs"]
mod create;
#[path = "vmctl/edit.rs"]
mod edit;
#[path = "vmctl/error.rs"]
mod error;
#[path = "vmctl/escape.rs"]
mod escape;
#[path = "vmctl/info.rs"]
mod info;
#[path = "vmctl/log.rs"]
mod log;
#[path = "vmctl/proxies.rs"]
mod proxies;
#[path = "vmctl/relay.rs"]
mod relay;
#[path = "vmctl/size.rs"]
mod size;
#[path = "vmctl/table.rs"]
mod table;
#[path = "vmctl/watch.rs"]
mod watch;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // zbus runs its connection on the Tokio runtime it is built in; vmctl needs only one thread.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("vmctl: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(status) => ExitCode::from(status),
        Err(error) => {
            eprintln!("vmctl: {error}");
            ExitCode::FAILURE
        }
    }
}
