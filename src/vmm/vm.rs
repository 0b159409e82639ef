//! Building a VM, as one linear recipe: KVM VM → memory → irqchip → legacy devices → virtio
//! devices (each attached through the device manager, adding its command-line entry) → kernel,
//! initrd → command line, ACPI tables and boot parameters, written last so they describe every
//! device → vCPUs. The result starts with every vCPU parked, so the caller can report `Created`
//! before the guest runs one instruction.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::boot::{self, BootError};
use super::cpu::{self, CpuSetupError};
use super::layout;
use super::memory::{self, GuestMemoryError};
use super::vcpu::{Vcpu, VcpuControl, VcpuThreads};
use crate::devices::acpi_pm::{AcpiPm, IrqLine};
use crate::devices::bus::lock_device;
use crate::devices::cmos::Cmos;
use crate::devices::console_journal::ConsoleJournal;
use crate::devices::i8042::I8042;
use crate::devices::manager::{DeviceManager, DeviceManagerError};
use crate::devices::serial::{ConsoleOutput, SerialDevice};
use crate::devices::virtio::block::{BlockDevice, DiskImage, ImageError};
use crate::devices::virtio::net::{NetDevice, NetError};
use crate::devices::virtio::rng::EntropyDevice;
use crate::devices::virtio::worker::{WorkerHandle, WorkerKind, WorkerSetup};
use crate::devices::{Bus, BusError, GuestStop, StopSignal};
use crate::protocol::{DiskConfig, InterfaceConfig};

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// Intel needs three pages for the TSS below 4 GiB, outside RAM and MMIO; AMD ignores it.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// What the machine looks like (the files arrive separately, as fds).
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub cmdline: String,
    /// One entry per [`MachineFiles::disks`] entry.
    pub disks: Vec<DiskConfig>,
    /// Attach a virtio-rng entropy source.
    pub entropy: bool,
    /// One entry per [`MachineFiles::taps`] entry.
    pub interfaces: Vec<InterfaceConfig>,
}

/// The open files a VM is built from.
pub struct MachineFiles {
    pub kernel: File,
    pub initrd: Option<File>,
    /// The console (read for guest input, written with guest output); must be non-blocking.
    pub console: Option<OwnedFd>,
    /// Where the console's lines also go: the journal, under the daemon.
    pub console_journal: Option<ConsoleJournal>,
    /// Each disk's image and backing chain, nearest first.
    pub disks: Vec<DiskFiles>,
    /// Each network interface's tap.
    pub taps: Vec<File>,
}

/// One disk's open files.
pub struct DiskFiles {
    pub image: File,
    pub bases: Vec<File>,
}

/// Errors from [`build_vm`], one per stage.
#[derive(Debug, thiserror::Error)]
pub enum BuildVmError {
    #[error("/dev/kvm speaks API version {0}, not {KVM_API_VERSION}")]
    KvmApiVersion(i32),
    #[error("this host supports at most {max} vCPUs, {wanted} asked")]
    TooManyVcpus { wanted: u8, max: usize },
    #[error("cannot create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot set up the in-kernel interrupt controller and timer")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("cannot create guest memory")]
    Memory(#[source] GuestMemoryError),
    #[error("cannot load the kernel")]
    Kernel(#[source] BootError),
    #[error("cannot load the initrd")]
    Initrd(#[source] BootError),
    #[error("cannot set up the boot parameters")]
    BootParams(#[source] BootError),
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] super::acpi::AcpiError),
    #[error("cannot write the MP table")]
    Mptable(#[source] super::mptable::MptableError),
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot wire COM1's interrupt")]
    SerialIrq(#[source] kvm_ioctls::Error),
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    #[error("cannot duplicate the console fd")]
    Console(#[source] std::io::Error),
    #[error("{files} disks were passed for {configs} disk configurations")]
    DiskCount { files: usize, configs: usize },
    #[error("disk {index} has {files} backing files but its configuration names {formats}")]
    BackingCount {
        index: usize,
        files: usize,
        formats: usize,
    },
    #[error("cannot open disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: ImageError,
    },
    #[error("{files} taps were passed for {configs} interface configurations")]
    TapCount { files: usize, configs: usize },
    #[error("cannot set up network interface {index}")]
    Net {
        index: usize,
        #[source]
        source: NetError,
    },
    #[error("cannot attach the devices")]
    Devices(#[source] DeviceManagerError),
    #[error(
        "the command line with the devices' entries is {len} bytes; Linux takes at most {}",
        layout::CMDLINE_MAX_SIZE - 1
    )]
    CmdlineTooLong { len: usize },
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up vCPU {index}")]
    ConfigureVcpu {
        index: u8,
        #[source]
        source: CpuSetupError,
    },
    #[error("cannot start vCPU thread {index}")]
    SpawnVcpu {
        index: u8,
        #[source]
        source: std::io::Error,
    },
}

/// Drives the SCI through KVM's in-kernel IOAPIC.
struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl IrqLine for KvmIrqLine {
    fn set_level(&self, high: bool) {
        if let Err(err) = self.vm.set_irq_line(self.gsi, high) {
            tracing::warn!("cannot set interrupt line {} to {high}: {err}", self.gsi);
        }
    }
}

/// Devices the VMM thread talks to while the guest runs.
pub struct Devices {
    pub serial: Arc<Mutex<SerialDevice>>,
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    /// The console, for reading guest input (the serial device owns the writing end).
    pub console_input: Option<OwnedFd>,
}

/// A built VM whose vCPUs have not started.
pub struct Vm {
    // Field order is drop order: vCPUs and devices go before the memory KVM maps.
    vcpus: Vec<Vcpu>,
    pub devices: Devices,
    pub stop: Arc<StopSignal>,
    /// Device workers: stopped (and their disks flushed) after the vCPUs.
    workers: Vec<WorkerHandle>,
    _vm_fd: Arc<VmFd>,
    _memory: GuestMemoryMmap,
    _kvm: Kvm,
}

/// Builds the VM described by `config` from `files`. Device worker threads start here and run
/// `worker_setup` first.
pub fn build_vm(
    config: &MachineConfig,
    kvm: OwnedFd,
    files: MachineFiles,
    worker_setup: WorkerSetup,
) -> Result<Vm, BuildVmError> {
    if files.disks.len() != config.disks.len() {
        return Err(BuildVmError::DiskCount {
            files: files.disks.len(),
            configs: config.disks.len(),
        });
    }
    if files.taps.len() != config.interfaces.len() {
        return Err(BuildVmError::TapCount {
            files: files.taps.len(),
            configs: config.interfaces.len(),
        });
    }
    // SAFETY: `kvm` is an open /dev/kvm fd whose ownership moves into the Kvm object.
    let kvm = unsafe { Kvm::from_raw_fd(kvm.into_raw_fd()) };
    let api = kvm.get_api_version();
    if api != KVM_API_VERSION {
        return Err(BuildVmError::KvmApiVersion(api));
    }
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(config.vcpus) > max_vcpus || config.vcpus == 0 {
        return Err(BuildVmError::TooManyVcpus {
            wanted: config.vcpus,
            max: max_vcpus,
        });
    }

    let vm_fd = Arc::new(kvm.create_vm().map_err(BuildVmError::CreateVm)?);
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS)
        .map_err(BuildVmError::Irqchip)?;
    // Memory comes before the irqchip on purpose. A new memory slot makes KVM wait for an SRCU
    // grace period; as the VM's first one it takes about 0.1 ms, but right after the irqchip and
    // PIT have put their devices on KVM's buses (grace periods of their own) it became a
    // timer-driven one of a jiffy or two: 4-10 ms asleep, most of a helper's start.
    let memory = memory::map_guest_memory(config.memory_bytes).map_err(BuildVmError::Memory)?;
    memory::register_guest_memory(&vm_fd, &memory).map_err(BuildVmError::Memory)?;
    vm_fd.create_irq_chip().map_err(BuildVmError::Irqchip)?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(BuildVmError::Irqchip)?;
    furnish_vm(config, kvm, vm_fd, memory, files, worker_setup)
}

/// Everything after the VM, its memory and its interrupt controller exist: devices, boot data
/// and vCPUs.
fn furnish_vm(
    config: &MachineConfig,
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    files: MachineFiles,
    worker_setup: WorkerSetup,
) -> Result<Vm, BuildVmError> {
    let MachineFiles {
        mut kernel,
        initrd,
        console,
        console_journal,
        disks,
        taps,
    } = files;
    let stop = Arc::new(StopSignal::new().map_err(BuildVmError::EventFd)?);
    let (pio, devices) = attach_legacy_devices(&vm_fd, console, console_journal, &stop)?;
    let pio = Arc::new(pio);
    let mut manager = DeviceManager::new(vm_fd.clone(), memory.clone(), stop.clone(), worker_setup)
        .map_err(BuildVmError::Devices)?;
    attach_virtio_devices(&mut manager, config, disks, taps)?;
    let attached = manager.finish().map_err(BuildVmError::Devices)?;
    let mmio = Arc::new(attached.mmio);

    let loaded = boot::load_kernel(&memory, &mut kernel).map_err(BuildVmError::Kernel)?;
    let initrd = match initrd {
        Some(mut file) => {
            Some(boot::load_initrd(&memory, &mut file, &loaded).map_err(BuildVmError::Initrd)?)
        }
        None => None,
    };
    let cmdline = full_cmdline(&config.cmdline, &attached.cmdline)?;
    boot::load_cmdline(&memory, &cmdline).map_err(BuildVmError::BootParams)?;
    let rsdp =
        super::acpi::create_acpi_tables(&memory, config.vcpus).map_err(BuildVmError::Acpi)?;
    super::mptable::write_mptable(&memory, config.vcpus).map_err(BuildVmError::Mptable)?;
    boot::write_boot_params(
        &memory,
        config.memory_bytes,
        &loaded,
        cmdline.len(),
        initrd,
        rsdp,
    )
    .map_err(BuildVmError::BootParams)?;
    cpu::write_boot_tables(&memory)
        .map_err(|source| BuildVmError::ConfigureVcpu { index: 0, source })?;

    let supported_cpuid = cpu::supported_cpuid(&kvm)
        .map_err(|source| BuildVmError::ConfigureVcpu { index: 0, source })?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let fd = vm_fd
            .create_vcpu(u64::from(index))
            .map_err(|source| BuildVmError::CreateVcpu { index, source })?;
        let mut cpuid = cpu::cpuid_for_vcpu(&supported_cpuid, index, config.vcpus);
        let tsc_khz =
            cpu::tsc_khz(&fd).map_err(|source| BuildVmError::ConfigureVcpu { index, source })?;
        cpu::announce_tsc_frequency(&mut cpuid, tsc_khz)
            .map_err(|source| BuildVmError::ConfigureVcpu { index, source })?;
        cpu::configure_common(&fd, &cpuid)
            .map_err(|source| BuildVmError::ConfigureVcpu { index, source })?;
        // Application processors wait for INIT/SIPI from the boot processor, as on hardware.
        if index == 0 {
            cpu::configure_boot_vcpu(&fd, loaded.entry)
                .map_err(|source| BuildVmError::ConfigureVcpu { index, source })?;
        }
        vcpus.push(Vcpu {
            index,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            stop: stop.clone(),
        });
    }

    Ok(Vm {
        vcpus,
        devices,
        stop,
        workers: attached.workers,
        _vm_fd: vm_fd,
        _memory: memory,
        _kvm: kvm,
    })
}

/// The disks in order (`disk0` is the guest's first virtio-blk device), then the network
/// interfaces, then the entropy source.
fn attach_virtio_devices(
    manager: &mut DeviceManager,
    config: &MachineConfig,
    disks: Vec<DiskFiles>,
    taps: Vec<File>,
) -> Result<(), BuildVmError> {
    for (index, (files, disk)) in disks.into_iter().zip(&config.disks).enumerate() {
        if files.bases.len() != disk.backing.len() {
            return Err(BuildVmError::BackingCount {
                index,
                files: files.bases.len(),
                formats: disk.backing.len(),
            });
        }
        let bases = files.bases.into_iter().zip(disk.backing.iter().copied());
        let image = DiskImage::open(files.image, disk.format, bases.collect(), disk.read_only)
            .map_err(|source| BuildVmError::Disk { index, source })?;
        let device = BlockDevice::new(format!("disk{index}"), image, disk.read_only, &disk.serial);
        manager
            .attach_virtio(device.description(), Box::new(device), WorkerKind::Block)
            .map_err(BuildVmError::Devices)?;
    }
    for (index, (tap, interface)) in taps.into_iter().zip(&config.interfaces).enumerate() {
        let device = NetDevice::new(
            format!("net{index}"),
            tap,
            interface.mac.0,
            interface.locked_lladdr,
        )
        .map_err(|source| BuildVmError::Net { index, source })?;
        manager
            .attach_virtio(device.description(), Box::new(device), WorkerKind::Net)
            .map_err(BuildVmError::Devices)?;
    }
    if config.entropy {
        let device = EntropyDevice;
        manager
            .attach_virtio(device.description(), Box::new(device), WorkerKind::Entropy)
            .map_err(BuildVmError::Devices)?;
    }
    Ok(())
}

/// The user's command line followed by the devices' entries.
fn full_cmdline(user: &str, devices: &str) -> Result<String, BuildVmError> {
    let cmdline = match (user.is_empty(), devices.is_empty()) {
        (_, true) => user.to_string(),
        (true, false) => devices.to_string(),
        (false, false) => format!("{user} {devices}"),
    };
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BuildVmError::CmdlineTooLong { len: cmdline.len() });
    }
    Ok(cmdline)
}

/// COM1, the i8042, the CMOS clock and the ACPI PM1 block, on the port I/O bus.
fn attach_legacy_devices(
    vm_fd: &Arc<VmFd>,
    console: Option<OwnedFd>,
    console_journal: Option<ConsoleJournal>,
    stop: &Arc<StopSignal>,
) -> Result<(Bus, Devices), BuildVmError> {
    let mut pio = Bus::new("port I/O");

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildVmError::EventFd)?;
    vm_fd
        .register_irqfd(&serial_irq, layout::COM1_GSI)
        .map_err(BuildVmError::SerialIrq)?;
    let console_input = console
        .as_ref()
        .map(|fd| fd.try_clone())
        .transpose()
        .map_err(BuildVmError::Console)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        ConsoleOutput::new(console, console_journal),
    )));
    pio.insert(
        u64::from(layout::COM1_PORT),
        u64::from(layout::COM1_PORT_COUNT),
        serial.clone(),
    )
    .map_err(BuildVmError::Bus)?;

    let i8042 = Arc::new(Mutex::new(I8042::new(stop.clone())));
    // Data port 0x60 up to the command port 0x64; the speaker port 0x61 in between belongs to
    // the in-kernel PIT and never reaches us.
    let i8042_len = u64::from(layout::I8042_COMMAND_PORT - layout::I8042_DATA_PORT + 1);
    pio.insert(u64::from(layout::I8042_DATA_PORT), i8042_len, i8042)
        .map_err(BuildVmError::Bus)?;

    // The real-time clock: without it Linux polls its floating ports for seconds at boot.
    pio.insert(
        u64::from(layout::CMOS_PORT),
        u64::from(layout::CMOS_PORT_COUNT),
        Arc::new(Mutex::new(Cmos::default())),
    )
    .map_err(BuildVmError::Bus)?;

    let sci = KvmIrqLine {
        vm: vm_fd.clone(),
        gsi: layout::SCI_GSI,
    };
    let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(Box::new(sci), stop.clone())));
    pio.insert(
        u64::from(layout::PM1A_EVT_PORT),
        u64::from(layout::PM1_EVT_LEN + layout::PM1_CNT_LEN),
        acpi_pm.clone(),
    )
    .map_err(BuildVmError::Bus)?;

    Ok((
        pio,
        Devices {
            serial,
            acpi_pm,
            console_input,
        },
    ))
}

impl Vm {
    /// Spawns one thread per vCPU. Each runs `thread_setup` first (the helper installs its
    /// seccomp filter there) and then stays parked until [`VcpuThreads::resume`].
    pub fn start_vcpus(
        &mut self,
        thread_setup: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    ) -> Result<VcpuThreads, BuildVmError> {
        let control = Arc::new(VcpuControl::new());
        let mut handles = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            let index = vcpu.index;
            let control = control.clone();
            let setup = thread_setup.clone();
            let stop = vcpu.stop.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match setup() {
                            Ok(()) => vcpu.run(&control),
                            Err(reason) => stop.request(GuestStop::Failure(format!(
                                "cannot set up vCPU thread {index}: {reason}"
                            ))),
                        }));
                    if outcome.is_err() {
                        stop.request(GuestStop::Failure(format!("vCPU thread {index} panicked")));
                    }
                })
                .map_err(|source| BuildVmError::SpawnVcpu { index, source })?;
            handles.push(handle);
        }
        Ok(VcpuThreads::new(control, handles))
    }

    /// The fd the VMM thread polls for guest input, if the VM has a console.
    pub fn console_input_fd(&self) -> Option<i32> {
        self.devices.console_input.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// Stops the device workers, each flushing its device first. Call after the vCPUs stopped.
    pub fn stop_devices(&mut self) {
        for worker in self.workers.drain(..) {
            worker.stop();
        }
    }

    /// The guest has stopped: the console's last partial line goes to the journal.
    pub fn finish_console(&self) {
        lock_device(&self.devices.serial).finish_console_journal();
    }

    /// Presses the ACPI power button.
    pub fn press_power_button(&self) {
        lock_device(&self.devices.acpi_pm).press_power_button();
    }
}
