//! Port I/O, MMIO and the COM1 console.

use core::arch::asm;

/// Writes one byte to an I/O port.
pub fn outb(port: u16, val: u8) {
    // SAFETY: port output has no memory effects; the guest owns the whole machine.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port input has no memory effects.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Writes four bytes to an I/O port.
pub fn outl(port: u16, val: u32) {
    // SAFETY: port output has no memory effects.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads four bytes from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: port input has no memory effects.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Writes a u32 to an MMIO address below 4 GiB (identity mapped, uncached).
pub fn mmio_write32(addr: u64, val: u32) {
    // SAFETY: the caller passes an address inside the identity-mapped MMIO hole, which holds
    // no Rust objects; a volatile access becomes exactly one 4-byte store.
    unsafe { core::ptr::write_volatile(addr as usize as *mut u32, val) }
}

/// Writes a byte to an MMIO address below 4 GiB (identity mapped).
pub fn mmio_write8(addr: u64, val: u8) {
    // SAFETY: as for `mmio_write32`; callers pass device register addresses only.
    unsafe { core::ptr::write_volatile(addr as usize as *mut u8, val) }
}

/// Reads a u32 from an MMIO address below 4 GiB.
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: as for `mmio_write32`.
    unsafe { core::ptr::read_volatile(addr as usize as *const u32) }
}

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// A VMM whose UART never reports THR empty must not hang the guest.
const TX_SPIN_LIMIT: u32 = 1_000_000;

/// Sends one byte on COM1, polling LSR bit 5 first (contract).
pub fn serial_putb(b: u8) {
    let mut spins = 0;
    while inb(LSR) & LSR_THR_EMPTY == 0 && spins < TX_SPIN_LIMIT {
        spins += 1;
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// Sends bytes on COM1.
pub fn serial_write(bytes: &[u8]) {
    for &b in bytes {
        serial_putb(b);
    }
}

/// Sends one line (appends `\n`).
pub fn serial_line(bytes: &[u8]) {
    serial_write(bytes);
    serial_putb(b'\n');
}

/// Waits for and returns one received byte (LSR bit 0).
pub fn serial_getb() -> u8 {
    while inb(LSR) & LSR_DATA_READY == 0 {
        core::hint::spin_loop();
    }
    inb(COM1)
}

/// Powers the machine off per the contract: kiln power device, then QEMU isa-debug-exit,
/// then `cli; hlt` forever.
pub fn power_off() -> ! {
    outb(0x600, 0x34);
    outb(0xf4, 0);
    loop {
        // SAFETY: cli/hlt only stop this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
