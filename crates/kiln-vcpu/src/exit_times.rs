//! Per-exit user-space timing, for the exit benchmark: how long a vCPU thread spends between
//! `KVM_RUN` returning with an exit and its next `KVM_RUN` — the VMM's own share of each
//! exit.
//!
//! A mean over a run is easily moved by the host: one preemption of the vCPU thread between
//! its two clock reads adds a time slice (ms) to a run that holds a few ms of user-space
//! time in all. So [`ExitTimes`] also keeps a histogram of the per-exit times (1 ns buckets)
//! and gives their interquartile mean, the mean of the middle half: what a typical exit costs
//! the VMM, with preemptions and interrupts (the slowest quarter) and nothing else left out.
//!
//! The same type and the same clock ([`exit_clock_ns`]) serve kiln's vCPU threads and the
//! benchmark's raw floor, so both are measured alike.

use std::cell::Cell;

/// Histogram buckets, 1 ns each; the last one also holds every slower exit.
pub const EXIT_TIME_BUCKETS: usize = 512;

/// The clock of exit timing: `CLOCK_MONOTONIC` in ns (a vDSO call, no system call).
#[inline(always)]
pub fn exit_clock_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, owned by this frame.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// Per-exit user-space times of one vCPU thread: their sum, count and histogram.
///
/// Interior mutability (`Cell`s) so the run loop that records and a device model that reads
/// or restarts it (on the same thread, during an exit) can both hold a shared reference.
///
/// ```
/// use kiln_vcpu::ExitTimes;
/// let t = ExitTimes::new();
/// for ns in [40, 41, 42, 43, 5_000_000] {
///     t.record(ns);
/// }
/// let s = t.summary();
/// assert_eq!(s.exits, 5);
/// assert_eq!(s.total_ns, 5_000_166);
/// // The one preempted exit moves the mean by a millisecond, the typical value not at all.
/// assert!((41.0..=43.0).contains(&s.typical_ns.unwrap()));
/// ```
pub struct ExitTimes {
    total_ns: Cell<u64>,
    exits: Cell<u64>,
    hist: [Cell<u32>; EXIT_TIME_BUCKETS],
}

/// What [`ExitTimes::summary`] reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExitTimeSummary {
    /// Sum of the recorded times, ns.
    pub total_ns: u64,
    /// Exits recorded.
    pub exits: u64,
    /// Interquartile mean of the per-exit times, ns (`None` with fewer than 4 exits). Exits
    /// slower than the histogram's range count as its last bucket, so if over a quarter of
    /// them were, this is a lower bound.
    pub typical_ns: Option<f64>,
}

impl Default for ExitTimes {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ExitTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitTimes")
            .field("summary", &self.summary())
            .finish()
    }
}

impl ExitTimes {
    /// Nothing recorded.
    pub const fn new() -> Self {
        ExitTimes {
            total_ns: Cell::new(0),
            exits: Cell::new(0),
            hist: [const { Cell::new(0) }; EXIT_TIME_BUCKETS],
        }
    }

    /// Records one exit that took `ns` in user space.
    #[inline(always)]
    pub fn record(&self, ns: u64) {
        self.total_ns.set(self.total_ns.get().wrapping_add(ns));
        self.exits.set(self.exits.get().wrapping_add(1));
        let i = (ns as usize).min(EXIT_TIME_BUCKETS - 1);
        // `i` is in range by the `min` above.
        if let Some(b) = self.hist.get(i) {
            b.set(b.get().saturating_add(1));
        }
    }

    /// Forgets everything recorded.
    pub fn clear(&self) {
        self.total_ns.set(0);
        self.exits.set(0);
        for b in &self.hist {
            b.set(0);
        }
    }

    /// Sum of the recorded times, ns.
    pub fn total_ns(&self) -> u64 {
        self.total_ns.get()
    }

    /// Sum, count and interquartile mean of what was recorded.
    pub fn summary(&self) -> ExitTimeSummary {
        let n: u64 = self.hist.iter().map(|b| u64::from(b.get())).sum();
        let typical_ns = (n >= 4).then(|| {
            // The middle half of the sorted times: ranks [lo, hi).
            let lo = n / 4;
            let hi = n - n / 4;
            let (mut rank, mut sum) = (0u64, 0u64);
            for (ns, b) in self.hist.iter().enumerate() {
                let c = u64::from(b.get());
                let from = rank.max(lo);
                let to = (rank + c).min(hi);
                if to > from {
                    sum += (to - from) * ns as u64;
                }
                rank += c;
                if rank >= hi {
                    break;
                }
            }
            sum as f64 / (hi - lo) as f64
        });
        ExitTimeSummary {
            total_ns: self.total_ns.get(),
            exits: self.exits.get(),
            typical_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interquartile_mean_ignores_both_tails() {
        let t = ExitTimes::new();
        assert_eq!(t.summary().typical_ns, None);
        // 100 exits: 25 fast outliers, 50 between 40 and 49, 25 preempted.
        for _ in 0..25 {
            t.record(1);
        }
        for i in 0..50 {
            t.record(40 + i % 10);
        }
        for _ in 0..25 {
            t.record(3_000_000);
        }
        let s = t.summary();
        assert_eq!(s.exits, 100);
        assert_eq!(s.typical_ns, Some(44.5));
        assert_eq!(s.total_ns, 25 + 25 * 3_000_000 + 5 * (40 + 49) * 5);
        t.clear();
        assert_eq!(t.summary().exits, 0);
        assert_eq!(t.total_ns(), 0);
    }

    #[test]
    fn slow_exits_land_in_the_last_bucket() {
        let t = ExitTimes::new();
        for _ in 0..8 {
            t.record(u64::MAX / 2);
        }
        let s = t.summary();
        assert_eq!(s.typical_ns, Some((EXIT_TIME_BUCKETS - 1) as f64));
    }

    #[test]
    fn the_clock_moves_forward() {
        let a = exit_clock_ns();
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(exit_clock_ns() >= a + 1_000_000);
    }
}
