//! Per-exit user-space timing, for the exit benchmark: how long a vCPU thread spends between
//! `KVM_RUN` returning with an exit and its next `KVM_RUN` — the VMM's own share of each
//! exit.
//!
//! A mean over a run is easily moved by the host: one preemption of the vCPU thread between
//! its two clock reads adds a time slice (ms) to a run that holds a few ms of user-space
//! time in all. So [`ExitTimes`] also keeps a histogram of the per-exit times (1 ns buckets
//! up to 511 ns) and gives the mean of the exits under 511 ns as the typical one: what an
//! exit costs the VMM when no interrupt or preemption (microseconds) hits it. Not a median
//! or an interquartile mean: the clock advances in steps (10 ns on this project's host), and
//! only the plain mean of such readings is the true time (a 12 ns exit reads 10 ns four times
//! in five, 20 ns once; its median and interquartile mean are 10 ns).
//!
//! The same type and the same clock ([`ExitClock`]) serve kiln's vCPU threads and the
//! benchmark's raw floor, so both are measured alike.

use std::cell::Cell;

/// Histogram buckets, 1 ns each; the last one also holds every slower exit.
pub const EXIT_TIME_BUCKETS: usize = 512;

/// The clock of exit timing.
///
/// Where the TSC is invariant (x86-64, CPUID `0x8000_0007` EDX bit 8) it reads the TSC
/// (`rdtsc`) and scales tick deltas to ns by a factor calibrated once against
/// `CLOCK_MONOTONIC`; elsewhere it reads `CLOCK_MONOTONIC` (a vDSO call). Each timed exit
/// includes about one clock read, so the cheaper clock matters: on this project's nested
/// host a `rdtsc` costs ~12 ns, `clock_gettime` ~30 ns, against a bare loop's ~10 ns of
/// work per exit. The read is not fenced: `lfence; rdtsc` (or `rdtscp`) costs ~23 ns there,
/// and an unfenced read can only move by the CPU's reorder window, alike in the VMM and
/// the floor it is compared with.
///
/// ```
/// use kiln_vcpu::ExitClock;
/// let clock = ExitClock::get();
/// let start = clock.now();
/// std::thread::sleep(std::time::Duration::from_millis(2));
/// let ns = clock.ns_between(start, clock.now());
/// assert!((2_000_000..1_000_000_000).contains(&ns), "{ns} ns on the {} clock", clock.name());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitClock {
    /// ns per TSC tick in 32.32 fixed point; 0: the clock is `CLOCK_MONOTONIC` in ns.
    scale: u64,
}

impl ExitClock {
    /// `CLOCK_MONOTONIC`, in ns.
    pub const fn monotonic() -> Self {
        ExitClock { scale: 0 }
    }

    /// The process's exit clock: the TSC where it is invariant, else `CLOCK_MONOTONIC`.
    /// The first call calibrates the TSC (about 10 ms); call it before timing starts.
    pub fn get() -> Self {
        static CLOCK: std::sync::OnceLock<ExitClock> = std::sync::OnceLock::new();
        *CLOCK.get_or_init(Self::calibrate)
    }

    /// Which clock this is: `"tsc"` or `"monotonic"`.
    pub fn name(self) -> &'static str {
        if self.scale == 0 {
            "monotonic"
        } else {
            "tsc"
        }
    }

    /// The TSC's rate in GHz (ticks per ns) as calibrated; `None` for `CLOCK_MONOTONIC`.
    pub fn tsc_ghz(self) -> Option<f64> {
        (self.scale != 0).then(|| (1u64 << 32) as f64 / self.scale as f64)
    }

    /// A time stamp: TSC ticks or ns, to be compared only with [`ns_between`](Self::ns_between).
    #[inline(always)]
    pub fn now(self) -> u64 {
        if self.scale != 0 {
            read_tsc()
        } else {
            monotonic_ns()
        }
    }

    /// ns from stamp `from` to stamp `to` (both from [`now`](Self::now) of this clock).
    #[inline(always)]
    pub fn ns_between(self, from: u64, to: u64) -> u64 {
        let d = to.wrapping_sub(from);
        if self.scale == 0 {
            d
        } else {
            ((u128::from(d) * u128::from(self.scale)) >> 32) as u64
        }
    }

    fn calibrate() -> Self {
        if !invariant_tsc() {
            return Self::monotonic();
        }
        let (t0, c0) = (monotonic_ns(), read_tsc());
        std::thread::sleep(std::time::Duration::from_millis(10));
        let (t1, c1) = (monotonic_ns(), read_tsc());
        let (ns, ticks) = (t1.saturating_sub(t0), c1.saturating_sub(c0));
        // 0.1 to 20 GHz, or the reading is not to be trusted.
        if ticks == 0 || ns == 0 || !(ns / 10..=ns * 20).contains(&ticks) {
            return Self::monotonic();
        }
        ExitClock {
            scale: ((u128::from(ns) << 32) / u128::from(ticks)) as u64,
        }
    }
}

/// `CLOCK_MONOTONIC` in ns (a vDSO call, no system call).
#[inline(always)]
fn monotonic_ns() -> u64 {
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

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn read_tsc() -> u64 {
    // SAFETY: `rdtsc` is a baseline x86-64 instruction with no memory operands (Linux leaves
    // it available to user space).
    unsafe { std::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn read_tsc() -> u64 {
    monotonic_ns()
}

#[cfg(target_arch = "x86_64")]
fn invariant_tsc() -> bool {
    use std::arch::x86_64::__cpuid;
    // Leaf 0x8000_0007 is read only when the maximum extended leaf covers it.
    __cpuid(0x8000_0000).eax >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn invariant_tsc() -> bool {
    false
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
    /// The typical time per exit, ns: the mean over the exits faster than the histogram's
    /// last bucket ([`EXIT_TIME_BUCKETS`]` - 1` ns), the ones nothing interrupted (`None`
    /// with fewer than 4 of them).
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

    /// Sum, count and typical time of what was recorded.
    pub fn summary(&self) -> ExitTimeSummary {
        // The exits under the histogram's last bucket: nothing interrupted them.
        let (mut n, mut sum) = (0u64, 0u64);
        for (ns, b) in self.hist[..EXIT_TIME_BUCKETS - 1].iter().enumerate() {
            let c = u64::from(b.get());
            n += c;
            sum += c * ns as u64;
        }
        let typical_ns = (n >= 4).then(|| sum as f64 / n as f64);
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
    fn the_typical_time_leaves_out_interrupted_exits_only() {
        let t = ExitTimes::new();
        assert_eq!(t.summary().typical_ns, None);
        // 100 exits: 25 fast ones, 50 between 40 and 49, 25 preempted.
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
        assert_eq!(s.typical_ns, Some((25.0 + 50.0 * 44.5) / 75.0));
        assert_eq!(s.total_ns, 25 + 25 * 3_000_000 + 5 * (40 + 49) * 5);
        t.clear();
        assert_eq!(t.summary().exits, 0);
        assert_eq!(t.total_ns(), 0);
    }

    #[test]
    fn slow_exits_land_in_the_last_bucket_and_out_of_the_typical_time() {
        let t = ExitTimes::new();
        for _ in 0..8 {
            t.record(u64::MAX / 2);
        }
        let s = t.summary();
        assert_eq!(s.exits, 8);
        assert_eq!(s.typical_ns, None, "no exit ran uninterrupted");
        for _ in 0..4 {
            t.record((EXIT_TIME_BUCKETS - 2) as u64);
        }
        assert_eq!(t.summary().typical_ns, Some((EXIT_TIME_BUCKETS - 2) as f64));
    }

    #[test]
    fn a_clock_of_coarse_steps_still_gives_the_true_mean() {
        // A 12 ns exit timed by a clock that steps every 10 ns reads 10 ns four times in five
        // and 20 ns once. The mean of the readings is the true time; a median or an
        // interquartile mean would say 10 ns, and 17 ns for an exit of 16 ns.
        let t = ExitTimes::new();
        for i in 0..1000 {
            t.record(if i % 5 == 0 { 20 } else { 10 });
        }
        assert_eq!(t.summary().typical_ns, Some(12.0));
    }

    #[test]
    fn both_clocks_measure_a_sleep() {
        for clock in [ExitClock::get(), ExitClock::monotonic()] {
            let a = clock.now();
            std::thread::sleep(std::time::Duration::from_millis(5));
            let ns = clock.ns_between(a, clock.now());
            // A sleep can overshoot a lot on a busy host, never undershoot.
            assert!(
                (5_000_000..2_000_000_000).contains(&ns),
                "{ns} ns on {clock:?}"
            );
        }
    }

    #[test]
    fn a_tsc_scale_converts_ticks_to_ns() {
        // 2.5 GHz: 0.4 ns per tick.
        let clock = ExitClock {
            scale: (0.4 * (1u64 << 32) as f64) as u64,
        };
        assert_eq!(clock.name(), "tsc");
        assert_eq!(clock.ns_between(1_000, 26_000), 9_999);
        assert_eq!(clock.ns_between(u64::MAX - 4, 20), 9, "a wrapped counter");
        assert!((clock.tsc_ghz().unwrap() - 2.5).abs() < 1e-6);
        assert_eq!(ExitClock::monotonic().ns_between(5, 17), 12);
        assert_eq!(ExitClock::monotonic().tsc_ghz(), None);
    }
}
