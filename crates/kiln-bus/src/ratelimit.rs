//! A rate-limited warning counter shared by the device crates.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Prints a warning to stderr the first `first` times, then only every `every`-th time.
///
/// Guest-triggered conditions (accesses to unclaimed ports, unsupported register values) must
/// never flood the VMM's stderr: a guest can cause millions per second. Each call site keeps
/// its own counter, typically a `static`:
///
/// ```
/// use kiln_bus::RateLimitedWarn;
///
/// static UNKNOWN_PORT: RateLimitedWarn = RateLimitedWarn::new();
///
/// fn on_miss(port: u16) {
///     UNKNOWN_PORT.warn(format_args!("unhandled PIO access at {port:#x}"));
/// }
/// on_miss(0x1234);
/// assert_eq!(UNKNOWN_PORT.count(), 1);
/// ```
#[derive(Debug)]
pub struct RateLimitedWarn {
    count: AtomicU64,
    first: u64,
    every: u64,
}

impl Default for RateLimitedWarn {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitedWarn {
    /// How many occurrences [`new`](Self::new) prints unconditionally.
    pub const DEFAULT_FIRST: u64 = 10;
    /// After the first ones, [`new`](Self::new) prints every this-many-th occurrence.
    pub const DEFAULT_EVERY: u64 = 1000;

    /// A counter printing the first [`DEFAULT_FIRST`](Self::DEFAULT_FIRST) occurrences, then
    /// every [`DEFAULT_EVERY`](Self::DEFAULT_EVERY)-th.
    pub const fn new() -> Self {
        Self::with_limits(Self::DEFAULT_FIRST, Self::DEFAULT_EVERY)
    }

    /// A counter printing the first `first` occurrences, then every `every`-th (never again
    /// if `every` is 0).
    pub const fn with_limits(first: u64, every: u64) -> Self {
        RateLimitedWarn {
            count: AtomicU64::new(0),
            first,
            every,
        }
    }

    /// Counts one occurrence and says whether it should be reported. Use this directly when
    /// building the message is itself costly.
    pub fn tick(&self) -> bool {
        let n = self.count.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        n <= self.first || (self.every != 0 && n % self.every == 0)
    }

    /// Counts one occurrence and prints `msg` to stderr if [`tick`](Self::tick) says so.
    /// Returns whether it printed.
    pub fn warn(&self, msg: fmt::Arguments<'_>) -> bool {
        let print = self.tick();
        if print {
            let n = self.count();
            if n <= self.first {
                eprintln!("kiln: warning: {msg}");
            } else {
                eprintln!("kiln: warning: {msg} (seen {n} times)");
            }
        }
        print
    }

    /// Occurrences counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_first_then_every_nth() {
        let w = RateLimitedWarn::with_limits(3, 5);
        let which: Vec<u64> = (1..=21u64).filter(|_| w.tick()).collect();
        assert_eq!(which, vec![1, 2, 3, 5, 10, 15, 20]);
        assert_eq!(w.count(), 21);
    }

    #[test]
    fn every_zero_stops_after_first() {
        let w = RateLimitedWarn::with_limits(2, 0);
        let which: Vec<u64> = (1..=5000u64).filter(|_| w.tick()).collect();
        assert_eq!(which, vec![1, 2]);
    }

    #[test]
    fn warn_reports_whether_it_printed() {
        let w = RateLimitedWarn::with_limits(1, 0);
        assert!(w.warn(format_args!("test warning {}", 1)));
        assert!(!w.warn(format_args!("test warning {}", 2)));
        assert_eq!(w.count(), 2);
    }
}
