//! The Intel MultiProcessor Specification (1.4) tables: the MP floating pointer and the MP
//! configuration table (processors, the ISA bus, the I/O APIC and its interrupt lines).
//!
//! A kernel without ACPI finds its interrupt controllers here. Every Linux looks for the floating
//! pointer at boot, ACPI or not: in the first KiB of RAM, in the last KiB of base memory, then in
//! the BIOS area 0xf0000-0xfffff. Linux 6.1 maps and unmaps the rest of that 64 KiB area once per
//! 16-byte step of the last scan; under an emulating `/dev/kvm` (kvm_pvm) that scan alone cost
//! seconds of boot. The floating pointer sits at [`EBDA_START`], the start of the last KiB of base
//! memory, where the second scan finds it; the configuration table follows it in the same
//! reserved area. A kernel with ACPI uses the MADT instead (Linux ignores the MP table then).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{ACPI_START, EBDA_START, IOAPIC_START, LAPIC_START};

/// Errors from [`write_mptable`].
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("the MP table for {vcpus} vCPUs ({len} bytes) does not fit below {limit:#x}")]
    TooLarge { vcpus: u8, len: usize, limit: u64 },
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
#[cfg(test)]
const PROCESSOR_ENTRY_LEN: usize = 20;
#[cfg(test)]
const SHORT_ENTRY_LEN: usize = 8;
const SPEC_REVISION: u8 = 4;

// Entry types (MP spec, table 4-3).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
// Interrupt types (table 4-8).
const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;

/// An integrated (xAPIC) local APIC; Linux then leaves the I/O APIC's id as the VMM set it.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// The same id as the MADT's I/O APIC (and KVM's reset value).
const IOAPIC_ID: u8 = 0;
/// The in-kernel I/O APIC's input pins.
const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 in the processor entries' signature field; FPU and APIC in their feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const BUS_ID_ISA: u8 = 0;
/// Every local APIC, in a local interrupt entry.
const ALL_LAPICS: u8 = 0xff;

/// The MP tables for `vcpus` processors, to be written at [`EBDA_START`].
fn mptable(vcpus: u8) -> Vec<u8> {
    let table_addr = EBDA_START as u32 + FLOATING_POINTER_LEN as u32;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for id in 0..vcpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id);
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.push(ENTRY_BUS);
    entries.push(BUS_ID_ISA);
    entries.extend_from_slice(b"ISA   ");
    entries.push(ENTRY_IOAPIC);
    entries.push(IOAPIC_ID);
    entries.push(IOAPIC_VERSION);
    entries.push(1); // usable
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    // ISA interrupt n on pin n, polarity and trigger as the bus has them (edge, active high), as
    // KVM's default routing delivers them: the PIT on pin 0, COM1 on 4, virtio devices from 5.
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INTERRUPT_INT, 0, 0]);
        entries.extend_from_slice(&[BUS_ID_ISA, pin, IOAPIC_ID, pin]);
        count += 1;
    }
    // LINT0 takes the 8259's interrupts, LINT1 is the NMI pin (as cpu.rs programs them).
    for (kind, lint) in [(INTERRUPT_EXTINT, 0), (INTERRUPT_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0]);
        entries.extend_from_slice(&[BUS_ID_ISA, 0, ALL_LAPICS, lint]);
        count += 1;
    }

    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.push(SPEC_REVISION);
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMD     ");
    table.extend_from_slice(b"VMD MPTABLE ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended entries
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut image = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    image.extend_from_slice(b"_MP_");
    image.extend_from_slice(&table_addr.to_le_bytes());
    image.push(1); // length in 16-byte units
    image.push(SPEC_REVISION);
    image.push(0); // checksum, below
    image.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    image[10] = checksum(&image);
    image.extend_from_slice(&table);
    image
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte))
        .wrapping_neg()
}

/// Writes the MP floating pointer and configuration table for `vcpus` processors at
/// [`EBDA_START`], inside the area e820 reports as reserved.
pub fn write_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let image = mptable(vcpus);
    if EBDA_START + image.len() as u64 > ACPI_START {
        return Err(MptableError::TooLarge {
            vcpus,
            len: image.len(),
            limit: ACPI_START,
        });
    }
    mem.write_slice(&image, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn floating_pointer_and_table_check_out() {
        for vcpus in [1u8, 2, 254] {
            let image = mptable(vcpus);
            let (pointer, table) = image.split_at(FLOATING_POINTER_LEN);
            assert_eq!(&pointer[..4], b"_MP_");
            assert_eq!(sum(pointer), 0);
            let table_addr = u32::from_le_bytes(pointer[4..8].try_into().expect("4 bytes"));
            assert_eq!(u64::from(table_addr), EBDA_START + 16);
            assert_eq!(&table[..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let entries = usize::from(u16::from_le_bytes([table[34], table[35]]));
            assert_eq!(entries, usize::from(vcpus) + 2 + 24 + 2);
            assert_eq!(
                len,
                HEADER_LEN + usize::from(vcpus) * PROCESSOR_ENTRY_LEN + 28 * SHORT_ENTRY_LEN
            );
            // The boot processor comes first, flagged as such.
            assert_eq!(
                &table[HEADER_LEN..HEADER_LEN + 4],
                &[0, 0, LAPIC_VERSION, 3]
            );
        }
    }

    #[test]
    fn every_vcpu_count_fits_in_the_reserved_area() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap");
        write_mptable(&mem, 254).expect("fits");
        let mut signature = [0u8; 4];
        mem.read_slice(&mut signature, GuestAddress(EBDA_START))
            .expect("read");
        assert_eq!(&signature, b"_MP_");
    }
}
