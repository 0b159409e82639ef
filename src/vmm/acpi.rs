//! The ACPI tables a vmd VM boots with (x86_64, ACPI 6.x).
//!
//! They describe the platform of [`super::layout`]: the in-kernel local APICs and I/O APIC, the
//! PM1a fixed hardware (soft-off through `\_S5` and the fixed-feature power button), the i8042
//! reset, and COM1. The tables live in the BIOS area at [`ACPI_START`], RSDP first (where a guest
//! that scans 0xe0000..0x100000 for it also finds it), then:
//!
//! | table | alignment | contents                                                       |
//! |-------|-----------|----------------------------------------------------------------|
//! | RSDP  | 16        | revision 2, points at the XSDT                                 |
//! | XSDT  | 16        | FADT, MADT                                                     |
//! | FADT  | 16        | revision 6 (276 bytes), points at the FACS and the DSDT        |
//! | FACS  | 64        | required by a FADT without HW_REDUCED_ACPI (ACPI 6.5 §5.2.10)  |
//! | DSDT  | 16        | `\_S5`, `\_SB.COM1`                                            |
//! | MADT  | 16        | local APICs, I/O APIC, interrupt source overrides, LINT1 NMI   |
//!
//! Everything ends below [`HIMEM_START`]; the VMM's e820 map reports that area as reserved.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADT, FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    ACPI_START, COM1_GSI, COM1_PORT, COM1_PORT_COUNT, HIMEM_START, I8042_COMMAND_PORT,
    IOAPIC_START, LAPIC_START, PM1_CNT_LEN, PM1_EVT_LEN, PM1A_CNT_PORT, PM1A_EVT_PORT,
    S5_SLEEP_TYPE, SCI_GSI,
};

/// Errors from [`create_acpi_tables`].
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("cannot describe a VM without vCPUs in the MADT")]
    NoVcpus,
    #[error(
        "the ACPI {table} table ({len} bytes) does not fit in the BIOS area below {limit:#x}",
        limit = HIMEM_START
    )]
    TooLarge { table: &'static str, len: usize },
    #[error(
        "guest memory does not cover the ACPI tables at {start:#x}..{end:#x}",
        start = ACPI_START
    )]
    NotInGuestMemory { end: u64 },
    #[error("cannot write the ACPI tables ({len} bytes) to guest memory at {addr:#x}", addr = ACPI_START)]
    Write {
        len: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// OEM identification in every table header (padded with spaces, as the spec's examples are).
const OEM_ID: [u8; 6] = *b"VMD   ";
/// The FADT's OEM table ID must match the root table's (ACPI 6.5 Table 5.9); all tables share it.
const OEM_TABLE_ID: [u8; 8] = *b"VMD     ";
const OEM_REVISION: u32 = 1;

/// Alignment of the tables in guest memory (the RSDP must be on a 16-byte boundary, ACPI 6.5
/// §5.2.5.1; the others follow suit).
const TABLE_ALIGN: u64 = 16;
/// The FACS must be 64-byte aligned (ACPI 6.5 §5.2.10).
const FACS_ALIGN: u64 = 64;

/// The XSDT: a header and one 64-bit pointer each for the FADT and the MADT.
const XSDT_ENTRIES: u32 = 2;
const XSDT_LEN: u32 = SDT_HEADER_LEN + 8 * XSDT_ENTRIES;
/// Length of the common table header (ACPI 6.5 §5.2.6).
const SDT_HEADER_LEN: u32 = 36;

/// DSDT revision 2: integers in the AML are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// FACS version of ACPI 4.0 and later.
const FACS_VERSION: u8 = 2;

// FADT (ACPI 6.5 §5.2.9).
/// IAPC_BOOT_ARCH (Table 5.11): ISA devices (COM1) present.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
/// IAPC_BOOT_ARCH: there is no VGA; the OS must not probe for one.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IAPC_BOOT_ARCH: no full CMOS RTC at ports 0x70/0x71 (Linux then skips rtc_cmos and keeps
/// the kvmclock wall clock). The clock there (`devices::cmos`) only tells the time: no alarm,
/// no interrupt, not settable.
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// The 8042 flag (bit 1) stays clear: the VMM's i8042 only implements the reset command, and a
/// flagged controller would make Linux probe it and wait for answers that never come. Reset
/// still reaches it through the FADT reset register (port 0x64, value 0xfe).
const IAPC_BOOT_ARCH: u16 = IAPC_LEGACY_DEVICES | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT;
/// C2 and C3 latencies above 100 and 1000 µs mean "not supported".
const P_LVL2_LAT_NONE: u16 = 0x0fff;
const P_LVL3_LAT_NONE: u16 = 0x0fff;
/// The i8042 "pulse reset line" command, written to the command port as the ACPI reset.
const RESET_VALUE: u8 = 0xfe;
/// FADT "Hypervisor Vendor Identity" (FADT revision 6), eight bytes.
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"VMD     ";
/// The FADT's SCI_INT field is 16 bits wide.
const SCI_INT: u16 = {
    assert!(SCI_GSI <= u16::MAX as u32);
    SCI_GSI as u16
};
/// Bit widths of the PM1 register blocks, for the X_ generic address structures.
const PM1_EVT_BITS: u8 = {
    assert!(PM1_EVT_LEN > 0 && PM1_EVT_LEN * 8 <= u8::MAX as u16);
    (PM1_EVT_LEN * 8) as u8
};
const PM1_CNT_BITS: u8 = {
    assert!(PM1_CNT_LEN > 0 && PM1_CNT_LEN * 8 <= u8::MAX as u16);
    (PM1_CNT_LEN * 8) as u8
};
/// COM1's port count, for the 8-bit length of an IO resource descriptor.
const COM1_PORT_LEN: u8 = {
    assert!(COM1_PORT_COUNT <= u8::MAX as u16);
    COM1_PORT_COUNT as u8
};
// SLP_TYP is a 3-bit field of PM1_CNT.
const _: () = assert!(S5_SLEEP_TYPE <= 7);

// MADT (ACPI 6.5 §5.2.12).
/// MADT revision 5 (ACPI 6.3+): the Online Capable flag exists (and is zero for enabled CPUs).
const MADT_REVISION: u8 = 5;
/// Header plus the local APIC address and the flags.
const MADT_HEADER_LEN: u32 = SDT_HEADER_LEN + 8;
/// MADT flags: the platform also has dual 8259s (KVM's in-kernel PIC), which the OS must mask.
const MADT_PCAT_COMPAT: u32 = 1;
const LAPIC_ADDR: u32 = {
    assert!(LAPIC_START <= u32::MAX as u64);
    LAPIC_START as u32
};
const IOAPIC_ADDR: u32 = {
    assert!(IOAPIC_START <= u32::MAX as u64);
    IOAPIC_START as u32
};
/// The I/O APIC's ID. KVM's in-kernel I/O APIC resets its ID register to 0, and x86-64 Linux
/// only needs I/O APIC IDs to be unique among I/O APICs (they are a separate namespace from local
/// APIC IDs on xAPIC systems), so 0 is used, as QEMU, Firecracker and Cloud Hypervisor do.
const IOAPIC_ID: u8 = 0;
const MADT_TYPE_LOCAL_APIC: u8 = 0;
const MADT_TYPE_IO_APIC: u8 = 1;
const MADT_TYPE_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
/// Local APIC flags: Enabled.
const LAPIC_ENABLED: u32 = 1;
/// MPS INTI flags (Table 5.26): polarity and trigger mode "conform to the bus" (ISA: edge, high).
const MPS_INTI_CONFORMS: u16 = 0;
/// MPS INTI flags: active high (0b01), level triggered (0b11 << 2).
const MPS_INTI_LEVEL_HIGH: u16 = 0b01 | (0b11 << 2);
/// The ISA bus, the source of every interrupt source override.
const ISA_BUS: u8 = 0;
/// The SCI is ISA IRQ 9, identity-mapped to GSI 9 but level triggered and active high.
const SCI_ISA_IRQ: u8 = {
    assert!(SCI_GSI <= u8::MAX as u32);
    SCI_GSI as u8
};
/// "All processors" in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;
/// LINT1 carries NMIs on PCs.
const NMI_LINT: u8 = 1;

/// Writes RSDP, XSDT, FADT, FACS, DSDT and MADT for `vcpus` processors (APIC ids `0..vcpus`)
/// into guest memory and returns the RSDP's guest address (the VMM puts it in
/// `boot_params.acpi_rsdp_addr`).
///
/// The vCPUs' local APIC ids must be `0..vcpus` (KVM's default: the vCPU index). Nothing is
/// written unless guest memory covers all the tables.
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    vcpus: u8,
) -> Result<GuestAddress, AcpiError> {
    if vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }

    // Tables without pointers first, so their sizes are known when placing them.
    let dsdt = dsdt_table();
    let madt = madt_table(vcpus);
    let facs = facs_table();
    let mut xsdt = Sdt::new(*b"XSDT", XSDT_LEN, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);

    let mut placer = Placer::new();
    let rsdp_addr = placer.place("RSDP", Rsdp::len(), TABLE_ALIGN)?;
    let xsdt_addr = placer.place("XSDT", xsdt.len(), TABLE_ALIGN)?;
    let fadt_addr = placer.place("FADT", FADT::len(), TABLE_ALIGN)?;
    let facs_addr = placer.place("FACS", facs.len(), FACS_ALIGN)?;
    let dsdt_addr = placer.place("DSDT", dsdt.len(), TABLE_ALIGN)?;
    let madt_addr = placer.place("MADT", madt.len(), TABLE_ALIGN)?;

    // Sdt::write_u64 keeps the checksum up to date.
    let sdt_header_len = SDT_HEADER_LEN as usize;
    xsdt.write_u64(sdt_header_len, u64::from(fadt_addr));
    xsdt.write_u64(sdt_header_len + 8, u64::from(madt_addr));
    let fadt = fadt_table(dsdt_addr, facs_addr);
    let mut rsdp = Vec::with_capacity(Rsdp::len());
    Rsdp::new(OEM_ID, u64::from(xsdt_addr)).to_aml_bytes(&mut rsdp);

    // One image of the whole area, padding zeroed, written at once. The tables come in the order
    // they were placed in.
    let mut image = Vec::with_capacity(placer.used());
    for (addr, table) in [
        (rsdp_addr, rsdp.as_slice()),
        (xsdt_addr, xsdt.as_slice()),
        (fadt_addr, fadt.as_slice()),
        (facs_addr, facs.as_slice()),
        (dsdt_addr, dsdt.as_slice()),
        (madt_addr, madt.as_slice()),
    ] {
        let offset = (u64::from(addr) - ACPI_START) as usize;
        debug_assert!(image.len() <= offset, "tables out of placement order");
        image.resize(offset, 0);
        image.extend_from_slice(table);
    }
    debug_assert_eq!(image.len(), placer.used());

    let start = GuestAddress(ACPI_START);
    if !GuestMemoryBackend::check_range(mem, start, image.len()) {
        return Err(AcpiError::NotInGuestMemory {
            end: ACPI_START + image.len() as u64,
        });
    }
    mem.write_slice(&image, start)
        .map_err(|source| AcpiError::Write {
            len: image.len(),
            source,
        })?;
    Ok(GuestAddress(u64::from(rsdp_addr)))
}

/// Hands out aligned, consecutive addresses from [`ACPI_START`] up to [`HIMEM_START`].
struct Placer {
    next: u64,
}

impl Placer {
    fn new() -> Self {
        Placer { next: ACPI_START }
    }

    /// The address of a `len`-byte table aligned to `align` (a power of two). Addresses fit in 32
    /// bits, as the FADT's DSDT and FIRMWARE_CTRL fields need.
    fn place(&mut self, table: &'static str, len: usize, align: u64) -> Result<u32, AcpiError> {
        let too_large = || AcpiError::TooLarge { table, len };
        let start = self
            .next
            .checked_next_multiple_of(align)
            .ok_or_else(too_large)?;
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .filter(|&end| end <= HIMEM_START)
            .ok_or_else(too_large)?;
        self.next = end;
        u32::try_from(start).map_err(|_| too_large())
    }

    /// Bytes from [`ACPI_START`] to the end of the last table.
    fn used(&self) -> usize {
        // At most HIMEM_START - ACPI_START bytes (place keeps `next` below HIMEM_START).
        (self.next - ACPI_START) as usize
    }
}

/// The DSDT: `\_S5` for soft-off through PM1_CNT, and COM1 so the OS knows its port and IRQ.
fn dsdt_table() -> Vec<u8> {
    let mut body = Vec::new();

    // Name (_S5, Package () { SLP_TYPa, SLP_TYPb, reserved, reserved }) (ACPI 6.5 §7.4.2).
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let hid = aml::EISAName::new("PNP0501");
    let io = aml::IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN);
    // Consumer, edge triggered, active high, exclusive: an ISA interrupt.
    let irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let com1 = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    aml::Scope::new("\\_SB_".into(), vec![&com1]).to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// The FADT of a PC with PM1a fixed hardware (not hardware-reduced), always in ACPI mode.
fn fadt_table(dsdt_addr: u32, facs_addr: u32) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        // WBINVD works (it is the only cache flush a guest needs).
        .flag(Flags::Wbinvd)
        // C1 (HLT) on every processor.
        .flag(Flags::ProcC1)
        // No fixed-feature sleep button. The power button flag stays clear: the fixed-feature
        // power button (PWRBTN_STS/EN) exists.
        .flag(Flags::SlpButton)
        // No RTC_STS in PM1_STS (there is no RTC).
        .flag(Flags::FixRtc)
        // RESET_REG below.
        .flag(Flags::ResetRegSup)
        // The FACS through the 32-bit field only: X_FIRMWARE_CTRL must then be zero.
        .firmware_ctrl_32(facs_addr);

    // Both DSDT fields hold the same address, as QEMU does; ACPICA uses X_DSDT.
    fadt.dsdt = dsdt_addr.into();
    fadt.x_dsdt = u64::from(dsdt_addr).into();
    fadt.sci_int = SCI_INT.into();
    // No SMI_CMD: the platform is always in ACPI mode (SCI_EN reads 1), so ACPI_ENABLE and
    // ACPI_DISABLE stay 0.
    fadt.smi_cmd = 0.into();
    fadt.acpi_enable = 0;
    fadt.acpi_disable = 0;
    fadt.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    fadt.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    fadt.pm1_evt_len = PM1_EVT_BITS / 8;
    fadt.pm1_cnt_len = PM1_CNT_BITS / 8;
    // No PM timer (optional since ACPI 5.0A), no PM2, no GPE blocks: all zero.
    fadt.p_lvl2_lat = P_LVL2_LAT_NONE.into();
    fadt.p_lvl3_lat = P_LVL3_LAT_NONE.into();
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    // PM1_STS and PM1_EN, and PM1_CNT, are 16-bit registers: word accesses.
    fadt.x_pm1a_evt_blk = GAS::new(
        AddressSpace::SystemIo,
        PM1_EVT_BITS,
        0,
        AccessSize::WordAccess,
        PM1A_EVT_PORT.into(),
    );
    fadt.x_pm1a_cnt_blk = GAS::new(
        AddressSpace::SystemIo,
        PM1_CNT_BITS,
        0,
        AccessSize::WordAccess,
        PM1A_CNT_PORT.into(),
    );
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        I8042_COMMAND_PORT.into(),
    );
    fadt.reset_value = RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();

    let mut bytes = Vec::with_capacity(FADT::len());
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// The FACS: nothing set (no S4BIOS, no waking vector); its global lock is there for the OS.
fn facs_table() -> Vec<u8> {
    let mut facs = FACS::new();
    facs.version = FACS_VERSION;
    let mut bytes = Vec::with_capacity(FACS::len());
    facs.to_aml_bytes(&mut bytes);
    bytes
}

/// The MADT: one enabled local APIC per vCPU, the I/O APIC with GSIs from 0, an interrupt source
/// override for the level-triggered active-high SCI, and LINT1 as the NMI input of every
/// processor.
///
/// There is no override moving the PIT (ISA IRQ 0) to GSI 2, as on PCs and QEMU: QEMU also
/// routes GSI 0 to I/O APIC pin 2 (KVM_SET_GSI_ROUTING), but vmd keeps KVM's default routing,
/// where the in-kernel PIT's GSI 0 reaches pin 0. With the override Linux found no timer
/// interrupt on pin 2 ("MP-BIOS bug: 8254 timer not connected to IO-APIC") and spent seconds
/// trying other routes before it settled for ExtINT through the 8259.
fn madt_table(vcpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    for id in 0..vcpus {
        // Processor Local APIC (Table 5.23): ACPI processor UID = APIC ID = vCPU index.
        body.extend_from_slice(&[MADT_TYPE_LOCAL_APIC, 8, id, id]);
        body.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }

    // I/O APIC (Table 5.25).
    body.extend_from_slice(&[MADT_TYPE_IO_APIC, 12, IOAPIC_ID, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());

    // Interrupt Source Overrides (Table 5.26).
    body.extend_from_slice(&[MADT_TYPE_INTERRUPT_OVERRIDE, 10, ISA_BUS, SCI_ISA_IRQ]);
    body.extend_from_slice(&SCI_GSI.to_le_bytes());
    body.extend_from_slice(&MPS_INTI_LEVEL_HIGH.to_le_bytes());

    // Local APIC NMI (Table 5.29).
    body.extend_from_slice(&[MADT_TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS]);
    body.extend_from_slice(&MPS_INTI_CONFORMS.to_le_bytes());
    body.push(NMI_LINT);

    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let header_len = SDT_HEADER_LEN as usize;
    madt.write_u32(header_len, LAPIC_ADDR);
    madt.write_u32(header_len + 4, MADT_PCAT_COMPAT);
    madt.append_slice(&body);
    madt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    //! These tests read the tables back as raw bytes at the offsets of the ACPI 6.5
    //! specification, independently of the builder and of the acpi_tables crate.

    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    const ACPI_END: u64 = 0x10_0000;

    /// Reads the system description table at `addr`: checks it lies in the BIOS area, has the
    /// signature, and sums to zero.
    fn table(mem: &GuestMemoryMmap<()>, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        assert!(
            (0xe_0000..ACPI_END).contains(&addr),
            "{} at {addr:#x}",
            String::from_utf8_lossy(signature)
        );
        let header = read(mem, addr, 36);
        assert_eq!(&header[0..4], signature);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36);
        assert!(
            addr + len as u64 <= ACPI_END,
            "{signature:?} ends past 1 MiB"
        );
        let bytes = read(mem, addr, len);
        assert_eq!(sum(&bytes), 0, "checksum of {signature:?}");
        assert_eq!(&bytes[10..16], b"VMD   ");
        bytes
    }

    /// A Generic Address Structure at `offset`: (space, bit width, bit offset, access, address).
    fn gas(bytes: &[u8], offset: usize) -> (u8, u8, u8, u8, u64) {
        (
            bytes[offset],
            bytes[offset + 1],
            bytes[offset + 2],
            bytes[offset + 3],
            u64_at(bytes, offset + 4),
        )
    }

    fn check_tables(vcpus: u8) {
        let mem = memory();
        let rsdp_addr = create_acpi_tables(&mem, vcpus).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(0xe_0000));

        // RSDP (§5.2.5.3).
        let rsdp = read(&mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(&rsdp[9..15], b"VMD   ");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
        let xsdt_addr = u64_at(&rsdp, 24);
        assert_eq!(xsdt_addr % 16, 0);

        // XSDT (§5.2.8).
        let xsdt = table(&mem, xsdt_addr, b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        let signatures: Vec<[u8; 4]> = entries
            .iter()
            .map(|&addr| read(&mem, addr, 4).try_into().unwrap())
            .collect();
        assert_eq!(signatures, [*b"FACP", *b"APIC"]);

        // FADT (§5.2.9, Table 5.9).
        let fadt = table(&mem, entries[0], b"FACP");
        assert_eq!(fadt.len(), 276, "FADT length");
        assert_eq!(fadt[8], 6, "FADT revision");
        let facs_addr = u64::from(u32_at(&fadt, 36));
        let dsdt_addr = u64::from(u32_at(&fadt, 40));
        assert_eq!(u64_at(&fadt, 132), 0, "X_FIRMWARE_CTRL");
        assert_eq!(u64_at(&fadt, 140), dsdt_addr, "X_DSDT");
        assert_eq!(u16_at(&fadt, 46), 9, "SCI_INT");
        assert_eq!(u32_at(&fadt, 48), 0, "SMI_CMD");
        assert_eq!((fadt[52], fadt[53]), (0, 0), "ACPI_ENABLE/DISABLE");
        assert_eq!(u32_at(&fadt, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(&fadt, 60), 0, "PM1b_EVT_BLK");
        assert_eq!(u32_at(&fadt, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(&fadt, 68), 0, "PM1b_CNT_BLK");
        assert_eq!(u32_at(&fadt, 76), 0, "PM_TMR_BLK");
        assert_eq!(u32_at(&fadt, 80), 0, "GPE0_BLK");
        assert_eq!(
            (fadt[88], fadt[89], fadt[91]),
            (4, 2, 0),
            "PM1_EVT/CNT, PM_TMR lengths"
        );
        let iapc_boot_arch = u16_at(&fadt, 109);
        assert_eq!(
            iapc_boot_arch & 0b110,
            0b100,
            "no 8042 announced (the VMM's is reset-only), no VGA"
        );
        assert_eq!(iapc_boot_arch & (1 << 3), 0, "MSI not declared unsupported");
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & 1, 0, "WBINVD");
        assert_eq!(flags & (1 << 4), 0, "fixed-feature power button present");
        assert_ne!(flags & (1 << 5), 0, "no fixed-feature sleep button");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED_ACPI");
        assert_eq!(gas(&fadt, 116), (1, 8, 0, 1, 0x64), "RESET_REG");
        assert_eq!(fadt[128], 0xfe, "RESET_VALUE");
        assert_eq!(gas(&fadt, 148), (1, 32, 0, 2, 0x600), "X_PM1a_EVT_BLK");
        assert_eq!(gas(&fadt, 160).4, 0, "X_PM1b_EVT_BLK");
        assert_eq!(gas(&fadt, 172), (1, 16, 0, 2, 0x604), "X_PM1a_CNT_BLK");
        assert_eq!(gas(&fadt, 208).4, 0, "X_PM_TMR_BLK");
        assert_eq!(&fadt[268..276], b"VMD     ", "hypervisor vendor identity");

        // FACS (§5.2.10): no checksum, 64-byte aligned.
        assert!((0xe_0000..ACPI_END).contains(&facs_addr));
        assert_eq!(facs_addr % 64, 0);
        let facs = read(&mem, facs_addr, 64);
        assert_eq!(&facs[0..4], b"FACS");
        assert_eq!(u32_at(&facs, 4), 64);
        assert_eq!(facs[32], 2, "FACS version");

        // DSDT: Name (_S5, Package (0x04) { 0x05, 0x05, Zero, Zero }), encoded per §20.2.
        let dsdt = table(&mem, dsdt_addr, b"DSDT");
        assert_eq!(dsdt[8], 2, "DSDT revision");
        let s5 = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00,
        ];
        assert!(dsdt.windows(s5.len()).any(|w| w == s5), "\\_S5 package");
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));

        // MADT (§5.2.12).
        let madt = table(&mem, entries[1], b"APIC");
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut overrides = Vec::new();
        let mut nmis = Vec::new();
        let mut offset = 44;
        while offset < madt.len() {
            let (kind, len) = (madt[offset], madt[offset + 1] as usize);
            assert!(
                len >= 2 && offset + len <= madt.len(),
                "MADT entry at {offset}"
            );
            let entry = &madt[offset..offset + len];
            match (kind, len) {
                (0, 8) => {
                    assert_eq!(u32_at(entry, 4), 1, "local APIC enabled");
                    lapics.push((entry[2], entry[3]));
                }
                (1, 12) => ioapics.push((entry[2], u32_at(entry, 4), u32_at(entry, 8))),
                (2, 10) => overrides.push((entry[2], entry[3], u32_at(entry, 4), u16_at(entry, 8))),
                (4, 6) => nmis.push((entry[2], u16_at(entry, 3), entry[5])),
                _ => panic!("unexpected MADT entry type {kind} length {len}"),
            }
            offset += len;
        }
        assert_eq!(offset, madt.len());
        let expected: Vec<(u8, u8)> = (0..vcpus).map(|id| (id, id)).collect();
        assert_eq!(lapics, expected, "one enabled local APIC per vCPU");
        assert_eq!(ioapics, [(0, 0xfec0_0000, 0)]);
        // ISA IRQ 0 (the PIT) is not moved: KVM's default routing has it on pin 0.
        assert_eq!(overrides, [(0, 9, 9, 0x000d)]);
        assert_eq!(nmis, [(0xff, 0, 1)]);

        // The tables do not overlap.
        let mut spans = [
            (rsdp_addr.0, 36),
            (xsdt_addr, xsdt.len() as u64),
            (entries[0], fadt.len() as u64),
            (facs_addr, 64),
            (dsdt_addr, dsdt.len() as u64),
            (entries[1], madt.len() as u64),
        ];
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{spans:x?}");
        }
    }

    #[test]
    fn tables_for_one_vcpu() {
        check_tables(1);
    }

    #[test]
    fn tables_for_four_vcpus() {
        check_tables(4);
    }

    #[test]
    fn tables_for_the_most_vcpus() {
        check_tables(u8::MAX);
    }

    #[test]
    fn memory_without_the_bios_area_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        let err = create_acpi_tables(&mem, 1).unwrap_err();
        assert!(matches!(err, AcpiError::NotInGuestMemory { .. }), "{err}");
    }

    #[test]
    fn memory_ending_inside_the_tables_is_an_error_and_writes_nothing() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xe_0100)]).unwrap();
        let err = create_acpi_tables(&mem, 4).unwrap_err();
        assert!(matches!(err, AcpiError::NotInGuestMemory { .. }), "{err}");
        assert!(read(&mem, 0xe_0000, 0x100).iter().all(|&b| b == 0));
    }

    #[test]
    fn tables_past_the_bios_area_are_an_error() {
        let mut placer = Placer::new();
        placer.place("RSDP", 36, TABLE_ALIGN).unwrap();
        let err = placer.place("DSDT", 0x2_0000, TABLE_ALIGN).unwrap_err();
        assert!(
            matches!(err, AcpiError::TooLarge { table: "DSDT", .. }),
            "{err}"
        );
        // Exactly up to the end of the area is fine.
        let last = placer.place("MADT", 0x1_0000, 0x1_0000).unwrap();
        assert_eq!(u64::from(last) + 0x1_0000, HIMEM_START);
    }

    #[test]
    fn no_vcpus_is_an_error() {
        let err = create_acpi_tables(&memory(), 0).unwrap_err();
        assert!(matches!(err, AcpiError::NoVcpus), "{err}");
    }
}
