//! Fixed-size line buffer for guest output: no allocator, truncates instead of failing.

use core::fmt;

/// Capacity of one output line (without the newline).
pub const LINE_CAP: usize = 512;

/// A line being built. Writing past [`LINE_CAP`] truncates and marks the line with `...`.
pub struct LineBuf {
    buf: [u8; LINE_CAP],
    len: usize,
    truncated: bool,
}

impl Default for LineBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LineBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineBuf")
            .field("text", &self.as_str())
            .finish()
    }
}

impl LineBuf {
    /// An empty line.
    pub const fn new() -> Self {
        LineBuf {
            buf: [0; LINE_CAP],
            len: 0,
            truncated: false,
        }
    }

    /// Empties the line.
    pub fn clear(&mut self) {
        self.len = 0;
        self.truncated = false;
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The text written so far (lossy: non-UTF-8 input was escaped by [`LineBuf::push_escaped`]).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(self.as_bytes()).unwrap_or("<non-utf8>")
    }

    /// True if nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether some output was dropped.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Appends raw bytes, truncating at capacity (the last 3 bytes become `...`).
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len == LINE_CAP {
                self.truncated = true;
                self.buf[LINE_CAP - 3..].copy_from_slice(b"...");
                return;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    /// Appends a string.
    pub fn push_str(&mut self, s: &str) {
        self.push_bytes(s.as_bytes());
    }

    /// Appends `v` in decimal. (Hand-written rather than `core::fmt`: the guest must not run
    /// the precompiled formatting code, which uses SSE; see the crate README.)
    pub fn push_dec(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push_bytes(&digits[i..]);
    }

    /// Appends `v` as `0x` followed by lower-case hex without leading zeros.
    pub fn push_hex(&mut self, v: u64) {
        self.push_bytes(b"0x");
        let digits = (64 - v.leading_zeros() as usize).div_ceil(4);
        self.push_hex_digits(v, digits.max(1));
    }

    /// Appends the low `digits` hex digits of `v`, zero-padded, without prefix.
    pub fn push_hex_digits(&mut self, v: u64, digits: usize) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for i in (0..digits.min(16)).rev() {
            self.push_bytes(&[HEX[((v >> (i * 4)) & 0xf) as usize]]);
        }
    }

    /// Appends `bytes` with anything outside printable ASCII written as `\xNN`, so that
    /// guest-controlled or VMM-controlled data cannot break the line protocol.
    pub fn push_escaped(&mut self, bytes: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for &b in bytes {
            if (0x20..0x7f).contains(&b) && b != b'\\' {
                self.push_bytes(&[b]);
            } else {
                self.push_bytes(&[
                    b'\\',
                    b'x',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]);
            }
        }
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes a scenario result line, `KTEST <name> PASS [detail]` or `KTEST <name> FAIL <reason>`,
/// into `out` (without newline).
pub fn result_line(out: &mut LineBuf, name: &str, pass: bool, detail: &[u8]) {
    out.clear();
    out.push_bytes(b"KTEST ");
    out.push_bytes(name.as_bytes());
    out.push_bytes(if pass { b" PASS" } else { b" FAIL" });
    if !detail.is_empty() {
        out.push_bytes(b" ");
        out.push_bytes(detail);
    }
}

/// Writes the final `KTEST-DONE pass=<n> fail=<m>` line into `out`.
pub fn done_line(out: &mut LineBuf, pass: u32, fail: u32) {
    out.clear();
    out.push_str("KTEST-DONE pass=");
    out.push_dec(u64::from(pass));
    out.push_str(" fail=");
    out.push_dec(u64::from(fail));
}

/// Something that can describe itself into a [`LineBuf`] without `core::fmt`.
pub trait Describe {
    /// Appends a one-line description to `out`.
    fn describe(&self, out: &mut LineBuf);
}

/// `Display` through [`Describe`], for host-side users (tests, tools).
pub struct Described<'a, T: Describe + ?Sized>(pub &'a T);

impl<T: Describe + ?Sized> fmt::Display for Described<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut l = LineBuf::new();
        self.0.describe(&mut l);
        f.write_str(l.as_str())
    }
}

/// Longest line the `serial` scenario reads.
pub const INPUT_CAP: usize = 128;

/// Collects one line of serial input: ends at `\n`, `\r` or after [`INPUT_CAP`] bytes.
#[derive(Debug)]
pub struct InputLine {
    buf: [u8; INPUT_CAP],
    len: usize,
}

impl Default for InputLine {
    fn default() -> Self {
        Self::new()
    }
}

impl InputLine {
    /// An empty line.
    pub const fn new() -> Self {
        InputLine {
            buf: [0; INPUT_CAP],
            len: 0,
        }
    }

    /// Feeds one received byte; returns true when the line is complete.
    pub fn push(&mut self, b: u8) -> bool {
        if b == b'\n' || b == b'\r' {
            return true;
        }
        self.buf[self.len] = b;
        self.len += 1;
        self.len == INPUT_CAP
    }

    /// The line without its terminator.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn formats_result_lines() {
        let mut l = LineBuf::new();
        result_line(&mut l, "boot", true, b"");
        assert_eq!(l.as_str(), "KTEST boot PASS");
        result_line(&mut l, "cpuid", false, b"no hypervisor bit");
        assert_eq!(l.as_str(), "KTEST cpuid FAIL no hypervisor bit");
        done_line(&mut l, 3, 1);
        assert_eq!(l.as_str(), "KTEST-DONE pass=3 fail=1");
    }

    #[test]
    fn truncates_at_capacity() {
        let mut l = LineBuf::new();
        for _ in 0..100 {
            write!(l, "0123456789").unwrap();
        }
        assert_eq!(l.as_bytes().len(), LINE_CAP);
        assert!(l.truncated());
        assert!(l.as_str().ends_with("..."));
    }

    #[test]
    fn input_line_stops_at_terminators_and_cap() {
        let mut l = InputLine::new();
        assert!(!l.push(b'h'));
        assert!(!l.push(b'i'));
        assert!(l.push(b'\r'));
        assert_eq!(l.as_bytes(), b"hi");
        let mut l = InputLine::new();
        assert!(l.push(b'\n'));
        assert!(l.as_bytes().is_empty());
        let mut l = InputLine::new();
        let done: Vec<bool> = (0..INPUT_CAP).map(|_| l.push(b'x')).collect();
        assert_eq!(done.iter().filter(|d| **d).count(), 1);
        assert!(done[INPUT_CAP - 1]);
    }

    #[test]
    fn numbers() {
        let mut l = LineBuf::new();
        l.push_dec(0);
        l.push_str(" ");
        l.push_dec(u64::MAX);
        l.push_str(" ");
        l.push_hex(0);
        l.push_str(" ");
        l.push_hex(0x9fc00);
        l.push_str(" ");
        l.push_hex(u64::MAX);
        l.push_str(" ");
        l.push_hex_digits(0xabc, 16);
        assert_eq!(
            l.as_str(),
            "0 18446744073709551615 0x0 0x9fc00 0xffffffffffffffff 0000000000000abc"
        );
    }

    #[test]
    fn escapes_control_bytes() {
        let mut l = LineBuf::new();
        l.push_escaped(b"a\nb\\\xff");
        assert_eq!(l.as_str(), "a\\x0ab\\x5c\\xff");
    }
}
