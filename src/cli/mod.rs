//! The user-facing commands of the `vmd` binary.

pub mod run;
