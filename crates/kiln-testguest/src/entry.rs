//! Entry code: the three ways in, page tables, GDT, stack. See README.md, "Entry".
//!
//! - `_start32` at 0x100000: Linux 32-bit protocol (bzImage `code32_start`; ESI = boot_params).
//! - `_start_pvh`: PVH (32-bit protected mode, paging off, EBX = hvm_start_info).
//! - `_start64` at 0x100200 (ELF `e_entry`, bzImage 64-bit entry): Linux 64-bit protocol
//!   (long mode, RSI = boot_params).
//!
//! Every path zeroes BSS, switches to the guest's own GDT and page tables (identity map of
//! 4 GiB with 2 MiB pages, the MMIO hole uncached), enables SSE for safety (the guest is built
//! without SSE, see README.md "Why no SSE"), sets a stack and calls `kmain(protocol, info)` in
//! ring 0: protocol 1 = Linux 64-bit, 2 = PVH, 3 = Linux 32-bit. Interrupts stay off.
//!
//! GDT: 0x10 code64, 0x18 flat data (the same selectors as the contract's boot GDT).

core::arch::global_asm!(
    r#"
    .section .text.ktg_head, "ax", @progbits
    .code32
    .globl _start32
_start32:
    mov $3, %ebp
    jmp ktg_enter32

    .globl _start_pvh
_start_pvh:
    mov %ebx, %esi
    mov $2, %ebp

ktg_enter32:
    cld
    /* Zero BSS (8-byte multiples: the linker script aligns both ends). */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    /* Long mode: CR3, PAE, EFER.LME, then paging. */
    mov $ktg_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt ktg_gdt_ptr
    ljmp $0x10, $ktg_from32

    /* The bzImage 64-bit entry is code32_start + 0x200. */
    .org 0x200
    .code64
    .globl _start64
_start64:
    cld
    mov %rsi, %r12
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
    rep stosq
    lea ktg_stack_top(%rip), %rsp
    lea ktg_pml4(%rip), %rax
    mov %rax, %cr3
    lgdt ktg_gdt_ptr(%rip)
    pushq $0x10
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:
    mov %r12, %rsi
    mov $1, %edi
    jmp ktg_common64

ktg_from32:
    /* Upper halves of registers are undefined after the switch from compatibility mode. */
    mov %esi, %esi
    mov %ebp, %edi

ktg_common64:
    mov $0x18, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    lea ktg_stack_top(%rip), %rsp
    /* SSE: CR0.EM = 0, CR0.TS = 0, CR0.MP = 1; CR4.OSFXSR | CR4.OSXMMEXCPT. */
    mov %cr0, %rax
    and $~0xC, %rax
    or $0x2, %rax
    mov %rax, %cr0
    mov %cr4, %rax
    or $0x600, %rax
    mov %rax, %cr4
    xor %ebp, %ebp
    call kmain
2:
    cli
    hlt
    jmp 2b

    .section .data.ktg_gdt, "aw", @progbits
    .balign 16
ktg_gdt:
    .quad 0
    .quad 0
    .quad 0x00AF9B000000FFFF
    .quad 0x00CF93000000FFFF
ktg_gdt_end:
    .balign 8
    .globl ktg_gdt_ptr
ktg_gdt_ptr:
    .word ktg_gdt_end - ktg_gdt - 1
    .quad ktg_gdt

    /* Identity map of the first 4 GiB, 2 MiB pages; [3 GiB, 4 GiB) is the MMIO hole: PCD|PWT. */
    .section .data.ktg_paging, "aw", @progbits
    .balign 4096
    .globl ktg_pml4
ktg_pml4:
    .quad ktg_pdpt + 0x3
    .fill 511, 8, 0
ktg_pdpt:
    .quad ktg_pd + 0x3
    .quad ktg_pd + 0x1003
    .quad ktg_pd + 0x2003
    .quad ktg_pd + 0x3003
    .fill 508, 8, 0
ktg_pd:
    .set ktg_i, 0
    .rept 1536
    .quad (ktg_i << 21) | 0x83
    .set ktg_i, ktg_i + 1
    .endr
    .rept 512
    .quad (ktg_i << 21) | 0x9b
    .set ktg_i, ktg_i + 1
    .endr

    .section .bss.ktg_stack, "aw", @nobits
    .balign 16
ktg_stack:
    .skip 0x10000
ktg_stack_top:

    /* PVH: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", 4-byte physical entry address. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long _start_pvh
"#,
    options(att_syntax)
);
