//! x86_64 vCPU state at boot: CPUID, MSRs, FPU, local APIC, and for the boot vCPU the registers,
//! segments and page tables of the Linux 64-bit boot protocol (long mode, paging on, identity
//! map of the first 4 GiB).

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs,
    kvm_segment,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

/// Errors from setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    #[error("cannot read the CPUID that KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot read the vCPU's TSC frequency")]
    TscFrequency(#[source] kvm_ioctls::Error),
    #[error("cannot add CPUID leaf {0:#x}")]
    AddCpuidLeaf(u32),
    #[error("cannot set CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot build the MSR list")]
    MsrList,
    #[error("cannot set MSRs")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    PartialMsrs { set: usize, wanted: usize },
    #[error("cannot set the FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("cannot read the local APIC state")]
    GetLapic(#[source] kvm_ioctls::Error),
    #[error("cannot set the local APIC state")]
    SetLapic(#[source] kvm_ioctls::Error),
    #[error("cannot read the segment registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("cannot set the segment registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("cannot set the general-purpose registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("cannot write the boot page tables or GDT into guest memory")]
    WriteTables(#[source] vm_memory::GuestMemoryError),
}

// Control register and EFER bits.
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// Page table entry bits.
const PTE_PRESENT_WRITABLE: u64 = 0b11;
const PDE_PAGE_SIZE: u64 = 1 << 7;
/// Page directories needed to map 4 GiB with 2 MiB pages.
const IDENTITY_MAPPED_GIB: u64 = 4;

/// MSRs (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Local APIC register offsets and LVT delivery modes (SDM vol. 3, 11.5.1).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// CPUID bits.
const CPUID_HYPERVISOR_ECX: u32 = 1 << 31;
const CPUID_HTT_EDX: u32 = 1 << 28;

/// CPUID leaves that announce the TSC frequency (Intel SDM vol. 2, CPUID): 0x15, the TSC to
/// core crystal clock ratio and the crystal's frequency; 0x16, the processor's base frequency.
const CPUID_TSC_CRYSTAL_LEAF: u32 = 0x15;
const CPUID_FREQUENCY_LEAF: u32 = 0x16;
/// "GenuineIntel" in leaf 0's EBX: only Intel processors define leaves 0x15 and 0x16.
const CPUID_VENDOR_INTEL_EBX: u32 = u32::from_le_bytes(*b"Genu");
/// The crystal clock announced in leaf 0x15: 1 GHz, the rate KVM's local APIC timer counts at,
/// because Linux also takes the APIC timer's rate from this leaf.
const CRYSTAL_HZ: u32 = 1_000_000_000;
const CRYSTAL_KHZ: u32 = CRYSTAL_HZ / 1000;
/// The bus (reference) frequency leaf 0x16 reports, in MHz.
const BUS_MHZ: u32 = 100;

/// GDT selectors of the boot protocol.
const GDT_CODE_SELECTOR: u16 = 0x10;
const GDT_DATA_SELECTOR: u16 = 0x18;
const GDT_TSS_SELECTOR: u16 = 0x20;

/// The CPUID KVM supports, once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuSetupError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuSetupError::SupportedCpuid)
}

/// KVM's supported CPUID with the topology of this vCPU filled in: its APIC id, the number of
/// logical processors, and the hypervisor bit.
pub fn cpuid_for_vcpu(supported: &CpuId, index: u8, vcpu_count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(index) << 24)
                    | (u32::from(vcpu_count) << 16);
                entry.ecx |= CPUID_HYPERVISOR_ECX;
                if vcpu_count > 1 {
                    entry.edx |= CPUID_HTT_EDX;
                }
            }
            // Extended topology: the x2APIC id.
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}

/// The vCPU's TSC frequency, as KVM runs it.
pub fn tsc_khz(vcpu: &VcpuFd) -> Result<u32, CpuSetupError> {
    vcpu.get_tsc_khz().map_err(CpuSetupError::TscFrequency)
}

/// Announces the TSC frequency in CPUID leaves 0x15 and 0x16 (Intel only), raising the highest
/// basic leaf to 0x16 if needed. A Linux without kvmclock otherwise measures the TSC against
/// the PIT, which fails when the guest runs under instruction emulation (kvm_pvm): Linux then
/// marks the TSC unstable, calibrates its delay loop and the local APIC timer against jiffies
/// (about half a second of boot), and keeps time with jiffies. With the frequency known it
/// skips all of that and uses the TSC deadline timer.
pub fn announce_tsc_frequency(cpuid: &mut CpuId, tsc_khz: u32) -> Result<(), CpuSetupError> {
    let is_intel = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 0 && e.ebx == CPUID_VENDOR_INTEL_EBX);
    if !is_intel || tsc_khz == 0 {
        return Ok(());
    }
    let (numerator, denominator) = tsc_ratio(tsc_khz);
    let tsc_leaf = [denominator, numerator, CRYSTAL_HZ, 0];
    let mhz = (tsc_khz + 500) / 1000;
    let frequency_leaf = [mhz, mhz, BUS_MHZ, 0];
    for (function, [eax, ebx, ecx, edx]) in [
        (CPUID_TSC_CRYSTAL_LEAF, tsc_leaf),
        (CPUID_FREQUENCY_LEAF, frequency_leaf),
    ] {
        let entry = kvm_cpuid_entry2 {
            function,
            index: 0,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        match cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == function)
        {
            Some(existing) => *existing = entry,
            None => cpuid
                .push(entry)
                .map_err(|_| CpuSetupError::AddCpuidLeaf(function))?,
        }
    }
    for entry in cpuid.as_mut_slice() {
        if entry.function == 0 {
            entry.eax = entry.eax.max(CPUID_FREQUENCY_LEAF);
        }
    }
    Ok(())
}

/// The TSC to crystal ratio (numerator, denominator) of leaf 0x15 for a TSC of `tsc_khz`. Linux
/// computes `crystal_khz * numerator / denominator` in 32 bits, so the numerator stays below
/// 2^32 / 10^6: the exact ratio when it is that small, the TSC rounded to the MHz otherwise
/// (at most 0.5 MHz off: under 200 ppm at 2.5 GHz and above).
fn tsc_ratio(tsc_khz: u32) -> (u32, u32) {
    let reduce = |numerator: u32, denominator: u32| {
        let (mut a, mut b) = (numerator, denominator);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        (numerator / a, denominator / a)
    };
    let max_numerator = u32::MAX / CRYSTAL_KHZ;
    let exact = reduce(tsc_khz, CRYSTAL_KHZ);
    if exact.0 <= max_numerator {
        return exact;
    }
    let mhz = (tsc_khz + 500) / 1000;
    reduce(mhz.min(max_numerator), 1000)
}

/// State every vCPU needs: CPUID, MSRs, FPU and LAPIC LINT pins.
pub fn configure_common(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), CpuSetupError> {
    vcpu.set_cpuid2(cpuid).map_err(CpuSetupError::SetCpuid)?;
    set_boot_msrs(vcpu)?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(CpuSetupError::SetFpu)?;
    configure_lapic(vcpu)
}

fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), CpuSetupError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuSetupError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(CpuSetupError::SetMsrs)?;
    if set != entries.len() {
        return Err(CpuSetupError::PartialMsrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// LINT0 delivers the legacy PIC's interrupts (ExtINT), LINT1 is the NMI pin, as on a PC.
fn configure_lapic(vcpu: &VcpuFd) -> Result<(), CpuSetupError> {
    let mut lapic = vcpu.get_lapic().map_err(CpuSetupError::GetLapic)?;
    for (register, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let bytes: &mut [i8] = &mut lapic.regs[register..register + 4];
        let mut value = u32::from_le_bytes([
            bytes[0] as u8,
            bytes[1] as u8,
            bytes[2] as u8,
            bytes[3] as u8,
        ]);
        value = (value & !0x700) | (mode << 8);
        for (dst, src) in bytes.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as i8;
        }
    }
    vcpu.set_lapic(&lapic).map_err(CpuSetupError::SetLapic)
}

/// Writes the identity-mapping page tables and the GDT the boot vCPU starts with.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), CpuSetupError> {
    let write = |addr: u64, value: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(CpuSetupError::WriteTables)
    };
    write(PML4_START, PDPTE_START | PTE_PRESENT_WRITABLE)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let directory = PDE_START + gib * 0x1000;
        write(PDPTE_START + gib * 8, directory | PTE_PRESENT_WRITABLE)?;
        for entry in 0..512u64 {
            let frame = (gib << 30) | (entry << 21);
            write(
                directory + entry * 8,
                frame | PDE_PAGE_SIZE | PTE_PRESENT_WRITABLE,
            )?;
        }
    }
    for (index, descriptor) in boot_gdt().iter().enumerate() {
        write(BOOT_GDT_START + index as u64 * 8, *descriptor)?;
    }
    write(BOOT_IDT_START, 0)
}

/// null, null, code64 (0x10), data (0x18), TSS (0x20).
fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// A segment descriptor from its flags (access byte in bits 0-7, flags in 12-15), base, limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The kvm_segment a descriptor loads.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            // Granularity 4 KiB: the limit counts pages.
            if bit(55) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0b11) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: if bit(47) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Puts the boot vCPU in 64-bit long mode at `entry`, with RSI pointing at the zero page.
pub fn configure_boot_vcpu(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), CpuSetupError> {
    let mut sregs = vcpu.get_sregs().map_err(CpuSetupError::GetSregs)?;
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[2], GDT_CODE_SELECTOR);
    let data = segment_from_gdt(gdt[3], GDT_DATA_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[4], GDT_TSS_SELECTOR);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(CpuSetupError::SetSregs)?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(CpuSetupError::SetRegs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_ratio_fits_linux_arithmetic() {
        for tsc_khz in [
            2_000_000, 2_918_400, 2_918_401, 3_000_000, 1_234_567, 4_000_000,
        ] {
            let (numerator, denominator) = tsc_ratio(tsc_khz);
            let linux = u64::from(CRYSTAL_KHZ) * u64::from(numerator);
            assert!(
                linux <= u64::from(u32::MAX),
                "{tsc_khz}: {numerator}/{denominator}"
            );
            let announced = (linux / u64::from(denominator)) as i64;
            assert!(
                (announced - i64::from(tsc_khz)).abs() <= 500,
                "{tsc_khz}: {announced}"
            );
        }
        assert_eq!(tsc_ratio(3_000_000), (3, 1));
        assert_eq!(tsc_ratio(2_918_400), (1824, 625));
        // No small exact ratio: rounded to the MHz.
        assert_eq!(tsc_ratio(2_918_401), (1459, 500));
    }

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let gdt = boot_gdt();
        let code = segment_from_gdt(gdt[2], GDT_CODE_SELECTOR);
        assert_eq!(
            (code.l, code.db, code.present, code.s, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!((code.base, code.limit, code.g), (0, 0xffff_ffff, 1));
        let data = segment_from_gdt(gdt[3], GDT_DATA_SELECTOR);
        assert_eq!(
            (data.l, data.db, data.type_, data.limit),
            (0, 1, 3, 0xffff_ffff)
        );
        let tss = segment_from_gdt(gdt[4], GDT_TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_, tss.present), (0, 0xb, 1));
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mmap");
        write_boot_tables(&mem).expect("tables");
        let read = |addr: u64| -> u64 { mem.read_obj(GuestAddress(addr)).expect("read") };
        assert_eq!(read(PML4_START), PDPTE_START | 3);
        assert_eq!(read(PDPTE_START + 3 * 8), (PDE_START + 0x3000) | 3);
        // The last 2 MiB page of the last GiB maps 0xffe00000 (where the LAPIC lives).
        assert_eq!(read(PDE_START + 0x3000 + 511 * 8), 0xffe0_0000 | 0x83);
    }
}
