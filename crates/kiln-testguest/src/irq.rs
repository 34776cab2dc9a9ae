//! Interrupt delivery: a 64-bit IDT, the 8259 PIC masked, the IOAPIC routing COM1's IRQ 4 to
//! the BSP, and the local APIC timer. Counts what arrives; `run` says whether COM1 RX, COM1
//! THRE and the LAPIC timer interrupts were all taken. The virtio scenarios use [`init`] and
//! the vectors from [`crate::virtio_hw::VEC_BASE`] (handled in `crate::virtio_hw::isr`).
//!
//! Interrupts are taken only in long mode (kvm-pvm can't `iret` in 32-bit protected mode),
//! at CPL 0 on the current stack (the guest is built without a red zone).

use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use kiln_testguest::apic::{
    idt_gate, ioredtbl_high, ioredtbl_index, ioredtbl_low, IOAPIC_BASE, IOAPIC_IOREGSEL,
    IOAPIC_IOWIN, LAPIC_EOI, LAPIC_LVT_TIMER, LAPIC_SVR, LAPIC_TIMER_DIV, LAPIC_TIMER_INIT,
};

use crate::io;

/// Vector of COM1's interrupt (IOAPIC pin 4).
pub const VEC_COM1: u8 = 0x34;
/// Vector of the LAPIC timer.
pub const VEC_TIMER: u8 = 0x40;
/// Vector of the i8042 keyboard's interrupt (IOAPIC pin 1).
pub const VEC_KBD: u8 = 0x35;
/// Spurious-interrupt vector.
pub const VEC_SPURIOUS: u8 = 0xff;

const COM1: u16 = 0x3f8;
const IER: u16 = COM1 + 1;
const IIR: u16 = COM1 + 2;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;

/// Interrupts seen, by kind.
pub static RX: AtomicU32 = AtomicU32::new(0);
/// THR-empty interrupts seen.
pub static THRE: AtomicU32 = AtomicU32::new(0);
/// LAPIC timer interrupts seen.
pub static TIMER: AtomicU32 = AtomicU32::new(0);
/// Keyboard interrupts seen.
pub static KBD: AtomicU32 = AtomicU32::new(0);
/// Keyboard bytes read (the first [`KBD_KEEP`] are kept in [`KBD_BYTES`]).
pub static KBD_N: AtomicU32 = AtomicU32::new(0);
/// How many keyboard bytes are kept.
pub const KBD_KEEP: usize = 8;
/// The keyboard bytes read, in order.
pub static KBD_BYTES: [AtomicU8; KBD_KEEP] = [const { AtomicU8::new(0) }; KBD_KEEP];
/// Interrupts on vectors nobody expected.
pub static OTHER: AtomicU32 = AtomicU32::new(0);

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

static mut IDT: Idt = Idt([[0; 2]; 256]);

#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

// One 16-byte stub per vector pushes its number and joins the common path, which saves the
// caller-saved registers, calls `ktg_irq_dispatch(vector, frame)` on a 16-byte-aligned stack
// and returns with `iretq`. CPU exceptions (vectors < 32, some with an error code) never
// return: the dispatcher reports them and ends the run.
core::arch::global_asm!(
    r#"
    .text
    .balign 16
    .globl ktg_isr_table
ktg_isr_table:
    .set ktg_vec, 0
    .rept 256
    .balign 16
    pushq $ktg_vec
    jmp ktg_isr_common
    .set ktg_vec, ktg_vec + 1
    .endr

ktg_isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %rbp
    mov %rsp, %rbp
    /* Vector above the 10 saved registers; the CPU's frame (after any error code) above it. */
    mov 80(%rsp), %rdi
    lea 88(%rsp), %rsi
    and $-16, %rsp
    call ktg_irq_dispatch
    mov %rbp, %rsp
    pop %rbp
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $8, %rsp
    iretq
"#,
    options(att_syntax)
);

unsafe extern "C" {
    static ktg_isr_table: u8;
}

/// Bytes per stub in `ktg_isr_table`.
const STUB_SIZE: u64 = 16;

/// Reports a CPU exception (the IDT is only loaded by this scenario) and ends the run.
fn exception(vector: u8, frame: *const u64) -> ! {
    // Vectors that push an error code: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX.
    let has_error = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
    // SAFETY: `frame` points at the CPU's interrupt frame on the current stack: the error
    // code if any, then RIP.
    let (error, rip) = unsafe {
        if has_error {
            (frame.read(), frame.add(1).read())
        } else {
            (0, frame.read())
        }
    };
    let mut line = kiln_testguest::line::LineBuf::new();
    line.push_str("KTEST-PANIC CPU exception ");
    line.push_dec(u64::from(vector));
    line.push_str(" error=");
    line.push_hex(error);
    line.push_str(" rip=");
    line.push_hex(rip);
    crate::die(line.as_bytes())
}

/// Length of the instruction to skip if it raises #GP (set by a probe just before running
/// an instruction that may fault, e.g. `rdmsr` of an MSR the VMM may not know); 0: a #GP is
/// fatal as usual.
pub static GP_SKIP: AtomicU32 = AtomicU32::new(0);
/// Counts #GPs skipped through [`GP_SKIP`].
pub static GP_HIT: AtomicU32 = AtomicU32::new(0);

/// Skips the faulting instruction if a probe asked for it; true if handled.
fn gp_fixup(frame: *const u64) -> bool {
    let len = GP_SKIP.swap(0, Ordering::SeqCst);
    if len == 0 {
        return false;
    }
    // SAFETY: for #GP the CPU pushed an error code, then RIP, at `frame`; the frame is on
    // this stack and `iretq` reads RIP back from it.
    unsafe {
        let rip = (frame as *mut u64).add(1);
        rip.write(rip.read() + u64::from(len));
    }
    GP_HIT.fetch_add(1, Ordering::SeqCst);
    true
}

#[unsafe(no_mangle)]
extern "C" fn ktg_irq_dispatch(vector: u64, frame: *const u64) {
    let vector = vector as u8;
    if vector < 32 {
        // Exceptions take no EOI.
        if vector == 13 && gp_fixup(frame) {
            return;
        }
        exception(vector, frame);
    }
    match vector {
        VEC_COM1 => {
            // Like Linux's 8250 driver: IIR says whether the UART is asserting; LSR says what
            // to service. (vm-superio can report RX and THRE in IIR at once, which no code
            // of a real 16550 means, so IIR's bits are not matched as one code.)
            let iir = io::inb(IIR);
            if iir & 1 == 0 {
                let lsr = io::inb(LSR);
                if lsr & 1 != 0 {
                    while io::inb(LSR) & 1 != 0 {
                        let _ = io::inb(COM1);
                    }
                    RX.fetch_add(1, Ordering::SeqCst);
                }
                if iir & 0x0e == 0x02 || (iir & 0x02 != 0 && lsr & 0x20 != 0) {
                    THRE.fetch_add(1, Ordering::SeqCst);
                    // One is enough: stop THRE interrupts, keep RX.
                    io::outb(IER, 0x01);
                }
            }
        }
        VEC_TIMER => {
            TIMER.fetch_add(1, Ordering::SeqCst);
        }
        VEC_KBD => {
            KBD.fetch_add(1, Ordering::SeqCst);
            // Like Linux's i8042 driver: read while the status says the buffer is full
            // (bounded, in case a hostile VMM keeps it full).
            for _ in 0..64 {
                if io::inb(0x64) & 1 == 0 {
                    break;
                }
                let b = io::inb(0x60);
                let n = KBD_N.fetch_add(1, Ordering::SeqCst) as usize;
                if let Some(slot) = KBD_BYTES.get(n) {
                    slot.store(b, Ordering::SeqCst);
                }
            }
        }
        v if (crate::virtio_hw::VEC_BASE..crate::virtio_hw::VEC_END).contains(&v) => {
            crate::virtio_hw::isr(usize::from(v - crate::virtio_hw::VEC_BASE));
        }
        v if crate::benchexits::VECTORS.contains(&v) => crate::benchexits::isr(v),
        VEC_SPURIOUS => return, // no EOI for spurious interrupts
        _ => {
            OTHER.fetch_add(1, Ordering::SeqCst);
        }
    }
    io::mmio_write32(LAPIC_EOI, 0);
}

fn ioapic_write(index: u32, value: u32) {
    ioapic_write_at(IOAPIC_BASE, index, value);
}

/// Writes register `index` of the IOAPIC at `base`.
pub fn ioapic_write_at(base: u64, index: u32, value: u32) {
    io::mmio_write32(base + IOAPIC_IOREGSEL, index);
    io::mmio_write32(base + IOAPIC_IOWIN, value);
}

/// Reads register `index` of the IOAPIC at `base`.
pub fn ioapic_read_at(base: u64, index: u32) -> u32 {
    io::mmio_write32(base + IOAPIC_IOREGSEL, index);
    io::mmio_read32(base + IOAPIC_IOWIN)
}

/// Loads the IDT, masks the 8259 and enables the local APIC; interrupts stay off. Safe to
/// call again.
pub fn init() {
    load_idt();
    // The 8259 would deliver IRQs as ExtINT at vector base 0: mask both.
    io::outb(0x21, 0xff);
    io::outb(0xa1, 0xff);
    io::mmio_write32(LAPIC_SVR, 0x100 | u32::from(VEC_SPURIOUS));
}

/// Enables interrupts.
pub fn enable() {
    // SAFETY: every vector has a stub in the IDT that `init` loaded.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
}

/// Disables interrupts.
pub fn disable() {
    // SAFETY: turning interrupts off has no other effect.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
}

/// On an AP: loads the IDT the BSP filled (`init`) and enables this CPU's local APIC.
pub fn init_ap() {
    let idt = core::ptr::addr_of!(IDT);
    let idtr = Idtr {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the IDT is a static the BSP filled before starting this AP; lidt only reads
    // the descriptor.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
    }
    io::mmio_write32(LAPIC_SVR, 0x100 | u32::from(VEC_SPURIOUS));
}

/// Fills every IDT entry with its stub (interrupt gates, CS 0x10) and loads the IDT.
fn load_idt() {
    let table = core::ptr::addr_of!(ktg_isr_table) as u64;
    // SAFETY: one CPU runs this with interrupts off; the IDT is only read by the CPU once
    // loaded, after these writes.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (v, gate) in idt.0.iter_mut().enumerate() {
            *gate = idt_gate(table + STUB_SIZE * v as u64, 0x10);
        }
        let idtr = Idtr {
            limit: (core::mem::size_of::<Idt>() - 1) as u16,
            base: idt as *const Idt as u64,
        };
        core::arch::asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
    }
}

/// Arms everything, enables interrupts, prints `KTEST-IRQ-READY` (so the host sends a
/// line) and waits up to `timeout_cycles` of TSC for RX, THRE and timer interrupts. Leaves
/// interrupts off and the sources masked. Returns (rx, thre, timer, other).
pub fn run(timeout_cycles: u64) -> (u32, u32, u32, u32) {
    for c in [&RX, &THRE, &TIMER, &OTHER] {
        c.store(0, Ordering::SeqCst);
    }
    init();
    ioapic_write(ioredtbl_index(4) + 1, ioredtbl_high(0));
    ioapic_write(ioredtbl_index(4), ioredtbl_low(VEC_COM1, false));
    io::serial_line(b"KTEST-IRQ-READY");
    // OUT2 gates the UART's interrupt output on PCs; RX data + THR empty.
    io::outb(MCR, io::inb(MCR) | 0x08);
    io::outb(IER, 0x03);
    // One-shot LAPIC timer, divide by 1.
    io::mmio_write32(LAPIC_TIMER_DIV, 0x0b);
    io::mmio_write32(LAPIC_LVT_TIMER, u32::from(VEC_TIMER));
    io::mmio_write32(LAPIC_TIMER_INIT, 100_000);
    // SAFETY: the IDT has handlers for every vector that is unmasked.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    // SAFETY: rdtsc has no side effects.
    let t = unsafe { core::arch::x86_64::_rdtsc() };
    while (RX.load(Ordering::SeqCst) == 0
        || THRE.load(Ordering::SeqCst) == 0
        || TIMER.load(Ordering::SeqCst) == 0)
        // SAFETY: as above.
        && unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(t) < timeout_cycles
    {
        core::hint::spin_loop();
    }
    // SAFETY: turning interrupts off has no other effect.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    io::outb(IER, 0);
    ioapic_write(ioredtbl_index(4), ioredtbl_low(VEC_COM1, true));
    io::mmio_write32(LAPIC_LVT_TIMER, 1 << 16);
    (
        RX.load(Ordering::SeqCst),
        THRE.load(Ordering::SeqCst),
        TIMER.load(Ordering::SeqCst),
        OTHER.load(Ordering::SeqCst),
    )
}

/// Routes the keyboard's IRQ 1 to [`VEC_KBD`], prints `KTEST-KBD-READY` (the host then
/// presses Ctrl+Alt+Del) and waits up to `timeout_cycles` of TSC until `want` bytes have been
/// read. Leaves interrupts off and the pin masked. Returns (interrupts, bytes read).
pub fn keyboard(want: u32, timeout_cycles: u64) -> (u32, u32) {
    KBD.store(0, Ordering::SeqCst);
    KBD_N.store(0, Ordering::SeqCst);
    init();
    ioapic_write(ioredtbl_index(1) + 1, ioredtbl_high(0));
    ioapic_write(ioredtbl_index(1), ioredtbl_low(VEC_KBD, false));
    io::serial_line(b"KTEST-KBD-READY");
    enable();
    // SAFETY: rdtsc has no side effects.
    let t = unsafe { core::arch::x86_64::_rdtsc() };
    while KBD_N.load(Ordering::SeqCst) < want
        // SAFETY: as above.
        && unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(t) < timeout_cycles
    {
        core::hint::spin_loop();
    }
    disable();
    ioapic_write(ioredtbl_index(1), ioredtbl_low(VEC_KBD, true));
    (KBD.load(Ordering::SeqCst), KBD_N.load(Ordering::SeqCst))
}
