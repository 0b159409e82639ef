//! Static checks of the end-to-end test guest (`tests/guest/`, built by `build.rs`).
//!
//! On kvm_pvm every guest instruction at CPL0 goes through KVM's instruction emulator, and an
//! instruction it does not implement kills the VM with KVM_EXIT_INTERNAL_ERROR, far from the
//! line that caused it. So the guest's disassembly is checked here: no instruction known to be
//! missing from the emulator, no SSE/AVX/MMX/x87, and nothing outside a small list of plain
//! general-purpose instructions. The ELF header facts the VMM's loader relies on are checked
//! too.
//!
//! Executable sections are disassembled as 64-bit code. The PVH entry stub (32-bit code, run
//! in place) has its own non-executable section `.pvh32`, disassembled as 32-bit code and held
//! to the same lists. The AP trampoline (16/32/64-bit code copied to 0x6000) lives in .rodata
//! and is reviewed by hand.

use std::process::Command;

const GUEST_ELF: &str = env!("VMD_TESTGUEST_ELF");

/// Lowest physical address the VMM loads a PT_LOAD segment at (`layout::HIMEM_START`).
const HIMEM_START: u64 = 0x10_0000;
/// The memtest scenario writes from 16 MiB up: the image must end below.
const MEMTEST_BASE: u64 = 0x100_0000;

/// Instructions the kvm_pvm emulator is known not to implement (or that are unverified), by
/// mnemonic prefix in objdump's AT&T syntax.
const FORBIDDEN_PREFIXES: &[(&str, &str)] = &[
    ("cmpxchg16b", "not emulated"),
    ("xrstor", "not emulated (xrstor, xrstors)"),
    ("xsave", "not emulated (xsave, xsaves, xsavec, xsaveopt)"),
    ("int3", "not emulated"),
    ("popcnt", "not emulated"),
    ("clac", "not emulated"),
    ("stac", "not emulated"),
    ("fwait", "not emulated"),
    ("wait", "not emulated (fwait)"),
    ("fninit", "not emulated"),
    ("ldmxcsr", "not emulated"),
    ("vldmxcsr", "not emulated"),
    ("stmxcsr", "SSE state"),
    ("rdgsbase", "not emulated"),
    ("rdfsbase", "not emulated (FSGSBASE)"),
    ("wrgsbase", "not emulated (FSGSBASE)"),
    ("wrfsbase", "not emulated (FSGSBASE)"),
    ("serialize", "not emulated"),
    ("invpcid", "not emulated"),
    ("cmps", "string compare (repe cmps) is unverified"),
    ("scas", "string scan (repe scas) is unverified"),
    ("emms", "MMX"),
    ("vzero", "AVX"),
    ("(bad)", "bytes objdump cannot decode"),
];

/// Register name prefixes of SSE/AVX/AVX-512/MMX/x87/MPX/AMX state.
const FORBIDDEN_REGISTERS: &[&str] = &[
    "%xmm", "%ymm", "%zmm", "%mm", "%st", "%bnd", "%tmm", "%k0", "%k1", "%k2", "%k3", "%k4", "%k5",
    "%k6", "%k7",
];

/// Instruction prefixes objdump prints before the mnemonic.
const PREFIXES: &[&str] = &[
    "lock", "rep", "repz", "repe", "repnz", "repne", "data16", "data32", "addr16", "addr32", "cs",
    "ds", "es", "fs", "gs", "ss", "notrack", "bnd", "xacquire", "xrelease",
];

/// The plain general-purpose instructions the guest may use (AT&T mnemonics; a size suffix
/// b/w/l/q is accepted after them). Before adding one, check that KVM's x86 emulator
/// (arch/x86/kvm/emulate.c) implements it, since kvm_pvm emulates every guest instruction.
const ALLOWED: &[&str] = &[
    // data movement
    "mov", "movabs", "movzbw", "movzbl", "movzbq", "movzwl", "movzwq", "movsbw", "movsbl", "movsbq",
    "movswl", "movswq", "movslq", "lea", "push", "pop", "xchg", "cltq", "cltd", "cqto", "cwtl",
    // string moves and stores (with rep)
    "movsb", "movsw", "movsl", "movsq", "movs", "stos", "stosb", "stosw", "stosl", "stosq",
    // arithmetic and logic
    "add", "adc", "sub", "sbb", "and", "or", "xor", "cmp", "test", "not", "neg", "inc", "dec",
    "imul", "mul", "div", "idiv", "shl", "shr", "sar", "sal", "rol", "ror", "bt", "bts", "btr",
    "btc", // atomics
    "xadd", "cmpxchg", // control flow
    "jmp", "call", "ret", "ja", "jae", "jb", "jbe", "jc", "je", "jg", "jge", "jl", "jle", "jna",
    "jnae", "jnb", "jnbe", "jnc", "jne", "jng", "jnge", "jnl", "jnle", "jno", "jnp", "jns", "jnz",
    "jo", "jp", "jpe", "jpo", "js", "jz", "ljmp", "lret", "ud2", // flags
    "clc", "stc", "cld", "cli", // system
    "in", "out", "cpuid", "rdtsc", "rdmsr", "wrmsr", "hlt", "pause", "nop", "lgdt",
    // string port I/O (with rep): emulate.c's ins/outs (em_in/em_out, String)
    "ins", "outs",
];

/// One decoded instruction of `objdump -d --no-show-raw-insn` output.
#[derive(Debug, PartialEq)]
struct Insn<'a> {
    address: &'a str,
    mnemonic: &'a str,
    text: &'a str,
}

/// Parses an instruction line (`  100000:\tmov    %rsp,%rbp`); other lines give `None`.
fn parse_line(line: &str) -> Option<Insn<'_>> {
    let (address, text) = line.split_once(":\t")?;
    let address = address.trim();
    if address.is_empty() || !address.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let text = text.trim();
    let mnemonic = text
        .split_whitespace()
        .find(|word| !PREFIXES.contains(word))?;
    Some(Insn {
        address,
        mnemonic,
        text,
    })
}

/// Why `insn` must not be in the guest, or `None` if it is fine.
fn check(insn: &Insn<'_>) -> Option<String> {
    let m = insn.mnemonic;
    for (prefix, why) in FORBIDDEN_PREFIXES {
        if m.starts_with(prefix) {
            return Some(format!("forbidden instruction `{m}`: {why}"));
        }
    }
    if m.starts_with('f') {
        return Some(format!("forbidden instruction `{m}`: x87/FPU state"));
    }
    let operands = insn
        .text
        .split_once(char::is_whitespace)
        .map_or("", |(_, rest)| rest);
    for reg in FORBIDDEN_REGISTERS {
        if operands.contains(reg) {
            return Some(format!(
                "forbidden register `{reg}...` in `{m}`: SSE/AVX/MMX/x87 state"
            ));
        }
    }
    let allowed = ALLOWED.contains(&m)
        || m.strip_suffix(['b', 'w', 'l', 'q'])
            .is_some_and(|base| ALLOWED.contains(&base));
    if !allowed {
        return Some(format!(
            "instruction `{m}` is not in the list of plain instructions known to be emulated \
             (tests/guest_disassembly.rs ALLOWED)"
        ));
    }
    None
}

/// Every problem in an objdump listing, one line each.
fn problems(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(parse_line)
        .filter_map(|insn| {
            check(&insn).map(|why| format!("{}: {}: {why}", insn.address, insn.text))
        })
        .collect()
}

/// The 64-bit disassembly of the executable sections.
fn disassemble() -> String {
    objdump(&["-d", "-w", "--no-show-raw-insn", GUEST_ELF])
}

/// The 32-bit disassembly of the PVH entry stub (section `.pvh32`).
fn disassemble_pvh32() -> String {
    objdump(&[
        "-D",
        "-w",
        "--no-show-raw-insn",
        "-M",
        "i386",
        "-j",
        ".pvh32",
        GUEST_ELF,
    ])
}

fn objdump(args: &[&str]) -> String {
    let objdump = std::env::var("OBJDUMP").unwrap_or_else(|_| "objdump".into());
    let out = Command::new(&objdump)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {objdump}: {e}"));
    assert!(
        out.status.success(),
        "{objdump} -d {GUEST_ELF} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("objdump output is not UTF-8")
}

#[test]
fn guest_uses_only_emulated_instructions() {
    let listing = disassemble();
    let insns: Vec<_> = listing.lines().filter_map(parse_line).collect();
    // Guard against a vacuous pass (nothing disassembled, output format changed).
    assert!(
        insns.len() > 200,
        "only {} instructions found in:\n{listing}",
        insns.len()
    );
    for needed in ["hlt", "out", "rdtsc", "xadd", "xchg"] {
        assert!(
            insns.iter().any(|i| i.mnemonic == needed),
            "no `{needed}` in the disassembly: is the output format still understood?"
        );
    }
    let problems = problems(&listing);
    assert!(
        problems.is_empty(),
        "the test guest {GUEST_ELF} uses instructions kvm_pvm cannot run:\n{}",
        problems.join("\n")
    );
}

#[test]
fn pvh_entry_uses_only_emulated_instructions() {
    let listing = disassemble_pvh32();
    let insns: Vec<_> = listing.lines().filter_map(parse_line).collect();
    for needed in ["wrmsr", "lgdtl", "ljmp"] {
        assert!(
            insns.iter().any(|i| i.mnemonic == needed),
            "no `{needed}` in the 32-bit disassembly of .pvh32:\n{listing}"
        );
    }
    let problems = problems(&listing);
    assert!(
        problems.is_empty(),
        "the PVH entry of {GUEST_ELF} uses instructions kvm_pvm cannot run:\n{}",
        problems.join("\n")
    );
}

#[test]
fn matcher_flags_forbidden_instructions() {
    let bad = [
        ("  100010:\tpxor   %xmm0,%xmm0", "%xmm"),
        ("  100010:\tlock cmpxchg16b (%rdi)", "cmpxchg16b"),
        ("  100010:\tint3", "int3"),
        ("  100010:\tfwait", "fwait"),
        ("  100010:\tfninit", "fninit"),
        ("  100010:\tfldz", "x87"),
        ("  100010:\tpopcnt %rax,%rbx", "popcnt"),
        ("  100010:\tldmxcsr (%rsp)", "ldmxcsr"),
        ("  100010:\txrstor (%rdi)", "xrstor"),
        ("  100010:\txsaves (%rdi)", "xsaves"),
        ("  100010:\trdgsbase %rax", "rdgsbase"),
        ("  100010:\tclac", "clac"),
        ("  100010:\tstac", "stac"),
        ("  100010:\tserialize", "serialize"),
        ("  100010:\tinvpcid (%rax),%rbx", "invpcid"),
        ("  100010:\trepz cmpsb %es:(%rdi),%ds:(%rsi)", "cmpsb"),
        ("  100010:\trepnz scas %es:(%rdi),%al", "scas"),
        ("  100010:\tmovq   %rax,%xmm1", "%xmm"),
        ("  100010:\tvmovdqu %ymm0,(%rdi)", "%ymm"),
        ("  100010:\tmovq   %mm0,%rax", "%mm"),
        ("  100010:\t(bad)", "(bad)"),
        ("  100010:\tlzcnt  %rax,%rbx", "lzcnt"),
    ];
    for (line, what) in bad {
        let insn = parse_line(line).unwrap_or_else(|| panic!("not parsed: {line:?}"));
        let why = check(&insn).unwrap_or_else(|| panic!("not flagged: {line:?}"));
        assert!(
            why.contains(what),
            "{line:?} flagged as {why:?}, expected a mention of {what}"
        );
    }
    let good = [
        "  100000:\tcli",
        "  100004:\tlea    0x1234(%rip),%rsp        # 101000 <bsp_stack_top>",
        "  100010:\tlock xadd %eax,0x1000(%rip)        # 102000 <ap_arrived>",
        "  100020:\trep movsb %ds:(%rsi),%es:(%rdi)",
        "  100030:\tmovzbl (%rsi),%eax",
        "  100040:\tout    %al,$0x80",
        "  100050:\tcmpl   $0x1,0x10(%rdx)",
        "  100060:\tmovabs $0x2052545020445352,%rdx",
        "  100070:\tcall   1007b9 <str_is>",
        "  100080:\tjmp    *%rax",
        "  100090:\tstc",
    ];
    for line in good {
        let insn = parse_line(line).unwrap_or_else(|| panic!("not parsed: {line:?}"));
        assert_eq!(check(&insn), None, "{line:?} wrongly flagged");
    }
    // Labels, headers and blank lines are not instructions.
    for line in [
        "0000000000100000 <_start>:",
        "Disassembly of section .text:",
        "",
        "\t...",
    ] {
        assert_eq!(parse_line(line), None, "{line:?} parsed as an instruction");
    }
    let listing = "0000000000100000 <_start>:\n  100000:\tcli\n  100001:\tpxor   %xmm0,%xmm0\n";
    let found = problems(listing);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("100001: pxor"), "{found:?}");
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

#[test]
fn guest_elf_header_fits_the_loader() {
    let elf = std::fs::read(GUEST_ELF).unwrap_or_else(|e| panic!("cannot read {GUEST_ELF}: {e}"));
    assert!(
        elf.len() >= 64,
        "{GUEST_ELF} is too short for an ELF header"
    );
    assert!(
        elf.len() <= 64 * 1024,
        "{GUEST_ELF} is {} bytes: expected a few KiB",
        elf.len()
    );
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELFCLASS64");
    assert_eq!(elf[5], 1, "not little endian");
    assert_eq!(u16_at(&elf, 16), 2, "e_type is not ET_EXEC");
    assert_eq!(u16_at(&elf, 18), 62, "e_machine is not EM_X86_64");
    let entry = u64_at(&elf, 24);
    let phoff = usize::try_from(u64_at(&elf, 32)).unwrap();
    let phentsize = usize::from(u16_at(&elf, 54));
    let phnum = usize::from(u16_at(&elf, 56));
    assert!(
        entry >= HIMEM_START,
        "entry {entry:#x} is below {HIMEM_START:#x}"
    );
    assert_eq!(phentsize, 56, "unexpected e_phentsize");
    assert!(
        phoff >= 64 && phoff + phnum * phentsize <= elf.len(),
        "program headers out of the file"
    );

    let mut loads = 0;
    let mut entry_in_code = false;
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..][..phentsize];
        let p_type = u32_at(ph, 0);
        let p_flags = u32_at(ph, 4);
        let (offset, vaddr, paddr) = (u64_at(ph, 8), u64_at(ph, 16), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        assert!(
            p_type != 2 && p_type != 3,
            "segment {i} is PT_DYNAMIC/PT_INTERP: the guest must be static"
        );
        if p_type != 1 {
            continue;
        }
        loads += 1;
        assert!(
            paddr >= HIMEM_START,
            "PT_LOAD {i} p_paddr {paddr:#x} < {HIMEM_START:#x}"
        );
        assert_eq!(
            vaddr, paddr,
            "PT_LOAD {i}: virtual and physical addresses differ"
        );
        assert!(filesz <= memsz, "PT_LOAD {i}: p_filesz > p_memsz");
        assert!(
            offset + filesz <= elf.len() as u64,
            "PT_LOAD {i} extends past the file"
        );
        assert!(
            paddr + memsz <= MEMTEST_BASE,
            "PT_LOAD {i} ends at {:#x}, inside the memtest range from {MEMTEST_BASE:#x}",
            paddr + memsz
        );
        if p_flags & 1 != 0 && (paddr..paddr + filesz).contains(&entry) {
            entry_in_code = true;
        }
    }
    assert!(loads > 0, "no PT_LOAD segment");
    assert!(
        entry_in_code,
        "entry {entry:#x} is not inside an executable PT_LOAD segment"
    );
}

/// The PVH entry note QEMU boots the image through: a PT_NOTE segment with the note
/// ("Xen", XEN_ELFNOTE_PHYS32_ENTRY = 18), whose 8-byte description is an address in an
/// executable PT_LOAD segment below 4 GiB. QEMU pads the name to the segment's alignment
/// before reading the description, so that must be 4.
#[test]
fn guest_elf_has_pvh_entry_note() {
    let elf = std::fs::read(GUEST_ELF).unwrap_or_else(|e| panic!("cannot read {GUEST_ELF}: {e}"));
    let phoff = usize::try_from(u64_at(&elf, 32)).unwrap();
    let phnum = usize::from(u16_at(&elf, 56));
    let phdrs: Vec<&[u8]> = (0..phnum).map(|i| &elf[phoff + i * 56..][..56]).collect();
    let mut entry = None;
    for ph in phdrs.iter().filter(|ph| u32_at(ph, 0) == 4) {
        let offset = usize::try_from(u64_at(ph, 8)).unwrap();
        let filesz = usize::try_from(u64_at(ph, 32)).unwrap();
        assert_eq!(u64_at(ph, 48), 4, "PT_NOTE p_align is not 4");
        let notes = &elf[offset..offset + filesz];
        let mut at = 0;
        while at + 12 <= notes.len() {
            let namesz = u32_at(notes, at) as usize;
            let descsz = u32_at(notes, at + 4) as usize;
            let n_type = u32_at(notes, at + 8);
            let name_at = at + 12;
            let desc_at = name_at + namesz.next_multiple_of(4);
            let next = desc_at + descsz.next_multiple_of(4);
            assert!(next <= notes.len(), "note at {at:#x} runs past its segment");
            if &notes[name_at..name_at + namesz] == b"Xen\0" && n_type == 18 {
                assert_eq!(descsz, 8, "PHYS32_ENTRY description is not 8 bytes");
                entry = Some(u64_at(notes, desc_at));
            }
            at = next;
        }
    }
    let entry = entry.expect("no XEN_ELFNOTE_PHYS32_ENTRY note in a PT_NOTE segment");
    assert!(entry < 1 << 32, "PVH entry {entry:#x} is above 4 GiB");
    let in_code = phdrs.iter().any(|ph| {
        let (paddr, filesz) = (u64_at(ph, 24), u64_at(ph, 32));
        u32_at(ph, 0) == 1 && u32_at(ph, 4) & 1 != 0 && (paddr..paddr + filesz).contains(&entry)
    });
    assert!(
        in_code,
        "PVH entry {entry:#x} is not inside an executable PT_LOAD segment"
    );
}
