//! `vmctl log NAME`: the guest's console output, which vmd keeps in the journal (each line an
//! entry with `VM_NAME=<name>` and `VM_CONSOLE=1`), shown by journalctl.

use std::{os::unix::process::CommandExt, process::Command};

use crate::{cli::LogArgs, commands::Ctx, error::VmctlError};

pub async fn log(ctx: &Ctx, args: LogArgs) -> Result<u8, VmctlError> {
    // The name of a VM vmd knows (by name or ID); a transient VM that is gone has a history
    // too, so a valid name vmd does not know is taken as it is.
    let name = match ctx.find(&args.vm).await {
        Ok((name, _)) => name,
        Err(VmctlError::Bus(error)) if crate::error::is_no_such_vm(&error) => args.vm.clone(),
        Err(error) => return Err(error),
    };
    let error = journalctl(&name, &args).exec();
    Err(VmctlError::io("cannot run journalctl", error))
}

/// The journalctl command line for `args`.
pub fn journalctl(name: &str, args: &LogArgs) -> Command {
    let mut command = Command::new("journalctl");
    command.args([
        format!("VM_NAME={name}"),
        "VM_CONSOLE=1".to_owned(),
        "--output=cat".to_owned(),
    ]);
    if args.follow {
        command.arg("--follow");
    }
    if let Some(lines) = args.lines {
        command.arg(format!("--lines={lines}"));
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journalctl_matches_the_vms_console_lines() {
        let args = LogArgs {
            vm: "web".into(),
            follow: true,
            lines: Some(20),
        };
        let command = journalctl("web", &args);
        assert_eq!(command.get_program(), "journalctl");
        let argv: Vec<_> = command.get_args().collect();
        assert_eq!(
            argv,
            [
                "VM_NAME=web",
                "VM_CONSOLE=1",
                "--output=cat",
                "--follow",
                "--lines=20"
            ]
        );
    }
}
