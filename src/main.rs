//! `vmd`: the command-line entry point.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vmd::cli::run::RunArgs;
use vmd::helper::HelperOptions;
use vmd::helper::listen_fds;
use vmd::sandbox::{Account, SandboxMode};

/// vmd runs virtual machines on KVM, each in its own sandboxed helper process.
#[derive(Parser)]
#[command(name = "vmd", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a VM in the foreground; the guest console is on stdout.
    Run(RunArgs),
    /// Run the D-Bus service (org.vmd.vmd1); started by systemd as vmd.service.
    Daemon(vmd::daemon::DaemonOptions),
    /// The per-VM helper, started by vmd with its fds passed as LISTEN_FDS.
    #[command(hide = true)]
    Vm {
        /// Run without landlock, seccomp, uid and capability drop (for debugging only).
        #[arg(long)]
        no_sandbox: bool,
        /// Report on stderr what the sandbox allows (for tests).
        #[arg(long, hide = true)]
        probe_sandbox: bool,
        /// The VM's name, for the logs (VM_NAME= in the journal).
        #[arg(long)]
        name: Option<String>,
        /// The account to switch to (NAME:UID:GID), as the launcher resolved it; without it
        /// the helper looks the account up itself.
        #[arg(long, value_parser = Account::from_argument)]
        account: Option<Account>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Vm {
            no_sandbox,
            probe_sandbox,
            name,
            account,
        } => {
            // The passed fds come first, before anything else here opens an fd (logging may
            // connect to the journal): an fd number LISTEN_FDS claims but the launcher did not
            // pass must be found closed, not taken for one of our own.
            // SAFETY: nothing in this process has opened an fd yet (the runtime and clap open
            // none that stay open), and no other thread exists.
            let fds = unsafe { listen_fds::take_listen_fds() };
            vmd::logging::init(name.as_deref());
            // Connected now: after the lock-down the helper can open no socket.
            let console_journal = vmd::logging::console_journal_socket();
            vmd::helper::main(
                fds,
                HelperOptions {
                    sandbox: if no_sandbox {
                        SandboxMode::Disabled
                    } else {
                        SandboxMode::Enforce
                    },
                    probe_sandbox,
                    account,
                },
                console_journal,
            )
        }
        Command::Run(args) => {
            if std::env::var_os("VMD_LOG").is_none() {
                // In the foreground the console is the point: keep the VMM's own logs (and
                // those of the helper, which inherits this) to warnings unless asked for more.
                // SAFETY: no other thread exists yet.
                unsafe { std::env::set_var("VMD_LOG", "warn") };
            }
            vmd::logging::init(None);
            vmd::cli::run::run(args)
        }
        Command::Daemon(options) => {
            vmd::logging::init(None);
            vmd::daemon::main(options)
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
