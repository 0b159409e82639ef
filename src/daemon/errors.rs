//! The named D-Bus errors of org.vmd.vmd1 (DESIGN.md, "D-Bus API"). Every refusal carries a
//! sentence for people; the name is for programs.

/// Errors returned by every method of the vmd API.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.vmd.vmd1.Error")]
pub enum VmdError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No VM has this name.
    NoSuchVM(String),
    /// A VM with this name exists already.
    VMExists(String),
    /// An argument (name, config key, value, file) is unacceptable.
    InvalidArgument(String),
    /// The caller may not do this.
    NotPermitted(String),
    /// The VM is not in a state that allows this.
    InvalidState(String),
    /// A disk image is in use: another VM (named in the sentence) or program writes it, or
    /// reads it while this VM would write it.
    DiskBusy(String),
    /// Another client holds the VM's console (named in the sentence); OpenConsoleForce takes
    /// it over.
    ConsoleBusy(String),
    /// The operation was valid but the host could not carry it out.
    Failed(String),
}

impl VmdError {
    pub fn no_such_vm(name: &str) -> Self {
        VmdError::NoSuchVM(format!("there is no VM named {name:?}"))
    }
}
