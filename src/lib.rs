//! vmd: a virtual machine manager for Linux.

pub mod devices;
pub mod protocol;
pub mod sandbox;
pub mod vmm;
