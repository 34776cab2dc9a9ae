//! Arithmetic of the `exits` scenario (the port and MMIO accesses live in the guest binary).

use core::fmt;

use crate::line::{Describe, Described, LineBuf};

/// PIO window of the kiln exit-test device (contract).
pub const EXIT_TEST_PORT: u16 = 0x700;
/// MMIO window of the kiln exit-test device (contract).
pub const EXIT_TEST_MMIO: u64 = 0xC000_0000;
/// `kiln.exits` default.
pub const DEFAULT_EXITS: u64 = 1000;
/// Upper bound on `kiln.exits`, so a typo cannot make the guest spin for hours.
pub const MAX_EXITS: u64 = 100_000_000;

/// Which window a counter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// Port I/O at 0x700.
    Pio,
    /// MMIO at 0xC000_0000.
    Mmio,
}

/// The device counted a different number of writes than the guest made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CountMismatch {
    /// Which window.
    pub window: Window,
    /// Writes made.
    pub wrote: u64,
    /// Counter delta read back.
    pub counted: u32,
}

impl Describe for CountMismatch {
    fn describe(&self, out: &mut LineBuf) {
        out.push_str(match self.window {
            Window::Pio => "PIO",
            Window::Mmio => "MMIO",
        });
        out.push_str(" counter advanced by ");
        out.push_dec(u64::from(self.counted));
        out.push_str(", guest wrote ");
        out.push_dec(self.wrote);
    }
}

impl fmt::Display for CountMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Described(self).fmt(f)
    }
}

/// Checks a counter read before and after `wrote` writes; the counter wraps at 2^32.
pub fn check_count(
    window: Window,
    before: u32,
    after: u32,
    wrote: u64,
) -> Result<(), CountMismatch> {
    let counted = after.wrapping_sub(before);
    if u64::from(counted) == wrote % (1u64 << 32) {
        Ok(())
    } else {
        Err(CountMismatch {
            window,
            wrote,
            counted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_wrapping() {
        assert_eq!(check_count(Window::Pio, 5, 1005, 1000), Ok(()));
        assert_eq!(check_count(Window::Mmio, u32::MAX - 1, 8, 10), Ok(()));
        let e = check_count(Window::Mmio, 0, 3, 4).unwrap_err();
        assert_eq!(e.to_string(), "MMIO counter advanced by 3, guest wrote 4");
        assert_eq!(
            check_count(Window::Pio, 0, 999, 1000),
            Err(CountMismatch {
                window: Window::Pio,
                wrote: 1000,
                counted: 999
            })
        );
    }
}
