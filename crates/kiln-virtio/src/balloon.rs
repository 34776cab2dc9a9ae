//! virtio-balloon (device ID 5): the guest gives pages back to the host (inflate), takes them
//! again (deflate), reports memory statistics, and reports free pages on its own (free page
//! reporting).
//!
//! A page the guest gives back is dropped from the host mapping: `MADV_DONTNEED` for private
//! anonymous memory, `MADV_REMOVE` (hole punching) for shared or file-backed memory, so the
//! VMM's RSS (or the file's allocation) really shrinks. The guest may touch such a page again
//! after deflating it and reads zeros, as the spec allows without
//! `VIRTIO_BALLOON_F_MUST_TELL_HOST` (not offered: deflate needs no host work).
//!
//! Which queue is which depends on the features the driver accepted: inflate and deflate are
//! always 0 and 1; the statistics queue comes next if `STATS_VQ` was accepted, then the
//! reporting queue if `REPORTING` was (Linux numbers only the queues that exist).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_bus::RateLimitedWarn;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion};

use crate::queue::{drain, ChainDone};
use crate::{
    check_queue_size, read_config_bytes, Error, InterruptKind, QueueOutcome, Result, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1,
};

const DEVICE: &str = "virtio-balloon";

/// Virtio device ID of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Balloon page size (the spec's PFN shift is 12, whatever the host page size).
pub const PAGE_SIZE: u64 = 4096;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Frame numbers read per inflate descriptor; Linux sends at most 256. The rest of a longer
/// buffer is ignored, so one request can't keep the event loop busy for long.
pub const MAX_PFNS_PER_DESCRIPTOR: u32 = 4096;

/// Feature bits (`VIRTIO_BALLOON_F_*`).
pub mod features {
    /// The driver must tell the host before reusing deflated pages (not offered).
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    /// A statistics queue exists.
    pub const STATS_VQ: u64 = 1 << 1;
    /// The guest deflates the balloon when it runs out of memory.
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    /// Free page reporting through a reporting queue.
    pub const REPORTING: u64 = 1 << 5;
}

/// Statistics tags (`VIRTIO_BALLOON_S_*`), in the order of [`BalloonStats`]' fields.
pub const STAT_TAGS: usize = 10;

/// The latest statistics the guest reported (bytes, except the counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Each tag's value, indexed by tag number (`VIRTIO_BALLOON_S_SWAP_IN` = 0 ...
    /// `VIRTIO_BALLOON_S_HTLB_PGFAIL` = 9); `None` if never reported.
    pub values: [Option<u64>; STAT_TAGS],
    /// How many statistics buffers have been read.
    pub updates: u64,
}

impl BalloonStats {
    /// Names of the tags, as Firecracker's API reports them.
    pub const NAMES: [&'static str; STAT_TAGS] = [
        "swap_in",
        "swap_out",
        "major_faults",
        "minor_faults",
        "free_memory",
        "total_memory",
        "available_memory",
        "disk_caches",
        "hugetlb_allocations",
        "hugetlb_failures",
    ];

    /// The value of the tag called `name`.
    pub fn get(&self, name: &str) -> Option<u64> {
        let i = Self::NAMES.iter().position(|n| *n == name)?;
        self.values[i]
    }
}

/// Configuration of a [`Balloon`].
#[derive(Debug, Clone)]
pub struct BalloonConfig {
    /// Initial target size of the balloon, in 4 KiB pages.
    pub target_pages: u32,
    /// Offer `DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offer the statistics queue and ask for new statistics this often (`None`: no queue).
    pub stats_interval: Option<Duration>,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// Size of each queue.
    pub queue_size: u16,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            target_pages: 0,
            deflate_on_oom: false,
            stats_interval: None,
            free_page_reporting: false,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

struct Active<M> {
    mem: M,
    queues: Vec<Queue>,
    roles: Vec<Role>,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The stats buffer the driver gave us, held until we want fresh numbers.
    stats_head: Option<u16>,
    stats_due: Instant,
}

/// The balloon's own part of a snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedBalloon {
    target_pages: u32,
    actual_pages: u32,
    inflated_pages: u64,
    reported_pages: u64,
    stats_head: Option<u16>,
}

/// A virtio memory balloon.
pub struct Balloon<M> {
    features: u64,
    acked: u64,
    queue_sizes: Vec<u16>,
    target_pages: u32,
    actual_pages: u32,
    stats_interval: Option<Duration>,
    stats: BalloonStats,
    /// Pages given back through the inflate queue and free page reports (counters).
    inflated_pages: u64,
    reported_pages: u64,
    active: Option<Active<M>>,
}

impl<M> std::fmt::Debug for Balloon<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("target_pages", &self.target_pages)
            .field("actual_pages", &self.actual_pages)
            .field("active", &self.active.is_some())
            .finish()
    }
}

static DISCARD_WARN: RateLimitedWarn = RateLimitedWarn::new();

impl<M> Balloon<M> {
    /// A balloon as configured.
    pub fn new(cfg: BalloonConfig) -> Result<Self> {
        check_queue_size(DEVICE, cfg.queue_size)?;
        let mut features = VIRTIO_F_VERSION_1;
        let mut queues = 2;
        if cfg.deflate_on_oom {
            features |= features::DEFLATE_ON_OOM;
        }
        if cfg.stats_interval.is_some() {
            features |= features::STATS_VQ;
            queues += 1;
        }
        if cfg.free_page_reporting {
            features |= features::REPORTING;
            queues += 1;
        }
        Ok(Balloon {
            features,
            acked: 0,
            queue_sizes: vec![cfg.queue_size; queues],
            target_pages: cfg.target_pages,
            actual_pages: 0,
            stats_interval: cfg.stats_interval.map(|d| d.max(Duration::from_millis(1))),
            stats: BalloonStats::default(),
            inflated_pages: 0,
            reported_pages: 0,
            active: None,
        })
    }

    /// The target size in pages (what the device asks the guest to hold).
    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    /// The size the guest says the balloon has (its `actual` config field).
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    /// Pages returned to the host through inflation, and through free page reporting.
    pub fn returned_pages(&self) -> (u64, u64) {
        (self.inflated_pages, self.reported_pages)
    }

    /// The latest statistics.
    pub fn stats(&self) -> BalloonStats {
        self.stats
    }

    /// Sets a new target and tells the driver (configuration change interrupt).
    pub fn set_target(&mut self, pages: u32) -> Result<()> {
        self.target_pages = pages;
        if let Some(a) = &self.active {
            a.interrupt
                .trigger(InterruptKind::Config)
                .map_err(|source| Error::Interrupt {
                    device: DEVICE,
                    what: "config change",
                    source,
                })?;
        }
        Ok(())
    }

    fn config_space(&self) -> [u8; 16] {
        let mut cs = [0u8; 16];
        cs[0..4].copy_from_slice(&self.target_pages.to_le_bytes());
        cs[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        cs
    }
}

/// Drops `[gpa, gpa + len)` (page aligned, inside one region or not at all) from the host
/// mapping. Returns false (after a rate-limited warning) if the range isn't guest RAM or the
/// host refused.
fn discard<M: GuestMemory>(mem: &M, gpa: u64, len: u64) -> bool {
    let bad = |why: &str| {
        DISCARD_WARN.warn(format_args!(
            "virtio-balloon: can't return [{gpa:#x}, +{len:#x}) to the host: {why}"
        ));
        false
    };
    let Some(phys) = mem.physical_memory() else {
        return bad("guest memory has no direct host mapping");
    };
    let Some(region) = phys.find_region(GuestAddress(gpa)) else {
        return bad("not guest RAM");
    };
    let Some(offset) = GuestAddress(gpa).checked_offset_from(region.start_addr()) else {
        return bad("not guest RAM");
    };
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return bad("crosses the end of a memory region");
    }
    let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(offset)) else {
        return bad("no host mapping");
    };
    let advice = if region.file_offset().is_some() {
        // Shared or file-backed: MADV_DONTNEED would only drop this mapping's view; punch
        // the hole in the backing memory instead.
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    let Ok(len_usize) = usize::try_from(len) else {
        return bad("too long");
    };
    // SAFETY: [host, host + len) lies inside the region's mapping (checked above) and is
    // page aligned; dropping its contents is what the guest asked for, and no Rust reference
    // into guest memory is held across this call (guest memory is only accessed through
    // volatile copies).
    if unsafe { libc::madvise(host.cast(), len_usize, advice) } != 0 {
        return bad(&std::io::Error::last_os_error().to_string());
    }
    true
}

/// Discards a list of 4 KiB guest frames, merging runs of consecutive frames into one call.
fn discard_pfns<M: GuestMemory>(mem: &M, pfns: impl Iterator<Item = u32>) -> u64 {
    let mut done = 0u64;
    let mut run: Option<(u64, u64)> = None; // (first pfn, count)
    let mut flush = |run: Option<(u64, u64)>| {
        if let Some((first, count)) = run {
            if discard(mem, first * PAGE_SIZE, count * PAGE_SIZE) {
                done += count;
            }
        }
    };
    for pfn in pfns.map(u64::from) {
        run = match run {
            Some((first, count)) if first + count == pfn => Some((first, count + 1)),
            other => {
                flush(other);
                Some((pfn, 1))
            }
        };
    }
    flush(run);
    done
}

/// An inflate chain: device-readable buffers of little-endian u32 frame numbers.
fn inflate_chain<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>) -> u64 {
    let mut pages = 0;
    for d in chain.filter(|d| !d.is_write_only()) {
        let n = u64::from((d.len() / 4).min(MAX_PFNS_PER_DESCRIPTOR));
        let addr = d.addr();
        let pfns = (0..n).map_while(|i| {
            let a = addr.checked_add(i * 4)?;
            mem.read_obj::<u32>(a).ok().map(u32::from_le)
        });
        pages += discard_pfns(mem, pfns);
    }
    pages
}

/// A free page report: each descriptor is a free range (address, length). Linux adds them
/// device-writable (`virtqueue_add_inbuf`), as QEMU expects; either direction is taken.
fn report_chain<M: GuestMemory>(chain: DescriptorChain<&M>, mem: &M) -> u64 {
    let mut pages = 0;
    for d in chain {
        let start = d.addr().0.next_multiple_of(PAGE_SIZE);
        let end = d.addr().0.saturating_add(u64::from(d.len())) & !(PAGE_SIZE - 1);
        if end > start && discard(mem, start, end - start) {
            pages += (end - start) / PAGE_SIZE;
        }
    }
    pages
}

impl<M: GuestMemory + Send> Balloon<M> {
    /// The statistics queue: read the buffer the driver gave us, keep it until the next
    /// interval, then hand it back so the driver fills in fresh numbers.
    fn process_stats(&mut self, index: usize) -> Result<QueueOutcome> {
        let interval = self.stats_interval.unwrap_or(Duration::from_secs(1));
        let Some(a) = self.active.as_mut() else {
            return Err(Error::NotActivated { device: DEVICE });
        };
        let qerr = |source| Error::Queue {
            device: DEVICE,
            queue: index,
            source,
        };
        let now = Instant::now();
        if let Some(head) = a.stats_head {
            if now < a.stats_due {
                return Ok(QueueOutcome::Throttled(a.stats_due - now));
            }
            // Give the buffer back: the driver refills it and kicks us.
            a.stats_head = None;
            let q = &mut a.queues[index];
            q.add_used(&a.mem, head, 0).map_err(qerr)?;
            if q.needs_notification(&a.mem).map_err(qerr)? {
                a.interrupt
                    .trigger(InterruptKind::Queue(index as u16))
                    .map_err(|source| Error::Interrupt {
                        device: DEVICE,
                        what: "used buffer",
                        source,
                    })?;
            }
            return Ok(QueueOutcome::Done);
        }
        let q = &mut a.queues[index];
        if !q.ready() {
            return Ok(QueueOutcome::Done);
        }
        let next = q.iter(&a.mem).map_err(qerr)?.next();
        let Some(chain) = next else {
            return Ok(QueueOutcome::Done);
        };
        let head = chain.head_index();
        let mem = &a.mem;
        for d in chain.filter(|d| !d.is_write_only()) {
            // Packed { le16 tag; le64 val; } entries.
            for i in 0..u64::from(d.len() / 10) {
                let Some(at) = d.addr().checked_add(i * 10) else {
                    break;
                };
                let (Ok(tag), Some(Ok(val))) = (
                    mem.read_obj::<u16>(at),
                    at.checked_add(2).map(|v| mem.read_obj::<u64>(v)),
                ) else {
                    break;
                };
                if let Some(slot) = self.stats.values.get_mut(usize::from(u16::from_le(tag))) {
                    *slot = Some(u64::from_le(val));
                }
            }
        }
        self.stats.updates += 1;
        a.stats_head = Some(head);
        a.stats_due = now + interval;
        Ok(QueueOutcome::Throttled(interval))
    }
}

impl<M: GuestMemory + Send> VirtioDevice<M> for Balloon<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is the driver's to write.
        if offset == 4 {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.actual_pages = u32::from_le_bytes(b);
            }
        }
    }

    fn activate(
        &mut self,
        mem: M,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<()> {
        if queues.len() != self.queue_sizes.len() {
            return Err(Error::QueueCount {
                device: DEVICE,
                expected: self.queue_sizes.len(),
                got: queues.len(),
            });
        }
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if self.acked & features::STATS_VQ != 0 {
            roles.push(Role::Stats);
        }
        if self.acked & features::REPORTING != 0 {
            roles.push(Role::Reporting);
        }
        self.active = Some(Active {
            mem,
            queues,
            roles,
            interrupt,
            stats_head: None,
            stats_due: Instant::now(),
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.actual_pages = 0;
    }

    fn save_state(&self) -> Result<crate::DeviceState> {
        let saved = SavedBalloon {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            inflated_pages: self.inflated_pages,
            reported_pages: self.reported_pages,
            stats_head: self.active.as_ref().and_then(|a| a.stats_head),
        };
        let data = postcard::to_stdvec(&saved).map_err(|e| Error::BadState {
            device: DEVICE.into(),
            why: e.to_string(),
        })?;
        Ok(crate::DeviceState {
            queues: crate::positions(self.active.iter().flat_map(|a| a.queues.iter())),
            data,
        })
    }

    fn restore_state(&mut self, data: &[u8]) -> Result<()> {
        let saved: SavedBalloon = postcard::from_bytes(data).map_err(|e| Error::BadState {
            device: DEVICE.into(),
            why: e.to_string(),
        })?;
        self.target_pages = saved.target_pages;
        self.actual_pages = saved.actual_pages;
        self.inflated_pages = saved.inflated_pages;
        self.reported_pages = saved.reported_pages;
        if let Some(a) = self.active.as_mut() {
            // The statistics buffer the driver handed over (already past next_avail) is
            // still ours to return; without it the driver would never send stats again.
            a.stats_head = saved.stats_head;
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<QueueOutcome> {
        let Some(a) = self.active.as_mut() else {
            return Err(Error::NotActivated { device: DEVICE });
        };
        let Some(&role) = a.roles.get(index) else {
            // A queue the accepted features don't define: nothing to do with it.
            return Ok(QueueOutcome::Done);
        };
        match role {
            Role::Stats => self.process_stats(index),
            Role::Inflate | Role::Deflate | Role::Reporting => {
                let mem = &a.mem;
                let mut pages = 0u64;
                let r = drain(
                    DEVICE,
                    index,
                    &mut a.queues[index],
                    mem,
                    &a.interrupt,
                    |c| {
                        match role {
                            Role::Inflate => pages += inflate_chain(mem, c),
                            Role::Reporting => pages += report_chain(c, mem),
                            // Deflated pages fault back in on their own.
                            _ => {}
                        }
                        Ok(ChainDone::Used(0))
                    },
                );
                match role {
                    Role::Inflate => self.inflated_pages += pages,
                    Role::Reporting => self.reported_pages += pages,
                    _ => {}
                }
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    fn balloon(stats: bool, reporting: bool) -> Balloon<Mem> {
        Balloon::new(BalloonConfig {
            target_pages: 16,
            deflate_on_oom: true,
            stats_interval: stats.then_some(Duration::from_millis(20)),
            free_page_reporting: reporting,
            queue_size: QS,
        })
        .unwrap()
    }

    /// `n` queues, all idle (not ready) except number `live`, on the test driver's rings.
    fn queues(n: usize, live: usize, drv: &Driver) -> Vec<Queue> {
        (0..n)
            .map(|i| {
                if i == live {
                    drv.queue()
                } else {
                    Queue::new(QS).unwrap()
                }
            })
            .collect()
    }

    #[test]
    fn features_and_queue_count_follow_the_config() {
        let b = balloon(false, false);
        assert_eq!(b.queue_max_sizes().len(), 2);
        assert_eq!(
            b.device_features(),
            VIRTIO_F_VERSION_1 | features::DEFLATE_ON_OOM
        );
        let b = balloon(true, true);
        assert_eq!(b.queue_max_sizes().len(), 4);
        assert_ne!(b.device_features() & features::STATS_VQ, 0);
        assert_ne!(b.device_features() & features::REPORTING, 0);
        assert_eq!(b.device_features() & features::MUST_TELL_HOST, 0);
    }

    #[test]
    fn config_space_target_and_actual() {
        let mut b = balloon(false, false);
        let mut buf = [0u8; 8];
        b.read_config(0, &mut buf);
        assert_eq!(u32::from_le_bytes(buf[0..4].try_into().unwrap()), 16);
        b.write_config(4, &7u32.to_le_bytes());
        b.write_config(0, &99u32.to_le_bytes()); // num_pages is the device's: ignored
        b.write_config(4, &[1, 2]); // short write: ignored
        b.read_config(0, &mut buf);
        assert_eq!(u32::from_le_bytes(buf[0..4].try_into().unwrap()), 16);
        assert_eq!(b.actual_pages(), 7);
        let mut past = [0xffu8; 4];
        b.read_config(100, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn inflate_zeroes_the_pages_and_counts_them() {
        let mem = mem();
        let mut drv = Driver::default();
        let mut b = balloon(false, false);
        b.ack_features(VIRTIO_F_VERSION_1);
        let irq = CountingInterrupt::new();
        b.activate(mem.clone(), queues(2, 0, &drv), irq.clone())
            .unwrap();
        // Fill three pages at 0x80000.. with data, then give them (plus one frame outside
        // guest memory) to the balloon.
        let page = 0x80000u64;
        for i in 0..3 {
            mem.write_obj(0xdead_beef_u64, GuestAddress(page + i * PAGE_SIZE))
                .unwrap();
        }
        let pfns: Vec<u8> = [0x80u32, 0x81, 0x82, 0xF_FFFF]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        mem.write_slice(&pfns, GuestAddress(DATA)).unwrap();
        drv.add(&mem, &[(DATA, pfns.len() as u32, false)]);
        assert_eq!(b.process_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(Driver::used_idx(&mem), 1);
        assert_eq!(irq.queue_count(), 1);
        for i in 0..3 {
            assert_eq!(
                mem.read_obj::<u64>(GuestAddress(page + i * PAGE_SIZE))
                    .unwrap(),
                0,
                "page {i} still has its data"
            );
        }
        assert_eq!(b.returned_pages(), (3, 0));
    }

    #[test]
    fn stats_are_read_held_and_returned_on_the_interval() {
        let mem = mem();
        let mut drv = Driver::default();
        let mut b = balloon(true, false);
        b.ack_features(VIRTIO_F_VERSION_1 | features::STATS_VQ);
        let irq = CountingInterrupt::new();
        // Stats is queue 2: give it the driver's rings, the other two are idle.
        b.activate(mem.clone(), queues(3, 2, &drv), irq.clone())
            .unwrap();
        let mut buf = Vec::new();
        for (tag, val) in [(4u16, 1000u64), (5, 5000), (99, 1)] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&val.to_le_bytes());
        }
        mem.write_slice(&buf, GuestAddress(DATA)).unwrap();
        drv.add(&mem, &[(DATA, buf.len() as u32, false)]);
        let QueueOutcome::Throttled(wait) = b.process_queue(2).unwrap() else {
            panic!("the stats buffer must be held for the interval");
        };
        assert_eq!(b.stats().get("free_memory"), Some(1000));
        assert_eq!(b.stats().get("total_memory"), Some(5000));
        assert_eq!(b.stats().get("swap_in"), None);
        assert_eq!(b.stats().updates, 1);
        assert_eq!(Driver::used_idx(&mem), 0);
        std::thread::sleep(wait);
        assert_eq!(b.process_queue(2).unwrap(), QueueOutcome::Done);
        assert_eq!(
            Driver::used_idx(&mem),
            1,
            "buffer handed back for new numbers"
        );
        assert_eq!(irq.queue_count(), 1);
    }

    #[test]
    fn free_page_reports_discard_whole_pages_only() {
        let mem = mem();
        let mut drv = Driver::default();
        let mut b = balloon(false, true);
        // Without STATS_VQ the reporting queue is number 2.
        b.ack_features(VIRTIO_F_VERSION_1 | features::REPORTING);
        let irq = CountingInterrupt::new();
        b.activate(mem.clone(), queues(3, 2, &drv), irq).unwrap();
        let start = 0x40000u64;
        for i in 0..4 {
            mem.write_obj(0x1234u64, GuestAddress(start + i * PAGE_SIZE))
                .unwrap();
        }
        // A range starting mid-page, device-writable as Linux sends it: only the two whole
        // pages inside it go.
        drv.add(&mem, &[(start + 0x800, 3 * PAGE_SIZE as u32, true)]);
        b.process_queue(2).unwrap();
        let word = |i: u64| {
            mem.read_obj::<u64>(GuestAddress(start + i * PAGE_SIZE))
                .unwrap()
        };
        assert_eq!([word(0), word(1), word(2), word(3)], [0x1234, 0, 0, 0x1234]);
        assert_eq!(b.returned_pages(), (0, 2));
        // A device-readable range is taken too.
        drv.add(&mem, &[(start + 3 * PAGE_SIZE, PAGE_SIZE as u32, false)]);
        b.process_queue(2).unwrap();
        assert_eq!(word(3), 0);
        assert_eq!(b.returned_pages(), (0, 3));
        // A queue the accepted features don't define is ignored.
        assert_eq!(b.process_queue(3).unwrap(), QueueOutcome::Done);
    }

    #[test]
    fn set_target_raises_a_config_interrupt_once_active() {
        let mut b = balloon(false, false);
        b.set_target(32).unwrap(); // not active: just stored
        let irq = CountingInterrupt::new();
        b.activate(mem(), queues(2, 0, &Driver::default()), irq.clone())
            .unwrap();
        b.set_target(64).unwrap();
        assert_eq!(b.target_pages(), 64);
        assert_eq!(irq.config.load(std::sync::atomic::Ordering::Relaxed), 1);
        b.reset();
        assert!(b.process_queue(0).is_err());
    }
}
