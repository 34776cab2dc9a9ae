//! Token-bucket rate limiting for Kiln's device I/O.
//!
//! Pure state machines: every operation has an `_at` form taking the current [`Instant`], so
//! callers (and tests) control the clock; the plain forms read [`Instant::now`].
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

use std::time::{Duration, Instant};

/// Errors building a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A bucket was configured with size 0 (it could never pass anything).
    #[error("{bucket} bucket has size 0")]
    ZeroSize {
        /// Which bucket ("bandwidth", "ops" or "token").
        bucket: &'static str,
    },
    /// A bucket was configured with a refill time of 0 (an unlimited bucket: leave it out).
    #[error("{bucket} bucket has a refill time of 0")]
    ZeroRefillTime {
        /// Which bucket ("bandwidth", "ops" or "token").
        bucket: &'static str,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Configuration of one [`TokenBucket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// Capacity of the bucket, in tokens; also the number of tokens added per `refill_time`.
    pub size: u64,
    /// Extra tokens available once at start, spent before the regular budget, never refilled.
    pub one_time_burst: u64,
    /// Time to refill an empty bucket completely.
    pub refill_time: Duration,
}

/// A token bucket: `size` tokens, refilled linearly over `refill_time`, plus a one-time burst.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u64,
    budget: u64,
    one_time_burst: u64,
    /// Tokens owed by an oversized request; refills pay it before growing `budget`.
    debt: u64,
    /// Part of a token earned but not yet whole, in units of `1 / refill_ns` tokens
    /// (always below `refill_ns`).
    frac: u64,
    last_refill: Instant,
}

impl TokenBucket {
    /// A full bucket as configured, with its clock starting at `now`.
    pub fn new_at(cfg: BucketConfig, now: Instant) -> Result<Self> {
        Self::named(cfg, now, "token")
    }

    /// A full bucket as configured, with its clock starting now.
    pub fn new(cfg: BucketConfig) -> Result<Self> {
        Self::new_at(cfg, Instant::now())
    }

    fn named(cfg: BucketConfig, now: Instant, bucket: &'static str) -> Result<Self> {
        if cfg.size == 0 {
            return Err(Error::ZeroSize { bucket });
        }
        // Saturate: a refill time above 584 years is as good as never.
        let refill_ns = u64::try_from(cfg.refill_time.as_nanos()).unwrap_or(u64::MAX);
        if refill_ns == 0 {
            return Err(Error::ZeroRefillTime { bucket });
        }
        Ok(TokenBucket {
            size: cfg.size,
            refill_ns,
            budget: cfg.size,
            one_time_burst: cfg.one_time_burst,
            debt: 0,
            frac: 0,
            last_refill: now,
        })
    }

    /// Capacity in tokens.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Regular tokens available (as of the last refill), not counting the burst.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// Adds the tokens earned since the last refill. A clock that goes backwards adds nothing.
    ///
    /// The part of a token not yet earned is carried in `frac` exactly, so refilling in many
    /// small steps earns the same as one step over the same time: what
    /// [`time_until_at`](Self::time_until_at) promises must hold however often the bucket is
    /// looked at in between.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        if elapsed == 0 {
            return;
        }
        self.last_refill = now;
        let refill_ns = u128::from(self.refill_ns);
        let acc = elapsed
            .saturating_mul(u128::from(self.size))
            .saturating_add(u128::from(self.frac));
        let earned = acc / refill_ns;
        let room = u128::from(self.debt) + u128::from(self.size - self.budget);
        if earned >= room {
            // Full: time spent full earns nothing, fractions included.
            self.debt = 0;
            self.budget = self.size;
            self.frac = 0;
            return;
        }
        // The remainder is below `refill_ns`, a u64.
        self.frac = u64::try_from(acc % refill_ns).unwrap_or(0);
        // `paid` is at most `debt` and, as `earned < room`, what is left after paying the
        // debt is below `size - budget`: both fit a u64.
        let paid = earned.min(u128::from(self.debt));
        self.debt -= u64::try_from(paid).unwrap_or(self.debt);
        let rest = u64::try_from(earned - paid).unwrap_or(u64::MAX);
        self.budget = self.budget.saturating_add(rest).min(self.size);
    }

    /// Whether `tokens` could be taken now (after a refill).
    fn can_take(&self, tokens: u64) -> bool {
        if self.debt > 0 {
            return false;
        }
        let avail = u128::from(self.budget) + u128::from(self.one_time_burst);
        // An oversized request passes once the bucket is full; it leaves a debt.
        u128::from(tokens) <= avail || self.budget == self.size
    }

    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        let rest = tokens - from_burst;
        if rest <= self.budget {
            self.budget -= rest;
        } else {
            // Adds to an existing debt (only `charge_at` takes while in debt).
            self.debt = self.debt.saturating_add(rest - self.budget);
            self.budget = 0;
        }
    }

    /// Takes `tokens` if available at `now`; returns whether it did.
    pub fn consume_at(&mut self, tokens: u64, now: Instant) -> bool {
        self.refill(now);
        let ok = self.can_take(tokens);
        if ok {
            self.take(tokens);
        }
        ok
    }

    /// Takes `tokens` if available now; returns whether it did.
    pub fn consume(&mut self, tokens: u64) -> bool {
        self.consume_at(tokens, Instant::now())
    }

    /// How long after `now` a [`consume_at`](Self::consume_at) of `tokens` will succeed
    /// (zero if it would now). Does not change the bucket.
    pub fn time_until_at(&self, tokens: u64, now: Instant) -> Duration {
        let mut b = self.clone();
        b.refill(now);
        if b.can_take(tokens) {
            return Duration::ZERO;
        }
        // Tokens still missing: the debt, then either the shortfall or (oversized) a full
        // bucket. The burst counts only for requests that fit.
        let target = if tokens > b.size {
            u128::from(b.size)
        } else {
            u128::from(tokens).saturating_sub(u128::from(b.one_time_burst))
        };
        let missing = u128::from(b.debt) + target.saturating_sub(u128::from(b.budget));
        // Round up so the caller never wakes a nanosecond early; the fraction of a token
        // already earned counts. A clock behind the last refill waits for it first.
        let need = (missing * u128::from(b.refill_ns)).saturating_sub(u128::from(b.frac));
        let ahead = b.last_refill.saturating_duration_since(now).as_nanos();
        let ns = (need.div_ceil(u128::from(b.size)) + ahead).max(1);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// [`time_until_at`](Self::time_until_at) with the current time.
    pub fn time_until(&self, tokens: u64) -> Duration {
        self.time_until_at(tokens, Instant::now())
    }
}

/// A bandwidth bucket (bytes) and an ops bucket (requests), each optional.
///
/// A request is allowed only if both buckets can pay for it; then both are charged.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// A limiter with the given buckets (`None`: that dimension is unlimited), clocks at `now`.
    pub fn new_at(
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
        now: Instant,
    ) -> Result<Self> {
        Ok(RateLimiter {
            bandwidth: bandwidth
                .map(|c| TokenBucket::named(c, now, "bandwidth"))
                .transpose()?,
            ops: ops.map(|c| TokenBucket::named(c, now, "ops")).transpose()?,
        })
    }

    /// [`new_at`](Self::new_at) with the current time.
    pub fn new(bandwidth: Option<BucketConfig>, ops: Option<BucketConfig>) -> Result<Self> {
        Self::new_at(bandwidth, ops, Instant::now())
    }

    /// The bandwidth bucket, if any.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The ops bucket, if any.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// Charges `ops` operations and `bytes` bytes if both buckets allow it at `now`; returns
    /// whether it did (all or nothing).
    pub fn consume_at(&mut self, ops: u64, bytes: u64, now: Instant) -> bool {
        let mut ok = true;
        for (b, n) in [(&mut self.ops, ops), (&mut self.bandwidth, bytes)] {
            if let Some(b) = b {
                b.refill(now);
                ok &= b.can_take(n);
            }
        }
        if ok {
            for (b, n) in [(&mut self.ops, ops), (&mut self.bandwidth, bytes)] {
                if let Some(b) = b {
                    b.take(n);
                }
            }
        }
        ok
    }

    /// Charges `ops` and `bytes` at `now` whether or not the buckets hold them, leaving a debt
    /// that later requests wait out. For costs known only after the fact (a received frame's
    /// length): check with [`time_until_at`](Self::time_until_at) first, charge afterwards.
    pub fn charge_at(&mut self, ops: u64, bytes: u64, now: Instant) {
        for (b, n) in [(&mut self.ops, ops), (&mut self.bandwidth, bytes)] {
            if let Some(b) = b {
                b.refill(now);
                b.take(n);
            }
        }
    }

    /// [`consume_at`](Self::consume_at) with the current time.
    pub fn consume(&mut self, ops: u64, bytes: u64) -> bool {
        self.consume_at(ops, bytes, Instant::now())
    }

    /// How long after `now` a request of `ops` and `bytes` will pass (zero if it would now):
    /// the value to arm a retry timer with.
    pub fn time_until_at(&self, ops: u64, bytes: u64, now: Instant) -> Duration {
        let o = self
            .ops
            .as_ref()
            .map_or(Duration::ZERO, |b| b.time_until_at(ops, now));
        let w = self
            .bandwidth
            .as_ref()
            .map_or(Duration::ZERO, |b| b.time_until_at(bytes, now));
        o.max(w)
    }

    /// [`time_until_at`](Self::time_until_at) with the current time.
    pub fn time_until(&self, ops: u64, bytes: u64) -> Duration {
        self.time_until_at(ops, bytes, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(size: u64, burst: u64, ms: u64) -> BucketConfig {
        BucketConfig {
            size,
            one_time_burst: burst,
            refill_time: Duration::from_millis(ms),
        }
    }

    #[test]
    fn rejects_degenerate_configs() {
        let t = Instant::now();
        assert_eq!(
            TokenBucket::new_at(cfg(0, 0, 1), t).err(),
            Some(Error::ZeroSize { bucket: "token" })
        );
        assert_eq!(
            RateLimiter::new_at(None, Some(cfg(1, 0, 0)), t).err(),
            Some(Error::ZeroRefillTime { bucket: "ops" })
        );
    }

    #[test]
    fn charge_leaves_a_debt_that_accumulates() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new_at(Some(cfg(1000, 0, 1000)), None, t0).unwrap();
        assert_eq!(l.time_until_at(1, 0, t0), Duration::ZERO);
        l.charge_at(1, 1500, t0);
        l.charge_at(1, 500, t0);
        // 1000 tokens of debt at 1 token/ms.
        assert_eq!(l.time_until_at(1, 0, t0), Duration::from_millis(1000));
        assert!(!l.consume_at(1, 0, t0 + Duration::from_millis(999)));
        assert!(l.consume_at(1, 0, t0 + Duration::from_millis(1000)));
    }

    #[test]
    fn refills_linearly_and_caps_at_size() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(1000, 0, 1000), t0).unwrap();
        assert!(b.consume_at(1000, t0));
        assert!(!b.consume_at(1, t0));
        // 1 token per ms.
        assert!(!b.consume_at(101, t0 + Duration::from_millis(100)));
        assert_eq!(b.budget(), 100);
        assert!(b.consume_at(100, t0 + Duration::from_millis(100)));
        // A long idle period fills to size, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert!(!b.consume_at(1001, later) || b.budget() == 0);
        let mut b = TokenBucket::new_at(cfg(1000, 0, 1000), t0).unwrap();
        b.consume_at(1000, t0);
        b.refill(later);
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn fractional_tokens_are_not_lost() {
        let t0 = Instant::now();
        // 1 token per 3 ns is awkward: 3 tokens per 10 ns.
        let mut b = TokenBucket::new_at(
            BucketConfig {
                size: 3,
                one_time_burst: 0,
                refill_time: Duration::from_nanos(10),
            },
            t0,
        )
        .unwrap();
        assert!(b.consume_at(3, t0));
        // Refill in 1 ns steps for 10 ns: exactly 3 tokens must come back.
        for ns in 1..=10 {
            b.refill(t0 + Duration::from_nanos(ns));
        }
        assert_eq!(b.budget(), 3);
    }

    #[test]
    fn burst_is_spent_first_and_never_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(10, 5, 1000), t0).unwrap();
        assert!(b.consume_at(12, t0));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 3));
        b.refill(t0 + Duration::from_secs(10));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 10));
    }

    #[test]
    fn oversized_request_passes_when_full_and_leaves_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(100, 0, 100), t0).unwrap();
        assert!(b.consume_at(250, t0));
        // Owes 150 tokens = 150 ms before anything passes again.
        assert_eq!(b.time_until_at(1, t0), Duration::from_millis(151));
        assert!(!b.consume_at(1, t0 + Duration::from_millis(150)));
        assert_eq!(
            b.time_until_at(1, t0 + Duration::from_millis(150)),
            Duration::from_millis(1)
        );
        assert!(b.consume_at(1, t0 + Duration::from_millis(151)));
        // Not full: an oversized request waits for a full bucket.
        assert!(!b.consume_at(250, t0 + Duration::from_millis(151)));
    }

    #[test]
    fn time_until_is_exact_for_shortfalls() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(1000, 0, 1000), t0).unwrap();
        assert!(b.consume_at(1000, t0));
        assert_eq!(b.time_until_at(0, t0), Duration::ZERO);
        let w = b.time_until_at(250, t0);
        assert_eq!(w, Duration::from_millis(250));
        assert!(!b.consume_at(250, t0 + w - Duration::from_nanos(1)));
        assert!(b.consume_at(250, t0 + w));
    }

    #[test]
    fn limiter_charges_both_or_neither() {
        let t0 = Instant::now();
        let mut rl =
            RateLimiter::new_at(Some(cfg(4096, 0, 1000)), Some(cfg(2, 0, 1000)), t0).unwrap();
        assert!(rl.consume_at(1, 4000, t0));
        // Bandwidth refuses: the op must not be charged.
        assert!(!rl.consume_at(1, 200, t0));
        assert_eq!(rl.ops().unwrap().budget(), 1);
        assert!(rl.consume_at(1, 96, t0));
        // Ops refuses now.
        assert!(!rl.consume_at(1, 0, t0));
        assert_eq!(rl.time_until_at(1, 0, t0), Duration::from_millis(500));
        let unlimited = RateLimiter::new_at(None, None, t0).unwrap();
        assert_eq!(
            unlimited.time_until_at(u64::MAX, u64::MAX, t0),
            Duration::ZERO
        );
    }

    #[test]
    fn backwards_clock_adds_nothing() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut b = TokenBucket::new_at(cfg(10, 0, 10), t0).unwrap();
        assert!(b.consume_at(10, t0));
        assert!(!b.consume_at(1, t0 - Duration::from_millis(500)));
    }

    proptest! {
        /// Refilling at any number of intermediate times earns exactly what one refill at the
        /// end does (CI found a schedule where looking at the bucket in between earned one
        /// token more than `time_until` had promised to the caller who did not look).
        #[test]
        fn refill_is_path_independent(
            size in 1u64..10_000,
            refill_ns in 1u64..100_000,
            debt in 0u64..1_000_000,
            taken in 0u64..10_000,
            looks in proptest::collection::vec(0u64..100_000, 0..40),
        ) {
            let t0 = Instant::now();
            let cfg = BucketConfig {
                size,
                one_time_burst: 0,
                refill_time: Duration::from_nanos(refill_ns),
            };
            let mut once = TokenBucket::new_at(cfg, t0).unwrap();
            once.take(taken.min(size));
            once.debt = debt;
            let mut often = once.clone();
            let mut now = t0;
            for dt in looks {
                now += Duration::from_nanos(dt);
                often.refill(now);
            }
            once.refill(now);
            prop_assert_eq!(
                (once.budget, once.debt, once.frac),
                (often.budget, often.debt, often.frac)
            );
        }

        /// Over any schedule, what passed never exceeds burst + size + rate * elapsed
        /// (plus one oversized request's debt), and waiting `time_until` always suffices.
        #[test]
        fn never_exceeds_rate(
            size in 1u64..10_000,
            burst in 0u64..10_000,
            refill_ms in 1u64..2_000,
            steps in proptest::collection::vec((0u64..50_000_000, 0u64..20_000), 1..60),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new_at(cfg(size, burst, refill_ms), t0).unwrap();
            let mut now = t0;
            let mut passed: u128 = 0;
            let mut biggest: u128 = 0;
            for (dt, n) in steps {
                now += Duration::from_nanos(dt);
                if b.consume_at(n, now) {
                    passed += u128::from(n);
                    biggest = biggest.max(u128::from(n));
                } else {
                    let w = b.time_until_at(n, now);
                    prop_assert!(w > Duration::ZERO);
                    let mut c = b.clone();
                    prop_assert!(c.consume_at(n, now + w), "waiting {w:?} was not enough");
                }
                let elapsed = now.duration_since(t0).as_nanos();
                let earned = elapsed * u128::from(size) / (u128::from(refill_ms) * 1_000_000);
                prop_assert!(passed <= u128::from(burst) + u128::from(size) + earned + biggest);
            }
        }
    }
}
