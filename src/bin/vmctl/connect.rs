//! Reaching the daemon: the system bus, or vmd's own socket (peer-to-peer D-Bus).

use std::{
    os::unix::net::UnixStream,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use zbus::{Connection, connection::Builder};

use crate::error::{VmctlError, io_reason};

/// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS`, or the standard socket), or, with
/// `socket`, to vmd's own socket as a peer-to-peer D-Bus connection: no bus, no `Hello`, and
/// messages still name `org.vmd.vmd1` as their destination. Must run inside the Tokio runtime.
pub async fn connect(socket: Option<&Path>) -> Result<Connection, VmctlError> {
    let Some(path) = socket else {
        return Connection::system().await.map_err(|error| match error {
            zbus::Error::Connection(source, address) => VmctlError::Message(format!(
                "cannot connect to the system bus at {address}: {}",
                io_reason(&source)
            )),
            other => other.into(),
        });
    };
    let stream = UnixStream::connect(path).map_err(|source| VmctlError::Socket {
        path: path.to_owned(),
        source,
    })?;
    let builder = Builder::unix_stream(stream).p2p();
    if P2P_MISSING.load(Ordering::Relaxed) {
        return Err(VmctlError::NoPeerToPeer);
    }
    Ok(builder.build().await?)
}

/// Set by [`PeerToPeerFallback::p2p`], i.e. when zbus has no peer-to-peer support.
static P2P_MISSING: AtomicBool = AtomicBool::new(false);

/// zbus has `Builder::p2p` only when its `p2p` feature is on. When it is, that inherent method
/// takes precedence over this trait's, which is then never called; when it is not, this one
/// stands in and records that `--socket` cannot work, so vmctl says so instead of failing in the
/// handshake. Remove this trait once Cargo.toml enables `zbus/p2p` (the daemon needs it too, to
/// serve its socket).
#[allow(dead_code)]
trait PeerToPeerFallback {
    fn p2p(self) -> Self;
}

impl PeerToPeerFallback for Builder<'_> {
    fn p2p(self) -> Self {
        P2P_MISSING.store(true, Ordering::Relaxed);
        self
    }
}
