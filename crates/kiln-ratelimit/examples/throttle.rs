//! Simulates a disk throttled to 10 MiB/s and 100 IOPS with an injected clock: 64 KiB
//! requests arrive back to back; when the limiter refuses one, "sleep" until
//! `time_until_at` says it will pass (what a VMM does with a timerfd).

use std::time::{Duration, Instant};

use kiln_ratelimit::{BucketConfig, RateLimiter};

fn main() -> Result<(), kiln_ratelimit::Error> {
    let t0 = Instant::now();
    let mut now = t0;
    let bw = BucketConfig {
        size: 10 << 20,
        one_time_burst: 0,
        refill_time: Duration::from_secs(1),
    };
    let ops = BucketConfig {
        size: 100,
        one_time_burst: 0,
        refill_time: Duration::from_secs(1),
    };
    let mut rl = RateLimiter::new_at(Some(bw), Some(ops), t0)?;
    let (mut done, mut throttled) = (0u64, 0u64);
    while now.duration_since(t0) < Duration::from_secs(5) {
        if rl.consume_at(1, 64 << 10, now) {
            done += 1;
        } else {
            throttled += 1;
            now += rl.time_until_at(1, 64 << 10, now);
        }
    }
    let secs = now.duration_since(t0).as_secs_f64();
    println!(
        "{done} requests ({:.1} MiB/s, {:.0} IOPS) in {secs:.2} simulated s, throttled {throttled} times",
        (done * 64) as f64 / 1024.0 / secs,
        done as f64 / secs
    );
    Ok(())
}
