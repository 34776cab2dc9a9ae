//! Latency histograms for the `bench-exits` scenario: log-linear buckets (exact below 32 ns,
//! then 16 sub-buckets per power of two, so at most 6.25% relative error), filled in the
//! guest without floating point and decoded on the host by the same code.
//!
//! Wire format (one histogram, several serial lines so each stays short):
//! `KBENCH-H <kind> <index>:<count> <index>:<count> ...` for the non-empty buckets, then
//! `KBENCH exits kind=<kind> n=<samples> min=<ns> max=<ns> sum=<ns>`.
//!
//! ```
//! use kiln_testguest::hist::Histogram;
//!
//! let mut h = Histogram::new();
//! for v in [100, 110, 120, 5000] {
//!     h.record(v);
//! }
//! assert_eq!(h.count(), 4);
//! assert!(h.percentile(50_000) >= 100 && h.percentile(50_000) <= 120); // p50
//! assert!(h.percentile(100_000) >= 4700); // p100
//! ```

use crate::line::LineBuf;

/// Values below this are their own bucket.
const LINEAR: u64 = 32;
/// Sub-buckets per power of two above [`LINEAR`].
const SUB_BITS: u32 = 4;
/// Number of buckets: 32 exact + 16 for each exponent 5..=63.
pub const BUCKETS: usize = LINEAR as usize + (64 - 5) * (1 << SUB_BITS);

/// The bucket of `v` (nanoseconds).
pub fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= 5
    let sub = (v >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as usize + ((e - 5) as usize) * (1 << SUB_BITS) + sub as usize
}

/// The smallest value in bucket `i`.
pub fn bucket_low(i: usize) -> u64 {
    if i < LINEAR as usize {
        return i as u64;
    }
    let j = i - LINEAR as usize;
    let e = (j >> SUB_BITS) as u32 + 5;
    let sub = (j & ((1 << SUB_BITS) - 1)) as u64;
    (1u64 << e) | (sub << (e - SUB_BITS))
}

/// The largest value in bucket `i`.
pub fn bucket_high(i: usize) -> u64 {
    if i + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_low(i + 1) - 1
    }
}

/// A latency histogram.
#[derive(Clone)]
pub struct Histogram {
    counts: [u32; BUCKETS],
    n: u64,
    min: u64,
    max: u64,
    sum: u64,
}

impl core::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Histogram")
            .field("n", &self.n)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Self {
        Histogram {
            counts: [0; BUCKETS],
            n: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }

    /// Empties it.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// Adds one sample (nanoseconds).
    pub fn record(&mut self, v: u64) {
        let b = &mut self.counts[bucket_of(v)];
        *b = b.saturating_add(1);
        self.n += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum = self.sum.saturating_add(v);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Smallest sample (`u64::MAX` when empty).
    pub fn min(&self) -> u64 {
        self.min
    }

    /// Largest sample.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Sum of the samples (saturating).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// Count in bucket `i`.
    pub fn bucket(&self, i: usize) -> u32 {
        self.counts.get(i).copied().unwrap_or(0)
    }

    /// Sets bucket `i` (host side, when decoding); out-of-range indices are ignored.
    pub fn set_bucket(&mut self, i: usize, count: u32) {
        if let Some(c) = self.counts.get_mut(i) {
            self.n = self.n - u64::from(*c) + u64::from(count);
            *c = count;
        }
    }

    /// Adds `other`'s samples to this histogram (host side: several runs of one kind).
    pub fn merge(&mut self, other: &Histogram) {
        if other.n == 0 {
            return;
        }
        for (c, o) in self.counts.iter_mut().zip(other.counts.iter()) {
            *c = c.saturating_add(*o);
        }
        self.n += other.n;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum = self.sum.saturating_add(other.sum);
    }

    /// Sets min, max and sum (host side, from the summary line).
    pub fn set_summary(&mut self, min: u64, max: u64, sum: u64) {
        self.min = min;
        self.max = max;
        self.sum = sum;
    }

    /// The value at percentile `p_milli / 1000` (0..=100_000, so 99.9% is 99_900): the
    /// middle of the bucket holding that rank, clamped to the recorded min and max. Integer
    /// only: this also builds for the guest, which has no floating point.
    pub fn percentile(&self, p_milli: u32) -> u64 {
        if self.n == 0 {
            return 0;
        }
        if p_milli == 0 {
            return self.min;
        }
        if p_milli >= 100_000 {
            return self.max;
        }
        let p = u128::from(p_milli);
        // Rank of the sample, 1-based: ceil(p * n / 100_000), at least 1.
        let rank = ((p * u128::from(self.n)).div_ceil(100_000) as u64).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                let lo = bucket_low(i);
                let mid = lo + (bucket_high(i).min(self.max) - lo) / 2;
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Writes the histogram's `KBENCH-H` lines through `emit`, at most `per_line` buckets
    /// each.
    pub fn emit_buckets(&self, kind: &str, per_line: usize, mut emit: impl FnMut(&LineBuf)) {
        let mut line = LineBuf::new();
        let mut in_line = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if in_line == 0 {
                line.clear();
                line.push_str("KBENCH-H ");
                line.push_str(kind);
            }
            line.push_str(" ");
            line.push_dec(i as u64);
            line.push_str(":");
            line.push_dec(u64::from(c));
            in_line += 1;
            if in_line == per_line.max(1) {
                emit(&line);
                in_line = 0;
            }
        }
        if in_line > 0 {
            emit(&line);
        }
    }

    /// Writes the summary line (`KBENCH exits kind=... n=... min=... max=... sum=...`).
    pub fn summary_line(&self, kind: &str, out: &mut LineBuf) {
        out.clear();
        out.push_str("KBENCH exits kind=");
        out.push_str(kind);
        out.push_str(" n=");
        out.push_dec(self.n);
        out.push_str(" min=");
        out.push_dec(if self.n == 0 { 0 } else { self.min });
        out.push_str(" max=");
        out.push_dec(self.max);
        out.push_str(" sum=");
        out.push_dec(self.sum);
    }

    /// Parses one `KBENCH-H` line's buckets into this histogram (host side). Returns the
    /// kind, or `None` (histogram unchanged) if the line isn't a well-formed bucket line.
    pub fn parse_bucket_line<'a>(&mut self, line: &'a str) -> Option<&'a str> {
        let mut it = line.strip_prefix("KBENCH-H ")?.split(' ');
        let kind = it.next()?;
        let pairs = it.clone();
        for pair in it {
            let (i, c) = pair.split_once(':')?;
            i.parse::<usize>().ok()?;
            c.parse::<u32>().ok()?;
        }
        for pair in pairs {
            if let Some((i, c)) = pair.split_once(':') {
                if let (Ok(i), Ok(c)) = (i.parse::<usize>(), c.parse::<u32>()) {
                    self.set_bucket(i, c);
                }
            }
        }
        Some(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_monotonic() {
        let mut prev_high = None;
        for i in 0..BUCKETS {
            let (lo, hi) = (bucket_low(i), bucket_high(i));
            assert!(lo <= hi, "bucket {i}");
            if let Some(p) = prev_high {
                assert_eq!(lo, p + 1, "gap before bucket {i}");
            }
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi), i);
            prev_high = Some(hi);
        }
        assert_eq!(bucket_high(BUCKETS - 1), u64::MAX);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn relative_error_is_bounded() {
        for v in [33u64, 100, 1000, 8_000, 123_456, 10_000_000, 1 << 40] {
            let i = bucket_of(v);
            let width = bucket_high(i) - bucket_low(i) + 1;
            assert!(width * 16 <= v, "{v}: width {width}");
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 10);
        }
        let near = |p: u32, want: u64| {
            let got = h.percentile(p);
            assert!(
                got.abs_diff(want) * 100 <= want * 7,
                "p{p}: {got}, want ~{want}"
            );
        };
        near(50_000, 5000);
        near(90_000, 9000);
        near(99_000, 9900);
        near(99_900, 9990);
        assert_eq!(h.percentile(0), 10);
        assert_eq!(h.percentile(100_000), 10_000);
        assert_eq!(Histogram::new().percentile(50_000), 0);
    }

    #[test]
    fn wire_round_trip() {
        let mut h = Histogram::new();
        for v in [5u64, 5, 40, 41, 9_000, 9_001, 1_000_000] {
            h.record(v);
        }
        let mut lines = std::vec::Vec::new();
        h.emit_buckets("pio-out", 2, |l| {
            lines.push(std::string::String::from(l.as_str()))
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("KBENCH-H pio-out 5:2 "));
        let mut summary = LineBuf::new();
        h.summary_line("pio-out", &mut summary);
        assert_eq!(
            summary.as_str(),
            "KBENCH exits kind=pio-out n=7 min=5 max=1000000 sum=1018092"
        );
        let mut back = Histogram::new();
        for l in &lines {
            assert_eq!(back.parse_bucket_line(l), Some("pio-out"));
        }
        back.set_summary(h.min(), h.max(), h.sum());
        assert_eq!(back.count(), 7);
        for p in [0, 50_000, 90_000, 100_000] {
            assert_eq!(back.percentile(p), h.percentile(p));
        }
        let mut twice = back.clone();
        twice.merge(&back);
        assert_eq!(twice.count(), 14);
        assert_eq!(twice.sum(), 2 * back.sum());
        assert_eq!((twice.min(), twice.max()), (back.min(), back.max()));
        assert_eq!(twice.percentile(50_000), back.percentile(50_000));
        twice.merge(&Histogram::new());
        assert_eq!(twice.count(), 14);
        assert_eq!(back.parse_bucket_line("KTEST boot PASS"), None);
        assert_eq!(back.parse_bucket_line("KBENCH-H x 1:zz"), None);
    }
}
