//! vmd: a virtual machine manager for Linux.
//!
//! The `vmd` binary is the front end (`vmd run`, later the D-Bus daemon) and, re-executed in
//! `vm` mode, the per-VM helper process that owns one KVM virtual machine:
//! - [`launch`] starts a helper (fork + exec with LISTEN_FDS);
//! - [`helper`] is the helper process itself;
//! - [`protocol`] is what the two say over their control socket;
//! - [`sandbox`] is how the helper locks itself down;
//! - [`images`] inspects disk images, follows their backing chains and locks them;
//! - [`vmm`] builds and runs the VM on KVM, with the [`devices`] it emulates;
//! - [`daemon`] is the D-Bus service that runs VMs in systemd scopes;
//! - [`cli`] holds the user-facing commands;
//! - [`tap`] opens, checks and creates the host side of network interfaces;
//! - [`poll_set`] is the poll(2) loop shape the helper and `vmd run` share.

pub mod cli;
pub mod daemon;
pub mod devices;
pub mod helper;
pub mod images;
pub mod launch;
pub mod logging;
pub mod poll_set;
pub mod protocol;
pub mod sandbox;
pub mod tap;
pub mod vmm;
