//! Kernel command-line parsing: `key=value` tokens separated by ASCII whitespace.

/// The value `kiln.marker=` must have, exactly (docs/guest-contract.md).
pub const EXPECTED_MARKER: &[u8] = b"Kiln-cmdline_0123456789~!@#%^&*()";

/// Longest command line the guest reads, including the NUL (contract: 4096 bytes).
pub const MAX_CMDLINE: usize = 4096;

/// A borrowed command line.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a> {
    bytes: &'a [u8],
}

/// A token was present but its value did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadValue<'a> {
    /// The key, e.g. `kiln.mem`.
    pub key: &'a str,
    /// The raw value that did not parse.
    pub value: &'a [u8],
}

impl<'a> Cmdline<'a> {
    /// Wraps `bytes`, cut at the first NUL if there is one.
    pub fn new(bytes: &'a [u8]) -> Self {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        Cmdline {
            bytes: &bytes[..end],
        }
    }

    /// The command line without its NUL terminator.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Iterates over whitespace-separated tokens.
    pub fn tokens(&self) -> impl Iterator<Item = &'a [u8]> {
        self.bytes
            .split(|b| b.is_ascii_whitespace())
            .filter(|t| !t.is_empty())
    }

    /// The value of the last `key=value` token for `key` (later tokens override earlier ones,
    /// as in Linux). A bare `key` without `=` yields an empty value.
    pub fn get(&self, key: &str) -> Option<&'a [u8]> {
        let key = key.as_bytes();
        let mut found = None;
        for tok in self.tokens() {
            if let Some(rest) = tok.strip_prefix(key) {
                if rest.is_empty() {
                    found = Some(rest);
                } else if let Some(v) = rest.strip_prefix(b"=") {
                    found = Some(v);
                }
            }
        }
        found
    }

    /// `key` parsed as a decimal `u64`; `Ok(None)` when absent.
    pub fn get_u64<'k>(&self, key: &'k str) -> Result<Option<u64>, BadValue<'k>>
    where
        'a: 'k,
    {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_dec(v).map(Some).ok_or(BadValue { key, value: v }),
        }
    }

    /// `key` parsed as hexadecimal `u64` (no `0x`); `Ok(None)` when absent.
    pub fn get_hex<'k>(&self, key: &'k str) -> Result<Option<u64>, BadValue<'k>>
    where
        'a: 'k,
    {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_hex(v).map(Some).ok_or(BadValue { key, value: v }),
        }
    }
}

/// Parses a non-empty decimal number without sign; `None` on junk or overflow.
pub fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        let d = (c as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Parses a non-empty hexadecimal number (either case, no prefix); `None` on junk or overflow.
pub fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        let d = (c as char).to_digit(16)?;
        Some((acc << 4) | u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_values() {
        let c =
            Cmdline::new(b"console=ttyS0  kiln.test=boot\tkiln.mem=134217728 kiln.verify\0junk");
        assert_eq!(c.get("kiln.test"), Some(&b"boot"[..]));
        assert_eq!(c.get("kiln.verify"), Some(&b""[..]));
        assert_eq!(c.get("kiln.cpus"), None);
        assert_eq!(c.get_u64("kiln.mem"), Ok(Some(134_217_728)));
        assert_eq!(c.get("junk"), None, "text after the NUL is ignored");
        assert_eq!(c.tokens().count(), 4);
    }

    #[test]
    fn prefix_of_another_key_is_not_a_match() {
        let c = Cmdline::new(b"kiln.memory=5 kiln.mem2=3");
        assert_eq!(c.get("kiln.mem"), None);
    }

    #[test]
    fn last_token_wins() {
        let c = Cmdline::new(b"kiln.exits=1 kiln.exits=7");
        assert_eq!(c.get_u64("kiln.exits"), Ok(Some(7)));
    }

    #[test]
    fn bad_numbers_are_reported() {
        let c = Cmdline::new(b"kiln.mem=12x kiln.initrd_sum=0xff kiln.cpus=");
        assert_eq!(
            c.get_u64("kiln.mem"),
            Err(BadValue {
                key: "kiln.mem",
                value: b"12x"
            })
        );
        assert!(c.get_hex("kiln.initrd_sum").is_err());
        assert!(c.get_u64("kiln.cpus").is_err());
    }

    #[test]
    fn number_parsers() {
        assert_eq!(parse_dec(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_dec(b"18446744073709551616"), None);
        assert_eq!(parse_dec(b"-1"), None);
        assert_eq!(parse_hex(b"cbf29ce484222325"), Some(0xcbf2_9ce4_8422_2325));
        assert_eq!(parse_hex(b"ABC"), Some(0xabc));
        assert_eq!(parse_hex(b"1cbf29ce484222325"), None);
        assert_eq!(parse_hex(b"g"), None);
    }

    #[test]
    fn marker_is_one_token() {
        let mut line = b"a kiln.marker=".to_vec();
        line.extend_from_slice(EXPECTED_MARKER);
        let c = Cmdline::new(&line);
        assert_eq!(c.get("kiln.marker"), Some(EXPECTED_MARKER));
    }
}
