//! vmd: a virtual machine manager for Linux.

pub mod protocol;
pub mod sandbox;
