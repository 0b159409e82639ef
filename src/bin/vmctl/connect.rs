//! Reaching the daemon: the system bus, or vmd's own socket (peer-to-peer D-Bus).

use std::{os::unix::net::UnixStream, path::Path, time::Duration};

use zbus::{Connection, connection::Builder};

use crate::error::{VmctlError, io_reason};

/// How long connecting and the D-Bus handshake may take: a daemon that accepted the connection
/// but does not answer must not hang vmctl forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS`, or the standard socket), or, with
/// `socket`, to vmd's own socket as a peer-to-peer D-Bus connection: no bus and no `Hello`;
/// messages still name `org.vmd.vmd1` as their destination. Must run inside the Tokio runtime.
pub async fn connect(socket: Option<&Path>) -> Result<Connection, VmctlError> {
    let (what, connecting) = match socket {
        None => ("the system bus".to_owned(), Builder::system()),
        Some(path) => {
            let stream = UnixStream::connect(path).map_err(|source| VmctlError::Socket {
                path: path.to_owned(),
                source,
            })?;
            (
                path.display().to_string(),
                Builder::unix_stream(stream).p2p(),
            )
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting.build()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(zbus::Error::Connection(source, address))) => Err(VmctlError::Message(format!(
            "cannot connect to {what} at {address}: {}",
            io_reason(&source)
        ))),
        Ok(Err(error)) => Err(error.into()),
        Err(_elapsed) => Err(VmctlError::Message(format!(
            "{what} did not answer within {} seconds",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}
