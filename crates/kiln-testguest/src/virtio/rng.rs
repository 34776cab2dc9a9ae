//! virtio-rng (device ID 4) and the `virtio-rng` scenario.

use super::layout;
use super::ring::{Buf, SplitQueue};
use super::transport::{InitError, Transport, F_INDIRECT_DESC, ID_RNG};
use super::{wait_until, Env, MmioDev, Platform, SECOND};
use crate::line::{Describe, LineBuf};

/// Features the scenarios use.
pub const WANTED: u64 = F_INDIRECT_DESC;
/// Queue entries asked for.
pub const QUEUE_SIZE: u16 = 64;
/// How long one request may take: a VMM may throttle its entropy device (kiln's
/// `--rng bw_size=...`), so this is generous.
pub const TIMEOUT_NS: u64 = 20 * SECOND;
/// Where the scenarios' buffers are (1 KiB each, 4 KiB apart; in the small area, so the
/// entropy scenarios need no more than [`layout::RNG_END`]).
pub const BUFS: u64 = layout::SCRATCH + 0x1000;

/// An entropy device brought up with its queue.
pub struct Rng {
    /// Where it is.
    pub dev: MmioDev,
    /// Its registers.
    pub t: Transport,
    /// Its request queue.
    pub q: SplitQueue,
}

impl Rng {
    /// Resets and initialises the device at `dev` with its queue at `area`.
    pub fn open<P: Platform>(p: &P, dev: MmioDev, area: u64) -> Result<Rng, InitError> {
        let t = Transport::new(dev.base);
        let (_, q) = t.init(p, WANTED, area, QUEUE_SIZE)?;
        Ok(Rng { dev, t, q })
    }

    /// Asks for `len` bytes at `buf` and waits; returns the used length (None on timeout or
    /// a wrong id).
    pub fn fill<P: Platform>(&mut self, p: &P, buf: u64, len: u32) -> Option<u32> {
        let head = self.q.add(p, &[Buf::w(buf, len)])?;
        self.t.notify(p, 0);
        let mut got = None;
        let q = &mut self.q;
        wait_until(p, TIMEOUT_NS, || {
            got = q.pop_used(p);
            got.is_some()
        });
        match got {
            Some((id, len)) if id == u32::from(head) => Some(len),
            _ => None,
        }
    }
}

/// Zeroes the first `words` u64 of `buf`, so an untouched buffer reads as all-equal bytes.
pub fn clear<P: Platform>(p: &P, buf: u64, words: u64) {
    for i in 0..words {
        p.write64(buf + 8 * i, 0);
    }
}

/// Whether the first `len` bytes at `buf` (at most 128 looked at) are not all the same.
pub fn varied<P: Platform>(p: &P, buf: u64, len: u32) -> bool {
    let n = u64::from(len.min(128));
    if n < 2 {
        return false;
    }
    let first = p.read8(buf);
    (1..n).any(|i| p.read8(buf + i) != first)
}

/// Whether two buffers differ in their first 16 bytes.
pub fn differ<P: Platform>(p: &P, a: u64, b: u64) -> bool {
    p.read64(a) != p.read64(b) || p.read64(a + 8) != p.read64(b + 8)
}

/// The `virtio-rng` scenario: three 1 KiB requests, each answered with data that is not
/// constant, all three different.
pub fn run_rng<P: Platform>(p: &P, env: &Env<'_>, out: &mut LineBuf) -> bool {
    if !env.region_ok(layout::START, layout::RNG_END, out) {
        return false;
    }
    let base = BUFS;
    let Some(dev) = env.find(p, ID_RNG, |_, _| true) else {
        env.none_found(p, "virtio-rng", out);
        return false;
    };
    let mut r = match Rng::open(p, dev, layout::RNG_QA) {
        Ok(r) => r,
        Err(e) => {
            out.push_str("init: ");
            e.describe(out);
            return false;
        }
    };
    let mut lens = [0u32; 3];
    let mut ok = true;
    for (i, l) in lens.iter_mut().enumerate() {
        let buf = base + 0x1000 * i as u64;
        clear(p, buf, 16);
        match r.fill(p, buf, 1024) {
            Some(n) if n > 0 && n <= 1024 && varied(p, buf, n) => *l = n,
            Some(n) => {
                out.push_str("request ");
                out.push_dec(i as u64);
                out.push_str(": used len ");
                out.push_dec(u64::from(n));
                out.push_str(if n == 0 || n > 1024 {
                    " (expected 1..=1024)"
                } else {
                    " but the bytes are all equal"
                });
                ok = false;
                break;
            }
            None => {
                out.push_str("request ");
                out.push_dec(i as u64);
                out.push_str(": no completion within 20 s (status ");
                out.push_hex(u64::from(r.t.status(p)));
                out.push_str(")");
                ok = false;
                break;
            }
        }
    }
    if ok {
        let b = |i: u64| base + 0x1000 * i;
        if !differ(p, b(0), b(1)) || !differ(p, b(1), b(2)) || !differ(p, b(0), b(2)) {
            out.push_str("two of the three answers are the same");
            ok = false;
        }
    }
    let _ = r.t.reset(p);
    if ok {
        out.push_str("dev=");
        out.push_hex(dev.base);
        out.push_str(" lens=");
        for (i, l) in lens.iter().enumerate() {
            if i > 0 {
                out.push_str(",");
            }
            out.push_dec(u64::from(*l));
        }
    }
    ok
}
