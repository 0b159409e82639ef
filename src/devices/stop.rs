//! How devices and vCPUs tell the VMM that the VM must stop: the guest powered off, asked for a
//! reboot, or something failed. One mechanism for all of them (i8042, ACPI PM1, vCPU errors).

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Why the VM stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 or ACPI reset register).
    Reboot,
    /// The VM cannot go on: a vCPU hit an error, a triple fault, or a VMM fault.
    Failure(String),
}

impl GuestStop {
    /// A failure outranks a power-off or reboot that raced with it: the failure is what the
    /// user needs to hear about.
    fn outranks(&self, other: &GuestStop) -> bool {
        matches!(self, GuestStop::Failure(_)) && !matches!(other, GuestStop::Failure(_))
    }
}

/// Shared by every device and vCPU thread; the main loop polls [`StopSignal::event_fd`].
pub struct StopSignal {
    reason: Mutex<Option<GuestStop>>,
    event: EventFd,
}

impl StopSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(StopSignal {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records why the VM must stop and wakes the main loop. The first reason wins, except
    /// that a failure replaces an earlier power-off or reboot.
    pub fn request(&self, stop: GuestStop) {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        match reason.as_ref() {
            Some(current) if !stop.outranks(current) => {}
            _ => *reason = Some(stop),
        }
        drop(reason);
        if let Err(err) = self.event.write(1) {
            // Only an overflowing counter fails; the reason is recorded, and the main loop
            // also checks it after every wake-up.
            tracing::warn!("cannot signal the VM stop event: {err}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<GuestStop> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_requested(&self) -> bool {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Readable when a stop was requested; reading it resets the counter.
    pub fn event_fd(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_but_failure_outranks() {
        let stop = StopSignal::new().expect("eventfd");
        assert_eq!(stop.reason(), None);
        stop.request(GuestStop::PowerOff);
        stop.request(GuestStop::Reboot);
        assert_eq!(stop.reason(), Some(GuestStop::PowerOff));
        stop.request(GuestStop::Failure("triple fault".into()));
        stop.request(GuestStop::Failure("later".into()));
        assert_eq!(
            stop.reason(),
            Some(GuestStop::Failure("triple fault".into()))
        );
        assert_eq!(stop.event_fd().read().expect("signalled"), 4);
    }
}
