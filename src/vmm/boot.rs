//! Direct kernel boot: loading an ELF or bzImage kernel, the initrd and the command line into
//! guest memory, and writing the Linux boot parameters ("zero page") with the e820 map.
//! See the kernel's Documentation/arch/x86/boot.rst for the fields.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, Cmdline, KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout::{
    ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START,
    ZERO_PAGE_START,
};
use super::memory::ram_ranges;

/// The 64-bit entry of a bzImage is 0x200 bytes into the protected-mode kernel (boot.rst,
/// "64-bit boot protocol").
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// boot_params magic values (boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Initrds are placed below this address unless the kernel header says otherwise (boot.rst:
/// `initrd_addr_max` defaults to 0x37ffffff for old kernels).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

/// Errors from loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot rewind the kernel image")]
    SeekKernel(#[source] std::io::Error),
    #[error("the kernel is neither a 64-bit ELF executable ({elf}) nor a bzImage")]
    UnknownKernelFormat {
        elf: loader::Error,
        #[source]
        bzimage: loader::Error,
    },
    #[error("the kernel command line is invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest memory")]
    LoadCmdline(#[source] loader::Error),
    #[error("cannot read the size of the initrd")]
    InitrdSize(#[source] std::io::Error),
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("cannot read the initrd into guest memory")]
    ReadInitrd(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the boot parameters into guest memory")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
}

/// Where the loaded kernel starts executing, and what its bzImage header said.
pub struct LoadedKernel {
    pub entry: GuestAddress,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Loads a 64-bit ELF (vmlinux, or the project's test guest) or a bzImage into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let highmem = Some(GuestAddress(HIMEM_START));
    let elf = match Elf::load(mem, None, kernel, highmem) {
        Ok(result) => {
            return Ok(LoadedKernel {
                entry: result.kernel_load,
                setup_header: None,
            });
        }
        Err(err) => err,
    };
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(BootError::SeekKernel)?;
    match BzImage::load(mem, None, kernel, highmem) {
        Ok(result) => Ok(LoadedKernel {
            entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
            setup_header: result.setup_header,
        }),
        Err(bzimage) => Err(BootError::UnknownKernelFormat { elf, bzimage }),
    }
}

/// Writes the command line (NUL-terminated) at `CMDLINE_START`.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let mut line = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !cmdline.is_empty() {
        line.insert_str(cmdline).map_err(BootError::Cmdline)?;
    }
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &line).map_err(BootError::LoadCmdline)
}

/// An initrd in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Copies the initrd to the highest page-aligned place below the kernel's limit (Linux wants it
/// as high as possible, out of the kernel's way).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    kernel: &LoadedKernel,
) -> Result<LoadedInitrd, BootError> {
    let size = initrd.metadata().map_err(BootError::InitrdSize)?.len();
    let addr_max = kernel
        .setup_header
        .map(|hdr| u64::from(hdr.initrd_addr_max))
        .filter(|&max| max != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let low_ram_end = mem.last_addr().0.min(MMIO_GAP_START - 1);
    let limit = addr_max.min(low_ram_end) + 1;
    let addr = limit
        .checked_sub(size)
        .map(|start| start & !(PAGE_SIZE - 1))
        .filter(|&start| start >= HIMEM_START)
        .ok_or(BootError::InitrdTooLarge { size, limit })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(BootError::ReadInitrd)?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

// The ACPI tables must sit in the area e820 reports as reserved.
const _: () = assert!(ACPI_START > EBDA_START && ACPI_START < HIMEM_START);

/// The e820 map: low RAM, the reserved legacy area (EBDA, ACPI tables, BIOS), then RAM.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for (range_start, len) in ram_ranges(mem_size) {
        let end = range_start.0 + len;
        let start = range_start.0.max(HIMEM_START);
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Writes `struct boot_params` at `ZERO_PAGE_START`.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    // Both are below 4 GiB by construction (layout constants).
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        // load_initrd keeps the initrd below the 32-bit initrd_addr_max.
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    let map = e820_map(mem_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::WriteBootParams)
}

/// Reads a u32 back from guest memory; used by tests.
#[cfg(test)]
fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).expect("in memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).expect("mmap")
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_legacy_area() {
        let map = e820_map(64 << 20);
        let entries: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            entries,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        let big = e820_map(5 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(
            (big[3].addr, big[3].size),
            (1 << 32, (5 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let mem = memory(4 << 20);
        let mut file = tempfile::tempfile().expect("tempfile");
        std::io::Write::write_all(&mut file, &[0x5a; 8192]).expect("write");
        let err = load_kernel(&mem, &mut file).err().expect("must fail");
        assert!(err.to_string().contains("neither a 64-bit ELF"), "{err}");
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let mem = memory(32 << 20);
        let mut file = tempfile::tempfile().expect("tempfile");
        std::io::Write::write_all(&mut file, &[7u8; 10_000]).expect("write");
        std::io::Seek::rewind(&mut file).expect("rewind");
        let kernel = LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            setup_header: None,
        };
        let initrd = load_initrd(&mem, &mut file, &kernel).expect("fits");
        assert_eq!(initrd.addr.0 % PAGE_SIZE, 0);
        assert!(initrd.addr.0 + initrd.size <= 32 << 20);
        assert!(initrd.addr.0 + initrd.size > (32 << 20) - PAGE_SIZE);
        assert_eq!(read_u32(&mem, initrd.addr.0), 0x0707_0707);
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let mem = memory(4 << 20);
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(8 << 20).expect("size");
        let mut file = file;
        let kernel = LoadedKernel {
            entry: GuestAddress(HIMEM_START),
            setup_header: None,
        };
        assert!(matches!(
            load_initrd(&mem, &mut file, &kernel),
            Err(BootError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn cmdline_too_long_is_refused() {
        let mem = memory(4 << 20);
        assert!(load_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
        load_cmdline(&mem, "console=ttyS0").expect("fits");
        let mut bytes = [0u8; 14];
        mem.read_slice(&mut bytes, GuestAddress(CMDLINE_START))
            .expect("read");
        assert_eq!(&bytes, b"console=ttyS0\0");
    }
}
