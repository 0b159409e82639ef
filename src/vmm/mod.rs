//! The virtual machine monitor: guest memory, boot, vCPUs.

pub mod layout;
