//! Enough of `org.freedesktop.DBus` on vmd.sock for clients that take any address for a bus:
//! `busctl --address=unix:path=/run/vmd/vmd.sock` and `gdbus ... --address=...` send `Hello`
//! first and give up without an answer. There is no bus on this socket, only the daemon: Hello
//! names the client, and the name questions they ask are answered for the two names that
//! exist here, the daemon's and the bus's own.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;

use zbus::{fdo, interface};

use super::BUS_NAME;

pub const PATH: &str = "/org/freedesktop/DBus";
/// What a peer-to-peer client is told the daemon's unique name is.
const DAEMON_UNIQUE_NAME: &str = ":1.0";

/// Numbers the peer-to-peer clients, for their unique names.
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// How long a new client has to say Hello before it is taken for one that never will.
pub const HELLO_WAIT: Duration = Duration::from_millis(300);
/// How long after Hello the daemon waits before it may send signals: the answer to Hello must
/// be the first message such a client gets.
pub const AFTER_HELLO: Duration = Duration::from_millis(100);

pub struct PeerBus {
    /// The name Hello gives this client.
    name: String,
    /// Fired by Hello.
    said_hello: Mutex<Option<oneshot::Sender<()>>>,
}

impl PeerBus {
    /// The object, and what fires when the client says Hello.
    pub fn new() -> (PeerBus, oneshot::Receiver<()>) {
        let (sender, receiver) = oneshot::channel();
        let bus = PeerBus {
            name: format!(":1.{}", NEXT_CLIENT.fetch_add(1, Ordering::Relaxed)),
            said_hello: Mutex::new(Some(sender)),
        };
        (bus, receiver)
    }
}

#[interface(name = "org.freedesktop.DBus")]
impl PeerBus {
    /// The client's unique name (busctl and gdbus need one).
    fn hello(&self) -> String {
        if let Some(said) = self
            .said_hello
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = said.send(());
        }
        self.name.clone()
    }

    /// Signals reach every peer-to-peer client anyway: nothing to match.
    fn add_match(&self, _rule: String) {}

    fn remove_match(&self, _rule: String) {}

    fn get_name_owner(&self, name: String) -> fdo::Result<String> {
        match name.as_str() {
            BUS_NAME | "org.freedesktop.DBus" => Ok(DAEMON_UNIQUE_NAME.to_string()),
            n if n == self.name => Ok(self.name.clone()),
            _ => Err(fdo::Error::NameHasNoOwner(format!(
                "only {BUS_NAME} is on this socket, not {name}"
            ))),
        }
    }

    fn name_has_owner(&self, name: String) -> bool {
        name == BUS_NAME || name == "org.freedesktop.DBus" || name == self.name
    }

    #[zbus(name = "GetId")]
    fn get_id(&self) -> String {
        // Not a bus: no machine-wide bus ID, but a well-formed one.
        "0".repeat(32)
    }
}
