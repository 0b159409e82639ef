//! vCPU threads: the run loop, exit handling, and pause/resume/stop.
//!
//! Each vCPU runs `KVM_RUN` on its own thread. The VMM controls them through [`VcpuControl`]:
//! it stores the wanted state in an atomic and kicks each thread once with a signal. The
//! signal's handler sets the thread's `kvm_run.immediate_exit`, so a kick that lands after the
//! thread checked the state but before it entered the guest still makes `KVM_RUN` return at
//! once (EINTR); the thread then clears the flag, sees the new state, and parks or returns.
//! Exits that end the VM go through the shared [`StopSignal`].

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use nix::errno::Errno;

use crate::devices::{Bus, GuestStop, StopSignal};

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run` mapping, while a vCPU runs on it (null elsewhere). Constant
    /// initialization and no destructor: reading it is plain TLS access, safe in a signal
    /// handler.
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Installs the kick handler. Call once, before vCPU threads start.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let run = KVM_RUN.with(Cell::get);
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by `Vcpu::run`
            // before the first KVM_RUN and cleared before the mapping goes away; a byte store
            // is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    }
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

/// What the VMM wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunRequest {
    Run,
    Pause,
    Stop,
}

impl RunRequest {
    fn from_u8(value: u8) -> RunRequest {
        match value {
            0 => RunRequest::Run,
            1 => RunRequest::Pause,
            _ => RunRequest::Stop,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            RunRequest::Run => 0,
            RunRequest::Pause => 1,
            RunRequest::Stop => 2,
        }
    }
}

/// Shared between the VMM thread and all vCPU threads.
pub struct VcpuControl {
    /// The wanted state, read by every vCPU before each `KVM_RUN` without a lock.
    request: AtomicU8,
    /// vCPU threads currently parked (paused, or not yet started), and the condition variable
    /// both sides wait on.
    parked: Mutex<usize>,
    changed: Condvar,
}

impl VcpuControl {
    /// vCPUs start paused: nothing runs until the VMM says [`RunRequest::Run`].
    pub fn new() -> Self {
        VcpuControl {
            request: AtomicU8::new(RunRequest::Pause.as_u8()),
            parked: Mutex::new(0),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request(&self) -> RunRequest {
        RunRequest::from_u8(self.request.load(Ordering::SeqCst))
    }

    fn set_request(&self, request: RunRequest) {
        // Stored under the lock so that a thread about to park cannot miss the wake-up.
        let parked = self.lock();
        self.request.store(request.as_u8(), Ordering::SeqCst);
        drop(parked);
        self.changed.notify_all();
    }

    /// Parks the calling vCPU thread while `keep_parked(request)`; returns the request that
    /// ended the wait.
    fn park_while(&self, keep_parked: impl Fn(RunRequest) -> bool) -> RunRequest {
        let mut parked = self.lock();
        *parked += 1;
        self.changed.notify_all();
        while keep_parked(self.request()) {
            parked = self.changed.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        *parked -= 1;
        self.request()
    }
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything a vCPU thread touches.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stop: Arc<StopSignal>,
}

/// What one `KVM_RUN` exit means for the loop.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// The run was interrupted by a kick: look at the control state.
    Interrupted,
    /// The VM cannot continue; the reason is the failure to report.
    Fail(String),
}

/// Maps one exit to what the loop does next. Device accesses go to the buses, which ignore
/// addresses nobody decodes; everything the VMM cannot handle is a failure with a reason.
/// `io_size` is the size of one port access of an I/O exit (`kvm_run.io.size`).
pub fn handle_exit(
    exit: Result<VcpuExit<'_>, kvm_ioctls::Error>,
    io_size: u8,
    pio: &Bus,
    mmio: &Bus,
) -> ExitAction {
    match exit {
        Ok(VcpuExit::IoOut(port, data)) => {
            for access in data.chunks(pio_access_size(io_size, data.len())) {
                tracing::trace!("port write {port:#x} {access:?}");
                pio.write(u64::from(port), access);
            }
            ExitAction::Continue
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            let size = pio_access_size(io_size, data.len());
            for access in data.chunks_mut(size) {
                pio.read(u64::from(port), access);
                tracing::trace!("port read {port:#x} {access:?}");
            }
            ExitAction::Continue
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            tracing::trace!("MMIO write {addr:#x} {data:?}");
            mmio.write(addr, data);
            ExitAction::Continue
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            mmio.read(addr, data);
            tracing::trace!("MMIO read {addr:#x} {data:?}");
            ExitAction::Continue
        }
        // With the in-kernel irqchip a halted vCPU waits in the kernel; an exit here means the
        // guest halted with interrupts off, which on a PC is how a CPU stops for good.
        Ok(VcpuExit::Hlt) => ExitAction::Interrupted,
        Ok(VcpuExit::Shutdown) => {
            ExitAction::Fail("the guest triple-faulted (KVM_EXIT_SHUTDOWN)".to_string())
        }
        Ok(VcpuExit::InternalError) => ExitAction::Fail(
            "KVM could not emulate a guest instruction (KVM_EXIT_INTERNAL_ERROR)".to_string(),
        ),
        Ok(VcpuExit::FailEntry(reason, cpu)) => ExitAction::Fail(format!(
            "KVM could not enter the guest (hardware entry failure reason {reason:#x} on cpu {cpu})"
        )),
        Ok(VcpuExit::SystemEvent(kind, _)) => {
            ExitAction::Fail(format!("unexpected KVM system event {kind}"))
        }
        Ok(other) => ExitAction::Fail(format!("unexpected vCPU exit {other:?}")),
        Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
            ExitAction::Interrupted
        }
        Err(err) => ExitAction::Fail(format!("KVM_RUN failed: {err}")),
    }
}

/// The size of each access in a port I/O exit's data. String I/O (`rep ins`/`rep outs`)
/// arrives as one exit with `count * size` bytes: the port sees `count` accesses of `size`
/// bytes each, in order. A size KVM never reports falls back to one access of the whole data.
fn pio_access_size(io_size: u8, len: usize) -> usize {
    let size = usize::from(io_size);
    if matches!(size, 1 | 2 | 4) && len.is_multiple_of(size) {
        size
    } else {
        len.max(1)
    }
}

impl Vcpu {
    /// The thread body: parked until the first `Run`, then runs the guest until told to stop
    /// or the VM must stop.
    pub fn run(mut self, control: &VcpuControl) {
        let kvm_run: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|cell| cell.set(kvm_run));
        self.run_until_stopped(control);
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }

    fn run_until_stopped(&mut self, control: &VcpuControl) {
        loop {
            match control.request() {
                RunRequest::Stop => return,
                RunRequest::Pause => {
                    control.park_while(|request| request == RunRequest::Pause);
                    continue;
                }
                RunRequest::Run => {}
            }
            if self.stop.is_requested() {
                // The VM is ending: run no more guest code, wait for the VMM to stop us.
                control.park_while(|request| request != RunRequest::Stop);
                return;
            }
            let kvm_run: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
            let exit = self.fd.run();
            let io_size = match exit {
                Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => {
                    // SAFETY: `kvm_run` points into this vCPU's kvm_run mapping, which lives as
                    // long as `self.fd`; for this I/O exit the kernel filled the `io` member of
                    // the union. Only that header field is read: the data the exit borrows
                    // lies elsewhere in the mapping, at `io.data_offset` past the struct.
                    unsafe { std::ptr::addr_of!((*kvm_run).__bindgen_anon_1.io.size).read() }
                }
                _ => 0,
            };
            let action = handle_exit(exit, io_size, &self.pio, &self.mmio);
            if action == ExitAction::Interrupted {
                // A kick set immediate_exit; clear it before the next entry (a kick from now
                // on sets it again).
                self.fd.set_kvm_immediate_exit(0);
            }
            if let ExitAction::Fail(reason) = action {
                let reason = self.describe_failure(&reason);
                tracing::error!("{reason}");
                self.stop.request(GuestStop::Failure(reason));
            }
        }
    }

    /// Adds where the guest was to a failure reason.
    fn describe_failure(&mut self, reason: &str) -> String {
        let internal = {
            let run = self.fd.get_kvm_run();
            if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
                // SAFETY: exit_reason says the `internal` member of the union is the valid one.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                format!(" suberror {}", internal.suberror)
            } else {
                String::new()
            }
        };
        match self.fd.get_regs() {
            Ok(regs) => format!(
                "vCPU {}: {reason}{internal} at rip {:#x}",
                self.index, regs.rip
            ),
            Err(_) => format!("vCPU {}: {reason}{internal}", self.index),
        }
    }
}

/// The running vCPU threads.
pub struct VcpuThreads {
    control: Arc<VcpuControl>,
    handles: Vec<JoinHandle<()>>,
}

impl VcpuThreads {
    pub fn new(control: Arc<VcpuControl>, handles: Vec<JoinHandle<()>>) -> Self {
        VcpuThreads { control, handles }
    }

    pub fn resume(&self) {
        self.control.set_request(RunRequest::Run);
    }

    /// Pauses every vCPU and returns once all of them are parked outside `KVM_RUN`.
    pub fn pause(&self) {
        self.control.set_request(RunRequest::Pause);
        self.kick();
        let mut parked = self.control.lock();
        while *parked < self.live_threads() {
            // A thread that died (a panic) never parks; the timeout lets the count catch up.
            parked = self
                .control
                .changed
                .wait_timeout(parked, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(mut self) {
        self.control.set_request(RunRequest::Stop);
        self.kick();
        for handle in self.handles.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }

    fn live_threads(&self) -> usize {
        self.handles.iter().filter(|h| !h.is_finished()).count()
    }

    /// Kicks every live thread once: its handler makes the current or next `KVM_RUN` return.
    fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        for handle in self.handles.iter().filter(|h| !h.is_finished()) {
            // SAFETY: the pthread_t belongs to a thread we spawned and have not joined, so it
            // is valid; the signal's handler is installed.
            let ret = unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
            if ret != 0 && ret != libc::ESRCH {
                tracing::warn!("cannot kick a vCPU thread: {}", Errno::from_raw(ret));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_exits_continue_and_faults_fail() {
        let pio = Bus::new("pio");
        let mmio = Bus::new("mmio");
        let mut data = [0u8; 2];
        assert_eq!(
            handle_exit(Ok(VcpuExit::IoIn(0x4400, &mut data)), 2, &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(
            handle_exit(
                Ok(VcpuExit::MmioWrite(0xd000_0000, &[1, 2, 3, 4])),
                0,
                &pio,
                &mmio
            ),
            ExitAction::Continue
        );
        assert!(
            matches!(handle_exit(Ok(VcpuExit::Shutdown), 0, &pio, &mmio), ExitAction::Fail(r) if r.contains("triple"))
        );
        assert!(matches!(
            handle_exit(Ok(VcpuExit::InternalError), 0, &pio, &mmio),
            ExitAction::Fail(_)
        ));
        assert_eq!(
            handle_exit(Err(kvm_ioctls::Error::new(libc::EINTR)), 0, &pio, &mmio),
            ExitAction::Interrupted
        );
        assert!(matches!(
            handle_exit(Err(kvm_ioctls::Error::new(libc::EFAULT)), 0, &pio, &mmio),
            ExitAction::Fail(_)
        ));
    }

    /// Records each access it sees; reads return 0x10, 0x11, ... in order.
    #[derive(Default)]
    struct Port {
        writes: Vec<Vec<u8>>,
        reads: Vec<usize>,
    }

    impl crate::devices::bus::BusDevice for Port {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            self.reads.push(data.len());
            data.fill(0x10 + self.reads.len() as u8 - 1);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.writes.push(data.to_vec());
        }
    }

    #[test]
    fn string_port_io_is_one_access_per_element() {
        let port = Arc::new(Mutex::new(Port::default()));
        let mut pio = Bus::new("pio");
        pio.insert(0x3f8, 8, port.clone()).expect("insert");
        let mmio = Bus::new("mmio");

        // rep outsb of 3 bytes: three 1-byte writes, not one 3-byte write the port ignores.
        let action = handle_exit(Ok(VcpuExit::IoOut(0x3f8, b"abc")), 1, &pio, &mmio);
        assert_eq!(action, ExitAction::Continue);
        // rep insw of 2 words: two 2-byte reads, each filling its own element.
        let mut words = [0u8; 4];
        handle_exit(Ok(VcpuExit::IoIn(0x3f8, &mut words)), 2, &pio, &mmio);
        let port = port.lock().unwrap();
        assert_eq!(port.writes, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(port.reads, [2, 2]);
        assert_eq!(words, [0x10, 0x10, 0x11, 0x11]);
    }

    #[test]
    fn sizes_kvm_never_reports_are_one_access() {
        assert_eq!(pio_access_size(1, 3), 1);
        assert_eq!(pio_access_size(4, 8), 4);
        assert_eq!(pio_access_size(0, 3), 3);
        assert_eq!(pio_access_size(4, 6), 6);
        assert_eq!(pio_access_size(8, 8), 8);
        assert_eq!(pio_access_size(0, 0), 1);
    }
}
