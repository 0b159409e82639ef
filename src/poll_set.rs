//! poll(2) over a set of fds that changes from one round to the next, each tagged with what it
//! is: the shape of the helper's event loop and of `vmd run`'s relay.

use std::os::fd::BorrowedFd;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// The fds to wait on this round, each with its tag `S`.
pub struct PollSet<'fd, S> {
    sources: Vec<S>,
    fds: Vec<PollFd<'fd>>,
}

impl<'fd, S: Copy> PollSet<'fd, S> {
    pub fn new() -> Self {
        PollSet {
            sources: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Waits on `fd` for `events`, reporting it as `source`.
    pub fn watch(&mut self, source: S, fd: BorrowedFd<'fd>, events: PollFlags) {
        self.sources.push(source);
        self.fds.push(PollFd::new(fd, events));
    }

    /// Waits until an fd is ready, `timeout` passes or a signal arrives (then nothing is
    /// ready), and returns the ready sources in the order they were added.
    pub fn wait(mut self, timeout: PollTimeout) -> nix::Result<Vec<S>> {
        match poll(&mut self.fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(err) => return Err(err),
        }
        Ok(self
            .sources
            .iter()
            .zip(&self.fds)
            .filter(|(_, fd)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(source, _)| *source)
            .collect())
    }
}

impl<S: Copy> Default for PollSet<'_, S> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn only_the_ready_sources_come_back_in_order() {
        let (idle_read, _idle_write) = nix::unistd::pipe().unwrap();
        let (ready_read, ready_write) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&ready_write, b"x").unwrap();
        let mut set = PollSet::new();
        set.watch("idle", idle_read.as_fd(), PollFlags::POLLIN);
        set.watch("ready", ready_read.as_fd(), PollFlags::POLLIN);
        set.watch("writable", ready_write.as_fd(), PollFlags::POLLOUT);
        assert_eq!(set.wait(PollTimeout::NONE).unwrap(), ["ready", "writable"]);
        let mut set = PollSet::new();
        set.watch("idle", idle_read.as_fd(), PollFlags::POLLIN);
        assert!(set.wait(PollTimeout::ZERO).unwrap().is_empty());
    }
}
