//! Everything that runs in ring 0, as hand-written assembly.
//!
//! Ring 0 is kept tiny on purpose: some hosts (KVM "PVM") emulate guest ring 0
//! one instruction at a time. Ring 0 only switches modes, loads the
//! precomputed page tables, GDT, TSS and IDT, and `iretq`s into ring 3 with
//! IOPL=3 and interrupts off. All real work happens in Rust in ring 3.
//!
//! Port I/O from ring 3 is allowed twice over: by IOPL=3 and by an all-zero
//! I/O permission bitmap shared by every TSS. PVM does not keep a guest IOPL
//! for ring 3; it emulates the faulting `in`/`out` and consults the bitmap.
//!
//! Entry points:
//! - `pvh_start32`: PVH (Xen `XEN_ELFNOTE_PHYS32_ENTRY`), 32-bit protected
//!   mode, paging off, `%ebx` = `hvm_start_info`.
//! - `linux64_start` (ELF `e_entry`): Linux 64-bit boot protocol, long mode,
//!   `%rsi` = `boot_params`.
//! - `ap_trampoline_start`: copied to [`TRAMPOLINE_ADDR`] at run time and
//!   started by SIPI vector 0x10; real mode straight to long mode.
//!
//! Ring 0 services for ring 3 (`int 0x80`, DPL 3), selected by `%rax`:
//! 0 = park the CPU (`cli; hlt` forever), 1 = triple fault on purpose,
//! 2 = 32-bit store of `%esi` to address `%rdi` (ring-0 MMIO fallback).
//! PVM turns ring-3 software interrupts into #UD at the `int` instruction, so
//! the #UD handler treats a #UD on `int $0x80` (bytes cd 80) as the call.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, AtomicU64};

/// Most CPUs the guest can run (xAPIC IDs 0..=254).
pub const MAX_CPUS: usize = 255;
/// Where the AP trampoline is copied; SIPI vector 0x10 starts it.
pub const TRAMPOLINE_ADDR: u64 = 0x10000;
/// SIPI vector: the AP starts at `vector << 12` = [`TRAMPOLINE_ADDR`].
pub const SIPI_VECTOR: u32 = (TRAMPOLINE_ADDR >> 12) as u32;
/// Per-AP kernel (ring-0) stack size, allocated by the BSP from guest RAM.
pub const AP_KSTACK_SIZE: u64 = 8 << 10;
/// Per-AP user (ring-3) stack size, allocated by the BSP from guest RAM.
pub const AP_USTACK_SIZE: u64 = 56 << 10;

/// `int 0x80` service numbers (in `%rax`).
pub const SYS_PARK: u64 = 0;
pub const SYS_TRIPLE_FAULT: u64 = 1;
pub const SYS_WRITE32: u64 = 2;

/// Boot protocol the guest was entered through ([`BOOT_KIND`]).
pub const BOOT_PVH: u32 = 1;
pub const BOOT_LINUX64: u32 = 2;

/// Physical address of `hvm_start_info` (PVH) or `boot_params` (Linux 64).
pub static BOOT_INFO: AtomicU64 = AtomicU64::new(0);
/// [`BOOT_PVH`] or [`BOOT_LINUX64`], written by the entry code.
pub static BOOT_KIND: AtomicU32 = AtomicU32::new(0);
/// Last CPU index handed out to an AP (the BSP is 0); bumped atomically by
/// each AP in ring 0.
pub static AP_NEXT: AtomicU32 = AtomicU32::new(0);
/// Top of the ring-0 stack of each AP, by CPU index (set by the BSP).
pub static AP_KSTACK_TOP: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Top of the ring-3 stack of each AP, by CPU index (set by the BSP).
pub static AP_USTACK_TOP: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Flags of a 2 MiB page: present, writable, user, accessed, dirty, large.
/// A and D are preset so the page walker never needs to write the tables.
const PDE_FLAGS: u64 = 0xe7;
/// Cache disable + write through, for the MMIO pages (IOAPIC, LAPIC, ...).
const PDE_UNCACHED: u64 = 0x18;
/// Everything from here up to 4 GiB is mapped uncached.
const UNCACHED_FROM: u64 = 0xfe00_0000;

/// Four page directories identity-mapping 0..4 GiB with 2 MiB pages.
#[repr(C, align(4096))]
pub struct PageDirs([[u64; 512]; 4]);

const fn page_dirs() -> PageDirs {
    let mut pd = [[0u64; 512]; 4];
    let mut i = 0;
    while i < 2048 {
        let addr = (i as u64) << 21;
        let mut entry = addr | PDE_FLAGS;
        if addr >= UNCACHED_FROM {
            entry |= PDE_UNCACHED;
        }
        pd[i / 512][i % 512] = entry;
        i += 1;
    }
    PageDirs(pd)
}

/// The page directories, computed at compile time (the PML4 and PDPT that
/// point at them are in the assembly below).
pub static BOOT_PDS: PageDirs = page_dirs();

extern "C" {
    /// First byte of the AP trampoline (copied to [`TRAMPOLINE_ADDR`]).
    pub static ap_trampoline_start: u8;
    /// One past the last byte of the AP trampoline.
    pub static ap_trampoline_end: u8;
    /// End of the loaded image (including .bss), page aligned.
    pub static __image_end: u8;
}

global_asm!(
    r#"
    .set KERNEL_CS, 0x08
    .set KERNEL_DS, 0x10
    .set USER_CS, 0x1b
    .set USER_DS, 0x23
    .set TSS0, 0x30
    .set CR0_BITS, 0x80000033       /* PG | NE | ET | MP | PE; EM = TS = 0 */
    .set CR4_BITS, 0x620            /* OSXMMEXCPT | OSFXSR | PAE */
    .set CR4_CLEAR, 0xf00884        /* CET PKE SMAP SMEP UMIP PGE TSD */
    .set USER_RFLAGS, 0x3002        /* IOPL = 3, IF = 0 */
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 0x100
    .set COM1, 0x3f8
    .set EXIT_PORT, 0xf4

/* ------------------------------------------------------------------ */
/* PVH note: 32-bit entry point. 8-byte descriptor so that readers of  */
/* either 4 bytes (linux-loader) or 8 bytes (QEMU, ELF64) agree.       */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4                         /* n_namesz */
    .long 8                         /* n_descsz */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4
    .popsection

/* ------------------------------------------------------------------ */
    .pushsection .text.boot, "ax", @progbits

/* PVH entry: 32-bit protected mode, paging off, %ebx = hvm_start_info. */
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, {boot_info}
    movl $0, {boot_info}+4
    movl ${boot_pvh}, {boot_kind}
    lgdt boot_gdt_ptr
    movl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $CR0_BITS, %eax
    movl %eax, %cr0
    ljmp $KERNEL_CS, $bsp_start64

/* Linux 64-bit boot protocol entry: long mode, %rsi = boot_params. */
    .code64
    .globl linux64_start
linux64_start:
    cli
    cld
    movq %rsi, {boot_info}(%rip)
    movl ${boot_linux64}, {boot_kind}(%rip)
    leaq bsp_kstack_top(%rip), %rsp
    lgdt boot_gdt_ptr(%rip)
    movq %cr4, %rax
    andq $~CR4_CLEAR, %rax          /* clearing PGE also flushes global TLB entries */
    orq $CR4_BITS, %rax
    movq %rax, %cr4
    leaq boot_pml4(%rip), %rax
    movq %rax, %cr3
    movq %cr0, %rax
    andq $~0xc, %rax                /* EM = TS = 0 */
    orq $0x22, %rax                 /* MP | NE */
    movq %rax, %cr0
    pushq $KERNEL_CS
    leaq bsp_start64(%rip), %rax
    pushq %rax
    lretq

/* BSP, long mode with our GDT and page tables. */
bsp_start64:
    movl $KERNEL_DS, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    leaq bsp_kstack_top(%rip), %rsp
    movb $0xff, io_bitmap_end(%rip)
    call idt_fill
    xorl %ecx, %ecx
    leaq bsp_kstack_top(%rip), %rdx
    leaq bsp_ustack_top(%rip), %rbx
    jmp enter_ring3

/* AP, long mode (from the trampoline). */
ap_start64:
    movl $KERNEL_DS, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl $1, %ecx
    lock xaddl %ecx, {ap_next}(%rip)
    incl %ecx                       /* this AP's CPU index */
    cmpl ${max_cpus}, %ecx
    jae park
    leaq {ap_kstack}(%rip), %rax
    movq (%rax,%rcx,8), %rdx
    leaq {ap_ustack}(%rip), %rax
    movq (%rax,%rcx,8), %rbx
    testq %rdx, %rdx
    jz park
    testq %rbx, %rbx
    jz park
    jmp enter_ring3

/* %ecx = CPU index, %rdx = ring-0 stack top, %rbx = ring-3 stack top.
   Builds this CPU's TSS and its GDT descriptor, loads TR and IDTR, and
   enters cpu_entry(index) in ring 3. */
enter_ring3:
    movq %rdx, %rsp
    movl %ecx, %eax
    shll $7, %eax
    leaq tss_array(%rip), %rsi
    addq %rax, %rsi                 /* %rsi = &tss[index] */
    movq %rdx, 4(%rsi)              /* RSP0 */
    movl ${max_cpus}, %eax
    subl %ecx, %eax
    shll $7, %eax                   /* offset of io_bitmap from this TSS */
    movw %ax, 102(%rsi)             /* I/O map base */
    leal 8192(%rax), %r10d          /* limit: covers the bitmap and its 0xff end byte */
    movl %esi, %eax
    andl $0xffffff, %eax
    shlq $16, %rax
    orq %r10, %rax                  /* limit[15:0] */
    movabsq $0x0000890000000000, %rdi
    orq %rdi, %rax                  /* present, available 64-bit TSS */
    movq %rsi, %rdi
    shrq $24, %rdi
    shlq $56, %rdi
    orq %rdi, %rax                  /* base[31:24] (the image is below 4 GiB) */
    movl %ecx, %edi
    shll $4, %edi
    leaq boot_gdt+TSS0(%rip), %r8
    movq %rax, (%r8,%rdi)
    movq $0, 8(%r8,%rdi)
    addl $TSS0, %edi
    ltr %di
    lidt boot_idt_ptr(%rip)
    movl $USER_DS, %eax
    movw %ax, %ds
    movw %ax, %es
    pushq $USER_DS                  /* SS */
    leaq -8(%rbx), %rax
    pushq %rax                      /* RSP: as if just called */
    pushq $USER_RFLAGS
    pushq $USER_CS
    leaq {cpu_entry}(%rip), %rax
    pushq %rax
    movl %ecx, %edi                 /* cpu_entry(index) */
    iretq

/* Fill IDT vectors 0..31 (exceptions) and 0x80 (ring-3 services). */
idt_fill:
    leaq exc_stubs(%rip), %rsi
    leaq boot_idt(%rip), %rdi
    movabsq $0x00008e0000000000, %r9    /* present, DPL 0, interrupt gate */
    xorl %ecx, %ecx
1:  call idt_gate
    movq %rax, (%rdi)
    addq $16, %rsi
    addq $16, %rdi
    incl %ecx
    cmpl $32, %ecx
    jb 1b
    leaq int80_entry(%rip), %rsi
    leaq boot_idt+0x800(%rip), %rdi
    movabsq $0x0000ee0000000000, %r9    /* present, DPL 3, interrupt gate */
    call idt_gate
    movq %rax, (%rdi)
    ret

/* %rsi = handler (below 4 GiB), %r9 = attributes: low qword in %rax. */
idt_gate:
    movl %esi, %eax
    andl $0xffff, %eax
    orl $(KERNEL_CS << 16), %eax
    movl %esi, %edx
    shrl $16, %edx
    shlq $48, %rdx
    orq %rdx, %rax
    orq %r9, %rax
    ret

/* Exception stubs, 16 bytes apart; push a 0 error code where the CPU does not. */
    .balign 16
exc_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if ((0x60227d00 >> \vec) & 1) == 0
    pushq $0
    .endif
    pushq $\vec
    jmp exc_common
    .endr

/* A #UD on an `int $0x80` instruction is a service call too: some hosts
   (KVM PVM) turn ring-3 software interrupts into #UD at the instruction. */
exc_common:
    cmpq $6, (%rsp)
    jne exc_report
    pushq %rax
    movq 24(%rsp), %rax             /* faulting RIP (it was fetched: mapped) */
    cmpw $0x80cd, (%rax)
    popq %rax
    jne exc_report
    addq $16, %rsp                  /* drop vector and error code */
    addq $2, (%rsp)                 /* return past the int $0x80 */
    jmp int80_entry

/* Print "FAIL: exception <vector> error 0x<code> rip 0x<rip>" and exit 2. */
exc_report:
    movl $1, %eax
1:  xchgl %eax, exc_lock(%rip)
    testl %eax, %eax
    jz 2f
    pause
    movl $1, %eax
    jmp 1b
2:  leaq msg_exc(%rip), %rsi
    call kputs
    movq 0(%rsp), %rax
    call kputdec
    leaq msg_err(%rip), %rsi
    call kputs
    movq 8(%rsp), %rax
    call kputhex
    leaq msg_rip(%rip), %rsi
    call kputs
    movq 16(%rsp), %rax
    call kputhex
    movl $10, %edi
    call kputc
    movb $2, %al
    outb %al, $EXIT_PORT
    jmp park

/* int 0x80 from ring 3. */
int80_entry:
    cmpq ${sys_triple}, %rax
    je sys_triple_fault
    cmpq ${sys_write32}, %rax
    je sys_write32
park:
    cli
    hlt
    jmp park
sys_write32:
    movl %esi, (%rdi)
    iretq
sys_triple_fault:
    lidt zero_idt_ptr(%rip)
    ud2

/* %rsi = NUL-terminated string. */
kputs:
    movzbl (%rsi), %edi
    testl %edi, %edi
    jz 1f
    call kputc
    incq %rsi
    jmp kputs
1:  ret

/* %dil = byte; waits (bounded) for THRE. Clobbers %rax, %rdx, %r10. */
kputc:
    movl $0x100000, %r10d
1:  movw $(COM1 + 5), %dx
    inb %dx, %al
    testb $0x20, %al
    jnz 2f
    decl %r10d
    jnz 1b
2:  movw $COM1, %dx
    movl %edi, %eax
    outb %al, %dx
    ret

/* %rax in hex, no leading zeros. Clobbers %rcx, %rdi, %r11 (+ kputc). */
kputhex:
    movq %rax, %r11
    movl $60, %ecx
1:  testl %ecx, %ecx
    jz 2f
    movq %r11, %rax
    shrq %cl, %rax
    testq %rax, %rax
    jnz 2f
    subl $4, %ecx
    jmp 1b
2:  movq %r11, %rax
    shrq %cl, %rax
    andl $0xf, %eax
    leaq hex_digits(%rip), %rdi
    movzbl (%rdi,%rax), %edi
    call kputc
    subl $4, %ecx
    jns 2b
    ret

/* %rax in decimal. Clobbers %rcx, %rdi, %r8 (+ kputc). */
kputdec:
    xorl %ecx, %ecx
    movl $10, %r8d
1:  xorl %edx, %edx
    divq %r8
    pushq %rdx
    incl %ecx
    testq %rax, %rax
    jnz 1b
2:  popq %rdi
    addl $48, %edi
    call kputc
    decl %ecx
    jnz 2b
    ret

/* ------------------------------------------------------------------ */
/* AP trampoline: copied to 0x10000, entered by SIPI in real mode at   */
/* 1000:0000. Goes directly to long mode (PE and PG set together).     */
    .balign 16
    .globl ap_trampoline_start
ap_trampoline_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_trampoline_gdtr - ap_trampoline_start
    movl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $CR0_BITS, %eax
    movl %eax, %cr0
    ljmpl $KERNEL_CS, $ap_start64
    .balign 8
ap_trampoline_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    .globl ap_trampoline_end
ap_trampoline_end:
    .code64
    .popsection

/* ------------------------------------------------------------------ */
    .pushsection .rodata.boot, "a", @progbits
    .balign 4096
boot_pml4:
    .quad boot_pdpt + 0x27          /* present, writable, user, accessed */
    .fill 511, 8, 0
boot_pdpt:
    .quad {pds} + 0x0000 + 0x27
    .quad {pds} + 0x1000 + 0x27
    .quad {pds} + 0x2000 + 0x27
    .quad {pds} + 0x3000 + 0x27
    .fill 508, 8, 0
msg_exc:
    .asciz "\nFAIL: exception "
msg_err:
    .asciz " error 0x"
msg_rip:
    .asciz " rip 0x"
hex_digits:
    .ascii "0123456789abcdef"
    .popsection

/* ------------------------------------------------------------------ */
    .pushsection .data.boot, "aw", @progbits
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00affa000000ffff        /* 0x18 user code, 64-bit, DPL 3 */
    .quad 0x00cff2000000ffff        /* 0x20 user data, DPL 3 */
    .quad 0                         /* 0x28 unused */
    .fill {max_cpus} * 2, 8, 0      /* 0x30 + 16 * index: TSS of each CPU */
boot_gdt_end:
    .balign 8
    .word 0, 0, 0
boot_gdt_ptr:                       /* limit, then base (the 32-bit lgdt reads 6 bytes) */
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .word 0, 0, 0
boot_idt_ptr:
    .word 256 * 16 - 1
    .quad boot_idt
    .word 0, 0, 0
zero_idt_ptr:
    .word 0
    .quad 0
    .popsection

    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
boot_idt:
    .skip 256 * 16
tss_array:
    .skip 128 * {max_cpus}
io_bitmap:                          /* shared by every TSS: all ports allowed */
    .skip 8192
io_bitmap_end:
    .skip 16
exc_lock:
    .skip 4
    .balign 4096
bsp_kstack:
    .skip 8192
bsp_kstack_top:
bsp_ustack:
    .skip 65536
bsp_ustack_top:
    .popsection
"#,
    boot_info = sym BOOT_INFO,
    boot_kind = sym BOOT_KIND,
    ap_next = sym AP_NEXT,
    ap_kstack = sym AP_KSTACK_TOP,
    ap_ustack = sym AP_USTACK_TOP,
    pds = sym BOOT_PDS,
    cpu_entry = sym crate::cpu_entry,
    boot_pvh = const BOOT_PVH,
    boot_linux64 = const BOOT_LINUX64,
    max_cpus = const MAX_CPUS,
    sys_triple = const SYS_TRIPLE_FAULT,
    sys_write32 = const SYS_WRITE32,
    options(att_syntax)
);
