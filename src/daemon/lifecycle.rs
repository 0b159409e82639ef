//! A VM's states and the one function that moves between them (DESIGN.md, "State"): every
//! change of a VM's `State` is an [`Event`] fed to [`transition`], which says what the state
//! becomes or refuses. No bus, no helper, no systemd here, so each rule is tested alone.

/// The states of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Defined,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Failed,
}

impl VmState {
    pub const ALL: [VmState; 7] = [
        VmState::Defined,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Defined => "defined",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }

    /// The state named `name` (as [`VmState::as_str`] writes it).
    pub fn parse(name: &str) -> Option<VmState> {
        VmState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// A helper exists (or is being launched) in these states.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

/// What happens to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Start was called (or Autostart): a helper is about to be launched.
    Start,
    /// A helper that a previous daemon started is taken over.
    Adopt,
    /// The helper says the guest runs.
    HelperRunning,
    /// The helper says the guest is paused.
    HelperPaused,
    /// Shutdown was asked for (and sent to the helper).
    Shutdown,
    /// The guest rebooted and gets a fresh helper.
    Restart,
    /// The VM ended: its last helper is gone (or none could be launched).
    Ended { failed: bool },
}

/// A transition [`transition`] does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{event:?} is not possible in state {}", from.as_str())]
pub struct Refused {
    pub from: VmState,
    pub event: Event,
}

/// The state a VM in `from` goes to on `event`, or why not.
pub fn transition(from: VmState, event: Event) -> Result<VmState, Refused> {
    use Event as E;
    use VmState as S;
    let to = match (from, event) {
        (S::Defined | S::Stopped | S::Failed, E::Start) => S::Starting,
        // The helper is asked at once whether it is paused.
        (S::Defined | S::Stopped | S::Failed, E::Adopt) => S::Running,
        (S::Starting | S::Running | S::Paused, E::HelperRunning) => S::Running,
        (S::Starting | S::Running | S::Paused, E::HelperPaused) => S::Paused,
        // Stopping is final until the helper ends: a guest resumed to act on the power button
        // (or one a client had paused) does not make the VM running again.
        (S::Stopping, E::HelperRunning | E::HelperPaused) => S::Stopping,
        (S::Running | S::Paused, E::Shutdown) => S::Stopping,
        (S::Starting | S::Running | S::Paused, E::Restart) => S::Starting,
        (S::Starting | S::Running | S::Paused | S::Stopping, E::Ended { failed }) => {
            if failed {
                S::Failed
            } else {
                S::Stopped
            }
        }
        (
            S::Defined | S::Stopped | S::Failed,
            E::HelperRunning | E::HelperPaused | E::Shutdown | E::Restart | E::Ended { .. },
        )
        | (S::Starting | S::Running | S::Paused | S::Stopping, E::Start | E::Adopt)
        | (S::Starting | S::Stopping, E::Shutdown)
        | (S::Stopping, E::Restart) => return Err(Refused { from, event }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENTS: [Event; 8] = [
        Event::Start,
        Event::Adopt,
        Event::HelperRunning,
        Event::HelperPaused,
        Event::Shutdown,
        Event::Restart,
        Event::Ended { failed: false },
        Event::Ended { failed: true },
    ];

    /// Every event in `from`, against the expected outcome (None: refused).
    fn check(from: VmState, expected: [Option<VmState>; 8]) {
        for (event, expected) in EVENTS.into_iter().zip(expected) {
            assert_eq!(
                transition(from, event).ok(),
                expected,
                "{event:?} in {}",
                from.as_str()
            );
            if expected.is_none() {
                assert_eq!(transition(from, event), Err(Refused { from, event }));
            }
        }
    }

    use VmState::*;

    #[test]
    fn from_defined_only_start_or_adopt() {
        check(
            Defined,
            [
                Some(Starting),
                Some(Running),
                None,
                None,
                None,
                None,
                None,
                None,
            ],
        );
    }

    #[test]
    fn from_stopped_and_failed_as_from_defined() {
        for from in [Stopped, Failed] {
            check(
                from,
                [
                    Some(Starting),
                    Some(Running),
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                ],
            );
        }
    }

    #[test]
    fn from_starting() {
        check(
            Starting,
            [
                None,
                None,
                Some(Running),
                Some(Paused),
                None,
                Some(Starting),
                Some(Stopped),
                Some(Failed),
            ],
        );
    }

    #[test]
    fn from_running() {
        check(
            Running,
            [
                None,
                None,
                Some(Running),
                Some(Paused),
                Some(Stopping),
                Some(Starting),
                Some(Stopped),
                Some(Failed),
            ],
        );
    }

    #[test]
    fn from_paused() {
        check(
            Paused,
            [
                None,
                None,
                Some(Running),
                Some(Paused),
                Some(Stopping),
                Some(Starting),
                Some(Stopped),
                Some(Failed),
            ],
        );
    }

    #[test]
    fn from_stopping_only_the_end_leaves_it() {
        check(
            Stopping,
            [
                None,
                None,
                Some(Stopping),
                Some(Stopping),
                None,
                None,
                Some(Stopped),
                Some(Failed),
            ],
        );
    }

    #[test]
    fn state_names_read_back() {
        for state in VmState::ALL {
            assert_eq!(VmState::parse(state.as_str()), Some(state));
        }
        assert_eq!(VmState::parse("running "), None);
    }
}
