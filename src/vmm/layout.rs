//! The guest-physical memory map and the fixed platform addresses of a vmd VM (x86_64).
//!
//! This is the contract between the VMM and whatever it boots: Linux reads most of it from the
//! boot parameters, the e820 map and the ACPI tables; the project's test guest
//! (`tests/guest/`) relies on the same values.

/// Global descriptor table set up for the boot vCPU: null, null, code64 (0x10), data (0x18), TSS (0x20),
/// the selectors of the Linux 64-bit boot protocol (`__BOOT_CS`, `__BOOT_DS`).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty interrupt descriptor table (limit 0): an exception before the guest loads its own IDT
/// is a triple fault.
pub const BOOT_IDT_START: u64 = 0x520;
/// Low memory the platform leaves free for a guest's AP start-up trampoline (SIPI vector 0x06).
pub const AP_TRAMPOLINE_START: u64 = 0x6000;
/// The Linux "zero page" (`struct boot_params`); its address is in RSI at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU (the stack grows down from here to 0x8000).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the first 4 GiB with 2 MiB pages:
/// PML4, one PDPT, and four page directories.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line (NUL terminated).
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line accepted, including its NUL (Linux x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: low RAM ends here in the e820 map.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables (RSDP first), in the BIOS read-only area that e820 reports as reserved.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the legacy area; kernels are loaded here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Guest RAM above this address is placed above 4 GiB, leaving a hole for MMIO devices.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio devices' register windows are placed (4 KiB each), inside the MMIO gap.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000_0000;
/// The I/O APIC lines virtio devices get, the SCI's excepted (as Firecracker's, so one guest
/// kernel configuration works under both).
pub const VIRTIO_FIRST_GSI: u32 = 5;
pub const VIRTIO_LAST_GSI: u32 = 23;
/// The I/O APIC and local APIC (emulated by the in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// The first 16550 UART (COM1), its eight registers and its ISA interrupt.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_PORT_COUNT: u16 = 8;
pub const COM1_GSI: u32 = 4;
/// The i8042 keyboard controller: data and command/status ports. Command 0xfe resets the machine.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The CMOS real-time clock: index port, then data port.
pub const CMOS_PORT: u16 = 0x70;
pub const CMOS_PORT_COUNT: u16 = 2;
/// The ACPI PM1a event block (PM1_STS at +0, PM1_EN at +2, 16 bits each) and the PM1a control
/// block (PM1_CNT, 16 bits), as announced in the FADT.
pub const PM1A_EVT_PORT: u16 = 0x600;
pub const PM1_EVT_LEN: u16 = 4;
pub const PM1A_CNT_PORT: u16 = 0x604;
pub const PM1_CNT_LEN: u16 = 2;
/// The ACPI system control interrupt (level triggered, as on PCs).
pub const SCI_GSI: u32 = 9;
/// The sleep type the DSDT's `\_S5` package announces for soft-off: writing
/// `SLP_EN | SLP_TYP(S5_SLEEP_TYPE)` to PM1_CNT powers the VM off.
pub const S5_SLEEP_TYPE: u16 = 5;
