//! The `virtio-reset` scenario: reset devices with requests in flight, bring them up again
//! on fresh queue memory, check they work and leave the old rings alone.

use super::blk::{self, req, Blk};
use super::layout::{self, DATA};
use super::ring::Buf;
use super::rng::{self, Rng};
use super::transport::ID_RNG;
use super::{Env, Platform};
use crate::line::{Describe, LineBuf};

/// Requests left in flight on the block device when it is reset.
pub const BLK_IN_FLIGHT: usize = 16;
/// Requests left in flight on the entropy device.
pub const RNG_IN_FLIGHT: usize = 4;

fn init_fail(out: &mut LineBuf, what: &str, e: &dyn Describe) -> bool {
    out.push_str(what);
    out.push_str(": ");
    e.describe(out);
    false
}

/// Says whether the device wrote the old used ring after the reset (`before` is its index
/// right after).
fn old_ring_quiet(out: &mut LineBuf, what: &str, before: u16, after: u16) -> bool {
    if before == after {
        return true;
    }
    out.push_str(what);
    out.push_str(": the device wrote the old used ring after the reset (idx ");
    out.push_dec(u64::from(before));
    out.push_str(" -> ");
    out.push_dec(u64::from(after));
    out.push_str(")");
    false
}

/// The block half: 16 reads posted, one notify, reset at once; re-initialised on the
/// other queue area, one read of sectors 0..8 completed by interrupt and checked.
fn blk_part<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    let Some(dev) = blk::find_writable(p, env) else {
        env.none_found(p, "writable virtio-blk of 32768 sectors or more", out);
        return false;
    };
    let mut b = match Blk::open(p, dev, layout::BLK_QA) {
        Ok(b) => b,
        Err(e) => return init_fail(out, "blk init", &e),
    };
    for i in 0..BLK_IN_FLIGHT {
        let buf = DATA + 0x1000 * i as u64;
        if let Err(e) = b.post(p, i, req::IN, 8 * i as u64, &[Buf::w(buf, 4096)]) {
            return init_fail(out, "blk post", &e);
        }
    }
    b.t.notify(p, 0);
    if let Err(e) = b.t.reset(p) {
        return init_fail(out, "blk reset with requests in flight", &e);
    }
    let old = b.q.mem;
    let old_idx = b.q.used_idx(p);
    let mut b = match Blk::open(p, dev, layout::BLK_QB) {
        Ok(b) => b,
        Err(e) => return init_fail(out, "blk re-init", &e),
    };
    if !p.irq_enable(&dev) {
        out.push_str("cannot route GSI ");
        out.push_dec(u64::from(dev.gsi));
        return false;
    }
    let ok = blk::read_by_interrupt(
        p,
        &mut b,
        out,
        "blk read 0..8 after reset",
        (0, 8, DATA + 0x10_0000),
    );
    p.irq_disable(&dev);
    let _ = b.t.reset(p);
    if !ok {
        return false;
    }
    if !old_ring_quiet(out, "blk", old_idx, p.read16(old.used_idx_addr())) {
        return false;
    }
    out.push_str("blk=ok(reset with ");
    out.push_dec(BLK_IN_FLIGHT as u64);
    out.push_str(" in flight, ");
    out.push_dec(u64::from(old_idx));
    out.push_str(" had completed)");
    true
}

/// The entropy half: requests posted, reset at once, re-initialised, one request answered.
fn rng_part<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    let Some(dev) = env.find(p, ID_RNG, |_, _| true) else {
        out.push_str(" rng=absent");
        return true;
    };
    let mut r = match Rng::open(p, dev, layout::RNG_QA) {
        Ok(r) => r,
        Err(e) => return init_fail(out, "rng init", &e),
    };
    for i in 0..RNG_IN_FLIGHT {
        if r.q
            .add(p, &[Buf::w(rng::BUFS + 0x400 * i as u64, 256)])
            .is_none()
        {
            out.push_str("rng post: queue full");
            return false;
        }
    }
    r.t.notify(p, 0);
    if let Err(e) = r.t.reset(p) {
        return init_fail(out, "rng reset with requests in flight", &e);
    }
    let old = r.q.mem;
    let old_idx = r.q.used_idx(p);
    let mut r = match Rng::open(p, dev, layout::RNG_QB) {
        Ok(r) => r,
        Err(e) => return init_fail(out, "rng re-init", &e),
    };
    let buf = rng::BUFS + 0x2000;
    rng::clear(p, buf, 8);
    let got = r.fill(p, buf, 64);
    let _ = r.t.reset(p);
    match got {
        Some(n) if n > 0 && n <= 64 && rng::varied(p, buf, n) => {}
        other => {
            out.push_str("rng after reset: ");
            match other {
                Some(n) => {
                    out.push_str("used len ");
                    out.push_dec(u64::from(n));
                    out.push_str(" or constant bytes");
                }
                None => out.push_str("no answer within 20 s"),
            }
            return false;
        }
    }
    if !old_ring_quiet(out, "rng", old_idx, p.read16(old.used_idx_addr())) {
        return false;
    }
    out.push_str(" rng=ok");
    true
}

/// The `virtio-reset` scenario.
pub fn run_reset<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    if !env.region_ok(layout::START, layout::FUNCTIONAL_END, out) {
        return false;
    }
    blk_part(p, env, out) && rng_part(p, env, out)
}
