//! The `counter` scenario on the APs (`kiln.counter.aps=1`): each AP keeps dirtying and
//! checking its own area exactly as the BSP does its own (`kiln_testguest::virtio::counter`:
//! each pass checks the first and last u64 of every page against the previous pass's
//! `page_word` and writes its own), paced by its own kvmclock, until the BSP says stop. The
//! BSP folds the APs' counts into its lines.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kiln_testguest::virtio::counter::page_word;

use crate::clock;

const PAGE: u64 = 4096;

/// Start of AP 1's area; AP `i` starts `(i - 1) * PAGES` pages later.
static BASE: AtomicU64 = AtomicU64::new(0);
/// Pages per AP.
static PAGES: AtomicU64 = AtomicU64::new(0);
/// Pages per second per AP (0: unpaced).
static RATE: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);
/// Pages stepped over by all APs.
pub static STEPS: AtomicU64 = AtomicU64::new(0);
/// Mismatches found by all APs.
pub static ERRORS: AtomicU64 = AtomicU64::new(0);

/// Sets the APs' areas and rate and starts `aps` of them; returns how many checked in.
pub fn start(base: u64, pages: u64, rate_pages: u64, aps: u32) -> u32 {
    BASE.store(base, Ordering::SeqCst);
    PAGES.store(pages, Ordering::SeqCst);
    RATE.store(rate_pages, Ordering::SeqCst);
    STOP.store(false, Ordering::SeqCst);
    STEPS.store(0, Ordering::SeqCst);
    ERRORS.store(0, Ordering::SeqCst);
    crate::smp::start_aps_with(crate::smp::TASK_COUNTER, aps, 10_000_000_000)
}

/// Tells the APs to stop (they halt).
pub fn stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// AP side, from `smp::ap_main` with `TASK_COUNTER`.
pub fn ap_task(apic_id: u32) {
    let idx = apic_id as usize;
    let paced = clock::enable(idx, 0);
    let pages = PAGES.load(Ordering::SeqCst);
    let rate = RATE.load(Ordering::SeqCst);
    if apic_id == 0 || pages == 0 {
        return;
    }
    let start = BASE.load(Ordering::SeqCst) + u64::from(apic_id - 1) * pages * PAGE;
    let t0 = if paced { clock::now(idx) } else { 0 };
    let mut steps = 0u64;
    let mut pass = 1u64;
    let mut i = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        let due = if rate == 0 || !paced {
            u64::MAX
        } else {
            let el = u128::from(clock::now(idx).saturating_sub(t0));
            (u128::from(rate) * el / 1_000_000_000) as u64
        };
        let mut n = 0;
        while steps < due && n < 64 {
            let a = start + i * PAGE;
            let (first, last) = (a as usize as *mut u64, (a + PAGE - 8) as usize as *mut u64);
            // SAFETY: the BSP gave this AP `pages` pages of free RAM (checked against the
            // memory map by `FreeRam` in the scenario), identity-mapped below the MMIO hole,
            // above the image and the virtio driver's region; no other CPU touches them.
            unsafe {
                if pass > 1 {
                    let want = page_word(a, pass - 1);
                    if first.read_volatile() != want || last.read_volatile() != want {
                        ERRORS.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let w = page_word(a, pass);
                first.write_volatile(w);
                last.write_volatile(w);
            }
            i += 1;
            if i == pages {
                i = 0;
                pass += 1;
            }
            steps += 1;
            n += 1;
        }
        STEPS.fetch_add(n, Ordering::Relaxed);
        core::hint::spin_loop();
    }
}
