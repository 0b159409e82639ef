//! Per-thread seccomp allow-lists (the `pledge` part of the sandbox).
//!
//! Each kind of helper thread has its own table, [`vmm_allow_list`] and [`vcpu_allow_list`]: one
//! line per system call, with the argument conditions under which it is allowed and a comment
//! naming who needs it. Anything not listed kills the whole process (`SECCOMP_RET_KILL_PROCESS`,
//! `SIGSYS`); the kernel logs the system call number (`journalctl -k`, `type=1326 ... syscall=N`),
//! which is how to find what a table lacks (without auditd these messages are printk
//! rate-limited: of a burst of kills only the first ten or so show).
//!
//! Two std behaviours matter here: in builds with debug assertions, dropping an `OwnedFd`
//! (`File`, sockets, kvm-ioctls' fds) first checks it with `fcntl(fd, F_GETFD)`; and
//! `set_nonblocking` on std sockets uses `ioctl(FIONBIO)` (not allowed: use `fcntl(F_SETFL)`).
//!
//! The helper is a plain std program on glibc, x86_64 only. Integer arguments are compared as
//! 32-bit values (`Dword`): the kernel truncates `int`/`unsigned int` arguments, so the upper
//! half may hold garbage (e.g. an `ioctl` request passed sign-extended) and must not matter.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;

use kvm_bindings::{KVMIO, kvm_irq_level, kvm_regs, kvm_sregs};
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::{_IOC_NONE, _IOC_READ, _IOC_WRITE, ioctl_expr};

use super::SandboxMode;

/// The kinds of threads in the helper, each with its own seccomp allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: control socket, console, event loop, kicking vCPU threads.
    Vmm,
    /// A vCPU thread: `KVM_RUN` loop and the device emulation it calls.
    Vcpu,
    /// A virtio-blk worker: disk image I/O.
    Block,
    /// The virtio-rng worker: getrandom.
    Entropy,
    /// A virtio-net worker: frames to and from its tap.
    Net,
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThreadKind::Vmm => "VMM",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Block => "block device",
            ThreadKind::Entropy => "entropy device",
            ThreadKind::Net => "network device",
        })
    }
}

/// Errors from [`apply_seccomp`].
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter for {0} threads")]
    Build(ThreadKind, #[source] BackendError),
    #[error("cannot install the seccomp filter of {0} threads")]
    Install(ThreadKind, #[source] seccompiler::Error),
}

/// Installs the seccomp filter of `kind` for the calling thread only (no `TSYNC`).
///
/// A system call outside the allow-list kills the process (`SECCOMP_RET_KILL_PROCESS`).
/// Sets no_new_privs (required by the kernel without `CAP_SYS_ADMIN`). Disabled mode: no-op.
pub fn apply_seccomp(kind: ThreadKind, mode: SandboxMode) -> Result<(), SeccompError> {
    if mode == SandboxMode::Disabled {
        return Ok(());
    }
    let program = build_filter(kind).map_err(|err| SeccompError::Build(kind, err))?;
    let refusals = refusal_filter().map_err(|err| SeccompError::Build(kind, err))?;
    tracing::debug!(
        "installing the seccomp filter of {kind} threads ({} instructions)",
        program.len()
    );
    // Of two filters the kernel takes the stricter answer: the refusal filter's EACCES wins
    // over the allow-list's Allow for exactly the refused calls.
    seccompiler::apply_filter(&refusals).map_err(|err| SeccompError::Install(kind, err))?;
    seccompiler::apply_filter(&program).map_err(|err| SeccompError::Install(kind, err))
}

/// System calls every thread may make and always gets EACCES for, instead of being killed:
/// glibc's malloc opens `/proc/sys/vm/overcommit_memory` the first time a thread's arena
/// shrinks (a block worker freeing qcow2 cache buffers does), and copes with the refusal.
/// Landlock refuses every path anyway; this only keeps the attempt from killing the VM.
const REFUSED_WITH_EACCES: [libc::c_long; 2] = [libc::SYS_open, libc::SYS_openat];

fn refusal_filter() -> Result<BpfProgram, BackendError> {
    let rules = REFUSED_WITH_EACCES
        .iter()
        .map(|&syscall| (syscall, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )?;
    BpfProgram::try_from(filter)
}

/// Compiles the allow-list of `kind` to BPF.
fn build_filter(kind: ThreadKind) -> Result<BpfProgram, BackendError> {
    let context = Context {
        // SAFETY: getpid has no preconditions and cannot fail.
        pid: unsafe { libc::getpid() },
    };
    let list = match kind {
        ThreadKind::Vmm => vmm_allow_list(&context),
        ThreadKind::Vcpu => vcpu_allow_list(&context),
        ThreadKind::Block => block_allow_list(&context),
        ThreadKind::Entropy => worker_allow_list(&context),
        ThreadKind::Net => net_allow_list(&context),
    };
    compile(list)
}

// KVM ioctl requests, computed like the kernel's _IO* macros in <linux/kvm.h> (kvm-ioctls
// keeps its own constants private). The request argument of ioctl(2) is compared on 32 bits.

/// `_IO(KVMIO, 0x80)`: enter the guest (vCPU fd).
const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0);
/// `_IOW(KVMIO, 0x61, struct kvm_irq_level)`: raise or lower a GSI (VM fd).
const KVM_IRQ_LINE: u64 = ioctl_expr(_IOC_WRITE, KVMIO, 0x61, size_of::<kvm_irq_level>() as u32);
/// `_IOR(KVMIO, 0x81, struct kvm_regs)`: read the general-purpose registers (vCPU fd).
const KVM_GET_REGS: u64 = ioctl_expr(_IOC_READ, KVMIO, 0x81, size_of::<kvm_regs>() as u32);
/// `_IOR(KVMIO, 0x83, struct kvm_sregs)`: read the segment and control registers (vCPU fd).
const KVM_GET_SREGS: u64 = ioctl_expr(_IOC_READ, KVMIO, 0x83, size_of::<kvm_sregs>() as u32);

/// Values only known at run time that allow-lists refer to.
struct Context {
    /// This process: signals may only go to its own threads.
    pid: libc::pid_t,
}

/// One line of an allow-list: a system call and when it is allowed.
struct Allow {
    syscall: libc::c_long,
    when: When,
}

/// The argument conditions under which a system call is allowed.
enum When {
    /// With any arguments.
    Always,
    /// When 32-bit argument `arg` (0-based) is one of `values`.
    ArgIn { arg: u8, values: Vec<u64> },
    /// When 32-bit argument `arg` has none of the bits of `mask` set.
    BitsClear { arg: u8, mask: u64 },
    /// When every 32-bit argument `(arg, value)` listed has that value.
    ArgsEqual(Vec<(u8, u64)>),
}

/// `syscall` with any arguments.
fn allow(syscall: libc::c_long) -> Allow {
    Allow {
        syscall,
        when: When::Always,
    }
}

/// `syscall` when `when` holds.
fn allow_if(syscall: libc::c_long, when: When) -> Allow {
    Allow { syscall, when }
}

/// Memory management: glibc malloc (a thread's first allocation creates an arena with
/// mmap + mprotect; large blocks are mmap'd, grown with mremap, returned with munmap or
/// madvise; the main arena grows with brk), std's per-thread signal stack (mmap, mprotect of
/// its guard page, munmap at thread exit) and glibc releasing a dead thread's stack (madvise).
/// Never executable: no mapping or protection change with `PROT_EXEC`.
fn memory_allow_list() -> Vec<Allow> {
    let no_exec = || When::BitsClear {
        arg: 2,
        mask: libc::PROT_EXEC as u64,
    };
    vec![
        allow_if(libc::SYS_mmap, no_exec()),
        allow_if(libc::SYS_mprotect, no_exec()),
        allow(libc::SYS_munmap),
        allow(libc::SYS_mremap),
        allow(libc::SYS_madvise),
        allow(libc::SYS_brk),
    ]
}

/// The main (VMM) thread: event loop on the control socket, console and eventfds, interrupt
/// injection, kicking vCPU threads. Spawns no thread, opens no file, creates no socket.
fn vmm_allow_list(context: &Context) -> Vec<Allow> {
    let mut list = vec![
        // Event loop.
        allow(libc::SYS_ppoll), // nix::poll::ppoll
        allow(libc::SYS_poll),  // nix::poll::poll, glibc poll()
        // Console, eventfds, pipes; tracing to stderr.
        allow(libc::SYS_read),
        allow(libc::SYS_write),
        allow(libc::SYS_readv),
        allow(libc::SYS_writev),
        // Control socket (SOCK_SEQPACKET, no fds are passed over it): nix's socket::recv and
        // socket::send are glibc recv()/send(), i.e. recvfrom and sendto.
        allow(libc::SYS_recvfrom),
        allow(libc::SYS_sendto),
        // Interrupt injection on the VM fd, vCPU state for error reports.
        allow_if(
            libc::SYS_ioctl,
            When::ArgIn {
                arg: 1,
                values: vec![KVM_IRQ_LINE, KVM_GET_REGS, KVM_GET_SREGS],
            },
        ),
        // Non-blocking mode of the console and socket fds (F_GETFL, F_SETFL; std's
        // set_nonblocking on sockets uses ioctl(FIONBIO) instead, which is not allowed);
        // F_GETFD: std built with debug assertions checks an OwnedFd is open before closing it.
        allow_if(
            libc::SYS_fcntl,
            When::ArgIn {
                arg: 1,
                values: vec![
                    libc::F_GETFL as u64,
                    libc::F_SETFL as u64,
                    libc::F_GETFD as u64,
                ],
            },
        ),
        // Dropping fds (OwnedFd, File, sockets).
        allow(libc::SYS_close),
        // std Mutex, Condvar, JoinHandle::join, OnceLock.
        allow(libc::SYS_futex),
        // Kicking vCPU threads out of KVM_RUN, and glibc abort() (raise); only to threads of
        // this process.
        allow_if(
            libc::SYS_tgkill,
            When::ArgIn {
                arg: 0,
                values: vec![context.pid as u64],
            },
        ),
        // Signal masks (glibc abort, thread exit); returning from a signal handler.
        allow(libc::SYS_rt_sigprocmask),
        allow(libc::SYS_rt_sigreturn),
        // An interrupted futex wait with a timeout (Condvar::wait_timeout) or sleep resumes.
        allow(libc::SYS_restart_syscall),
        // std's stack overflow handler: sigaltstack is queried and disabled at thread exit.
        allow(libc::SYS_sigaltstack),
        // Time: Instant/SystemTime (normally in the vDSO, this is the fallback), sleeps.
        allow(libc::SYS_clock_gettime),
        allow(libc::SYS_clock_nanosleep), // std::thread::sleep
        allow(libc::SYS_nanosleep),
        allow(libc::SYS_sched_yield), // std's spin-then-park paths
        // std's HashMap seeds (per thread, on first use).
        allow(libc::SYS_getrandom),
        // Thread and process ids: tracing, glibc raise().
        allow(libc::SYS_getpid),
        allow(libc::SYS_gettid),
        // Leaving: std::process::exit (exit_group), thread exit (exit).
        allow(libc::SYS_exit_group),
        allow(libc::SYS_exit),
        // Not allowed, on purpose: rt_sigaction (install the kick handler before the filter),
        // clone/clone3 (spawn vCPU threads before), open/openat/socket/connect/execve (landlock
        // denies them anyway), wait4 (the helper has no children), fstat/statx (no file reads).
    ];
    list.extend(memory_allow_list());
    list
}

/// What every helper thread but the VMM's needs to live and end: the mutexes and condition
/// variables it shares, dropping its fds, signal masks and stacks at exit, time and ids for
/// tracing, std's HashMap seeds, glibc abort() on itself, and memory.
fn thread_allow_list(context: &Context) -> Vec<Allow> {
    let mut list = vec![
        // std Mutex and Condvar shared with the VMM thread and devices; joins.
        allow(libc::SYS_futex),
        // The thread's own fds are dropped when it ends: close, and in debug builds std's
        // check that an OwnedFd is still open, fcntl(F_GETFD).
        allow(libc::SYS_close),
        allow_if(
            libc::SYS_fcntl,
            When::ArgIn {
                arg: 1,
                values: vec![libc::F_GETFD as u64],
            },
        ),
        // Returning from a signal handler (the vCPU kick); a futex wait with a timeout
        // interrupted by a signal resumes through restart_syscall.
        allow(libc::SYS_rt_sigreturn),
        allow(libc::SYS_restart_syscall),
        // Thread exit: glibc blocks signals, std disables and unmaps its signal stack (and a
        // VcpuFd's kvm_run mapping is unmapped, see memory_allow_list).
        allow(libc::SYS_rt_sigprocmask),
        allow(libc::SYS_sigaltstack),
        // Time for tracing timestamps (normally in the vDSO, this is the fallback).
        allow(libc::SYS_clock_gettime),
        allow(libc::SYS_sched_yield), // std's spin-then-park paths
        // std's HashMap seeds (per thread, on first use); the entropy device's source.
        allow(libc::SYS_getrandom),
        // Thread and process ids: tracing, glibc raise().
        allow(libc::SYS_getpid),
        allow(libc::SYS_gettid),
        // glibc abort() (a panic while panicking, panic=abort) raises SIGABRT on itself; only
        // that signal, only to this process.
        allow_if(
            libc::SYS_tgkill,
            When::ArgsEqual(vec![(0, context.pid as u64), (2, libc::SIGABRT as u64)]),
        ),
        // Thread exit (exit); a fatal error that ends the process (std::process::exit).
        allow(libc::SYS_exit),
        allow(libc::SYS_exit_group),
    ];
    list.extend(memory_allow_list());
    list
}

/// A vCPU thread: `KVM_RUN` loop, port and MMIO exits handled by device code, interrupt
/// injection, the kick signal, and the thread's exit.
fn vcpu_allow_list(context: &Context) -> Vec<Allow> {
    let mut list = vec![
        // KVM_RUN on the vCPU fd; KVM_IRQ_LINE on the VM fd from device emulation (e.g. the
        // serial port raising its IRQ); KVM_GET_REGS/KVM_GET_SREGS for error reports.
        allow_if(
            libc::SYS_ioctl,
            When::ArgIn {
                arg: 1,
                values: vec![KVM_RUN, KVM_IRQ_LINE, KVM_GET_REGS, KVM_GET_SREGS],
            },
        ),
        // Device emulation: console socket/pty output (may return EAGAIN), eventfd writes to
        // inject interrupts and wake device workers; tracing to stderr; the panic message.
        allow(libc::SYS_write),
    ];
    list.extend(thread_allow_list(context));
    list
}

/// A device worker: waits on its queue eventfds and its exit eventfd, interrupts the guest
/// through its irqfd, shares the queues' mutex with vCPU threads. The entropy worker needs
/// nothing more (getrandom is in [`thread_allow_list`]).
fn worker_allow_list(context: &Context) -> Vec<Allow> {
    let mut list = vec![
        // Waiting for notifications (nix::poll::poll is glibc poll(), which may use ppoll).
        allow(libc::SYS_ppoll),
        allow(libc::SYS_poll),
        // Eventfds: reading notifications, writing the irqfd; tracing to stderr or the journal.
        allow(libc::SYS_read),
        allow(libc::SYS_write),
        allow(libc::SYS_writev),
        // Not allowed, on purpose: clone (workers spawn nothing), ioctl (no KVM calls:
        // interrupts go through the irqfd).
    ];
    list.extend(thread_allow_list(context));
    list
}

/// A block worker: [`worker_allow_list`] plus vectored positional I/O on its image files
/// (imago: preadv, pwritev, pread64, pwrite64), flushes (fsync, fdatasync) and qcow2's
/// cluster allocation and zeroing (fallocate).
fn block_allow_list(context: &Context) -> Vec<Allow> {
    let mut list = worker_allow_list(context);
    list.extend([
        allow(libc::SYS_preadv),
        allow(libc::SYS_pwritev),
        allow(libc::SYS_pread64),
        allow(libc::SYS_pwrite64),
        allow(libc::SYS_fsync),
        allow(libc::SYS_fdatasync),
        allow(libc::SYS_fallocate),
    ]);
    list
}

/// A network worker: [`worker_allow_list`] (read and write serve the tap too) plus the one tap
/// request it makes when the guest (re)negotiates offloads.
fn net_allow_list(context: &Context) -> Vec<Allow> {
    let mut list = worker_allow_list(context);
    list.push(allow_if(
        libc::SYS_ioctl,
        When::ArgIn {
            arg: 1,
            values: vec![TUNSETOFFLOAD],
        },
    ));
    list
}

/// `_IOW('T', 208, unsigned int)`: the tap's offloads.
const TUNSETOFFLOAD: u64 = ioctl_expr(_IOC_WRITE, b'T' as u32, 208, 4);

/// Compiles an allow-list into a filter that allows what is listed and kills the process for
/// anything else. Several lines for one system call are OR-ed.
fn compile(list: Vec<Allow>) -> Result<BpfProgram, BackendError> {
    // An empty rule vector means "with any arguments" to seccompiler.
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // Let the refused calls through to the refusal filter, which answers them with EACCES.
    let refused = REFUSED_WITH_EACCES.iter().map(|&syscall| allow(syscall));
    for line in list.into_iter().chain(refused) {
        let new = line.when.into_rules()?;
        match rules.entry(line.syscall) {
            Entry::Vacant(entry) => {
                entry.insert(new);
            }
            Entry::Occupied(mut entry) => {
                let old = entry.get_mut();
                if old.is_empty() || new.is_empty() {
                    old.clear();
                } else {
                    old.extend(new);
                }
            }
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    BpfProgram::try_from(filter)
}

impl When {
    /// The seccompiler rules (OR-ed; each an AND of conditions); empty for [`When::Always`].
    fn into_rules(self) -> Result<Vec<SeccompRule>, BackendError> {
        let dword = |arg, op, value| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value);
        match self {
            When::Always => Ok(Vec::new()),
            When::ArgIn { arg, values } => values
                .into_iter()
                .map(|value| SeccompRule::new(vec![dword(arg, SeccompCmpOp::Eq, value)?]))
                .collect(),
            When::BitsClear { arg, mask } => Ok(vec![SeccompRule::new(vec![dword(
                arg,
                SeccompCmpOp::MaskedEq(mask),
                0,
            )?])?]),
            When::ArgsEqual(pairs) => {
                let conditions = pairs
                    .into_iter()
                    .map(|(arg, value)| dword(arg, SeccompCmpOp::Eq, value))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(vec![SeccompRule::new(conditions)?])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn kvm_requests_match_linux_headers() {
        // Values printed by a C program including <linux/kvm.h> on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_IRQ_LINE, 0x4008_ae61);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
    }

    #[test]
    fn filters_compile() {
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Vcpu,
            ThreadKind::Block,
            ThreadKind::Entropy,
            ThreadKind::Net,
        ] {
            let program = build_filter(kind).expect("filter compiles");
            assert!(
                program.len() < 4096,
                "{kind}: {} instructions",
                program.len()
            );
        }
    }

    #[test]
    fn tables_list_each_syscall_once() {
        let context = Context { pid: 1 };
        for (kind, list) in [
            (ThreadKind::Vmm, vmm_allow_list(&context)),
            (ThreadKind::Vcpu, vcpu_allow_list(&context)),
            (ThreadKind::Block, block_allow_list(&context)),
            (ThreadKind::Entropy, worker_allow_list(&context)),
            (ThreadKind::Net, net_allow_list(&context)),
        ] {
            let mut seen = BTreeSet::new();
            for line in &list {
                assert!(
                    seen.insert(line.syscall),
                    "{kind}: syscall {} listed twice",
                    line.syscall
                );
            }
        }
    }

    #[test]
    fn forbidden_syscalls_are_not_listed() {
        let context = Context { pid: 1 };
        let forbidden = [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_rt_sigaction,
            libc::SYS_prctl,
            libc::SYS_seccomp,
            libc::SYS_setuid,
            libc::SYS_wait4,
        ];
        for list in [
            vmm_allow_list(&context),
            vcpu_allow_list(&context),
            block_allow_list(&context),
            worker_allow_list(&context),
            net_allow_list(&context),
        ] {
            for line in &list {
                assert!(
                    !forbidden.contains(&line.syscall),
                    "syscall {} allowed",
                    line.syscall
                );
            }
        }
    }

    #[test]
    fn an_open_gets_eacces_instead_of_killing_the_process() {
        // In a thread of its own: the filter stays with that thread.
        let outcome = std::thread::spawn(|| {
            apply_seccomp(ThreadKind::Entropy, SandboxMode::Enforce).expect("filter");
            std::fs::File::open("/proc/sys/vm/overcommit_memory")
                .map(drop)
                .map_err(|e| e.raw_os_error())
        })
        .join()
        .expect("thread");
        assert_eq!(outcome, Err(Some(libc::EACCES)));
    }

    #[test]
    fn duplicate_lines_merge_to_the_widest() {
        let rules = |list| compile(list).expect("compiles");
        let only_exec = rules(vec![allow_if(
            libc::SYS_mmap,
            When::BitsClear { arg: 2, mask: 4 },
        )]);
        let merged = rules(vec![
            allow_if(libc::SYS_mmap, When::BitsClear { arg: 2, mask: 4 }),
            allow(libc::SYS_mmap),
        ]);
        let always = rules(vec![allow(libc::SYS_mmap)]);
        assert_eq!(merged, always);
        assert_ne!(only_exec, always);
    }
}
