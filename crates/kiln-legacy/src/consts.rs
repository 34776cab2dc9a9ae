//! Every guest-visible port, address and IRQ of the legacy devices, from
//! `docs/guest-contract.md`. The VMM, the ACPI tables and the docs take them from here.

/// COM1 (16550A UART) base port.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of COM1 ports (8 registers: 0x3f8..0x400).
pub const COM1_PORT_SIZE: u16 = 8;
/// COM1's legacy IRQ line (IOAPIC pin / GSI).
pub const COM1_IRQ: u32 = 4;
/// The i8042 keyboard's interrupt (ISA IRQ 1, IOAPIC pin 1).
pub const KEYBOARD_IRQ: u32 = 1;

/// IOAPIC pin of the ACPI Generic Event Device: the VMM raises it for a power-button press
/// (the DSDT's GED `_EVT` notifies `\_SB.PWRB`). Above the ISA range, so it is IOAPIC-only.
pub const GED_GSI: u32 = 23;

/// PCI configuration mechanism #1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Ports 0xcf8..0xd00.
pub const PCI_CONFIG_PORT_SIZE: u16 = 8;

/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 status (read) / command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 command "pulse the CPU reset line": written to [`I8042_COMMAND_PORT`].
pub const I8042_CMD_RESET_CPU: u8 = 0xfe;
/// What the i8042 status port reads: system flag (bit 2), last write was a command (bit 3),
/// keyboard not inhibited (bit 4); no output or input pending (bits 0 and 1 clear).
pub const I8042_STATUS: u8 = 0x1c;

/// POST / debug port: writes are ignored (recorded for diagnostics).
pub const POST_PORT: u16 = 0x80;

/// Base of the kiln power device (the FADT's hardware-reduced sleep and reset registers).
pub const POWER_PORT: u16 = 0x600;
/// Number of power device ports (0x600..0x603).
pub const POWER_PORT_SIZE: u16 = 3;
/// Offset of the sleep control register (FADT `SLEEP_CONTROL_REG`, 1 byte) in the power device.
pub const POWER_SLEEP_CONTROL_OFFSET: u16 = 0;
/// Offset of the sleep status register (FADT `SLEEP_STATUS_REG`, 1 byte).
pub const POWER_SLEEP_STATUS_OFFSET: u16 = 1;
/// Offset of the reset register (FADT `RESET_REG`, 1 byte).
pub const POWER_RESET_OFFSET: u16 = 2;
/// Sleep control SLP_EN bit: the write starts the sleep transition.
pub const SLP_EN: u8 = 1 << 5;
/// Shift of the 3-bit SLP_TYP field in the sleep control register (bits 2..4).
pub const SLP_TYP_SHIFT: u8 = 2;
/// Mask of the SLP_TYP field after shifting.
pub const SLP_TYP_MASK: u8 = 0b111;
/// SLP_TYP value of S5 (soft off); the DSDT's `_S5` package must give this value.
pub const SLP_TYP_S5: u8 = 5;
/// The sleep control value that powers the VM off: SLP_EN | S5 << 2.
pub const POWER_OFF_VALUE: u8 = SLP_EN | (SLP_TYP_S5 << SLP_TYP_SHIFT);
/// The value written to the reset register to reset the VM (FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x01;

/// Base port of the kiln exit-test device's PIO window.
pub const EXIT_TEST_PORT: u16 = 0x700;
/// Size of the exit-test PIO window (0x700..0x704).
pub const EXIT_TEST_PORT_SIZE: u16 = 4;
/// Base of the kiln exit-test device's MMIO window (start of the 32-bit MMIO hole).
pub const EXIT_TEST_MMIO_BASE: u64 = 0xc000_0000;
/// Size of the exit-test MMIO window (0xC000_0000..0xC000_1000).
pub const EXIT_TEST_MMIO_SIZE: u64 = 0x1000;

/// QEMU's `isa-debug-exit` port: the conformance guest writes 0 here if the power-off write
/// did not stop it. Kiln does not emulate it (the access is an unclaimed port).
pub const QEMU_DEBUG_EXIT_PORT: u16 = 0xf4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_off_value_matches_contract() {
        // The contract spells the value out; the bit layout must agree with it.
        assert_eq!(POWER_OFF_VALUE, 0x34);
        assert_eq!(
            (POWER_OFF_VALUE >> SLP_TYP_SHIFT) & SLP_TYP_MASK,
            SLP_TYP_S5
        );
    }
}
