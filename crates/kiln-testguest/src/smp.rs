//! SMP bring-up the way firmware and Linux do it: copy a real-mode trampoline below 1 MiB,
//! send INIT / SIPI / SIPI through the local APIC, and let each AP climb real → protected →
//! long mode into `ap_main`, which counts itself in and records its APIC ID.
//!
//! The trampoline never uses `iret` (it fails in 32-bit protected mode under kvm-pvm) and
//! takes no interrupts; each AP gets its own stack from a static pool.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use kiln_testguest::apic::{
    icr_init_all_but_self, icr_init_to, icr_sipi_all_but_self, icr_sipi_to, AP_STACK_SIZE,
    LAPIC_ICR_HIGH, LAPIC_ICR_LOW, LAPIC_ID, LAPIC_SVR, MAX_APS,
};

use crate::io;

/// Where the trampoline is copied: a free RAM page below 1 MiB (the VMM's boot page tables
/// at 0x9000.. and its stack at 0x8ff0 are no longer used once the guest runs on its own).
pub const TRAMPOLINE: u64 = 0x8000;

/// APs that reached `ap_main`.
pub static AP_COUNT: AtomicU32 = AtomicU32::new(0);
/// Bit i: APIC ID i checked in.
pub static AP_SEEN: [AtomicU64; 4] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

core::arch::global_asm!(
    r#"
    .section .text.ktg_tramp, "ax", @progbits
    .code16
    .globl ktg_tramp_start
ktg_tramp_start:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    lgdtl (ktg_tramp_gdtr - ktg_tramp_start + {tramp})
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(ktg_tramp32 - ktg_tramp_start + {tramp})

    .code32
ktg_tramp32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
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
    or $0x80000000, %eax
    mov %eax, %cr0
    ljmp $0x18, $(ktg_tramp64 - ktg_tramp_start + {tramp})

    .code64
ktg_tramp64:
    movabs $ktg_gdt_ptr, %rax
    lgdt (%rax)
    mov $0x18, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    /* Take a stack slot; more APs than slots park here. */
    mov $1, %eax
    movabs $ktg_ap_next, %rdx
    lock xadd %eax, (%rdx)
    cmp ${max_aps}, %eax
    jae 2f
    inc %eax
    imul ${stack_size}, %eax
    movabs $ktg_ap_stacks, %rsp
    add %rax, %rsp
    pushq $0x10
    movabs $ktg_ap_entry, %rax
    push %rax
    lretq
2:
    cli
    hlt
    jmp 2b

    .balign 8
ktg_tramp_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00AF9A000000FFFF
ktg_tramp_gdtr:
    .word ktg_tramp_gdtr - ktg_tramp_gdt - 1
    .long ktg_tramp_gdt - ktg_tramp_start + {tramp}
    .globl ktg_tramp_end
ktg_tramp_end:

    .text
ktg_ap_entry:
    xor %ebp, %ebp
    call ap_main
3:
    cli
    hlt
    jmp 3b

    .section .bss.ktg_stack, "aw", @nobits
    .balign 16
ktg_ap_stacks:
    .skip {stacks_len}
"#,
    tramp = const TRAMPOLINE,
    max_aps = const MAX_APS,
    stack_size = const AP_STACK_SIZE,
    stacks_len = const MAX_APS * AP_STACK_SIZE,
    options(att_syntax)
);

unsafe extern "C" {
    static ktg_tramp_start: u8;
    static ktg_tramp_end: u8;
}

/// Next free AP stack slot, taken by the trampoline with `lock xadd`.
#[unsafe(export_name = "ktg_ap_next")]
static AP_NEXT: AtomicU32 = AtomicU32::new(0);

/// What APs do after checking in.
pub static AP_TASK: AtomicU32 = AtomicU32::new(TASK_HALT);
/// Check in, then halt.
pub const TASK_HALT: u32 = 0;
/// Check in, then answer the BSP's kvmclock ping-pong (`clock::ap_pingpong`), then halt.
pub const TASK_CLOCK: u32 = 1;
/// Check in, then take the exit benchmark's IPIs (`benchexits::ap_ipi_task`) until INITed.
pub const TASK_BENCH_IPI: u32 = 2;
/// Check in, then dirty and check memory for `counter` (`counter_ap::ap_task`) until told
/// to stop.
pub const TASK_COUNTER: u32 = 3;

/// First Rust code on an AP, on its own stack, in long mode with the kernel's GDT.
#[unsafe(no_mangle)]
extern "C" fn ap_main() {
    let id = io::mmio_read32(LAPIC_ID) >> 24;
    AP_SEEN[(id / 64) as usize % 4].fetch_or(1 << (id % 64), Ordering::SeqCst);
    AP_COUNT.fetch_add(1, Ordering::SeqCst);
    match AP_TASK.load(Ordering::SeqCst) {
        TASK_CLOCK => crate::clock::ap_pingpong(id),
        TASK_BENCH_IPI => crate::benchexits::ap_ipi_task(),
        TASK_COUNTER => crate::counter_ap::ap_task(id),
        _ => {}
    }
}

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Spins for about `cycles` TSC cycles.
fn spin(cycles: u64) {
    let t = rdtsc();
    while rdtsc().wrapping_sub(t) < cycles {
        core::hint::spin_loop();
    }
}

/// Copies the trampoline, enables the local APIC, forgets earlier check-ins and stack slots
/// (APs about to be INITed no longer use them) and sets the APs' task.
fn prepare(task: u32) {
    // Both symbols are labels in this image; the range between them is the trampoline.
    let (start, end) = (
        core::ptr::addr_of!(ktg_tramp_start) as usize,
        core::ptr::addr_of!(ktg_tramp_end) as usize,
    );
    let len = end.saturating_sub(start).min(4096);
    // SAFETY: the destination is one page of RAM below 1 MiB that nothing else uses (see
    // TRAMPOLINE), identity-mapped; the source is `len` bytes of this image.
    unsafe { core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len) };
    // Software-enable the local APIC (spurious vector 0xff).
    io::mmio_write32(LAPIC_SVR, io::mmio_read32(LAPIC_SVR) | 0x1ff);
    AP_COUNT.store(0, Ordering::SeqCst);
    for s in &AP_SEEN {
        s.store(0, Ordering::SeqCst);
    }
    AP_NEXT.store(0, Ordering::SeqCst);
    AP_TASK.store(task, Ordering::SeqCst);
}

fn send_ipi(high: u32, low: u32) {
    io::mmio_write32(LAPIC_ICR_HIGH, high);
    io::mmio_write32(LAPIC_ICR_LOW, low);
}

fn wait_for(expected: u32, timeout_cycles: u64) -> u32 {
    let t = rdtsc();
    while AP_COUNT.load(Ordering::SeqCst) < expected && rdtsc().wrapping_sub(t) < timeout_cycles {
        core::hint::spin_loop();
    }
    AP_COUNT.load(Ordering::SeqCst)
}

/// Sends INIT, SIPI, SIPI to every other CPU (they halt after checking in); then waits until
/// `expected` APs checked in or `timeout_cycles` of TSC passed. Returns the number that
/// checked in. May be called again: the APs are INITed afresh.
pub fn start_aps(expected: u32, timeout_cycles: u64) -> u32 {
    start_aps_with(TASK_HALT, expected, timeout_cycles)
}

/// [`start_aps`] with `task` for every AP.
pub fn start_aps_with(task: u32, expected: u32, timeout_cycles: u64) -> u32 {
    prepare(task);
    send_ipi(0, icr_init_all_but_self());
    spin(10_000_000);
    for _ in 0..2 {
        send_ipi(0, icr_sipi_all_but_self(TRAMPOLINE));
        spin(1_000_000);
    }
    wait_for(expected, timeout_cycles)
}

/// Starts the one AP `apic_id` with `task`; true once it checked in.
pub fn start_ap(apic_id: u8, task: u32, timeout_cycles: u64) -> bool {
    prepare(task);
    let (h, l) = icr_init_to(apic_id);
    send_ipi(h, l);
    spin(10_000_000);
    for _ in 0..2 {
        let (h, l) = icr_sipi_to(apic_id, TRAMPOLINE);
        send_ipi(h, l);
        spin(1_000_000);
    }
    wait_for(1, timeout_cycles) == 1
}
