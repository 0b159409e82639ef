/*
 * vmd test guest: a tiny x86-64 program booted like a Linux kernel ELF (64-bit boot protocol)
 * that exercises the VMM end to end. See README.md for the scenarios and their output, and
 * src/vmm/layout.rs for the platform contract (addresses, ports) it relies on. QEMU (microvm)
 * boots the same ELF through its PVH entry (pvh_start32), the reference for the virtio-mmio
 * scenarios.
 *
 * Constraints: on kvm_pvm every guest instruction at CPL0 is software-emulated by KVM's
 * instruction emulator, which does not implement SSE/x87, int3, popcnt, xrstor, clac/stac,
 * ... (tests/guest_disassembly.rs enforces this). Use plain general-purpose integer
 * instructions only, and keep loops short.
 *
 * Conventions: helper routines preserve every register except their documented outputs
 * (flags are clobbered). Scenario code never returns and uses registers freely.
 */

/* ---- platform contract (src/vmm/layout.rs) ---- */
#define COM1_THR            0x3f8
#define COM1_LSR            0x3fd
#define COM1_SCR            0x3ff           /* scratch register */
#define LSR_THR_EMPTY       0x20
#define LSR_DATA_READY      0x01
#define PM1_STS_PORT        0x600
#define PM1_PWRBTN_STS      0x100
#define PM1_CNT_PORT        0x604
#define PM1_CNT_S5          0x3400          /* SLP_EN (1 << 13) | SLP_TYP 5 (5 << 10) */
#define I8042_CMD_PORT      0x64
#define I8042_CMD_RESET     0xfe
#define LAPIC_BASE          0xfee00000
#define LAPIC_ID            0x20
#define LAPIC_ICR_LO        0x300
#define LAPIC_ICR_HI        0x310
#define ICR_INIT            0x4500          /* delivery mode INIT, level assert */
#define ICR_SIPI            0x4600          /* delivery mode start-up, level assert */
#define ICR_BUSY            0x1000
#define TRAMP_ADDR          0x6000          /* AP start-up trampoline, SIPI vector 0x06 */
#define TRAMP_VECTOR        (TRAMP_ADDR >> 12)
#define MSR_EFER            0xc0000080
#define EFER_LME            0x100
#define EFER_LMA            0x400

/* struct boot_params offsets */
#define BP_ACPI_RSDP_ADDR   0x070
#define BP_E820_ENTRIES     0x1e8
#define BP_CMD_LINE_PTR     0x228
#define BP_E820_TABLE       0x2d0
#define E820_ENTRY_SIZE     20
#define E820_MAX_ENTRIES    128
#define E820_RAM            1

/* ACPI signatures, little endian */
#define SIG_RSDP            0x2052545020445352  /* "RSD PTR " */
#define SIG_XSDT            0x54445358          /* "XSDT" */
#define SIG_MADT            0x43495041          /* "APIC" */

/* timing: the TSC is assumed to run at about 2 GHz */
#define TSC_SECOND          2000000000
#define TSC_10MS            20000000
#define TSC_200US           400000
#define SMP_TIMEOUT         (10 * TSC_SECOND)

#define MAX_CPUS            256
#define AP_STACK_SIZE       1024
#define MAX_APS             255
#define BSP_STACK_SIZE      8192

#define MEMTEST_BASE        0x1000000           /* 16 MiB */
#define MEMTEST_MAX_MIB     4080                /* 16 MiB + 4080 MiB = 4 GiB, the mapped range */
#define MEMTEST_PATTERN     0x5aa5c33c96690ff0

/* PVH entry (QEMU microvm): struct hvm_start_info, see README.md */
#define HVM_START_MAGIC     0x336ec578
#define SI_MAGIC            0
#define SI_VERSION          4
#define SI_CMDLINE_PADDR    24
#define SI_RSDP_PADDR       32
#define SI_MEMMAP_PADDR     40              /* version >= 1 */
#define SI_MEMMAP_ENTRIES   48
#define MEMMAP_ENTRY_SIZE   24              /* {addr u64, size u64, type u32, reserved u32} */
#define PVH_CS              0x10            /* selectors of pvh_gdt, the same as vmd's */
#define PVH_DS              0x18

/* QEMU microvm power off: ACPI GED sleep control register (byte), SLP_EN | SLP_TYP 5 */
#define GED_SLEEP_CTL       0xfea00200
#define GED_SLEEP_S5        0x34            /* SLP_EN (1 << 5) | SLP_TYP 5 (5 << 2) */
#define DEBUG_EXIT_PORT     0xf4            /* -device isa-debug-exit,iobase=0xf4,iosize=4 */

/* virtio-mmio, version 2 (virtio 1.x) register offsets */
#define VIRTIO_MAGIC        0x74726976      /* "virt" */
#define VMMIO_MAGIC         0x000
#define VMMIO_VERSION       0x004
#define VMMIO_DEVICE_ID     0x008
#define VMMIO_DEV_FEATURES  0x010
#define VMMIO_DEV_FEAT_SEL  0x014
#define VMMIO_DRV_FEATURES  0x020
#define VMMIO_DRV_FEAT_SEL  0x024
#define VMMIO_QUEUE_SEL     0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM     0x038
#define VMMIO_QUEUE_READY   0x044
#define VMMIO_QUEUE_NOTIFY  0x050
#define VMMIO_STATUS        0x070
#define VMMIO_QUEUE_DESC    0x080           /* low word; high word at +4 */
#define VMMIO_QUEUE_DRIVER  0x090
#define VMMIO_QUEUE_DEVICE  0x0a0
#define VMMIO_CONFIG_GEN    0x0fc
#define VMMIO_CONFIG        0x100
#define VSTAT_ACK           0x01
#define VSTAT_DRIVER        0x02
#define VSTAT_DRIVER_OK     0x04
#define VSTAT_FEATURES_OK   0x08
#define VSTAT_NEEDS_RESET   0x40
#define VSTAT_FAILED        0x80
#define VIRTIO_ID_NET       1
#define VIRTIO_ID_BLOCK     2
#define VIRTIO_ID_RNG       4
#define VIRTIO_F_VERSION_1_HI 0x1           /* feature bit 32: bit 0 of feature word 1 */
#define BLK_F_SEG_MAX       2
#define BLK_F_RO            5
#define BLK_F_BLK_SIZE      6
#define BLK_F_FLUSH         9
#define BLK_FEATURES        ((1 << BLK_F_SEG_MAX) | (1 << BLK_F_RO) | (1 << BLK_F_BLK_SIZE) | (1 << BLK_F_FLUSH))
#define NET_F_MAC           5
#define NET_F_MRG_RXBUF     15
#define NET_FEATURES        ((1 << NET_F_MAC) | (1 << NET_F_MRG_RXBUF))
#define BLK_T_IN            0
#define BLK_T_OUT           1
#define BLK_T_FLUSH         4
#define BLK_T_GET_ID        8
#define BLK_T_BAD           0xff            /* blk-bad's unsupported request type */
#define BLK_S_OK            0
#define BLK_S_IOERR         1
#define BLK_ID_BYTES        20
#define VRING_DESC_F_NEXT   1
#define VRING_DESC_F_WRITE  2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VQ_MAX_SIZE         16
#define VQ_DESC             0               /* offsets in vq_area: 16 * 16 bytes */
#define VQ_AVAIL            0x100           /* flags, idx, ring[16], used_event */
#define VQ_USED             0x200           /* flags, idx, ring[16] of {id, len}, avail_event */
#define BLK_BUF_SIZE        0x20000         /* 128 KiB: one request's data */
#define BLK_BUF_SECTORS     (BLK_BUF_SIZE / 512)
#define VIRTIO_TIMEOUT      (3 * TSC_SECOND)
#define BLKBAD_TIMEOUT      (TSC_SECOND / 2)
#define BLKBAD_OUTSIDE      0xf000000000    /* 960 GiB: beyond any test VM's RAM */
#define BLKREAD_MAX_MIB     0x10000000000   /* keeps MIB << 20 within 64 bits */
#define XORSHIFT_SEED       0x9e3779b97f4a7c15
#define VRING_USED_F_NO_NOTIFY 1

/* virtio-net and the frames the net scenarios answer. Multi-byte protocol fields are big
 * endian; *_BE constants are their values as a little-endian load of the packet bytes. */
#define NET_HDR_LEN         12              /* virtio_net_hdr_v1 (VERSION_1: always 12 bytes) */
#define NET_HDR_NUM_BUFFERS 10
#define NET_BUF_SIZE        2048            /* >= 1526: a whole frame, never merged */
#define NET_BUF_SHIFT       11
#define NET_DEFAULT_MAC_LO  0x00677402      /* 02:74:67:00:00:01 without VIRTIO_NET_F_MAC */
#define NET_DEFAULT_MAC_HI  0x0100
#define ETH_HLEN            14
#define ETH_TYPE            12
#define ETH_P_ARP_BE        0x0608          /* 0x0806 */
#define ETH_P_IP_BE         0x0008          /* 0x0800 */
#define ARP_LEN             28
#define ARP_SHA             8
#define ARP_SPA             14
#define ARP_THA             18
#define ARP_TPA             24
#define ARP_ETH_IP_BE       0x00080100      /* htype 1, ptype 0x0800 */
#define ARP_REQUEST_BE      0x01000406      /* hlen 6, plen 4, oper 1 */
#define ARP_REPLY_BE        0x02000406      /* hlen 6, plen 4, oper 2 */
#define IP_HLEN             20
#define IP_TOTLEN           2
#define IP_FRAG             6
#define IP_MF_OFFSET_BE     0xff3f          /* MF and the fragment offset */
#define IP_TTL              8
#define IP_PROTO            9
#define IP_CSUM             10
#define IP_SADDR            12
#define IP_DADDR            16
#define IPPROTO_ICMP        1
#define ICMP_HLEN           8
#define ICMP_CSUM           2
#define ICMP_ECHO           8
#define ICMP_ECHOREPLY      0

/* ======================================================================================= */
    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    lea     bsp_stack_top(%rip), %rsp
    mov     %rsi, boot_params(%rip)

    call    parse_cmdline

    /* "testguest: scenario NAME" */
    call    line_begin
    lea     s_scenario(%rip), %rsi
    call    puts
    mov     scen_ptr(%rip), %rsi
    mov     scen_len(%rip), %rcx
    test    %rsi, %rsi
    jnz     1f
    lea     s_none(%rip), %rsi
    call    puts
    jmp     2f
1:  call    putsn
2:  call    line_end

    /* dispatch on the scenario name (rsi, rcx) */
    mov     scen_ptr(%rip), %rsi
    mov     scen_len(%rip), %rcx
    test    %rsi, %rsi
    jz      sc_unknown
    lea     k_hello(%rip), %rdi
    call    str_is
    je      sc_hello
    lea     k_reboot(%rip), %rdi
    call    str_is
    je      sc_reboot
    lea     k_smp(%rip), %rdi
    call    str_is
    je      sc_smp
    lea     k_badio(%rip), %rdi
    call    str_is
    je      sc_badio
    lea     k_crash(%rip), %rdi
    call    str_is
    je      sc_crash
    lea     k_spin(%rip), %rdi
    call    str_is
    je      sc_spin
    lea     k_stringio(%rip), %rdi
    call    str_is
    je      sc_stringio
    lea     k_exits(%rip), %rdi
    call    str_prefix
    je      sc_exits
    lea     k_memtest(%rip), %rdi
    call    str_prefix
    je      sc_memtest
    lea     k_blk_fill(%rip), %rdi
    call    str_prefix
    je      sc_blk_fill
    lea     k_blk_check(%rip), %rdi
    call    str_prefix
    je      sc_blk_check
    lea     k_blk_read(%rip), %rdi
    call    str_prefix
    je      sc_blk_read
    lea     k_blk_iops(%rip), %rdi
    call    str_prefix
    je      sc_blk_iops
    lea     k_blk_id(%rip), %rdi
    call    str_is
    je      sc_blk_id
    lea     k_blk_ro(%rip), %rdi
    call    str_is
    je      sc_blk_ro
    lea     k_blk_bad(%rip), %rdi
    call    str_is
    je      sc_blk_bad
    lea     k_rng(%rip), %rdi
    call    str_is
    je      sc_rng
    lea     k_net(%rip), %rdi
    call    str_is
    je      sc_net
    lea     k_net_spoof(%rip), %rdi
    call    str_is
    je      sc_net_spoof
    jmp     sc_unknown

/* PVH entry, continued in 64-bit mode from pvh_start32 (.pvh32) on pvh_gdt and pvh_pml4.
 * Builds a Linux boot_params from the hvm_start_info and joins vmd's path at _start. */
pvh_start64:
    mov     $PVH_DS, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     %eax, %fs
    mov     %eax, %gs
    lea     bsp_stack_top(%rip), %rsp
    lea     pvh_boot_params(%rip), %rbx
    mov     %rbx, %rdi
    mov     $(4096 / 8), %ecx
    xor     %eax, %eax
    rep stosq
    mov     pvh_start_info(%rip), %esi
    test    %esi, %esi
    jz      9f
    cmpl    $HVM_START_MAGIC, SI_MAGIC(%rsi)
    jne     9f
    mov     SI_CMDLINE_PADDR(%rsi), %rax
    mov     %rax, %rdx
    shr     $32, %rdx
    jnz     1f                          /* cmd_line_ptr is 32 bits */
    mov     %eax, BP_CMD_LINE_PTR(%rbx)
1:  mov     SI_RSDP_PADDR(%rsi), %rax
    mov     %rax, BP_ACPI_RSDP_ADDR(%rbx)
    cmpl    $1, SI_VERSION(%rsi)
    jb      9f                          /* version 0: no memory map */
    mov     SI_MEMMAP_ENTRIES(%rsi), %ecx
    cmp     $E820_MAX_ENTRIES, %ecx
    jbe     2f
    mov     $E820_MAX_ENTRIES, %ecx
2:  mov     %cl, BP_E820_ENTRIES(%rbx)
    mov     SI_MEMMAP_PADDR(%rsi), %rsi
    lea     BP_E820_TABLE(%rbx), %rdi
    test    %ecx, %ecx
    jz      9f
3:  mov     (%rsi), %rax                /* addr */
    mov     %rax, (%rdi)
    mov     8(%rsi), %rax               /* size */
    mov     %rax, 8(%rdi)
    mov     16(%rsi), %eax              /* type */
    mov     %eax, 16(%rdi)
    add     $MEMMAP_ENTRY_SIZE, %rsi
    add     $E820_ENTRY_SIZE, %rdi
    dec     %ecx
    jnz     3b
9:  mov     %rbx, %rsi
    jmp     _start

/* ---- scenarios (entered with rsi/rcx = scenario token, rdx = length of the matched prefix) */

sc_unknown:
    lea     s_unknown(%rip), %rsi
    call    say
    jmp     poweroff

sc_hello:
    lea     s_hello(%rip), %rsi
    call    say
    jmp     poweroff

sc_reboot:
    lea     s_rebooting(%rip), %rsi
    call    say
    mov     $I8042_CMD_RESET, %al
    out     %al, $I8042_CMD_PORT
    jmp     halt_forever

sc_crash:
    lea     s_crashing(%rip), %rsi
    call    say
    ud2
    jmp     halt_forever

/* exits=N: N writes to the unmapped port 0x80 */
sc_exits:
    add     %rdx, %rsi
    sub     %rdx, %rcx
    call    parse_dec
    jc      sc_unknown
    mov     %rax, %rbx
    call    line_begin
    lea     s_exits(%rip), %rsi
    call    puts
    call    putdec
    lea     s_start(%rip), %rsi
    call    puts
    call    line_end
    mov     %rbx, %rcx
    xor     %eax, %eax
    test    %rcx, %rcx
    jz      2f
1:  out     %al, $0x80
    dec     %rcx
    jnz     1b
2:  lea     s_exits_done(%rip), %rsi
    call    say
    jmp     poweroff

/* badio: unmapped PIO (8/16/32 bit) and MMIO (32 bit) reads, then writes */
sc_badio:
    mov     $0x4400, %edx
    xor     %eax, %eax
    inb     %dx, %al
    movzbl  %al, %r12d
    xor     %eax, %eax
    inw     %dx, %ax
    movzwl  %ax, %r13d
    inl     %dx, %eax
    mov     %eax, %r14d
    mov     $0xd0000000, %ebx
    mov     (%rbx), %eax
    mov     %eax, %r15d

    call    line_begin
    lea     s_badio_pio8(%rip), %rsi
    call    puts
    mov     %r12, %rax
    mov     $2, %ecx
    call    puthex
    lea     s_badio_pio16(%rip), %rsi
    call    puts
    mov     %r13, %rax
    mov     $4, %ecx
    call    puthex
    lea     s_badio_pio32(%rip), %rsi
    call    puts
    mov     %r14, %rax
    mov     $8, %ecx
    call    puthex
    lea     s_badio_mmio32(%rip), %rsi
    call    puts
    mov     %r15, %rax
    mov     $8, %ecx
    call    puthex
    call    line_end

    mov     $0x4400, %edx
    mov     $0x5a, %al
    outb    %al, %dx
    mov     $0x5aa5, %ax
    outw    %ax, %dx
    mov     $0x5aa5c33c, %eax
    outl    %eax, %dx
    movl    %eax, (%rbx)

    lea     s_badio_survived(%rip), %rsi
    call    say
    jmp     poweroff

/* spin: heartbeat about once a second, poll the ACPI power button and COM1 input every
 * ~10 ms; each byte received is printed back as "spin input <decimal>" */
sc_spin:
    xor     %r12d, %r12d                /* heartbeat number */
    call    tsc_now
    mov     %rax, %r13                  /* time of the next heartbeat */
1:  call    tsc_now
    cmp     %r13, %rax
    jb      2f
    mov     $TSC_SECOND, %r13d
    add     %rax, %r13
    call    line_begin
    lea     s_heartbeat(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    call    line_end
    inc     %r12
2:  mov     $COM1_LSR, %edx
    inb     %dx, %al
    test    $LSR_DATA_READY, %al
    jz      4f
    mov     $COM1_THR, %edx             /* RBR on reads */
    inb     %dx, %al
    movzbl  %al, %eax
    call    line_begin
    lea     s_spin_input(%rip), %rsi
    call    puts
    call    putdec
    call    line_end
    jmp     2b                          /* the next byte, if any */
4:  mov     $PM1_STS_PORT, %edx
    inw     %dx, %ax
    test    $PM1_PWRBTN_STS, %ax
    jnz     3f
    mov     $TSC_10MS, %edi
    call    delay
    jmp     1b
3:  mov     $PM1_PWRBTN_STS, %eax
    outw    %ax, %dx                    /* write 1 to clear */
    lea     s_pwrbtn(%rip), %rsi
    call    say
    jmp     poweroff

/* stringio: string port I/O, which KVM hands to the VMM as count * size bytes in one exit.
 * A line written with rep outsb (vmd's COM1 never fills, so LSR is not polled), then four
 * bytes read with rep insb from the scratch register after writing 0xa5 to it. */
sc_stringio:
    call    line_begin
    lea     s_stringio_outs(%rip), %rsi
    mov     $(s_stringio_outs_end - s_stringio_outs), %ecx
    mov     $COM1_THR, %edx
    rep outsb
    call    line_end
    mov     $COM1_SCR, %edx
    mov     $0xa5, %al
    outb    %al, %dx
    lea     stringio_buf(%rip), %rdi
    mov     $4, %ecx
    rep insb
    call    line_begin
    lea     s_stringio_ins(%rip), %rsi
    call    puts
    mov     stringio_buf(%rip), %eax
    mov     $8, %ecx
    call    puthex
    call    line_end
    jmp     poweroff

/* memtest=MIB: pattern test of [16 MiB, 16 MiB + MIB MiB) */
sc_memtest:
    add     %rdx, %rsi
    sub     %rdx, %rcx
    call    parse_dec
    jc      sc_unknown
    mov     %rax, %r12                  /* MiB */
    cmp     $MEMTEST_MAX_MIB, %rax
    ja      .Lmt_no_ram
    mov     %rax, %r13
    shl     $20, %r13
    add     $MEMTEST_BASE, %r13         /* r13 = end */
    mov     $MEMTEST_BASE, %edi
    mov     %r13, %rsi
    call    e820_covers
    jc      .Lmt_no_ram

    /* write: qword at address A holds A ^ PATTERN; blocks of 64 bytes (the size is a
     * multiple of 1 MiB). Within a block A = base | off, so the value for offset off is
     * (base ^ PATTERN) ^ off. */
    movabs  $MEMTEST_PATTERN, %rdx
    mov     $MEMTEST_BASE, %edi
    cmp     %r13, %rdi
    jae     .Lmt_ok
1:  mov     %rdi, %rax
    xor     %rdx, %rax
    mov     %rax, (%rdi)
    xor     $(0 ^ 8), %rax
    mov     %rax, 8(%rdi)
    xor     $(8 ^ 16), %rax
    mov     %rax, 16(%rdi)
    xor     $(16 ^ 24), %rax
    mov     %rax, 24(%rdi)
    xor     $(24 ^ 32), %rax
    mov     %rax, 32(%rdi)
    xor     $(32 ^ 40), %rax
    mov     %rax, 40(%rdi)
    xor     $(40 ^ 48), %rax
    mov     %rax, 48(%rdi)
    xor     $(48 ^ 56), %rax
    mov     %rax, 56(%rdi)
    add     $64, %rdi
    cmp     %r13, %rdi
    jb      1b

    /* verify: value ^ (base ^ PATTERN) must equal the offset in the block */
    mov     $MEMTEST_BASE, %edi
2:  mov     %rdi, %rcx
    xor     %rdx, %rcx
    mov     (%rdi), %rax
    xor     %rcx, %rax
    jnz     .Lmt_locate
    mov     8(%rdi), %rax
    xor     %rcx, %rax
    cmp     $8, %rax
    jne     .Lmt_locate
    mov     16(%rdi), %rax
    xor     %rcx, %rax
    cmp     $16, %rax
    jne     .Lmt_locate
    mov     24(%rdi), %rax
    xor     %rcx, %rax
    cmp     $24, %rax
    jne     .Lmt_locate
    mov     32(%rdi), %rax
    xor     %rcx, %rax
    cmp     $32, %rax
    jne     .Lmt_locate
    mov     40(%rdi), %rax
    xor     %rcx, %rax
    cmp     $40, %rax
    jne     .Lmt_locate
    mov     48(%rdi), %rax
    xor     %rcx, %rax
    cmp     $48, %rax
    jne     .Lmt_locate
    mov     56(%rdi), %rax
    xor     %rcx, %rax
    cmp     $56, %rax
    jne     .Lmt_locate
    add     $64, %rdi
    cmp     %r13, %rdi
    jb      2b

.Lmt_ok:
    call    line_begin
    lea     s_memtest(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    lea     s_memtest_ok(%rip), %rsi
    call    puts
    call    line_end
    jmp     poweroff

.Lmt_locate:
    /* find the first bad qword of the block at rdi */
    mov     %rdi, %rcx
    lea     64(%rdi), %rsi
3:  mov     (%rcx), %rax
    xor     %rcx, %rax
    cmp     %rdx, %rax
    jne     4f
    add     $8, %rcx
    cmp     %rsi, %rcx
    jb      3b
    mov     %rdi, %rcx                  /* the block changed under us: report its start */
4:  call    line_begin
    lea     s_memtest_fail_at(%rip), %rsi
    call    puts
    mov     %rcx, %rax
    xor     %ecx, %ecx
    call    puthex
    call    line_end
    jmp     poweroff

.Lmt_no_ram:
    lea     s_memtest_no_ram(%rip), %rsi
    call    say
    jmp     poweroff

/* smp: start every AP listed in the MADT and wait for them to check in */
sc_smp:
    call    find_madt
    test    %rbx, %rbx
    jz      .Lsmp_no_madt

    /* collect the APIC ids of enabled processor local APIC entries */
    mov     4(%rbx), %ecx               /* MADT length */
    lea     (%rbx,%rcx), %rdi           /* end */
    lea     44(%rbx), %rsi              /* first entry */
    xor     %r12d, %r12d                /* N */
    lea     cpu_ids(%rip), %r8
1:  lea     2(%rsi), %rax
    cmp     %rdi, %rax
    ja      3f
    movzbl  1(%rsi), %ecx               /* entry length */
    cmp     $2, %ecx
    jb      3f                          /* malformed: stop */
    lea     (%rsi,%rcx), %rax
    cmp     %rdi, %rax
    ja      3f
    cmpb    $0, (%rsi)                  /* type 0: processor local APIC */
    jne     2f
    cmp     $8, %ecx
    jb      2f
    testb   $1, 4(%rsi)                 /* flags bit 0: enabled */
    jz      2f
    cmp     $MAX_CPUS, %r12
    jae     2f
    movzbl  3(%rsi), %eax               /* APIC id */
    mov     %al, (%r8,%r12)
    inc     %r12
2:  add     %rcx, %rsi
    jmp     1b
3:
    test    %r12, %r12
    jz      .Lsmp_no_cpus
    call    line_begin
    lea     s_smp(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    lea     s_cpus_in_madt(%rip), %rsi
    call    puts
    call    line_end

    /* install the trampoline at 0x6000 with the BSP's CR3 and EFER */
    lea     ap_trampoline(%rip), %rsi
    mov     $TRAMP_ADDR, %edi
    mov     $(ap_trampoline_end - ap_trampoline), %ecx
    rep movsb
    mov     %cr3, %rax
    mov     %eax, (TRAMP_ADDR + tr_cr3 - ap_trampoline)
    mov     $MSR_EFER, %ecx
    rdmsr
    or      $EFER_LME, %eax
    and     $~EFER_LMA, %eax
    mov     %eax, (TRAMP_ADDR + tr_efer - ap_trampoline)

    /* our own APIC id */
    mov     $LAPIC_BASE, %ebx
    mov     LAPIC_ID(%rbx), %r14d
    shr     $24, %r14d

    /* INIT, SIPI, SIPI every other APIC id */
    xor     %r13d, %r13d                /* number of APs started */
    xor     %r15d, %r15d                /* index into cpu_ids */
4:  cmp     %r12, %r15
    jae     6f
    movzbl  (%r8,%r15), %edi
    inc     %r15
    cmp     %r14d, %edi
    je      4b
    inc     %r13
    mov     $ICR_INIT, %esi
    call    send_ipi
    mov     $TSC_10MS, %edi
    call    delay
    movzbl  -1(%r8,%r15), %edi
    mov     $(ICR_SIPI | TRAMP_VECTOR), %esi
    call    send_ipi
    mov     $TSC_200US, %edi
    call    delay
    movzbl  -1(%r8,%r15), %edi
    mov     $(ICR_SIPI | TRAMP_VECTOR), %esi
    call    send_ipi
    mov     $TSC_200US, %edi
    call    delay
    jmp     4b

    /* wait (bounded) for the APs to check in */
6:  call    tsc_now
    movabs  $SMP_TIMEOUT, %rbx
    add     %rax, %rbx
7:  mov     ap_arrived(%rip), %eax
    cmp     %r13, %rax
    jae     8f
    pause
    call    tsc_now
    cmp     %rbx, %rax
    jb      7b

    call    line_begin
    lea     s_smp_fail_only(%rip), %rsi
    call    puts
    mov     ap_arrived(%rip), %eax
    inc     %rax                        /* the BSP */
    call    putdec
    lea     s_of(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    lea     s_cpus_up(%rip), %rsi
    call    puts
    call    line_end
    jmp     poweroff

8:  call    line_begin
    lea     s_smp_all(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    lea     s_cpus_up(%rip), %rsi
    call    puts
    call    line_end
    jmp     poweroff

.Lsmp_no_madt:
    lea     s_smp_no_madt(%rip), %rsi
    call    say
    jmp     poweroff

.Lsmp_no_cpus:
    lea     s_smp_no_cpus(%rip), %rsi
    call    say
    jmp     poweroff

/* ---- virtio scenarios (see README.md; the driver is under "virtio-mmio" below) -------- */

/* blk-fill=BYTE: write BYTE over the whole of disk 0, then flush */
sc_blk_fill:
    add     %rdx, %rsi
    sub     %rdx, %rcx
    call    parse_byte
    jc      sc_unknown
    mov     %rax, %r12
    lea     n_blk_fill(%rip), %rax
    mov     %rax, cur_name(%rip)
    call    blk_open
    lea     blk_buf(%rip), %rdi
    mov     $BLK_BUF_SIZE, %ecx
    mov     %r12d, %eax
    rep stosb
    xor     %r13d, %r13d                /* sector */
1:  call    blk_chunk                   /* rcx = sectors of this request */
    jz      2f
    mov     %rcx, %r15
    shl     $9, %ecx
    mov     $BLK_T_OUT, %edi
    mov     %r13, %rsi
    lea     blk_buf(%rip), %rdx
    call    blk_request_ok
    add     %r15, %r13
    jmp     1b
2:  testl   $(1 << BLK_F_FLUSH), vdev_feat(%rip)
    jz      3f
    mov     $BLK_T_FLUSH, %edi
    xor     %esi, %esi
    xor     %edx, %edx
    xor     %ecx, %ecx
    call    blk_request_ok
3:  call    line_begin
    lea     s_blk_fill_done(%rip), %rsi
    call    puts
    mov     %r13, %rax
    call    putdec
    lea     s_sectors(%rip), %rsi
    call    puts
    call    line_end
    jmp     poweroff

/* blk-check=BYTE: read all of disk 0 and compare it with BYTE, a qword at a time */
sc_blk_check:
    add     %rdx, %rsi
    sub     %rdx, %rcx
    call    parse_byte
    jc      sc_unknown
    movabs  $0x0101010101010101, %rdx
    imul    %rdx, %rax
    mov     %rax, %r12                  /* BYTE in every byte */
    lea     n_blk_check(%rip), %rax
    mov     %rax, cur_name(%rip)
    call    blk_open
    xor     %r13d, %r13d                /* sector */
1:  call    blk_chunk
    jz      4f
    mov     %rcx, %r15
    shl     $9, %ecx
    mov     $BLK_T_IN, %edi
    mov     %r13, %rsi
    lea     blk_buf(%rip), %rdx
    call    blk_request_ok
    lea     blk_buf(%rip), %rdi
    lea     (%rdi,%rcx), %rsi           /* end: a multiple of 512 bytes */
    mov     %r12, %rdx
2:  cmp     %rdx, (%rdi)
    jne     5f
    cmp     %rdx, 8(%rdi)
    jne     5f
    cmp     %rdx, 16(%rdi)
    jne     5f
    cmp     %rdx, 24(%rdi)
    jne     5f
    cmp     %rdx, 32(%rdi)
    jne     5f
    cmp     %rdx, 40(%rdi)
    jne     5f
    cmp     %rdx, 48(%rdi)
    jne     5f
    cmp     %rdx, 56(%rdi)
    jne     5f
    add     $64, %rdi
    cmp     %rsi, %rdi
    jb      2b
    add     %r15, %r13
    jmp     1b
4:  call    line_begin
    lea     s_blk_check_ok(%rip), %rsi
    call    puts
    mov     %r13, %rax
    call    putdec
    lea     s_sectors(%rip), %rsi
    call    puts
    call    line_end
    jmp     poweroff
5:  movzbl  (%rdi), %eax                /* the first bad byte of the 64 at rdi */
    cmp     %dl, %al
    jne     6f
    inc     %rdi
    jmp     5b
6:  mov     %eax, %r14d
    call    line_begin
    lea     s_blk_check_fail(%rip), %rsi
    call    puts
    lea     blk_buf(%rip), %rax
    sub     %rax, %rdi
    mov     %r13, %rax
    shl     $9, %rax
    add     %rdi, %rax
    xor     %ecx, %ecx
    call    puthex
    lea     s_got(%rip), %rsi
    call    puts
    mov     %r14, %rax
    mov     $2, %ecx
    call    puthex
    call    line_end
    jmp     poweroff

/* blk-id: the device's serial (GET_ID) */
sc_blk_id:
    lea     n_blk_id(%rip), %rax
    mov     %rax, cur_name(%rip)
    call    blk_open
    lea     blk_buf(%rip), %rdx
    movq    $0, (%rdx)
    movq    $0, 8(%rdx)
    movq    $0, 16(%rdx)
    mov     $BLK_T_GET_ID, %edi
    xor     %esi, %esi
    mov     $BLK_ID_BYTES, %ecx
    call    blk_request_ok
    xor     %ecx, %ecx                  /* length up to the first NUL */
1:  cmpb    $0, (%rdx,%rcx)
    je      2f
    inc     %ecx
    cmp     $BLK_ID_BYTES, %ecx
    jb      1b
2:  call    line_begin
    lea     s_blk_id(%rip), %rsi
    call    puts
    mov     %rdx, %rsi
    call    putsn
    call    line_end
    jmp     poweroff

/* blk-ro: the RO feature must be offered and a write must fail with IOERR */
sc_blk_ro:
    lea     n_blk_ro(%rip), %rax
    mov     %rax, cur_name(%rip)
    call    blk_open
    lea     s_ro_not_offered(%rip), %rsi
    testl   $(1 << BLK_F_RO), vdev_feat(%rip)
    jz      fail
    mov     $BLK_T_IN, %edi             /* read sector 0, to write the same data back */
    xor     %esi, %esi
    lea     blk_buf(%rip), %rdx
    mov     $512, %ecx
    call    blk_request_ok
    mov     $BLK_T_OUT, %edi
    movabs  $VIRTIO_TIMEOUT, %r8
    call    blk_request
    lea     s_timeout(%rip), %rsi
    jc      fail
    cmp     $BLK_S_IOERR, %eax
    lea     s_write_status(%rip), %rsi
    jne     fail_hex
    lea     s_blk_ro_ok(%rip), %rsi
    call    say
    jmp     poweroff

/* blk-read=MIB: read MIB MiB sequentially in 128 KiB requests, wrapping at the end */
sc_blk_read:
    add     %rdx, %rsi
    sub     %rdx, %rcx
    call    parse_dec
    jc      sc_unknown
    movabs  $BLKREAD_MAX_MIB, %rdx
    cmp     %rdx, %rax
    jae     sc_unknown
    mov     %rax, %r12
    lea     n_blk_read(%rip), %rax
    mov     %rax, cur_name(%rip)
    call    blk_open
    lea     s_empty_disk(%rip), %rsi
    cmpq    $0, blk_capacity(%rip)
    je      fail
    lea     s_blk_read_start(%rip), %rsi
    call    say
    mov     %r12, %r14
    shl     $11, %r14                   /* sectors left */
    xor     %r13d, %r13d                /* sector */
1:  test    %r14, %r14
    jz      3f
    call    blk_chunk                   /* never 0: r13 < capacity */
    cmp     %r14, %rcx
    jbe     2f
    mov     %r14, %rcx
2:  mov     %rcx, %r15
    shl     $9, %ecx
    mov     $BLK_T_IN, %edi
    mov     %r13, %rsi
    lea     blk_buf(%rip), %rdx
    call    blk_request_ok
    sub     %r15, %r14
    add     %r15, %r13
    cmp     blk_capacity(%rip), %r13
    jb      1b
    xor     %r13d, %r13d                /* wrap around */
    jmp     1b
3:  call    line_begin
    lea     s_blk_read_done(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    lea     s_mib(%rip), %rsi
    call    puts
    call    line_end
    jmp     poweroff

/* blk-iops=N: N reads of 4 KiB at random 4 KiB-aligned offsets (xorshift64) */
sc_blk_iops:
    add     %rdx, %rsi
    sub     %rdx, %rcx
    call    parse_dec
    jc      sc_unknown
    mov     %rax, %r12
    lea     n_blk_iops(%rip), %rax
    mov     %rax, cur_name(%rip)
    call    blk_open
    mov     blk_capacity(%rip), %r14
    shr     $3, %r14                    /* 4 KiB blocks */
    lea     s_small_disk(%rip), %rsi
    jz      fail
    lea     s_blk_iops_start(%rip), %rsi
    call    say
    movabs  $XORSHIFT_SEED, %rbx
    xor     %r13d, %r13d
1:  cmp     %r12, %r13
    jae     2f
    mov     %rbx, %rax
    shl     $13, %rax
    xor     %rax, %rbx
    mov     %rbx, %rax
    shr     $7, %rax
    xor     %rax, %rbx
    mov     %rbx, %rax
    shl     $17, %rax
    xor     %rax, %rbx
    mov     %rbx, %rax
    xor     %edx, %edx
    div     %r14
    lea     (,%rdx,8), %rsi             /* sector */
    mov     $BLK_T_IN, %edi
    lea     blk_buf(%rip), %rdx
    mov     $4096, %ecx
    call    blk_request_ok
    inc     %r13
    jmp     1b
2:  call    line_begin
    lea     s_blk_iops_done(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    call    line_end
    jmp     poweroff

/* rng: 32 bytes from virtio-rng, in hex */
sc_rng:
    lea     n_rng(%rip), %rax
    mov     %rax, cur_name(%rip)
    mov     $VIRTIO_ID_RNG, %edi
    call    virtio_find
    lea     s_no_rng(%rip), %rsi
    call    virtio_open
    xor     %r12d, %r12d                /* bytes received */
    xor     %r13d, %r13d                /* requests */
1:  cmp     $32, %r12d
    jae     3f
    inc     %r13d
    lea     s_rng_short(%rip), %rsi
    cmp     $64, %r13d
    ja      fail
    call    vq_alloc
    mov     %eax, %edi
    lea     blk_buf(%rip), %rax
    add     %r12, %rax
    mov     $32, %ecx
    sub     %r12d, %ecx
    mov     $VRING_DESC_F_WRITE, %edx
    call    vq_set_desc
    call    vq_submit
    movabs  $VIRTIO_TIMEOUT, %rsi
    call    vq_wait
    lea     s_timeout(%rip), %rsi
    jc      fail
    cmp     %ecx, %eax                  /* more than it was given: count what was asked */
    jbe     2f
    mov     %ecx, %eax
2:  add     %eax, %r12d
    jmp     1b
3:  call    line_begin
    lea     s_rng(%rip), %rsi
    call    puts
    lea     blk_buf(%rip), %rsi
    lea     hexdigits(%rip), %rdx
    xor     %ecx, %ecx
4:  movzbl  (%rsi,%rcx), %ebx
    mov     %ebx, %eax
    shr     $4, %eax
    movzbl  (%rdx,%rax), %eax
    call    putc
    and     $15, %ebx
    movzbl  (%rdx,%rbx), %eax
    call    putc
    inc     %ecx
    cmp     $32, %ecx
    jb      4b
    call    line_end
    jmp     poweroff

/* net, net-spoof: answer ARP requests and ICMP echo requests for ip=A.B.C.D over virtio-net
 * until the power button (PM1_STS), or net-seconds=N seconds if given. net-spoof sends every
 * reply from its MAC with the last byte xor 0xff (Ethernet source and ARP sender). */
sc_net:
    lea     n_net(%rip), %rax
    xor     %ebx, %ebx
    jmp     net_main
sc_net_spoof:
    lea     n_net_spoof(%rip), %rax
    mov     $1, %ebx
net_main:
    mov     %rax, cur_name(%rip)
    mov     %ebx, net_spoof(%rip)
    lea     k_ip(%rip), %rdi
    call    cmdline_value
    jc      1f
    call    parse_ipv4
    jnc     2f
1:  lea     s_no_ip(%rip), %rsi
    jmp     fail
2:  mov     %eax, net_ip(%rip)
    mov     $-1, %r15                   /* deadline: none */
    lea     k_net_seconds(%rip), %rdi
    call    cmdline_value
    jc      3f
    call    parse_dec
    lea     s_bad_seconds(%rip), %rsi
    jc      fail
    mov     $TSC_SECOND, %edx
    mul     %rdx
    test    %rdx, %rdx
    jnz     3f                          /* too far away: none */
    mov     %rax, %r15
    call    tsc_now
    add     %rax, %r15
    jnc     3f
    mov     $-1, %r15
3:  mov     $VIRTIO_ID_NET, %edi
    call    virtio_find
    lea     s_no_net(%rip), %rsi
    call    virtio_open
    call    net_setup
    call    line_begin                  /* "<name> mac <reply MAC> ip <A.B.C.D>" */
    mov     cur_name(%rip), %rsi
    call    puts
    lea     s_mac(%rip), %rsi
    call    puts
    lea     net_reply_mac(%rip), %rsi
    call    put_mac
    lea     s_ip(%rip), %rsi
    call    puts
    mov     net_ip(%rip), %eax
    call    put_ipv4
    call    line_end
    xor     %r12d, %r12d                /* ARP replies sent */
    xor     %r13d, %r13d                /* echo replies sent */
    call    tsc_now
    mov     %rax, %r14                  /* next PM1_STS poll: at once */

.Lnet_loop:
    lea     vq_area(%rip), %rbx         /* the receiveq */
    movzwl  VQ_USED+2(%rbx), %eax
    cmp     %ax, vq_used_last(%rip)
    je      .Lnet_idle
    /* every used rx buffer: answer it, post it again; then publish and notify once */
1:  mov     vq_used_last(%rip), %ecx
    movzwl  VQ_USED+2(%rbx), %eax
    cmp     %cx, %ax
    je      3f
    mov     %ecx, %edx
    and     vq_mask(%rip), %edx
    mov     VQ_USED+4(%rbx,%rdx,8), %edi    /* id */
    mov     VQ_USED+8(%rbx,%rdx,8), %esi    /* len */
    inc     %ecx
    mov     %ecx, vq_used_last(%rip)
    cmp     vq_size(%rip), %edi
    jae     1b                          /* not a descriptor of ours */
    push    %rbx
    push    %rdi
    call    net_frame
    pop     %rdi
    pop     %rbx
    mov     vq_avail_idx(%rip), %eax
    mov     %eax, %edx
    and     vq_mask(%rip), %edx
    mov     %di, VQ_AVAIL+4(%rbx,%rdx,2)
    inc     %eax
    mov     %eax, vq_avail_idx(%rip)
    jmp     1b
3:  mov     vq_avail_idx(%rip), %eax
    xchg    %ax, VQ_AVAIL+2(%rbx)       /* publish (xchg: a full barrier before the flags) */
    mov     vdev_base(%rip), %rdx
    testw   $VRING_USED_F_NO_NOTIFY, VQ_USED(%rbx)
    jnz     4f
    movl    $0, VMMIO_QUEUE_NOTIFY(%rdx)
4:  cmpl    $0, net_tx_pending(%rip)
    je      .Lnet_time
    movl    $0, net_tx_pending(%rip)
    testw   $VRING_USED_F_NO_NOTIFY, vq_area1+VQ_USED(%rip)
    jnz     .Lnet_time
    movl    $1, VMMIO_QUEUE_NOTIFY(%rdx)
    jmp     .Lnet_time
.Lnet_idle:
    pause
.Lnet_time:
    call    tsc_now
    cmp     %r15, %rax
    jae     .Lnet_done
    cmp     %r14, %rax
    jb      .Lnet_loop
    mov     $TSC_10MS, %r14d
    add     %rax, %r14
    mov     $PM1_STS_PORT, %edx
    inw     %dx, %ax
    cmp     $0xffff, %ax                /* no PM1 block there (QEMU microvm): stop polling */
    je      .Lnet_no_pm1
    test    $PM1_PWRBTN_STS, %ax
    jz      .Lnet_loop
    mov     $PM1_PWRBTN_STS, %eax
    outw    %ax, %dx                    /* write 1 to clear */
    jmp     .Lnet_done
.Lnet_no_pm1:
    mov     $-1, %r14
    jmp     .Lnet_loop
.Lnet_done:
    call    line_begin                  /* "<name> answered <A> arp <E> echo" */
    mov     cur_name(%rip), %rsi
    call    puts
    lea     s_answered(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    lea     s_arp(%rip), %rsi
    call    puts
    mov     %r13, %rax
    call    putdec
    lea     s_echo(%rip), %rsi
    call    puts
    call    line_end
    jmp     poweroff

/* blk-bad: malformed requests, one at a time, then a good one. Each case prints the used
 * length and the status byte (pre-set to 0xff), or "no answer" after ~0.5 s. A device that
 * sets DEVICE_NEEDS_RESET is reset and set up again before the next case. */
sc_blk_bad:
    lea     n_blk_bad(%rip), %rax
    mov     %rax, cur_name(%rip)
    call    blk_open

    /* loop: header -> data -> header -> ..., both device-readable (a device that gives up
     * on the length of the chain finds no status byte and must not touch the disk) */
    mov     $BLK_T_IN, %edi
    xor     %esi, %esi
    call    bb_header
    call    vq_alloc
    mov     %eax, %r12d
    call    vq_alloc
    mov     %eax, %r13d
    mov     %r12d, %edi
    lea     blk_hdr(%rip), %rax
    mov     $16, %ecx
    mov     %r13d, %edx
    shl     $16, %edx
    or      $VRING_DESC_F_NEXT, %edx
    call    vq_set_desc
    mov     %r13d, %edi
    lea     blk_buf(%rip), %rax
    mov     $512, %ecx
    mov     %r12d, %edx
    shl     $16, %edx
    or      $VRING_DESC_F_NEXT, %edx
    call    vq_set_desc
    lea     c_loop(%rip), %rbx
    call    bb_case

    /* outside: data buffer far beyond RAM */
    mov     $BLK_T_IN, %edi
    xor     %esi, %esi
    call    bb_header
    xor     %r8d, %r8d
    movabs  $BLKBAD_OUTSIDE, %r9
    mov     $512, %r10d
    mov     $VRING_DESC_F_WRITE, %r11d
    call    bb_chain3
    lea     c_outside(%rip), %rbx
    call    bb_case

    /* zero-len: data descriptor of length 0 */
    mov     $BLK_T_IN, %edi
    xor     %esi, %esi
    call    bb_header
    xor     %r8d, %r8d
    lea     blk_buf(%rip), %r9
    xor     %r10d, %r10d
    mov     $VRING_DESC_F_WRITE, %r11d
    call    bb_chain3
    lea     c_zero_len(%rip), %rbx
    call    bb_case

    /* huge-len: a 4 GiB - 1 write (the device would only read guest memory) */
    mov     $BLK_T_OUT, %edi
    xor     %esi, %esi
    call    bb_header
    xor     %r8d, %r8d
    lea     blk_buf(%rip), %r9
    mov     $0xffffffff, %r10d
    xor     %r11d, %r11d
    call    bb_chain3
    lea     c_huge_len(%rip), %rbx
    call    bb_case

    /* no-status: header and a device-readable data buffer, nothing device-writable */
    mov     $BLK_T_IN, %edi
    xor     %esi, %esi
    call    bb_header
    call    vq_alloc
    mov     %eax, %r12d
    call    vq_alloc
    mov     %eax, %r13d
    mov     %r12d, %edi
    lea     blk_hdr(%rip), %rax
    mov     $16, %ecx
    mov     %r13d, %edx
    shl     $16, %edx
    or      $VRING_DESC_F_NEXT, %edx
    call    vq_set_desc
    mov     %r13d, %edi
    lea     blk_buf(%rip), %rax
    mov     $512, %ecx
    xor     %edx, %edx
    call    vq_set_desc
    lea     c_no_status(%rip), %rbx
    call    bb_case

    /* writable-header: the header descriptor is flagged WRITE */
    mov     $BLK_T_IN, %edi
    xor     %esi, %esi
    call    bb_header
    mov     $VRING_DESC_F_WRITE, %r8d
    lea     blk_buf(%rip), %r9
    mov     $512, %r10d
    mov     $VRING_DESC_F_WRITE, %r11d
    call    bb_chain3
    lea     c_writable_header(%rip), %rbx
    call    bb_case

    /* bad-next: the header's next is the queue size */
    mov     $BLK_T_IN, %edi
    xor     %esi, %esi
    call    bb_header
    call    vq_alloc
    mov     %eax, %r12d
    mov     %eax, %edi
    lea     blk_hdr(%rip), %rax
    mov     $16, %ecx
    mov     vq_size(%rip), %edx
    shl     $16, %edx
    or      $VRING_DESC_F_NEXT, %edx
    call    vq_set_desc
    lea     c_bad_next(%rip), %rbx
    call    bb_case

    /* bad-type: a request type virtio-blk does not define (UNSUPP expected) */
    mov     $BLK_T_BAD, %edi
    xor     %esi, %esi
    call    bb_header
    xor     %r8d, %r8d
    lea     blk_buf(%rip), %r9
    mov     $512, %r10d
    mov     $VRING_DESC_F_WRITE, %r11d
    call    bb_chain3
    lea     c_bad_type(%rip), %rbx
    call    bb_case

    /* beyond-capacity: one sector read just past the end (IOERR expected) */
    mov     $BLK_T_IN, %edi
    mov     blk_capacity(%rip), %rsi
    call    bb_header
    xor     %r8d, %r8d
    lea     blk_buf(%rip), %r9
    mov     $512, %r10d
    mov     $VRING_DESC_F_WRITE, %r11d
    call    bb_chain3
    lea     c_beyond_capacity(%rip), %rbx
    call    bb_case

    /* and a good request */
    mov     $BLK_T_IN, %edi
    xor     %esi, %esi
    lea     blk_buf(%rip), %rdx
    mov     $512, %ecx
    movabs  $VIRTIO_TIMEOUT, %r8
    call    blk_request
    lea     s_good_no_answer(%rip), %rsi
    jc      fail
    test    %eax, %eax
    lea     s_good_status(%rip), %rsi
    jnz     fail_hex
    lea     s_blk_bad_good(%rip), %rsi
    call    say
    jmp     poweroff

/* bb_header: blk_hdr = {type edi, sector rsi}, status byte = 0xff */
bb_header:
    mov     %edi, blk_hdr(%rip)
    movl    $0, blk_hdr+4(%rip)
    mov     %rsi, blk_hdr+8(%rip)
    movb    $0xff, blk_status(%rip)
    ret

/* bb_chain3: header (extra flags r8d) -> data (address r9, length r10d, flags r11d) ->
 * status (device-writable) -> r12d = head. rax, rcx, rdx, rdi, r13 are clobbered. */
bb_chain3:
    call    vq_alloc
    mov     %eax, %r12d
    call    vq_alloc
    mov     %eax, %r13d
    mov     %r12d, %edi
    lea     blk_hdr(%rip), %rax
    mov     $16, %ecx
    mov     %r13d, %edx
    shl     $16, %edx
    or      $VRING_DESC_F_NEXT, %edx
    or      %r8d, %edx
    call    vq_set_desc
    call    vq_alloc
    mov     %r13d, %edi
    mov     %eax, %r13d
    mov     %r9, %rax
    mov     %r10d, %ecx
    mov     %r13d, %edx
    shl     $16, %edx
    or      $VRING_DESC_F_NEXT, %edx
    or      %r11d, %edx
    call    vq_set_desc
    mov     %r13d, %edi
    lea     blk_status(%rip), %rax
    mov     $1, %ecx
    mov     $VRING_DESC_F_WRITE, %edx
    call    vq_set_desc
    ret

/* bb_case: submit the chain at r12d, wait ~0.5 s and print the result of case rbx; reset
 * and set up the device again if it asks for it. Clobbers rax, rcx, rdx, rsi, rdi. */
bb_case:
    mov     %r12d, %edi
    call    vq_submit
    mov     $BLKBAD_TIMEOUT, %esi
    call    vq_wait
    mov     $1, %edi                    /* no answer (mov keeps CF) */
    jc      1f
    xor     %edi, %edi
1:  mov     %eax, %edx                  /* used length */
    call    bb_case_begin
    test    %edi, %edi
    jz      2f
    lea     s_no_answer(%rip), %rsi
    call    puts
    jmp     3f
2:  lea     s_used_len(%rip), %rsi
    call    puts
    mov     %edx, %eax
    call    putdec
    lea     s_status(%rip), %rsi
    call    puts
    movzbl  blk_status(%rip), %eax
    mov     $2, %ecx
    call    puthex
3:  call    line_end
    mov     vdev_base(%rip), %rax
    testl   $VSTAT_NEEDS_RESET, VMMIO_STATUS(%rax)
    jz      4f
    call    bb_case_begin
    lea     s_needs_reset(%rip), %rsi
    call    puts
    call    line_end
    call    virtio_init
    jc      fail
4:  ret

/* bb_case_begin: line_begin and "blk-bad <case rbx>: " */
bb_case_begin:
    push    %rsi
    call    line_begin
    lea     s_blk_bad_case(%rip), %rsi
    call    puts
    mov     %rbx, %rsi
    call    puts
    pop     %rsi
    ret

/* An AP arrives here from the trampoline, in 64-bit mode on the trampoline's GDT. */
ap_main:
    mov     $1, %eax
    lock xadd %eax, ap_next_index(%rip)
    cmp     $MAX_APS, %eax
    jae     halt_forever                /* no stack left for it */
    inc     %eax
    imul    $AP_STACK_SIZE, %eax, %eax
    lea     ap_stacks(%rip), %rsp
    add     %rax, %rsp

    mov     $LAPIC_BASE, %ebx
    mov     LAPIC_ID(%rbx), %eax
    shr     $24, %eax
    call    line_begin
    lea     s_cpu(%rip), %rsi
    call    puts
    call    putdec
    lea     s_up(%rip), %rsi
    call    puts
    call    line_end

    mov     $1, %eax
    lock xadd %eax, ap_arrived(%rip)
    jmp     halt_forever

/* ---- power control ------------------------------------------------------------------ */

/* vmd ends the VM at the PM1a_CNT write; QEMU microvm (no port 0x604) at the GED write, or
 * without ACPI at the isa-debug-exit write */
poweroff:
    mov     $PM1_CNT_S5, %eax
    mov     $PM1_CNT_PORT, %edx
    outw    %ax, %dx
    mov     $GED_SLEEP_CTL, %edx
    movb    $GED_SLEEP_S5, (%rdx)
    xor     %eax, %eax                  /* QEMU with acpi=off: isa-debug-exit, status 1 */
    out     %al, $DEBUG_EXIT_PORT
halt_forever:
    cli
    hlt
    jmp     halt_forever

/* ---- helpers ---------------------------------------------------------------------- */

/* send_ipi: edi = destination APIC id, esi = ICR low (written last: it sends) */
send_ipi:
    push    %rax
    push    %rbx
    push    %rcx
    mov     $LAPIC_BASE, %ebx
    mov     %edi, %eax
    shl     $24, %eax
    mov     %eax, LAPIC_ICR_HI(%rbx)
    mov     %esi, LAPIC_ICR_LO(%rbx)
    mov     $1000, %ecx                 /* wait (bounded) for the delivery status to clear */
1:  mov     LAPIC_ICR_LO(%rbx), %eax
    test    $ICR_BUSY, %eax
    jz      2f
    pause
    dec     %ecx
    jnz     1b
2:  pop     %rcx
    pop     %rbx
    pop     %rax
    ret

/* tsc_now: rax = TSC */
tsc_now:
    push    %rdx
    rdtsc
    shl     $32, %rdx
    or      %rdx, %rax
    pop     %rdx
    ret

/* delay: busy-wait rdi TSC ticks */
delay:
    push    %rax
    push    %rdi
    call    tsc_now
    add     %rax, %rdi
1:  pause
    call    tsc_now
    cmp     %rdi, %rax
    jb      1b
    pop     %rdi
    pop     %rax
    ret

/* parse_cmdline: find the last "testguest=" token of the command line; set scen_ptr and
 * scen_len to its value (scen_ptr stays 0 if there is none). */
parse_cmdline:
    push    %rcx
    push    %rsi
    push    %rdi
    lea     k_testguest(%rip), %rdi
    call    cmdline_value
    jc      1f
    mov     %rsi, scen_ptr(%rip)
    mov     %rcx, scen_len(%rip)
1:  pop     %rdi
    pop     %rsi
    pop     %rcx
    ret

/* cmdline_value: the value of the last command-line token that starts with the NUL-terminated
 * rdi: rsi = its first byte after that prefix, rcx = its length; CF = 1 (rsi = rcx = 0) if
 * there is no such token. */
cmdline_value:
    push    %rax
    push    %rdx
    push    %r8
    push    %r9
    push    %r10
    xor     %r8d, %r8d                  /* the value found */
    xor     %r9d, %r9d
    mov     boot_params(%rip), %rax
    mov     BP_CMD_LINE_PTR(%rax), %esi
    test    %esi, %esi
    jz      9f
1:  movzbl  (%rsi), %eax                /* skip separators */
    test    %al, %al
    jz      9f
    cmp     $' ', %al
    ja      2f
    inc     %rsi
    jmp     1b
2:  mov     %rsi, %r10                  /* token [rsi, r10) */
3:  movzbl  (%r10), %eax
    cmp     $' ', %al
    jbe     4f
    inc     %r10
    jmp     3b
4:  mov     %r10, %rcx
    sub     %rsi, %rcx
    call    str_prefix
    jne     5f
    lea     (%rsi,%rdx), %r8
    mov     %rcx, %r9
    sub     %rdx, %r9
5:  mov     %r10, %rsi
    jmp     1b
9:  mov     %r8, %rsi
    mov     %r9, %rcx
    test    %rsi, %rsi
    jnz     10f
    stc
    jmp     11f
10: clc
11: pop     %r10
    pop     %r9
    pop     %r8
    pop     %rdx
    pop     %rax
    ret

/* str_prefix: does the string (rsi, length rcx) start with the NUL-terminated rdi?
 * ZF = 1 if so; rdx = length of rdi's string (when it matched). */
str_prefix:
    push    %rax
    xor     %edx, %edx
1:  movzbl  (%rdi,%rdx), %eax
    test    %al, %al
    jz      3f                          /* end of rdi: match, ZF = 1 */
    cmp     %rcx, %rdx
    jae     2f
    cmp     %al, (%rsi,%rdx)
    jne     2f
    inc     %rdx
    jmp     1b
2:  or      $1, %al                     /* ZF = 0 */
3:  pop     %rax
    ret

/* str_is: is the string (rsi, length rcx) equal to the NUL-terminated rdi? ZF = 1 if so.
 * rdx is clobbered. */
str_is:
    call    str_prefix
    jne     1f
    cmp     %rdx, %rcx
1:  ret

/* parse_dec: unsigned decimal (rsi, length rcx, 1-15 digits) -> rax; CF = 1 if invalid */
parse_dec:
    push    %rcx
    push    %rdx
    push    %rsi
    xor     %eax, %eax
    test    %rcx, %rcx
    jz      8f
    cmp     $15, %rcx
    ja      8f
1:  movzbl  (%rsi), %edx
    sub     $'0', %edx
    cmp     $9, %edx
    ja      8f
    imul    $10, %rax, %rax
    add     %rdx, %rax
    inc     %rsi
    dec     %rcx
    jnz     1b
    clc
    jmp     9f
8:  stc
9:  pop     %rsi
    pop     %rdx
    pop     %rcx
    ret

/* find_madt: rbx = address of the MADT found through boot_params.acpi_rsdp_addr and the
 * XSDT, or 0. Tables must lie below 4 GiB (the identity-mapped range). */
find_madt:
    push    %rax
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    mov     boot_params(%rip), %rax
    mov     BP_ACPI_RSDP_ADDR(%rax), %rax
    call    .Lbelow_4g
    jnz     8f
    movabs  $SIG_RSDP, %rdx
    cmp     %rdx, (%rax)
    jne     8f
    cmpb    $2, 15(%rax)                /* revision >= 2: has the XSDT address */
    jb      8f
    mov     24(%rax), %rax              /* XSDT */
    call    .Lbelow_4g
    jnz     8f
    cmpl    $SIG_XSDT, (%rax)
    jne     8f
    mov     4(%rax), %ecx
    cmp     $0x10000, %ecx
    ja      8f
    lea     (%rax,%rcx), %rdi           /* end */
    lea     36(%rax), %rsi              /* entries */
1:  lea     8(%rsi), %rdx
    cmp     %rdi, %rdx
    ja      8f
    mov     (%rsi), %rax
    add     $8, %rsi
    call    .Lbelow_4g
    jnz     1b
    cmpl    $SIG_MADT, (%rax)
    jne     1b
    cmpl    $0x10000, 4(%rax)           /* sane MADT length */
    ja      1b
    mov     %rax, %rbx
    jmp     9f
8:  xor     %ebx, %ebx
9:  pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rax
    ret
/* ZF = 1 if rax is a non-null address below 4 GiB - 64 KiB (the tables are read there) */
.Lbelow_4g:
    push    %rax
    test    %rax, %rax
    jz      1f
    shr     $16, %rax
    cmp     $0xffff, %rax
    jae     1f
    xor     %eax, %eax                  /* ZF = 1 */
    pop     %rax
    ret
1:  or      $1, %al                     /* ZF = 0 */
    pop     %rax
    ret

/* e820_covers: does e820 RAM cover [rdi, rsi)? CF = 0 if so, CF = 1 if not. */
e820_covers:
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rdi
    push    %r8
    push    %r9
    mov     boot_params(%rip), %rbx
    movzbl  BP_E820_ENTRIES(%rbx), %r8d
    cmp     $E820_MAX_ENTRIES, %r8d
    jbe     1f
    mov     $E820_MAX_ENTRIES, %r8d
1:  cmp     %rsi, %rdi                  /* rdi = first address not yet known to be RAM */
    jae     7f
    lea     BP_E820_TABLE(%rbx), %rdx
    mov     %r8d, %ecx
    xor     %r9d, %r9d                  /* progress made in this pass */
2:  test    %ecx, %ecx
    jz      4f
    cmpl    $E820_RAM, 16(%rdx)
    jne     3f
    mov     (%rdx), %rax                /* start */
    cmp     %rdi, %rax
    ja      3f
    add     8(%rdx), %rax               /* end */
    jc      3f
    cmp     %rdi, %rax
    jbe     3f
    mov     %rax, %rdi                  /* covered up to here */
    mov     $1, %r9d
3:  add     $E820_ENTRY_SIZE, %rdx
    dec     %ecx
    jmp     2b
4:  test    %r9d, %r9d
    jnz     1b
    stc
    jmp     9f
7:  clc
9:  pop     %r9
    pop     %r8
    pop     %rdi
    pop     %rdx
    pop     %rcx
    pop     %rbx
    pop     %rax
    ret

/* ---- virtio-mmio: a polling driver for one device at a time, queue 0 only ------------- */

/* virtio_find: edi = device id -> rax = base of the first virtio_mmio.device=<size>@<base>:
 * <irq>[...] command-line token whose transport is version 2 with that device id, or 0;
 * edx = 1 if a legacy (version 1) transport with that id was seen, else 0. */
virtio_find:
    push    %rbx
    push    %rcx
    push    %rsi
    push    %r8
    push    %r9
    xor     %r8d, %r8d                  /* result */
    xor     %r9d, %r9d                  /* legacy transport seen */
    mov     boot_params(%rip), %rax
    mov     BP_CMD_LINE_PTR(%rax), %esi
    test    %esi, %esi
    jz      9f
1:  movzbl  (%rsi), %eax                /* skip separators */
    test    %al, %al
    jz      9f
    cmp     $' ', %al
    ja      2f
    inc     %rsi
    jmp     1b
2:  mov     %rsi, %rbx                  /* token [rsi, rbx) */
3:  movzbl  (%rbx), %eax
    cmp     $' ', %al
    jbe     4f
    inc     %rbx
    jmp     3b
4:  mov     %rbx, %rcx
    sub     %rsi, %rcx
    push    %rdi
    lea     k_virtio_mmio(%rip), %rdi
    call    str_prefix
    pop     %rdi
    jne     8f
    add     %rdx, %rsi
    sub     %rdx, %rcx
    call    parse_num                   /* size (not used) */
    jc      8f
    test    %rcx, %rcx
    jz      8f
    movzbl  (%rsi), %eax                /* optional K, M or G */
    or      $0x20, %eax
    cmp     $'k', %eax
    je      5f
    cmp     $'m', %eax
    je      5f
    cmp     $'g', %eax
    jne     6f
5:  inc     %rsi
    dec     %rcx
    jz      8f
6:  cmpb    $'@', (%rsi)
    jne     8f
    inc     %rsi
    dec     %rcx
    call    parse_num                   /* base */
    jc      8f
    test    %rcx, %rcx
    jz      8f
    cmpb    $':', (%rsi)                /* the irq and anything after it are ignored */
    jne     8f
    test    %rax, %rax
    jz      8f
    mov     $0xfffff000, %edx           /* the registers must be in the mapped 4 GiB */
    cmp     %rdx, %rax
    ja      8f
    cmpl    $VIRTIO_MAGIC, VMMIO_MAGIC(%rax)
    jne     8f
    cmp     %edi, VMMIO_DEVICE_ID(%rax)
    jne     8f
    mov     VMMIO_VERSION(%rax), %edx
    cmp     $2, %edx
    je      7f
    cmp     $1, %edx
    jne     8f
    mov     $1, %r9d
    jmp     8f
7:  mov     %rax, %r8
    jmp     9f
8:  mov     %rbx, %rsi                  /* next token */
    jmp     1b
9:  mov     %r8, %rax
    mov     %r9d, %edx
    pop     %r9
    pop     %r8
    pop     %rsi
    pop     %rcx
    pop     %rbx
    ret

/* virtio_open: use the device virtio_find found (rax, edx; edi = its device id) and set it
 * up; on failure print a FAIL line (rsi = the message for "no such device") and power off. */
virtio_open:
    test    %rax, %rax
    jnz     1f
    test    %edx, %edx
    jz      fail
    lea     s_legacy(%rip), %rsi
    jmp     fail
1:  mov     %rax, vdev_base(%rip)
    movl    $0, vdev_want(%rip)
    movl    $1, vdev_nq(%rip)
    cmp     $VIRTIO_ID_BLOCK, %edi
    jne     2f
    movl    $BLK_FEATURES, vdev_want(%rip)
2:  cmp     $VIRTIO_ID_NET, %edi
    jne     3f
    movl    $NET_FEATURES, vdev_want(%rip)
    movl    $2, vdev_nq(%rip)           /* receiveq and transmitq */
3:  call    virtio_init
    jc      fail
    ret

/* virtio_init: reset the device at vdev_base and set it up: features (VERSION_1 and those of
 * vdev_want it offers), queue 0 in vq_area and, if vdev_nq is 2, queue 1 in vq_area1.
 * CF = 1 and rsi = a message on failure. */
virtio_init:
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rdi
    mov     vdev_base(%rip), %rbx
    movl    $0, VMMIO_STATUS(%rbx)      /* reset, and wait (bounded) until it reads 0 */
    mov     $1000, %ecx
1:  mov     VMMIO_STATUS(%rbx), %eax
    test    %eax, %eax
    jz      2f
    pause
    dec     %ecx
    jnz     1b
    lea     s_vi_reset(%rip), %rsi
    jmp     8f
2:  movl    $VSTAT_ACK, VMMIO_STATUS(%rbx)
    movl    $(VSTAT_ACK | VSTAT_DRIVER), VMMIO_STATUS(%rbx)
    movl    $1, VMMIO_DEV_FEAT_SEL(%rbx)
    mov     VMMIO_DEV_FEATURES(%rbx), %eax
    test    $VIRTIO_F_VERSION_1_HI, %eax
    lea     s_vi_version_1(%rip), %rsi
    jz      8f
    movl    $0, VMMIO_DEV_FEAT_SEL(%rbx)
    mov     VMMIO_DEV_FEATURES(%rbx), %eax
    and     vdev_want(%rip), %eax
    mov     %eax, vdev_feat(%rip)
    movl    $0, VMMIO_DRV_FEAT_SEL(%rbx)
    mov     %eax, VMMIO_DRV_FEATURES(%rbx)
    movl    $1, VMMIO_DRV_FEAT_SEL(%rbx)
    movl    $VIRTIO_F_VERSION_1_HI, VMMIO_DRV_FEATURES(%rbx)
    movl    $(VSTAT_ACK | VSTAT_DRIVER | VSTAT_FEATURES_OK), VMMIO_STATUS(%rbx)
    mov     VMMIO_STATUS(%rbx), %eax
    test    $VSTAT_FEATURES_OK, %eax
    lea     s_vi_features(%rip), %rsi
    jz      8f
    xor     %edi, %edi                  /* queue 0 */
    lea     vq_area(%rip), %rdx
    call    vq_setup
    jc      8f
    mov     %ecx, vq_size(%rip)
    dec     %ecx
    mov     %ecx, vq_mask(%rip)
    movl    $0, vq_cursor(%rip)
    movl    $0, vq_avail_idx(%rip)
    movl    $0, vq_used_last(%rip)
    cmpl    $2, vdev_nq(%rip)
    jb      3f
    mov     $1, %edi                    /* queue 1 */
    lea     vq_area1(%rip), %rdx
    call    vq_setup
    jc      8f
    mov     %ecx, txq_size(%rip)
    dec     %ecx
    mov     %ecx, txq_mask(%rip)
    movl    $0, txq_avail_idx(%rip)
    movl    $0, txq_used_last(%rip)
3:  movl    $(VSTAT_ACK | VSTAT_DRIVER | VSTAT_FEATURES_OK | VSTAT_DRIVER_OK), VMMIO_STATUS(%rbx)
    clc
    jmp     9f
8:  mov     VMMIO_STATUS(%rbx), %eax    /* give up: FAILED */
    or      $VSTAT_FAILED, %eax
    mov     %eax, VMMIO_STATUS(%rbx)
    stc
9:  pop     %rdi
    pop     %rdx
    pop     %rcx
    pop     %rbx
    pop     %rax
    ret

/* vq_setup: set up queue edi of the device at rbx with its rings in the 4 KiB page at rdx
 * (zeroed here: descriptors at +0, avail ring at +0x100 with VRING_AVAIL_F_NO_INTERRUPT, used
 * ring at +0x200) and make it ready. ecx = its size (the largest power of 2 <= min(QueueNumMax,
 * 16), at least 4); CF = 1 and rsi = a message on failure. Clobbers rax. */
vq_setup:
    push    %rdi
    mov     %edi, VMMIO_QUEUE_SEL(%rbx)
    mov     VMMIO_QUEUE_READY(%rbx), %eax
    test    %eax, %eax
    lea     s_vi_queue_ready(%rip), %rsi
    jnz     7f
    mov     VMMIO_QUEUE_NUM_MAX(%rbx), %eax
    test    %eax, %eax
    lea     s_vi_no_queue(%rip), %rsi
    jz      7f
    mov     $VQ_MAX_SIZE, %ecx          /* the largest power of 2 <= min(max, 16) */
1:  cmp     %eax, %ecx
    jbe     2f
    shr     $1, %ecx
    jmp     1b
2:  cmp     $4, %ecx                    /* a blk request takes 3 descriptors */
    lea     s_vi_small_queue(%rip), %rsi
    jb      7f
    mov     %ecx, VMMIO_QUEUE_NUM(%rbx)
    push    %rcx
    mov     %rdx, %rdi                  /* fresh rings */
    mov     $(4096 / 8), %ecx
    xor     %eax, %eax
    rep stosq
    pop     %rcx
    movw    $VRING_AVAIL_F_NO_INTERRUPT, VQ_AVAIL(%rdx)
    lea     VQ_DESC(%rdx), %rax
    mov     %eax, VMMIO_QUEUE_DESC(%rbx)
    shr     $32, %rax
    mov     %eax, VMMIO_QUEUE_DESC+4(%rbx)
    lea     VQ_AVAIL(%rdx), %rax
    mov     %eax, VMMIO_QUEUE_DRIVER(%rbx)
    shr     $32, %rax
    mov     %eax, VMMIO_QUEUE_DRIVER+4(%rbx)
    lea     VQ_USED(%rdx), %rax
    mov     %eax, VMMIO_QUEUE_DEVICE(%rbx)
    shr     $32, %rax
    mov     %eax, VMMIO_QUEUE_DEVICE+4(%rbx)
    movl    $1, VMMIO_QUEUE_READY(%rbx)
    pop     %rdi
    clc
    ret
7:  test    %edi, %edi                  /* queue 1: the same messages with "queue 1" */
    jz      8f
    add     $(s_vi1_queue_ready - s_vi_queue_ready), %rsi
8:  pop     %rdi
    stc
    ret
/* vq_alloc: eax = the next descriptor index (round robin: after a request that got no
 * answer, the next ones use other descriptors for a while) */
vq_alloc:
    push    %rdx
    mov     vq_cursor(%rip), %eax
    lea     1(%rax), %edx
    and     vq_mask(%rip), %edx
    mov     %edx, vq_cursor(%rip)
    pop     %rdx
    ret

/* vq_set_desc: descriptor edi = {address rax, length ecx, flags dx, next edx >> 16} */
vq_set_desc:
    push    %rbx
    push    %rdi
    shl     $4, %edi
    lea     vq_area+VQ_DESC(%rip), %rbx
    add     %rdi, %rbx
    mov     %rax, (%rbx)
    mov     %ecx, 8(%rbx)
    mov     %edx, 12(%rbx)
    pop     %rdi
    pop     %rbx
    ret

/* vq_submit: make the chain at descriptor edi available (ring entry, then idx: x86 keeps
 * the stores in order) and notify queue 0 */
vq_submit:
    push    %rax
    push    %rbx
    push    %rdx
    lea     vq_area(%rip), %rbx
    mov     vq_avail_idx(%rip), %eax
    mov     %eax, %edx
    and     vq_mask(%rip), %edx
    mov     %di, VQ_AVAIL+4(%rbx,%rdx,2)
    inc     %eax
    mov     %ax, VQ_AVAIL+2(%rbx)
    mov     %eax, vq_avail_idx(%rip)
    mov     vdev_base(%rip), %rdx
    movl    $0, VMMIO_QUEUE_NOTIFY(%rdx)
    pop     %rdx
    pop     %rbx
    pop     %rax
    ret

/* vq_wait: poll the used ring for the chain at descriptor edi, at most rsi TSC ticks.
 * eax = the used length; CF = 1 if it did not come. Used entries of other (earlier,
 * timed-out) chains are consumed and skipped. */
vq_wait:
    push    %rbx
    push    %rcx
    push    %rdx
    push    %r8
    call    tsc_now
    lea     (%rax,%rsi), %r8            /* deadline */
    lea     vq_area(%rip), %rbx
1:  movzwl  VQ_USED+2(%rbx), %eax
    mov     vq_used_last(%rip), %ecx
    cmp     %cx, %ax
    jne     2f
    pause
    call    tsc_now
    cmp     %r8, %rax
    jb      1b
    stc
    jmp     9f
2:  and     vq_mask(%rip), %ecx
    mov     VQ_USED+4(%rbx,%rcx,8), %edx    /* id */
    mov     VQ_USED+8(%rbx,%rcx,8), %eax    /* len */
    incl    vq_used_last(%rip)
    cmp     %edi, %edx
    jne     1b
    clc
9:  pop     %r8
    pop     %rdx
    pop     %rcx
    pop     %rbx
    ret

/* blk_open: set up disk 0 (the first virtio-blk device on the command line) and read its
 * capacity; FAIL and power off if there is none or it cannot be set up. */
blk_open:
    push    %rax
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    mov     $VIRTIO_ID_BLOCK, %edi
    call    virtio_find
    lea     s_no_blk(%rip), %rsi
    call    virtio_open
    mov     vdev_base(%rip), %rsi
1:  mov     VMMIO_CONFIG_GEN(%rsi), %ecx    /* capacity: two 32-bit reads, one generation */
    mov     VMMIO_CONFIG+4(%rsi), %eax
    shl     $32, %rax
    mov     VMMIO_CONFIG(%rsi), %edx
    or      %rdx, %rax
    cmp     VMMIO_CONFIG_GEN(%rsi), %ecx
    jne     1b
    mov     %rax, blk_capacity(%rip)
    pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rax
    ret

/* blk_chunk: rcx = sectors of the next request from sector r13: min(blk_capacity - r13,
 * BLK_BUF_SECTORS); ZF = 1 if that is 0 */
blk_chunk:
    mov     blk_capacity(%rip), %rcx
    sub     %r13, %rcx
    cmp     $BLK_BUF_SECTORS, %rcx
    jbe     1f
    mov     $BLK_BUF_SECTORS, %ecx
1:  test    %rcx, %rcx
    ret

/* blk_request: virtio-blk request of type edi at sector rsi with ecx bytes of data at rdx
 * (ecx = 0: no data descriptor), waiting at most r8 TSC ticks: header (device-readable),
 * data (device-writable unless OUT), status byte (device-writable, pre-set to 0xff).
 * eax = the status byte; CF = 1 if the request timed out. */
blk_request:
    push    %rcx
    push    %rdx
    push    %rdi
    push    %rsi
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    mov     %edi, blk_hdr(%rip)
    movl    $0, blk_hdr+4(%rip)
    mov     %rsi, blk_hdr+8(%rip)
    movb    $0xff, blk_status(%rip)
    mov     %edi, %r14d                 /* type */
    mov     %rdx, %r15                  /* data */
    mov     %ecx, %esi                  /* data length */
    call    vq_alloc
    mov     %eax, %r12d                 /* head: the header */
    call    vq_alloc
    mov     %eax, %r13d
    mov     %r12d, %edi
    lea     blk_hdr(%rip), %rax
    mov     $16, %ecx
    mov     %r13d, %edx
    shl     $16, %edx
    or      $VRING_DESC_F_NEXT, %edx
    call    vq_set_desc
    test    %esi, %esi
    jz      2f
    call    vq_alloc                    /* data in r13d, then status */
    mov     %r13d, %edi
    mov     %eax, %r13d
    mov     %r15, %rax
    mov     %esi, %ecx
    mov     %r13d, %edx
    shl     $16, %edx
    or      $VRING_DESC_F_NEXT, %edx
    cmp     $BLK_T_OUT, %r14d
    je      1f
    or      $VRING_DESC_F_WRITE, %edx
1:  call    vq_set_desc
2:  mov     %r13d, %edi
    lea     blk_status(%rip), %rax
    mov     $1, %ecx
    mov     $VRING_DESC_F_WRITE, %edx
    call    vq_set_desc
    mov     %r12d, %edi
    call    vq_submit
    mov     %r8, %rsi
    call    vq_wait
    jc      9f
    movzbl  blk_status(%rip), %eax
    clc
9:  pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %rsi
    pop     %rdi
    pop     %rdx
    pop     %rcx
    ret

/* blk_request_ok: blk_request with the ~3 s timeout; FAIL and power off unless the status
 * is OK */
blk_request_ok:
    push    %r8
    movabs  $VIRTIO_TIMEOUT, %r8
    call    blk_request
    pop     %r8
    jc      1f
    test    %eax, %eax
    jnz     2f
    ret
1:  lea     s_timeout(%rip), %rsi
    jmp     fail
2:  lea     s_req_status(%rip), %rsi
    jmp     fail_hex

/* ---- virtio-net: queue 0 receiveq, queue 1 transmitq ----------------------------------- */

/* net_setup: after virtio_open: the MAC (config offset 0, if VIRTIO_NET_F_MAC was
 * negotiated, else NET_DEFAULT_MAC) and the reply MAC; every receiveq descriptor i is the
 * 2 KiB device-writable buffer i of net_rx_bufs, all posted; every transmitq descriptor i is
 * buffer i of net_tx_bufs, all free. Clobbers rax, rbx, rcx, rdx, rsi, rdi, r8. */
net_setup:
    mov     vdev_base(%rip), %rsi
    testl   $(1 << NET_F_MAC), vdev_feat(%rip)
    jz      2f
1:  mov     VMMIO_CONFIG_GEN(%rsi), %ecx    /* six byte reads, one generation */
    movzbl  VMMIO_CONFIG+0(%rsi), %eax
    mov     %al, net_mac+0(%rip)
    movzbl  VMMIO_CONFIG+1(%rsi), %eax
    mov     %al, net_mac+1(%rip)
    movzbl  VMMIO_CONFIG+2(%rsi), %eax
    mov     %al, net_mac+2(%rip)
    movzbl  VMMIO_CONFIG+3(%rsi), %eax
    mov     %al, net_mac+3(%rip)
    movzbl  VMMIO_CONFIG+4(%rsi), %eax
    mov     %al, net_mac+4(%rip)
    movzbl  VMMIO_CONFIG+5(%rsi), %eax
    mov     %al, net_mac+5(%rip)
    cmp     VMMIO_CONFIG_GEN(%rsi), %ecx
    jne     1b
    jmp     3f
2:  movl    $NET_DEFAULT_MAC_LO, net_mac(%rip)
    movw    $NET_DEFAULT_MAC_HI, net_mac+4(%rip)
3:  mov     net_mac(%rip), %eax
    mov     %eax, net_reply_mac(%rip)
    movzwl  net_mac+4(%rip), %eax
    cmpl    $0, net_spoof(%rip)
    je      4f
    xor     $0xff00, %eax               /* the last byte */
4:  mov     %ax, net_reply_mac+4(%rip)

    lea     vq_area(%rip), %rbx         /* receiveq: post every buffer */
    xor     %edi, %edi
5:  mov     %edi, %eax
    shl     $NET_BUF_SHIFT, %eax
    lea     net_rx_bufs(%rip), %rdx
    add     %rdx, %rax
    mov     $NET_BUF_SIZE, %ecx
    mov     $VRING_DESC_F_WRITE, %edx
    call    vq_set_desc
    mov     %di, VQ_AVAIL+4(%rbx,%rdi,2)
    inc     %edi
    cmp     vq_size(%rip), %edi
    jb      5b
    mov     %edi, vq_avail_idx(%rip)
    mov     %di, VQ_AVAIL+2(%rbx)
    mov     vdev_base(%rip), %rsi
    movl    $0, VMMIO_QUEUE_NOTIFY(%rsi)

    xor     %edi, %edi                  /* transmitq: every descriptor free */
    lea     txq_free(%rip), %rsi
    lea     txq_busy(%rip), %r8
6:  mov     %dil, (%rsi,%rdi)
    movb    $0, (%r8,%rdi)
    inc     %edi
    cmp     txq_size(%rip), %edi
    jb      6b
    mov     %edi, txq_nfree(%rip)
    movl    $0, net_rx_skip(%rip)
    movl    $0, net_tx_pending(%rip)
    ret

/* net_frame: the used receiveq buffer edi (< vq_size) with used length esi: answer it if it
 * is an ARP request or an ICMP echo request for net_ip (r12 / r13 count the ARP / echo
 * replies queued). Clobbers rax, rbx, rcx, rdx, rsi, rdi, r8-r11. */
net_frame:
    cmpl    $0, net_rx_skip(%rip)       /* the rest of a frame that did not fit one buffer */
    je      1f
    decl    net_rx_skip(%rip)
    ret
1:  cmp     $NET_BUF_SIZE, %esi
    ja      9f                          /* more than the buffer: the device is wrong */
    mov     %edi, %r8d
    shl     $NET_BUF_SHIFT, %r8d
    lea     net_rx_bufs(%rip), %rax
    add     %rax, %r8                   /* the virtio_net_hdr_v1, then the frame */
    testl   $(1 << NET_F_MRG_RXBUF), vdev_feat(%rip)
    jz      2f
    movzwl  NET_HDR_NUM_BUFFERS(%r8), %eax
    cmp     $1, %eax
    jbe     2f
    dec     %eax                        /* drop the frame and the buffers it goes on in */
    mov     %eax, net_rx_skip(%rip)
    ret
2:  sub     $NET_HDR_LEN, %esi          /* esi = frame length */
    jb      9f
    cmp     $ETH_HLEN, %esi
    jb      9f
    lea     NET_HDR_LEN(%r8), %r9       /* r9 = frame */
    mov     (%r9), %eax                 /* destination: broadcast, our MAC or the reply MAC */
    movzwl  4(%r9), %edx
    cmp     $-1, %eax
    jne     3f
    cmp     $0xffff, %edx
    je      5f
3:  cmp     net_mac(%rip), %eax
    jne     4f
    cmp     net_mac+4(%rip), %dx
    je      5f
4:  cmp     net_reply_mac(%rip), %eax
    jne     9f
    cmp     net_reply_mac+4(%rip), %dx
    jne     9f
5:  movzwl  ETH_TYPE(%r9), %eax
    cmp     $ETH_P_ARP_BE, %eax
    je      net_arp
    cmp     $ETH_P_IP_BE, %eax
    je      net_ipv4
9:  ret

/* net_arp: net_frame's ARP frame (r9, length esi) */
net_arp:
    cmp     $(ETH_HLEN + ARP_LEN), %esi
    jb      9f
    cmpl    $ARP_ETH_IP_BE, ETH_HLEN(%r9)       /* htype 1, ptype 0x0800 */
    jne     9f
    cmpl    $ARP_REQUEST_BE, ETH_HLEN+4(%r9)    /* hlen 6, plen 4, oper 1 */
    jne     9f
    mov     ETH_HLEN+ARP_TPA(%r9), %eax
    cmp     net_ip(%rip), %eax
    jne     9f
    call    tx_get
    jc      9f
    mov     ETH_HLEN+ARP_SHA(%r9), %eax         /* to the asker */
    movzwl  ETH_HLEN+ARP_SHA+4(%r9), %edx
    mov     %eax, 0(%r10)
    mov     %dx, 4(%r10)
    mov     %eax, ETH_HLEN+ARP_THA(%r10)
    mov     %dx, ETH_HLEN+ARP_THA+4(%r10)
    mov     net_reply_mac(%rip), %eax           /* from the reply MAC */
    movzwl  net_reply_mac+4(%rip), %edx
    mov     %eax, 6(%r10)
    mov     %dx, 10(%r10)
    mov     %eax, ETH_HLEN+ARP_SHA(%r10)
    mov     %dx, ETH_HLEN+ARP_SHA+4(%r10)
    movw    $ETH_P_ARP_BE, ETH_TYPE(%r10)
    movl    $ARP_ETH_IP_BE, ETH_HLEN(%r10)
    movl    $ARP_REPLY_BE, ETH_HLEN+4(%r10)
    mov     net_ip(%rip), %eax
    mov     %eax, ETH_HLEN+ARP_SPA(%r10)
    mov     ETH_HLEN+ARP_SPA(%r9), %eax
    mov     %eax, ETH_HLEN+ARP_TPA(%r10)
    mov     $(ETH_HLEN + ARP_LEN), %ecx
    call    tx_put
    inc     %r12
9:  ret

/* net_ipv4: net_frame's IPv4 frame (r9, length esi). Only 20-byte headers (no options),
 * unfragmented, ICMP echo request to net_ip, the whole datagram in the frame. The reply is
 * the datagram with the addresses swapped, TTL 64, a new header checksum, type 0 and the
 * ICMP checksum updated (RFC 1624); Ethernet padding is not copied. */
net_ipv4:
    cmp     $(ETH_HLEN + IP_HLEN + ICMP_HLEN), %esi
    jb      9f
    cmpb    $0x45, ETH_HLEN(%r9)                /* version 4, IHL 5 */
    jne     9f
    mov     ETH_HLEN+IP_DADDR(%r9), %eax
    cmp     net_ip(%rip), %eax
    jne     9f
    cmpb    $IPPROTO_ICMP, ETH_HLEN+IP_PROTO(%r9)
    jne     9f
    testw   $IP_MF_OFFSET_BE, ETH_HLEN+IP_FRAG(%r9)
    jnz     9f                                  /* a fragment */
    cmpb    $ICMP_ECHO, ETH_HLEN+IP_HLEN(%r9)
    jne     9f
    movzwl  ETH_HLEN+IP_TOTLEN(%r9), %ecx
    rol     $8, %cx                             /* big endian */
    cmp     $(IP_HLEN + ICMP_HLEN), %ecx
    jb      9f
    add     $ETH_HLEN, %ecx                     /* ecx = reply frame length */
    cmp     %esi, %ecx
    ja      9f                                  /* truncated */
    call    tx_get
    jc      9f
    push    %rcx
    mov     %r9, %rsi
    mov     %r10, %rdi
    add     $7, %ecx                            /* whole qwords: the buffers are 2 KiB */
    shr     $3, %ecx
    rep movsq
    pop     %rcx
    mov     6(%r9), %eax                        /* Ethernet: to the sender, ... */
    movzwl  10(%r9), %edx
    mov     %eax, 0(%r10)
    mov     %dx, 4(%r10)
    mov     net_reply_mac(%rip), %eax           /* ... from the reply MAC */
    movzwl  net_reply_mac+4(%rip), %edx
    mov     %eax, 6(%r10)
    mov     %dx, 10(%r10)
    lea     ETH_HLEN(%r10), %rdi                /* IPv4 header */
    mov     IP_SADDR(%rdi), %eax
    mov     IP_DADDR(%rdi), %edx
    mov     %edx, IP_SADDR(%rdi)
    mov     %eax, IP_DADDR(%rdi)
    movb    $64, IP_TTL(%rdi)
    movw    $0, IP_CSUM(%rdi)
    xor     %eax, %eax
    xor     %edx, %edx
1:  movzwl  (%rdi,%rdx,2), %esi
    add     %esi, %eax
    inc     %edx
    cmp     $(IP_HLEN / 2), %edx
    jb      1b
    call    csum_fold
    mov     %ax, IP_CSUM(%rdi)
    add     $IP_HLEN, %rdi                      /* ICMP: HC' = ~(~HC + ~m + m') */
    movzwl  (%rdi), %edx                        /* m: type 8 and the code */
    movb    $ICMP_ECHOREPLY, (%rdi)
    movzwl  ICMP_CSUM(%rdi), %eax
    not     %eax
    and     $0xffff, %eax
    not     %edx
    and     $0xffff, %edx
    add     %edx, %eax
    movzwl  (%rdi), %edx                        /* m': type 0 and the code */
    add     %edx, %eax
    call    csum_fold
    mov     %ax, ICMP_CSUM(%rdi)
    call    tx_put
    inc     %r13
9:  ret

/* csum_fold: eax = a sum of 16-bit words (below 2^31) -> ax = its one's complement sum,
 * complemented (the Internet checksum of those words) */
csum_fold:
    push    %rdx
    mov     %eax, %edx
    shr     $16, %edx
    and     $0xffff, %eax
    add     %edx, %eax
    mov     %eax, %edx
    shr     $16, %edx
    add     %edx, %eax
    not     %eax
    pop     %rdx
    ret

/* tx_get: a free transmitq descriptor (used ones are reclaimed first): r11d = its index,
 * r10 = its buffer's frame, after the virtio_net_hdr_v1 (zeroed here); CF = 1 if all are in
 * flight. Clobbers rax, rdx. */
tx_get:
    call    tx_reclaim
    mov     txq_nfree(%rip), %eax
    test    %eax, %eax
    jz      8f
    dec     %eax
    mov     %eax, txq_nfree(%rip)
    lea     txq_free(%rip), %rdx
    movzbl  (%rdx,%rax), %r11d
    lea     txq_busy(%rip), %rdx
    movb    $1, (%rdx,%r11)
    mov     %r11d, %r10d
    shl     $NET_BUF_SHIFT, %r10d
    lea     net_tx_bufs(%rip), %rax
    add     %rax, %r10
    movq    $0, (%r10)
    movl    $0, 8(%r10)
    add     $NET_HDR_LEN, %r10
    clc
    ret
8:  stc
    ret

/* tx_reclaim: every used transmitq entry frees its descriptor (ids out of range or not in
 * flight are skipped). Clobbers rax, rdx. */
tx_reclaim:
    push    %rbx
    push    %rcx
    push    %rsi
    lea     vq_area1(%rip), %rbx
1:  mov     txq_used_last(%rip), %ecx
    movzwl  VQ_USED+2(%rbx), %eax
    cmp     %cx, %ax
    je      9f
    mov     %ecx, %edx
    and     txq_mask(%rip), %edx
    mov     VQ_USED+4(%rbx,%rdx,8), %edx    /* id */
    inc     %ecx
    mov     %ecx, txq_used_last(%rip)
    cmp     txq_size(%rip), %edx
    jae     1b
    lea     txq_busy(%rip), %rsi
    cmpb    $0, (%rsi,%rdx)
    je      1b
    movb    $0, (%rsi,%rdx)
    mov     txq_nfree(%rip), %eax
    lea     txq_free(%rip), %rsi
    mov     %dl, (%rsi,%rax)
    inc     %eax
    mov     %eax, txq_nfree(%rip)
    jmp     1b
9:  pop     %rsi
    pop     %rcx
    pop     %rbx
    ret

/* tx_put: send the frame of ecx bytes at r10 of descriptor r11d (from tx_get): descriptor
 * {header and frame, device-readable}, avail ring entry, avail idx. The notification comes
 * later (net_tx_pending). Clobbers rax, rdx. */
tx_put:
    push    %rbx
    lea     vq_area1(%rip), %rbx
    mov     %r11d, %edx
    shl     $4, %edx
    lea     -NET_HDR_LEN(%r10), %rax
    mov     %rax, VQ_DESC(%rbx,%rdx)
    lea     NET_HDR_LEN(%rcx), %eax
    mov     %eax, VQ_DESC+8(%rbx,%rdx)
    movl    $0, VQ_DESC+12(%rbx,%rdx)       /* flags 0, next 0 */
    mov     txq_avail_idx(%rip), %eax
    mov     %eax, %edx
    and     txq_mask(%rip), %edx
    mov     %r11w, VQ_AVAIL+4(%rbx,%rdx,2)
    inc     %eax
    mov     %eax, txq_avail_idx(%rip)
    mov     %ax, VQ_AVAIL+2(%rbx)
    movl    $1, net_tx_pending(%rip)
    pop     %rbx
    ret

/* parse_ipv4: (rsi, length rcx) is exactly A.B.C.D (decimal, 1-3 digits, 0-255 each) ->
 * eax = the address as it lies in a packet (A in the low byte); CF = 1 if not */
parse_ipv4:
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rsi
    push    %r8
    push    %r9
    xor     %eax, %eax
    xor     %r8d, %r8d                  /* octets done */
1:  xor     %ebx, %ebx                  /* this octet */
    xor     %r9d, %r9d                  /* its digits */
2:  test    %rcx, %rcx
    jz      3f
    movzbl  (%rsi), %edx
    sub     $'0', %edx
    cmp     $9, %edx
    ja      3f
    imul    $10, %ebx, %ebx
    add     %edx, %ebx
    inc     %r9d
    inc     %rsi
    dec     %rcx
    cmp     $3, %r9d
    jbe     2b
    jmp     8f                          /* four digits */
3:  test    %r9d, %r9d
    jz      8f
    cmp     $255, %ebx
    ja      8f
    push    %rcx
    lea     (,%r8,8), %ecx
    shl     %cl, %ebx
    pop     %rcx
    or      %ebx, %eax
    inc     %r8d
    cmp     $4, %r8d
    je      4f
    test    %rcx, %rcx
    jz      8f
    cmpb    $'.', (%rsi)
    jne     8f
    inc     %rsi
    dec     %rcx
    jmp     1b
4:  test    %rcx, %rcx
    jnz     8f
    clc
    jmp     9f
8:  stc
9:  pop     %r9
    pop     %r8
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rbx
    ret

/* put_mac: the 6 bytes at rsi as xx:xx:xx:xx:xx:xx */
put_mac:
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    lea     hexdigits(%rip), %rdx
    xor     %ecx, %ecx
1:  test    %ecx, %ecx
    jz      2f
    mov     $':', %al
    call    putc
2:  movzbl  (%rsi,%rcx), %ebx
    mov     %ebx, %eax
    shr     $4, %eax
    movzbl  (%rdx,%rax), %eax
    call    putc
    and     $15, %ebx
    movzbl  (%rdx,%rbx), %eax
    call    putc
    inc     %ecx
    cmp     $6, %ecx
    jb      1b
    pop     %rdx
    pop     %rcx
    pop     %rbx
    pop     %rax
    ret

/* put_ipv4: eax (as parse_ipv4 gives it) as A.B.C.D */
put_ipv4:
    push    %rax
    push    %rbx
    push    %rcx
    mov     %eax, %ebx
    xor     %ecx, %ecx
1:  test    %ecx, %ecx
    jz      2f
    mov     $'.', %al
    call    putc
2:  movzbl  %bl, %eax
    call    putdec
    shr     $8, %ebx
    inc     %ecx
    cmp     $4, %ecx
    jb      1b
    pop     %rcx
    pop     %rbx
    pop     %rax
    ret

/* fail: print "testguest: <cur_name>: FAIL <rsi>" and power off */
fail:
    call    line_begin
    push    %rsi
    mov     cur_name(%rip), %rsi
    call    puts
    lea     s_fail(%rip), %rsi
    call    puts
    pop     %rsi
    call    puts
    call    line_end
    jmp     poweroff

/* fail_hex: print "testguest: <cur_name>: FAIL <rsi>0x<al>" and power off */
fail_hex:
    call    line_begin
    push    %rsi
    mov     cur_name(%rip), %rsi
    call    puts
    lea     s_fail(%rip), %rsi
    call    puts
    pop     %rsi
    call    puts
    movzbl  %al, %eax
    mov     $2, %ecx
    call    puthex
    call    line_end
    jmp     poweroff

/* parse_num: a number at the start of (rsi, length rcx): "0x" and 1-16 hex digits, or 1-18
 * decimal digits; it ends at the first other character. rax = its value, rsi and rcx are
 * moved past it; CF = 1 (rsi and rcx unchanged) if there is none or it is too long. */
parse_num:
    push    %rbx
    push    %rdx
    push    %r8
    push    %r9
    mov     %rsi, %r8
    mov     %rcx, %r9
    xor     %eax, %eax
    xor     %ebx, %ebx                  /* digits */
    cmp     $2, %rcx
    jb      4f
    cmpb    $'0', (%rsi)
    jne     4f
    movzbl  1(%rsi), %edx
    or      $0x20, %edx
    cmp     $'x', %edx
    jne     4f
    add     $2, %rsi
    sub     $2, %rcx
1:  test    %rcx, %rcx                  /* hex */
    jz      3f
    movzbl  (%rsi), %edx
    sub     $'0', %edx
    cmp     $9, %edx
    jbe     2f
    movzbl  (%rsi), %edx
    or      $0x20, %edx
    sub     $'a', %edx
    cmp     $5, %edx
    ja      3f
    add     $10, %edx
2:  cmp     $16, %ebx
    jae     8f
    shl     $4, %rax
    or      %rdx, %rax
    inc     %ebx
    inc     %rsi
    dec     %rcx
    jmp     1b
3:  test    %ebx, %ebx
    jz      8f
    clc
    jmp     9f
4:  test    %rcx, %rcx                  /* decimal */
    jz      5f
    movzbl  (%rsi), %edx
    sub     $'0', %edx
    cmp     $9, %edx
    ja      5f
    cmp     $18, %ebx
    jae     8f
    imul    $10, %rax, %rax
    add     %rdx, %rax
    inc     %ebx
    inc     %rsi
    dec     %rcx
    jmp     4b
5:  test    %ebx, %ebx
    jz      8f
    clc
    jmp     9f
8:  mov     %r8, %rsi
    mov     %r9, %rcx
    stc
9:  pop     %r9
    pop     %r8
    pop     %rdx
    pop     %rbx
    ret

/* parse_byte: (rsi, length rcx) is exactly a number 0-255 (decimal or 0x hex) -> rax;
 * CF = 1 if not */
parse_byte:
    push    %rcx
    push    %rsi
    call    parse_num
    jc      9f
    test    %rcx, %rcx
    jnz     8f
    cmp     $255, %rax
    ja      8f
    clc
    jmp     9f
8:  stc
9:  pop     %rsi
    pop     %rcx
    ret

/* ---- console: COM1, one line at a time under a spinlock shared by all CPUs ---------- */

/* say: print the whole line "testguest: <rsi>\n" */
say:
    call    line_begin
    call    puts
    call    line_end
    ret

/* line_begin: take the console lock and print "testguest: " */
line_begin:
    push    %rax
    push    %rsi
1:  mov     $1, %eax
    xchg    %eax, con_lock(%rip)
    test    %eax, %eax
    jz      3f
2:  pause                               /* wait until it looks free, then retry */
    mov     con_lock(%rip), %eax
    test    %eax, %eax
    jnz     2b
    jmp     1b
3:  lea     s_prefix(%rip), %rsi
    call    puts
    pop     %rsi
    pop     %rax
    ret

/* line_end: print "\n" and release the console lock */
line_end:
    push    %rax
    mov     $'\n', %al
    call    putc
    xor     %eax, %eax
    xchg    %eax, con_lock(%rip)
    pop     %rax
    ret

/* putc: al */
putc:
    push    %rax
    push    %rdx
    mov     $COM1_LSR, %edx
1:  inb     %dx, %al
    test    $LSR_THR_EMPTY, %al
    jnz     2f
    pause
    jmp     1b
2:  mov     8(%rsp), %rax               /* the saved character */
    mov     $COM1_THR, %edx
    outb    %al, %dx
    pop     %rdx
    pop     %rax
    ret

/* puts: NUL-terminated string at rsi */
puts:
    push    %rax
    push    %rsi
1:  movzbl  (%rsi), %eax
    test    %al, %al
    jz      2f
    call    putc
    inc     %rsi
    jmp     1b
2:  pop     %rsi
    pop     %rax
    ret

/* putsn: rcx bytes at rsi */
putsn:
    push    %rax
    push    %rcx
    push    %rsi
    test    %rcx, %rcx
    jz      2f
1:  movzbl  (%rsi), %eax
    call    putc
    inc     %rsi
    dec     %rcx
    jnz     1b
2:  pop     %rsi
    pop     %rcx
    pop     %rax
    ret

/* putdec: rax in decimal */
putdec:
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rsi
    sub     $24, %rsp
    lea     24(%rsp), %rsi              /* digits are stored backwards from here */
    mov     $10, %ebx
    xor     %ecx, %ecx
1:  xor     %edx, %edx
    div     %rbx
    add     $'0', %dl
    dec     %rsi
    mov     %dl, (%rsi)
    inc     %ecx
    test    %rax, %rax
    jnz     1b
    call    putsn
    add     $24, %rsp
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rbx
    pop     %rax
    ret

/* puthex: "0x" and rax in hex, ecx digits (0: as many as needed) */
puthex:
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rsi
    mov     %rax, %rbx
    lea     s_0x(%rip), %rsi
    call    puts
    test    %ecx, %ecx
    jnz     2f
    mov     $1, %ecx                    /* count the significant digits */
    mov     %rbx, %rdx
1:  shr     $4, %rdx
    jz      2f
    inc     %ecx
    jmp     1b
2:  mov     %ecx, %edx                  /* digits left */
    lea     hexdigits(%rip), %rsi
3:  dec     %edx
    lea     (,%rdx,4), %ecx
    mov     %rbx, %rax
    shr     %cl, %rax
    and     $15, %eax
    movzbl  (%rsi,%rax), %eax
    call    putc
    test    %edx, %edx
    jnz     3b
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rbx
    pop     %rax
    ret

/* ======================================================================================= */
/* AP start-up trampoline. It is data here (kept out of the 64-bit disassembly) and runs
 * from its copy at TRAMP_ADDR, starting in real mode at CS:IP = 0x0600:0000. It has no
 * stack until ap_main. */
    .section .rodata.trampoline, "a"
    .globl  ap_trampoline, ap_trampoline_end    /* for the size check in testguest.ld */
    .p2align 4
ap_trampoline:
    .code16
    cli
    cld
    mov     %cs, %ax
    mov     %ax, %ds
    lgdtl   tr_gdtr - ap_trampoline
    mov     %cr0, %eax
    or      $1, %eax                    /* PE */
    mov     %eax, %cr0
    ljmpl   $0x08, $(TRAMP_ADDR + tr_pm32 - ap_trampoline)

    .code32
tr_pm32:
    mov     $0x10, %eax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     %ax, %fs
    mov     %ax, %gs
    mov     %cr4, %eax
    or      $0x20, %eax                 /* PAE */
    mov     %eax, %cr4
    mov     (TRAMP_ADDR + tr_cr3 - ap_trampoline), %eax
    mov     %eax, %cr3
    mov     $MSR_EFER, %ecx
    mov     (TRAMP_ADDR + tr_efer - ap_trampoline), %eax
    or      $EFER_LME, %eax
    xor     %edx, %edx
    wrmsr
    mov     %cr0, %eax
    and     $0x9fffffff, %eax           /* clear CD, NW */
    or      $0x80000001, %eax           /* PG, PE */
    mov     %eax, %cr0
    ljmp    $0x18, $(TRAMP_ADDR + tr_lm64 - ap_trampoline)

    .code64
tr_lm64:
    mov     $ap_main, %eax
    jmp     *%rax

    .p2align 3
tr_gdt:
    .quad   0                           /* null */
    .quad   0x00cf9b000000ffff          /* 0x08: 32-bit code, flat (accessed bit preset) */
    .quad   0x00cf93000000ffff          /* 0x10: data, flat */
    .quad   0x00af9b000000ffff          /* 0x18: 64-bit code */
tr_gdt_end:
tr_gdtr:
    .word   tr_gdt_end - tr_gdt - 1
    .long   TRAMP_ADDR + tr_gdt - ap_trampoline
tr_cr3:
    .long   0                           /* patched by the BSP */
tr_efer:
    .long   0                           /* patched by the BSP */
ap_trampoline_end:

/* ======================================================================================= */
/* PVH entry (XEN_ELFNOTE_PHYS32_ENTRY), used by QEMU's -kernel (microvm: qboot): 32-bit
 * protected mode, paging off, flat CS/DS/ES/SS, interrupts off, EBX = struct hvm_start_info,
 * no stack. Its own section (.pvh32, allocated but not marked executable: it lies in the R+X
 * text segment) so that tests/guest_disassembly.rs disassembles it as 32-bit code. It maps
 * the first 4 GiB with 2 MiB pages in its own tables, enters long mode and continues at
 * pvh_start64. Absolute addresses: the image is linked and loaded at 1 MiB. */
    .section .pvh32, "a"
    .code32
pvh_start32:
    cli
    cld
    mov     %ebx, pvh_start_info
    mov     $pvh_pml4, %edi             /* zero the PML4 and the PDPT */
    mov     $(2 * 4096 / 4), %ecx
    xor     %eax, %eax
    rep stosl
    movl    $(pvh_pdpt + 3), pvh_pml4   /* present, writable */
    mov     $pvh_pdpt, %edi             /* PDPT[0..3] -> the four page directories */
    mov     $(pvh_pd + 3), %eax
    mov     $4, %ecx
1:  mov     %eax, (%edi)
    add     $4096, %eax
    add     $8, %edi
    sub     $1, %ecx
    jnz     1b
    mov     $pvh_pd, %edi               /* 2048 entries of 2 MiB up to 4 GiB */
    mov     $0x83, %eax                 /* present, writable, 2 MiB page */
2:  mov     %eax, (%edi)
    movl    $0, 4(%edi)
    add     $8, %edi
    add     $0x200000, %eax
    jnc     2b                          /* carry: the last entry (4 GiB - 2 MiB) is done */
    lgdtl   pvh_gdtr
    mov     %cr4, %eax
    or      $0x20, %eax                 /* PAE */
    mov     %eax, %cr4
    mov     $pvh_pml4, %eax
    mov     %eax, %cr3
    mov     $MSR_EFER, %ecx
    rdmsr
    or      $EFER_LME, %eax
    wrmsr
    mov     %cr0, %eax
    or      $0x80000001, %eax           /* PG, PE */
    mov     %eax, %cr0
    ljmp    $PVH_CS, $pvh_start64
    .code64

/* The PVH entry point, for QEMU's loader: a PT_NOTE segment (see testguest.ld). QEMU reads
 * the description as a pointer-sized value after a name padded to the segment's alignment
 * (4), so it is a .quad here. */
    .section .note.Xen, "a", @note
    .p2align 2
    .long   4                           /* n_namesz: "Xen\0" */
    .long   8                           /* n_descsz */
    .long   18                          /* n_type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz  "Xen"
    .quad   pvh_start32

/* ======================================================================================= */
    .section .rodata, "a"
    .p2align 3
pvh_gdt:
    .quad   0                           /* null */
    .quad   0x00cf9b000000ffff          /* 0x08: 32-bit code, flat (accessed bit preset) */
    .quad   0x00af9b000000ffff          /* 0x10: 64-bit code */
    .quad   0x00cf93000000ffff          /* 0x18: data, flat */
pvh_gdt_end:
pvh_gdtr:
    .word   pvh_gdt_end - pvh_gdt - 1
    .long   pvh_gdt

s_prefix:           .asciz "testguest: "
s_scenario:         .asciz "scenario "
s_none:             .asciz "(none)"
s_unknown:          .asciz "error: unknown scenario"
s_hello:            .asciz "hello from the vmd test guest"
s_rebooting:        .asciz "rebooting"
s_crashing:         .asciz "crashing with ud2"
s_exits:            .asciz "exits="
s_start:            .asciz " start"
s_exits_done:       .asciz "exits done"
s_badio_pio8:       .asciz "badio: pio8 "
s_badio_pio16:      .asciz " pio16 "
s_badio_pio32:      .asciz " pio32 "
s_badio_mmio32:     .asciz " mmio32 "
s_badio_survived:   .asciz "badio: survived"
s_heartbeat:        .asciz "spin heartbeat "
s_spin_input:       .asciz "spin input "
s_pwrbtn:           .asciz "power button pressed, powering off"
s_stringio_outs:    .ascii "stringio: rep outsb to COM1"
s_stringio_outs_end:
s_stringio_ins:     .asciz "stringio: rep insb from COM1 scratch "
s_memtest:          .asciz "memtest "
s_memtest_ok:       .asciz " MiB OK"
s_memtest_fail_at:  .asciz "memtest: FAIL at "
s_memtest_no_ram:   .asciz "memtest: FAIL not enough RAM"
s_smp:              .asciz "smp: "
s_cpus_in_madt:     .asciz " cpus in MADT"
s_smp_all:          .asciz "smp: all "
s_cpus_up:          .asciz " cpus up"
s_smp_fail_only:    .asciz "smp: FAIL only "
s_of:               .asciz " of "
s_smp_no_madt:      .asciz "smp: FAIL no MADT"
s_smp_no_cpus:      .asciz "smp: FAIL no enabled processor in the MADT"
s_cpu:              .asciz "cpu "
s_up:               .asciz " up"
s_0x:               .asciz "0x"
hexdigits:          .ascii "0123456789abcdef"
k_testguest:        .asciz "testguest="
k_hello:            .asciz "hello"
k_reboot:           .asciz "reboot"
k_smp:              .asciz "smp"
k_badio:            .asciz "badio"
k_crash:            .asciz "crash"
k_spin:             .asciz "spin"
k_stringio:         .asciz "stringio"
k_exits:            .asciz "exits="
k_memtest:          .asciz "memtest="
k_blk_fill:         .asciz "blk-fill="
k_blk_check:        .asciz "blk-check="
k_blk_read:         .asciz "blk-read="
k_blk_iops:         .asciz "blk-iops="
k_blk_id:           .asciz "blk-id"
k_blk_ro:           .asciz "blk-ro"
k_blk_bad:          .asciz "blk-bad"
k_rng:              .asciz "rng"
k_net:              .asciz "net"
k_net_spoof:        .asciz "net-spoof"
k_ip:               .asciz "ip="
k_net_seconds:      .asciz "net-seconds="
k_virtio_mmio:      .asciz "virtio_mmio.device="
n_net:              .asciz "net"
n_net_spoof:        .asciz "net-spoof"
n_blk_fill:         .asciz "blk-fill"
n_blk_check:        .asciz "blk-check"
n_blk_id:           .asciz "blk-id"
n_blk_ro:           .asciz "blk-ro"
n_blk_read:         .asciz "blk-read"
n_blk_iops:         .asciz "blk-iops"
n_blk_bad:          .asciz "blk-bad"
n_rng:              .asciz "rng"
s_fail:             .asciz ": FAIL "
s_no_blk:           .asciz "no virtio-blk device"
s_no_rng:           .asciz "no virtio-rng device"
s_no_net:           .asciz "no virtio-net device"
s_no_ip:            .asciz "no ip=A.B.C.D on the command line"
s_bad_seconds:      .asciz "bad net-seconds=N"
s_mac:              .asciz " mac "
s_ip:               .asciz " ip "
s_answered:         .asciz " answered "
s_arp:              .asciz " arp "
s_echo:             .asciz " echo"
s_legacy:           .asciz "legacy (version 1) virtio-mmio transport, version 2 needed"
s_vi_reset:         .asciz "device status does not reset to 0"
s_vi_version_1:     .asciz "VIRTIO_F_VERSION_1 not offered"
s_vi_features:      .asciz "FEATURES_OK not kept: features refused"
s_vi_queue_ready:   .asciz "queue 0 already ready after reset"
s_vi_no_queue:      .asciz "queue 0 not available (QueueNumMax 0)"
s_vi_small_queue:   .asciz "queue 0 too small (QueueNumMax < 4)"
/* the same three for queue 1, in the same order (vq_setup adds one offset to all three) */
s_vi1_queue_ready:  .asciz "queue 1 already ready after reset"
s_vi1_no_queue:     .asciz "queue 1 not available (QueueNumMax 0)"
s_vi1_small_queue:  .asciz "queue 1 too small (QueueNumMax < 4)"
    .if (s_vi1_no_queue - s_vi_no_queue) != (s_vi1_queue_ready - s_vi_queue_ready)
    .error "the queue 1 messages must mirror the queue 0 ones"
    .endif
    .if (s_vi1_small_queue - s_vi_small_queue) != (s_vi1_queue_ready - s_vi_queue_ready)
    .error "the queue 1 messages must mirror the queue 0 ones"
    .endif
s_timeout:          .asciz "request timed out"
s_req_status:       .asciz "request status "
s_write_status:     .asciz "write status (IOERR expected) "
s_ro_not_offered:   .asciz "VIRTIO_BLK_F_RO not offered"
s_empty_disk:       .asciz "disk has no sectors"
s_small_disk:       .asciz "disk smaller than 4 KiB"
s_rng_short:        .asciz "too few bytes after 64 requests"
s_good_no_answer:   .asciz "good request: no answer"
s_good_status:      .asciz "good request: status "
s_blk_fill_done:    .asciz "blk-fill done "
s_blk_check_ok:     .asciz "blk-check ok "
s_sectors:          .asciz " sectors"
s_blk_check_fail:   .asciz "blk-check: FAIL at byte "
s_got:              .asciz " got "
s_blk_id:           .asciz "blk-id "
s_blk_ro_ok:        .asciz "blk-ro ok"
s_blk_read_start:   .asciz "blk-read start"
s_blk_read_done:    .asciz "blk-read done "
s_mib:              .asciz " MiB"
s_blk_iops_start:   .asciz "blk-iops start"
s_blk_iops_done:    .asciz "blk-iops done "
s_rng:              .asciz "rng "
s_blk_bad_case:     .asciz "blk-bad "
s_used_len:         .asciz ": used len "
s_status:           .asciz " status "
s_no_answer:        .asciz ": no answer"
s_needs_reset:      .asciz ": device needs reset, set up again"
s_blk_bad_good:     .asciz "blk-bad: good request ok"
c_loop:             .asciz "loop"
c_outside:          .asciz "outside"
c_zero_len:         .asciz "zero-len"
c_huge_len:         .asciz "huge-len"
c_no_status:        .asciz "no-status"
c_writable_header:  .asciz "writable-header"
c_bad_next:         .asciz "bad-next"
c_bad_type:         .asciz "bad-type"
c_beyond_capacity:  .asciz "beyond-capacity"

/* ======================================================================================= */
    .data
    .p2align 3
boot_params:        .quad 0
scen_ptr:           .quad 0
scen_len:           .quad 0
con_lock:           .long 0
ap_next_index:      .long 0
ap_arrived:         .long 0
stringio_buf:       .long 0
pvh_start_info:     .long 0             /* EBX at the PVH entry */
    .p2align 3
cur_name:           .quad 0             /* the scenario name FAIL lines start with */
vdev_base:          .quad 0             /* the virtio-mmio device in use */
blk_capacity:       .quad 0             /* in 512-byte sectors */
vdev_want:          .long 0             /* device features (word 0) the driver accepts */
vdev_feat:          .long 0             /* device features (word 0) negotiated */
vq_size:            .long 0             /* queue 0: size (a power of 2, at most 16) */
vq_mask:            .long 0             /* vq_size - 1 */
vq_cursor:          .long 0             /* next descriptor to hand out (round robin) */
vq_avail_idx:       .long 0             /* our avail idx (its low 16 bits are published) */
vq_used_last:       .long 0             /* used ring entries consumed */
vdev_nq:            .long 0             /* queues set up: 1, or 2 (virtio-net) */
txq_size:           .long 0             /* queue 1 (virtio-net transmitq): size, ... */
txq_mask:           .long 0
txq_avail_idx:      .long 0
txq_used_last:      .long 0
txq_nfree:          .long 0             /* entries of txq_free */
txq_free:           .skip VQ_MAX_SIZE   /* free transmitq descriptors (a stack) */
txq_busy:           .skip VQ_MAX_SIZE   /* 1: descriptor in flight */
    .p2align 3
net_mac:            .skip 8             /* the device's MAC (6 bytes) */
net_reply_mac:      .skip 8             /* the source MAC of replies (net-spoof: not ours) */
net_ip:             .long 0             /* ip=, as in a packet */
net_spoof:          .long 0             /* 1 in net-spoof */
net_rx_skip:        .long 0             /* rx buffers still to drop (MRG_RXBUF, num_buffers > 1) */
net_tx_pending:     .long 0             /* frames queued since the last transmitq notification */

    .bss
    .p2align 4
cpu_ids:            .skip MAX_CPUS
    .p2align 4
bsp_stack:          .skip BSP_STACK_SIZE
bsp_stack_top:
ap_stacks:          .skip AP_STACK_SIZE * MAX_APS
    .p2align 12
pvh_pml4:           .skip 4096          /* PVH entry: its own page tables, ... */
pvh_pdpt:           .skip 4096
pvh_pd:             .skip 4 * 4096
pvh_boot_params:    .skip 4096          /* ... and the boot_params it builds */
vq_area:            .skip 4096          /* queue 0: descriptors, avail ring, used ring */
vq_area1:           .skip 4096          /* queue 1 (virtio-net only), the same layout */
blk_buf:            .skip BLK_BUF_SIZE  /* request data */
net_rx_bufs:        .skip VQ_MAX_SIZE * NET_BUF_SIZE    /* receiveq buffer i: descriptor i */
net_tx_bufs:        .skip VQ_MAX_SIZE * NET_BUF_SIZE    /* transmitq buffer i: descriptor i */
blk_hdr:            .skip 16            /* virtio-blk request header */
blk_status:         .skip 16            /* its status byte */

    .section .note.GNU-stack, "", @progbits
