//! Waiting until a VM is down (`stop -w`, `wait`, the end of a console session).
//!
//! The daemon emits `PropertiesChanged` for every property change. The watcher subscribes to
//! those of one VM object before the caller asks for a change (so none is missed), reads `State`
//! once, and then re-checks on every signal. A signal that carries `State` (and `FailureReason`)
//! is believed as is: a transient VM may be gone right after it stopped. Where no subscription
//! is possible, and every few seconds anyway, the watcher reads `State` itself.

use std::{collections::HashMap, future::poll_fn, pin::Pin, time::Duration};

use tokio::time::Instant;
use zbus::{
    Connection, MatchRule, Message, MessageStream, OwnedObjectPath, OwnedVariant,
    export::futures_core::Stream, message::Type,
};

use crate::{
    error::{VmctlError, is_gone},
    proxies::{self, SERVICE, VM_INTERFACE, VmProxy},
};

/// How often `State` is read without a signal: when signals arrive, this only covers a lost one.
const RECHECK_WITH_SIGNALS: Duration = Duration::from_secs(2);
/// How often `State` is read when no subscription could be made.
const RECHECK_WITHOUT_SIGNALS: Duration = Duration::from_millis(250);

/// How a VM went down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Down {
    /// `stopped`, or `defined` (never started).
    Stopped,
    /// `failed`, with the daemon's `FailureReason` (empty if it gave none).
    Failed(String),
    /// The VM object disappeared (a transient VM is removed once it stops).
    Gone,
}

/// Whether `state` means the VM is not running: `Some` with how (a failure's reason is filled in
/// later), or `None` while it runs.
fn down_from_state(state: &str) -> Option<Down> {
    match state {
        "stopped" | "defined" => Some(Down::Stopped),
        "failed" => Some(Down::Failed(String::new())),
        _ => None,
    }
}

/// A subscription to one VM's state; see the [module documentation](self).
pub struct Watcher {
    vm: VmProxy<'static>,
    changes: Option<MessageStream>,
}

impl Watcher {
    /// Subscribes to the changes of the VM at `path`. Call before asking for a state change.
    pub async fn new(conn: &Connection, path: OwnedObjectPath) -> Result<Self, VmctlError> {
        let changes = subscribe(conn, &path).await;
        let vm = proxies::vm(conn, path).await?;
        Ok(Self { vm, changes })
    }

    /// Waits until the VM is down.
    pub async fn wait_down(&mut self) -> Result<Down, VmctlError> {
        loop {
            if let Some(down) = self.check().await? {
                return Ok(down);
            }
            let Some(changes) = self.changes.as_mut() else {
                tokio::time::sleep(RECHECK_WITHOUT_SIGNALS).await;
                continue;
            };
            tokio::select! {
                message = next(changes) => match message {
                    Some(Ok(message)) => match down_from_signal(&message) {
                        Some(Down::Failed(reason)) if reason.is_empty() => {
                            return Ok(Down::Failed(self.failure_reason().await));
                        }
                        Some(down) => return Ok(down),
                        None => {}
                    },
                    Some(Err(_)) => {}
                    None => return Err(VmctlError::Message(
                        "lost the connection to vmd".to_owned(),
                    )),
                },
                () = tokio::time::sleep(RECHECK_WITH_SIGNALS) => {}
            }
        }
    }

    /// As [`Watcher::wait_down`], giving up (`None`) at `deadline` if there is one.
    pub async fn wait_down_until(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<Down>, VmctlError> {
        match deadline {
            None => self.wait_down().await.map(Some),
            Some(deadline) => match tokio::time::timeout_at(deadline, self.wait_down()).await {
                Ok(result) => result.map(Some),
                Err(_elapsed) => Ok(None),
            },
        }
    }

    /// Reads `State` (and `FailureReason` if it failed).
    async fn check(&self) -> Result<Option<Down>, VmctlError> {
        let state = match self.vm.state().await {
            Ok(state) => state,
            Err(error) if is_gone(&error) => return Ok(Some(Down::Gone)),
            Err(error) => return Err(error.into()),
        };
        match down_from_state(&state) {
            Some(Down::Failed(_)) => Ok(Some(Down::Failed(self.failure_reason().await))),
            down => Ok(down),
        }
    }

    /// `FailureReason`, or an empty string if it cannot be read (the VM may be gone already).
    async fn failure_reason(&self) -> String {
        self.vm.failure_reason().await.unwrap_or_default()
    }
}

/// The next message of `stream`.
async fn next(stream: &mut MessageStream) -> Option<zbus::Result<Message>> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// A stream of the `PropertiesChanged` signals of `org.vmd.vmd1.VM` at `path`, or `None` if the
/// subscription failed (the watcher then reads `State` periodically).
async fn subscribe(conn: &Connection, path: &OwnedObjectPath) -> Option<MessageStream> {
    let mut rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .path(path.as_ref())
        .arg(0, VM_INTERFACE);
    // On the bus only the daemon's signals count. A peer-to-peer connection has nobody else, and
    // its signals carry no sender.
    if conn.is_bus() {
        rule = rule.sender(SERVICE);
    }
    let rule = rule.build().ok()?;
    MessageStream::for_match_rule(rule, conn, None).await.ok()
}

/// The state a `PropertiesChanged` signal reports, if it reports one and it means "down"; with
/// the failure's reason if the same signal has it.
fn down_from_signal(message: &Message) -> Option<Down> {
    type Body = (String, HashMap<String, OwnedVariant>, Vec<String>);
    let (_interface, mut changed, _invalidated): Body = message.body().deserialize().ok()?;
    let state = String::try_from(changed.remove("State")?).ok()?;
    match down_from_state(&state)? {
        Down::Failed(_) => Some(Down::Failed(
            changed
                .remove("FailureReason")
                .and_then(|reason| String::try_from(reason).ok())
                .unwrap_or_default(),
        )),
        down => Some(down),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_that_mean_down() {
        assert_eq!(down_from_state("stopped"), Some(Down::Stopped));
        assert_eq!(down_from_state("defined"), Some(Down::Stopped));
        assert_eq!(down_from_state("failed"), Some(Down::Failed(String::new())));
        for running in ["starting", "running", "paused", "stopping"] {
            assert_eq!(down_from_state(running), None, "{running}");
        }
    }

    fn signal(changed: &[(&str, &str)]) -> Message {
        let changed: HashMap<&str, zbus::Variant<'_>> = changed
            .iter()
            .map(|&(key, value)| (key, zbus::Variant::from(value)))
            .collect();
        Message::signal(
            "/org/vmd/vmd1/vm/web",
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
        )
        .build(&(VM_INTERFACE, changed, Vec::<String>::new()))
        .expect("a valid signal")
    }

    #[test]
    fn signals_that_carry_the_state() {
        assert_eq!(
            down_from_signal(&signal(&[("State", "stopped")])),
            Some(Down::Stopped)
        );
        assert_eq!(
            down_from_signal(&signal(&[
                ("State", "failed"),
                ("FailureReason", "bad I/O")
            ])),
            Some(Down::Failed("bad I/O".into()))
        );
        assert_eq!(
            down_from_signal(&signal(&[("State", "failed")])),
            Some(Down::Failed(String::new()))
        );
        assert_eq!(down_from_signal(&signal(&[("State", "running")])), None);
        assert_eq!(down_from_signal(&signal(&[("Restarts", "x")])), None);
    }
}
