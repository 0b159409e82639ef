//! A virtio device's worker thread: waits on its queues' notification eventfds (written by KVM
//! when the guest writes QueueNotify) and serves the activated queues.
//!
//! The thread is started while the VM is built, before the helper's lock-down, and installs
//! its own seccomp filter first. A failure or panic while serving a queue marks the device
//! NEEDS_RESET and is logged; the VM goes on. When the VM ends the worker is told to exit and
//! flushes its device (disks) before it does.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{DeviceShared, INTERRUPT_USED_BUFFER, QueueHandler};
use crate::devices::{GuestStop, StopSignal};

/// The kinds of worker, each with its own seccomp allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    /// Disk I/O: vectored reads and writes, flushes.
    Block,
    /// getrandom(2).
    Entropy,
    /// Frames to and from a tap.
    Net,
}

/// Runs first on every worker thread (the helper installs the thread's seccomp filter).
pub type WorkerSetup = Arc<dyn Fn(WorkerKind) -> Result<(), String> + Send + Sync>;

/// Everything a worker thread owns.
pub struct Worker {
    pub name: String,
    pub kind: WorkerKind,
    pub handler: Box<dyn QueueHandler>,
    pub shared: Arc<DeviceShared>,
    pub memory: GuestMemoryMmap,
    /// One per queue, in queue order.
    pub queue_events: Vec<EventFd>,
}

/// What woke the worker.
enum Wake {
    Exit,
    Ready { queues: Vec<usize>, backend: bool },
}

/// A running worker.
pub struct WorkerHandle {
    name: String,
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread; it runs `setup`, then serves until [`WorkerHandle::stop`].
    pub fn spawn(self, setup: WorkerSetup, stop: Arc<StopSignal>) -> std::io::Result<WorkerHandle> {
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let exit_for_thread = exit.try_clone()?;
        let name = self.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-{name}"))
            .spawn(move || {
                if let Err(reason) = setup(self.kind) {
                    stop.request(GuestStop::Failure(format!(
                        "cannot set up the {} worker thread: {reason}",
                        self.name
                    )));
                    return;
                }
                self.run(&exit_for_thread);
            })?;
        Ok(WorkerHandle {
            name,
            exit,
            thread: Some(thread),
        })
    }

    fn run(mut self, exit: &EventFd) {
        // The activation the handler was last told about, and whether the device is active
        // and healthy (only then is the backend fd worth waiting on).
        let mut seen_generation = 0;
        let mut serving = false;
        loop {
            let (queues, backend) = match self.wait(exit, serving) {
                Ok(Wake::Ready { queues, backend }) => (queues, backend),
                Ok(Wake::Exit) => break,
                Err(err) => {
                    tracing::error!("{}: waiting for the guest failed: {err}", self.name);
                    break;
                }
            };
            for &index in &queues {
                if let Some(event) = self.queue_events.get(index) {
                    // Clear the notification before looking at the ring, so a later one is
                    // never lost.
                    let _ = event.read();
                }
            }
            serving = self.serve(&mut seen_generation, &queues, backend);
        }
        if let Err(err) = self.handler.flush() {
            tracing::error!("{}: flushing before exit failed: {err}", self.name);
        }
    }

    /// Waits for queue notifications and the backend fd.
    fn wait(&self, exit: &EventFd, serving: bool) -> nix::Result<Wake> {
        let backend = self.handler.backend_fd().filter(|_| serving);
        let mut fds: Vec<PollFd<'_>> = self
            .queue_events
            .iter()
            .chain(std::iter::once(exit))
            .map(|event| PollFd::new(borrow_event(event), PollFlags::POLLIN))
            .collect();
        let queue_count = self.queue_events.len();
        if let Some(fd) = backend {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(err) => return Err(err),
            }
        }
        let readable = |fd: &PollFd<'_>| fd.any().unwrap_or(false);
        if readable(&fds[queue_count]) {
            return Ok(Wake::Exit);
        }
        let queues = fds[..queue_count]
            .iter()
            .enumerate()
            .filter(|(_, fd)| readable(fd))
            .map(|(index, _)| index)
            .collect();
        let backend = fds.get(queue_count + 1).is_some_and(readable);
        Ok(Wake::Ready { queues, backend })
    }

    /// Serves the notified queues and the backend if the device is active and healthy;
    /// returns whether it is.
    fn serve(&mut self, seen_generation: &mut u64, queues: &[usize], backend: bool) -> bool {
        let mut serving = false;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut active = self.shared.lock_active();
            let Some(active) = active.as_mut() else {
                return Ok(false);
            };
            if self.shared.needs_reset() {
                return Ok(false);
            }
            if active.generation != *seen_generation {
                *seen_generation = active.generation;
                self.handler.activate(active.features)?;
            }
            serving = true;
            let mut used = false;
            for &index in queues {
                let Some(queue) = active.queues.get_mut(index) else {
                    continue;
                };
                if virtio_queue::QueueT::ready(queue) {
                    used |= self.handler.process_queue(index, queue, &self.memory)?;
                }
            }
            if backend {
                used |= self
                    .handler
                    .process_backend(&mut active.queues, &self.memory)?;
            }
            Ok(used)
        }));
        match outcome {
            Ok(Ok(true)) => self.shared.interrupt.raise(INTERRUPT_USED_BUFFER),
            Ok(Ok(false)) => {}
            Ok(Err(err)) => {
                let err: super::DeviceError = err;
                serving = false;
                tracing::error!(
                    "{}: {}; the device needs a reset by the guest",
                    self.name,
                    crate::helper::error_chain(&err)
                );
                self.shared.set_needs_reset();
            }
            Err(_) => {
                tracing::error!(
                    "{}: serving the device panicked; it needs a reset by the guest",
                    self.name
                );
                self.shared.set_needs_reset();
                serving = false;
            }
        }
        serving
    }
}

/// vmm-sys-util's EventFd has no `AsFd`; borrow its fd for as long as the EventFd is borrowed.
fn borrow_event(event: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the fd belongs to `event`, which outlives the returned borrow.
    unsafe { BorrowedFd::borrow_raw(event.as_raw_fd()) }
}

impl WorkerHandle {
    /// Tells the worker to exit, and waits until it has flushed its device and ended.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(err) = self.exit.write(1) {
            tracing::error!("cannot tell the {} worker to exit: {err}", self.name);
            return;
        }
        if thread.join().is_err() {
            tracing::error!("the {} worker panicked while exiting", self.name);
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
