//! Live migration for Kiln: the wire protocol ([`wire`]) and the two ends of a pre-copy
//! migration over any byte stream (TCP, Unix socket): [`send`] on the source, [`receive`]
//! on the destination. KVM-free: the VM is reached through [`SourceVm`] and [`DestVm`], so
//! everything here is tested with fake VMs over a socket pair.
//!
//! The conversation (docs/migration.md has the byte layout):
//!
//! 1. source → `Hello` (protocol version, kiln version, host CPU vendor and feature words,
//!    memory regions, vCPUs); destination → `HelloOk`, or `Refuse` with why.
//! 2. source → every page once (`Pages`, `Zero` for all-zero runs), with the VM running
//!    and KVM's dirty log on; then rounds of the pages dirtied meanwhile, until the rest
//!    would go within the allowed downtime at the measured bandwidth, or the round limit.
//! 3. source pauses the VM, sends the last dirty pages, the pages the VMM's own devices
//!    wrote (found by fingerprint, see [`send`]), the device state (`State`), `Commit`.
//! 4. destination restores the VM and runs it, answers `Running`; only then does the source
//!    let its VM go. Any failure before that and the source resumes its own VM.
//!
//! ```
//! use kiln_migration::{wire, Frame};
//! let mut buf = Vec::new();
//! wire::write_frame(&mut buf, &Frame::Commit).unwrap();
//! assert_eq!(wire::read_frame(&mut &buf[..]).unwrap(), Frame::Commit);
//! ```

#![warn(missing_docs)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

pub mod wire;

pub use wire::{Frame, Hello};

/// Page size of the protocol.
pub const PAGE: u64 = 4096;

/// Errors of either end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the stream failed.
    #[error("migration stream: {0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// The stream ended in the middle of something.
    #[error("migration stream ended early (while reading the {0})")]
    Truncated(&'static str),
    /// A frame did not decode.
    #[error("malformed migration {0} frame: {1}")]
    Malformed(&'static str, String),
    /// The peer speaks another protocol version.
    #[error("migration protocol version {theirs} is not ours ({ours})")]
    Version {
        /// Ours.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// A frame came that does not belong here.
    #[error("unexpected migration frame '{got}' (expected {expected})")]
    Unexpected {
        /// What came.
        got: &'static str,
        /// What should have.
        expected: &'static str,
    },
    /// The destination refused the VM or failed to start it.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// The source gave up.
    #[error("the source aborted: {0}")]
    Aborted(String),
    /// The migration failed after the hand-over and the source could not take its VM back.
    #[error("{0}")]
    Stuck(String),
    /// The local VM failed at something (pause, dirty log, state, restore).
    #[error("{0}")]
    Vm(String),
    /// The source's VM is not one this destination can take.
    #[error("incompatible: {0}")]
    Incompatible(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A guest memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical start (page aligned).
    pub gpa: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
}

impl Region {
    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.len / PAGE
    }
}

/// What a destination must match: kiln's version and the host CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    /// kiln's version (the state format goes with it).
    pub kiln_version: String,
    /// CPUID leaf 0 vendor string.
    pub cpu_vendor: [u8; 12],
    /// Feature words (CPUID 1 ECX/EDX, 7.0 EBX/ECX/EDX, ...): every bit set on the source
    /// must be set on the destination, in the same order of words.
    pub cpu_features: Vec<u32>,
}

impl HostInfo {
    /// Why a VM from `src` can't run on `self`, if it can't.
    pub fn accepts(&self, src: &HostInfo) -> std::result::Result<(), String> {
        if src.kiln_version != self.kiln_version {
            return Err(format!(
                "kiln {} on the source, {} here",
                src.kiln_version, self.kiln_version
            ));
        }
        if src.cpu_vendor != self.cpu_vendor {
            return Err(format!(
                "CPU vendor {} on the source, {} here",
                String::from_utf8_lossy(&src.cpu_vendor),
                String::from_utf8_lossy(&self.cpu_vendor)
            ));
        }
        if src.cpu_features.len() != self.cpu_features.len() {
            return Err("different CPU feature word lists".into());
        }
        for (i, (s, d)) in src.cpu_features.iter().zip(&self.cpu_features).enumerate() {
            if s & !d != 0 {
                return Err(format!(
                    "CPU feature word {i}: the source has bits {:#x} this host lacks",
                    s & !d
                ));
            }
        }
        Ok(())
    }
}

/// The source VM as [`send`] needs it.
pub trait SourceVm {
    /// Guest memory regions, in a fixed order (bitmaps follow it).
    fn regions(&self) -> Vec<Region>;
    /// vCPUs.
    fn vcpus(&self) -> u32;
    /// Copies guest memory at `gpa` (inside one region) into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), String>;
    /// Turns dirty logging on (the log starts clear).
    fn start_dirty_log(&mut self) -> std::result::Result<(), String>;
    /// The pages the guest dirtied since logging started or the previous call, one bitmap
    /// per region (bit `i` of word `i / 64`: page `i`); clears the log.
    fn dirty_log(&mut self) -> std::result::Result<Vec<Vec<u64>>, String>;
    /// Turns dirty logging off.
    fn stop_dirty_log(&mut self);
    /// Stops the vCPUs and devices.
    fn pause(&mut self) -> std::result::Result<(), String>;
    /// Runs the VM again (after a failed migration).
    fn resume(&mut self);
    /// The paused VM's state (vCPUs, interrupt controller, devices) as one blob.
    fn save_state(&mut self) -> std::result::Result<Vec<u8>, String>;
    /// Called once everything is sent, just before `Commit`: give up what the destination
    /// must take over (kiln: its disk image locks).
    fn hand_over(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Called after a failed migration that got past [`SourceVm::hand_over`], before
    /// resuming: take it back. An error means the destination may hold it (and so may be
    /// running the VM): the source then stays paused rather than run a second copy.
    fn take_back(&mut self) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Pages known to hold zeros without reading them (e.g. never touched on the host),
    /// one bitmap per region, or None. [`send`] neither reads nor fingerprints those: on a
    /// host a read of an untouched page costs a page fault.
    fn known_zero(&self) -> Option<Vec<Vec<u64>>> {
        None
    }
}

/// The destination VM as [`receive`] needs it: memory first, then the state.
pub trait DestVm {
    /// Called once the source is known to be compatible: builds guest memory for
    /// `hello.regions` (and `hello.vcpus`), or says why this VM can't be taken here.
    fn prepare(&mut self, hello: &Hello) -> std::result::Result<(), String>;
    /// Writes `data` at `gpa` (inside one region: checked by [`receive`]).
    fn write(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), String>;
    /// Zeroes `len` bytes at `gpa` (inside one region: checked by [`receive`]).
    fn zero(&mut self, gpa: u64, len: u64) -> std::result::Result<(), String>;
    /// Restores the state blob and starts the VM.
    fn restore_and_run(&mut self, state: &[u8]) -> std::result::Result<(), String>;
}

/// Limits of a pre-copy migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Stop iterating once the rest would go within this.
    pub max_downtime: Duration,
    /// Stop iterating after this many dirty rounds anyway.
    pub max_iterations: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_downtime: Duration::from_millis(300),
            max_iterations: 30,
        }
    }
}

/// What a migration did (source side).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Bytes written to the stream.
    pub bytes: u64,
    /// Pages sent with their contents.
    pub pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Dirty rounds after the full pass (not counting the final, paused one).
    pub iterations: u32,
    /// Pages sent while paused (last dirty set plus device-written pages).
    pub final_pages: u64,
    /// Of those, pages the VMM's devices wrote (not in KVM's log).
    pub device_pages: u64,
    /// Device state bytes.
    pub state_bytes: u64,
    /// Measured stream bandwidth, bytes per second (the last round's).
    pub bandwidth: f64,
    /// Pause → the destination's `Running`, by the source's clock.
    pub downtime: Duration,
    /// Of the downtime: the pause itself (vCPUs out, devices quiet).
    pub pause: Duration,
    /// Of the downtime: finding the pages devices wrote (fingerprint pass).
    pub scan: Duration,
    /// Of the downtime: saving the VM state.
    pub save: Duration,
    /// The destination's own `Commit` → running time.
    pub restore: Duration,
    /// Start → `Running`.
    pub total: Duration,
    /// Whether iteration stopped at the round limit rather than converging.
    pub hit_iteration_limit: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "total_ms={:.1} downtime_ms={:.1} restore_ms={:.1} bytes={} pages={} zero_pages={} \
             iterations={}{} final_pages={} device_pages={} state_bytes={} bandwidth_mibs={:.0} \
             pause_ms={:.1} scan_ms={:.1} save_ms={:.1}",
            self.total.as_secs_f64() * 1e3,
            self.downtime.as_secs_f64() * 1e3,
            self.restore.as_secs_f64() * 1e3,
            self.bytes,
            self.pages,
            self.zero_pages,
            self.iterations,
            if self.hit_iteration_limit {
                "(limit)"
            } else {
                ""
            },
            self.final_pages,
            self.device_pages,
            self.state_bytes,
            self.bandwidth / (1 << 20) as f64,
            self.pause.as_secs_f64() * 1e3,
            self.scan.as_secs_f64() * 1e3,
            self.save.as_secs_f64() * 1e3,
        )
    }
}

/// A keyed 64-bit fingerprint of one page (four independent multiply–xor lanes, so it runs
/// near memory speed). Keyed per migration so a guest cannot aim for a collision.
pub fn fingerprint(key: u64, page: &[u8]) -> u64 {
    const M: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut l = [key, key ^ 0x5555, key.rotate_left(17), key.rotate_left(41)];
    for c in page.chunks_exact(32) {
        for (i, lane) in l.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&c[i * 8..i * 8 + 8]);
            *lane = (*lane ^ u64::from_le_bytes(w))
                .wrapping_mul(M)
                .rotate_left(29);
        }
    }
    l.iter()
        .fold(key, |a, &x| (a ^ x).wrapping_mul(M).rotate_left(31))
}

/// A fresh fingerprint key (per migration, per full snapshot), so a guest can't aim for a
/// collision: the wall clock, a stack address and the pid, mixed. No `getrandom`: the VMM's
/// main thread, which calls this, runs under a seccomp filter that doesn't allow it (std's
/// `RandomState` may need it on a thread's first use).
pub fn random_key() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let here = &t as *const u64 as u64;
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&t.to_le_bytes());
    seed[8..16].copy_from_slice(&here.to_le_bytes());
    seed[16..24].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    seed[24..].copy_from_slice(&Instant::now().elapsed().as_nanos().to_le_bytes()[..8]);
    fingerprint(0x6b69_6c6e, &seed)
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: every bit pattern is a valid u64; align_to only splits at alignment.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

fn bit(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// The source's bookkeeping: fingerprints of what was sent, and the stream.
struct Sender<'a, V: SourceVm, S: Write> {
    vm: &'a mut V,
    s: &'a mut S,
    regions: Vec<Region>,
    /// Fingerprint of each page as last sent.
    sent: Vec<Vec<u64>>,
    key: u64,
    /// Fingerprint of an all-zero page.
    zero_fp: u64,
    /// [`SourceVm::known_zero`] as of this round.
    hint: Option<Vec<Vec<u64>>>,
    /// Time spent reading and fingerprinting pages, and how many: the paused scan's cost.
    read_time: Duration,
    read_pages: u64,
    buf: Vec<u8>,
    report: Report,
}

impl<V: SourceVm, S: Write> Sender<'_, V, S> {
    fn io(e: std::io::Error) -> Error {
        Error::Io("sending", e)
    }

    fn hinted(&self, r: usize, p: u64) -> bool {
        self.hint
            .as_ref()
            .and_then(|h| h.get(r))
            .is_some_and(|b| bit(b, p))
    }

    /// Sends the pages of region `r` selected by `pick`, in runs; returns pages sent.
    fn send_pages(&mut self, r: usize, mut pick: impl FnMut(&Self, u64) -> bool) -> Result<u64> {
        let reg = self.regions[r];
        let n = reg.pages();
        let mut i = 0;
        let mut count = 0;
        while i < n {
            if !pick(self, i) {
                i += 1;
                continue;
            }
            // A run of picked pages, at most one frame long, all known zero or none.
            let start = i;
            let z = self.hinted(r, i);
            while i < n
                && i - start < wire::MAX_PAGES_PER_FRAME as u64
                && pick(self, i)
                && self.hinted(r, i) == z
            {
                i += 1;
            }
            count += if z {
                self.send_known_zero(r, start, i - start)?
            } else {
                self.send_run(r, start, i - start)?
            };
        }
        Ok(count)
    }

    /// What the paused fingerprint pass will cost: the measured read + fingerprint time per
    /// page, times the pages that are not known to be zero.
    fn scan_estimate(&self) -> Duration {
        let total: u64 = self.regions.iter().map(Region::pages).sum();
        let known: u64 = self.hint.as_ref().map_or(0, |h| count(h));
        let per_page = self.read_time.as_secs_f64() / self.read_pages.max(1) as f64;
        Duration::from_secs_f64(per_page * total.saturating_sub(known) as f64)
    }

    /// Sends pages `start..start + n` of region `r`, known to be zero, as a marker.
    fn send_known_zero(&mut self, r: usize, start: u64, n: u64) -> Result<u64> {
        let gpa = self.regions[r].gpa + start * PAGE;
        self.report.bytes +=
            wire::write_frame(self.s, &Frame::Zero { gpa, count: n }).map_err(Self::io)? as u64;
        self.report.zero_pages += n;
        self.sent[r][start as usize..(start + n) as usize].fill(self.zero_fp);
        Ok(n)
    }

    /// Sends pages `start..start + n` of region `r`: zero runs as markers, the rest as data.
    fn send_run(&mut self, r: usize, start: u64, n: u64) -> Result<u64> {
        let reg = self.regions[r];
        let gpa = reg.gpa + start * PAGE;
        self.buf.resize((n * PAGE) as usize, 0);
        let t = Instant::now();
        self.vm.read(gpa, &mut self.buf).map_err(Error::Vm)?;
        self.read_time += t.elapsed();
        self.read_pages += n;
        let zero_fp = self.zero_fp;
        let mut k = 0;
        while k < n {
            let page = |k: u64| &self.buf[(k * PAGE) as usize..((k + 1) * PAGE) as usize];
            let z = is_zero(page(k));
            let from = k;
            while k < n && is_zero(page(k)) == z {
                k += 1;
            }
            let run_gpa = gpa + from * PAGE;
            if z {
                self.report.bytes += wire::write_frame(
                    self.s,
                    &Frame::Zero {
                        gpa: run_gpa,
                        count: k - from,
                    },
                )
                .map_err(Self::io)? as u64;
                self.report.zero_pages += k - from;
                for j in from..k {
                    self.sent[r][(start + j) as usize] = zero_fp;
                }
            } else {
                let data = &self.buf[(from * PAGE) as usize..(k * PAGE) as usize];
                self.report.bytes +=
                    wire::write_pages(self.s, run_gpa, data).map_err(Self::io)? as u64;
                self.report.pages += k - from;
                let t = Instant::now();
                for j in from..k {
                    let fp = fingerprint(self.key, page(j));
                    self.sent[r][(start + j) as usize] = fp;
                }
                self.read_time += t.elapsed();
            }
        }
        Ok(n)
    }

    /// Sends every page whose bit is set in `dirty`; returns pages sent.
    fn send_dirty(&mut self, dirty: &[Vec<u64>]) -> Result<u64> {
        let mut total = 0;
        for (r, bits) in dirty.iter().enumerate().take(self.regions.len()) {
            total += self.send_pages(r, |_, i| bit(bits, i))?;
        }
        Ok(total)
    }

    /// Marks in `dirty` every page not already in it whose contents differ from what was
    /// sent: what the VMM's devices wrote behind KVM's log. Returns how many.
    fn add_device_writes(&mut self, dirty: &mut [Vec<u64>]) -> Result<u64> {
        self.hint = self.vm.known_zero();
        let mut found = 0;
        let mut page = vec![0u8; PAGE as usize];
        for (r, reg) in self.regions.clone().iter().enumerate() {
            for p in 0..reg.pages() {
                if bit(&dirty[r], p) {
                    continue;
                }
                let fp = if self.hinted(r, p) {
                    self.zero_fp
                } else {
                    self.vm
                        .read(reg.gpa + p * PAGE, &mut page)
                        .map_err(Error::Vm)?;
                    fingerprint(self.key, &page)
                };
                if fp != self.sent[r][p as usize] {
                    dirty[r][(p / 64) as usize] |= 1 << (p % 64);
                    found += 1;
                }
            }
        }
        Ok(found)
    }
}

fn count(d: &[Vec<u64>]) -> u64 {
    d.iter()
        .flat_map(|b| b.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn merge(into: &mut [Vec<u64>], from: &[Vec<u64>]) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// Migrates `vm` to the destination at the other end of `stream` (pre-copy).
///
/// On success the destination runs the VM and the caller must stop its own (it is left
/// paused). On any error before the destination said `Running` the VM is running here
/// again (resumed if it was paused), dirty logging is off, and the error says why; the
/// caller sets the stream's read and write timeouts, so that a silent destination (also one
/// that never answers `Commit`) ends in an error.
///
/// Writes done by the VMM itself (virtio devices) are not in KVM's dirty log; they are
/// found while paused by comparing a keyed fingerprint of every page with the fingerprint
/// of what was last sent for it.
pub fn send<V: SourceVm, S: Read + Write>(
    vm: &mut V,
    stream: &mut S,
    host: &HostInfo,
    params: &Params,
) -> Result<Report> {
    let t0 = Instant::now();
    let mut stage = Stage::Running;
    let r = send_inner(vm, stream, host, params, t0, &mut stage);
    if let Err(e) = r {
        let _ = wire::write_frame(stream, &Frame::Abort(e.to_string()));
        vm.stop_dirty_log();
        match stage {
            Stage::Running => {}
            Stage::Paused => vm.resume(),
            Stage::HandedOver => {
                if let Err(why) = vm.take_back() {
                    return Err(Error::Stuck(format!(
                        "{e}; and taking back what the destination was given failed ({why}): \
                         the destination may be running the VM, so it stays paused here"
                    )));
                }
                vm.resume();
            }
        }
        return Err(e);
    }
    r
}

/// How far the source got, for undoing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Running,
    Paused,
    HandedOver,
}

fn send_inner<V: SourceVm, S: Read + Write>(
    vm: &mut V,
    stream: &mut S,
    host: &HostInfo,
    params: &Params,
    t0: Instant,
    stage: &mut Stage,
) -> Result<Report> {
    let regions = vm.regions();
    wire::write_frame(
        stream,
        &Frame::Hello(Hello {
            version: wire::PROTOCOL_VERSION,
            host: host.clone(),
            regions: regions.clone(),
            vcpus: vm.vcpus(),
        }),
    )
    .map_err(|e| Error::Io("sending hello", e))?;
    match wire::read_frame(stream)? {
        Frame::HelloOk => {}
        Frame::Refuse(m) => return Err(Error::Refused(m)),
        f => {
            return Err(Error::Unexpected {
                got: f.name(),
                expected: "hello-ok",
            })
        }
    }
    vm.start_dirty_log().map_err(Error::Vm)?;
    let key = random_key();
    let mut s = Sender {
        sent: regions
            .iter()
            .map(|r| vec![0; r.pages() as usize])
            .collect(),
        regions,
        vm,
        s: stream,
        key,
        zero_fp: fingerprint(key, &[0u8; PAGE as usize]),
        hint: None,
        read_time: Duration::ZERO,
        read_pages: 0,
        buf: Vec::new(),
        report: Report::default(),
    };

    // Round 0: everything.
    let t = Instant::now();
    s.hint = s.vm.known_zero();
    let b0 = s.report.bytes;
    let mut sent = 0;
    for r in 0..s.regions.len() {
        sent += s.send_pages(r, |_, _| true)?;
    }
    s.report.bytes += wire::write_frame(
        s.s,
        &Frame::RoundEnd {
            round: 0,
            pages: sent,
        },
    )
    .map_err(Sender::<V, S>::io)? as u64;
    let full_time = t.elapsed();
    let mut bw = (s.report.bytes - b0) as f64 / full_time.as_secs_f64().max(1e-6);
    // Dirty rounds until the rest fits the downtime.
    let mut dirty;
    loop {
        dirty = s.vm.dirty_log().map_err(Error::Vm)?;
        let bytes = count(&dirty) * PAGE;
        let estimate = Duration::from_secs_f64(bytes as f64 / bw) + s.scan_estimate();
        if estimate <= params.max_downtime {
            break;
        }
        if s.report.iterations >= params.max_iterations {
            s.report.hit_iteration_limit = true;
            break;
        }
        s.report.iterations += 1;
        let t = Instant::now();
        s.hint = s.vm.known_zero();
        let b0 = s.report.bytes;
        let n = s.send_dirty(&dirty)?;
        s.report.bytes += wire::write_frame(
            s.s,
            &Frame::RoundEnd {
                round: s.report.iterations,
                pages: n,
            },
        )
        .map_err(Sender::<V, S>::io)? as u64;
        let el = t.elapsed().as_secs_f64();
        if el > 0.0 && n > 0 {
            bw = (s.report.bytes - b0) as f64 / el;
        }
    }
    s.report.bandwidth = bw;

    // Final round, paused.
    let pause_at = Instant::now();
    s.vm.pause().map_err(Error::Vm)?;
    *stage = Stage::Paused;
    s.report.pause = pause_at.elapsed();
    let last = s.vm.dirty_log().map_err(Error::Vm)?;
    merge(&mut dirty, &last);
    let t = Instant::now();
    s.report.device_pages = s.add_device_writes(&mut dirty)?;
    s.report.scan = t.elapsed();
    s.report.final_pages = s.send_dirty(&dirty)?;
    let t = Instant::now();
    let state = s.vm.save_state().map_err(Error::Vm)?;
    s.report.save = t.elapsed();
    s.report.state_bytes = state.len() as u64;
    s.report.bytes +=
        wire::write_frame(s.s, &Frame::State(state)).map_err(Sender::<V, S>::io)? as u64;
    s.vm.hand_over().map_err(Error::Vm)?;
    *stage = Stage::HandedOver;
    s.report.bytes += wire::write_frame(s.s, &Frame::Commit).map_err(Sender::<V, S>::io)? as u64;
    match wire::read_frame(s.s)? {
        Frame::Running { restore_ns } => {
            s.report.downtime = pause_at.elapsed();
            s.report.restore = Duration::from_nanos(restore_ns);
        }
        Frame::Refuse(m) => return Err(Error::Refused(m)),
        f => {
            return Err(Error::Unexpected {
                got: f.name(),
                expected: "running",
            })
        }
    }
    s.vm.stop_dirty_log();
    s.report.total = t0.elapsed();
    Ok(s.report)
}

/// What the destination saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Pages written with data.
    pub pages: u64,
    /// Pages zeroed.
    pub zero_pages: u64,
    /// Rounds the source announced (including the full pass).
    pub rounds: u32,
    /// `Commit` → running.
    pub restore: Duration,
}

fn check_range(regions: &[Region], gpa: u64, len: u64) -> Result<()> {
    let ok = regions.iter().any(|r| {
        gpa >= r.gpa
            && gpa
                .checked_add(len)
                .zip(r.gpa.checked_add(r.len))
                .is_some_and(|(e, re)| e <= re)
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Malformed(
            "pages",
            format!("{len} bytes at {gpa:#x} are outside guest memory"),
        ))
    }
}

/// Takes a VM from the source at the other end of `stream` into `vm` and starts it.
/// `host` is this host; the source's must be compatible (see [`HostInfo::accepts`]) and its
/// [`DestVm::prepare`] must accept its memory layout and vCPU count, or the VM is refused (and the source told).
pub fn receive<V: DestVm, S: Read + Write>(
    vm: &mut V,
    stream: &mut S,
    host: &HostInfo,
) -> Result<Received> {
    let r = receive_inner(vm, stream, host);
    if let Err(e) = &r {
        if !matches!(e, Error::Aborted(_) | Error::Io(..) | Error::Truncated(_)) {
            let _ = wire::write_frame(stream, &Frame::Refuse(e.to_string()));
        }
    }
    r
}

fn receive_inner<V: DestVm, S: Read + Write>(
    vm: &mut V,
    stream: &mut S,
    host: &HostInfo,
) -> Result<Received> {
    let hello = match wire::read_frame(stream)? {
        Frame::Hello(h) => h,
        f => {
            return Err(Error::Unexpected {
                got: f.name(),
                expected: "hello",
            })
        }
    };
    host.accepts(&hello.host).map_err(Error::Incompatible)?;
    vm.prepare(&hello).map_err(Error::Incompatible)?;
    let regions = hello.regions.clone();
    wire::write_frame(stream, &Frame::HelloOk).map_err(|e| Error::Io("sending hello-ok", e))?;
    let mut got = Received::default();
    let mut state = None;
    loop {
        match wire::read_frame(stream)? {
            Frame::Pages { gpa, data } => {
                check_range(&regions, gpa, data.len() as u64)?;
                vm.write(gpa, &data).map_err(Error::Vm)?;
                got.pages += data.len() as u64 / PAGE;
            }
            Frame::Zero { gpa, count } => {
                let len = count
                    .checked_mul(PAGE)
                    .ok_or_else(|| Error::Malformed("zero", format!("{count} pages")))?;
                if gpa % PAGE != 0 {
                    return Err(Error::Malformed("zero", format!("unaligned {gpa:#x}")));
                }
                check_range(&regions, gpa, len)?;
                vm.zero(gpa, len).map_err(Error::Vm)?;
                got.zero_pages += count;
            }
            Frame::RoundEnd { .. } => got.rounds = got.rounds.saturating_add(1),
            Frame::State(s) => state = Some(s),
            Frame::Commit => {
                let Some(s) = state.take() else {
                    return Err(Error::Unexpected {
                        got: "commit",
                        expected: "state before commit",
                    });
                };
                let t = Instant::now();
                vm.restore_and_run(&s).map_err(Error::Vm)?;
                got.restore = t.elapsed();
                wire::write_frame(
                    stream,
                    &Frame::Running {
                        restore_ns: got.restore.as_nanos() as u64,
                    },
                )
                .map_err(|e| Error::Io("sending running", e))?;
                return Ok(got);
            }
            Frame::Abort(m) => return Err(Error::Aborted(m)),
            f => {
                return Err(Error::Unexpected {
                    got: f.name(),
                    expected: "pages, zero, round-end, state or commit",
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
