//! The user-facing commands of the `vmd` binary.

pub mod disk_option;
pub mod net_option;
pub mod run;
