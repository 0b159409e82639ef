//! The virtual machine monitor: guest memory, kernel boot, ACPI tables, vCPU setup and threads,
//! and the builder that puts a VM together from them.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod vcpu;
pub mod vm;
