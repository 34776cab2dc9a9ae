//! The `bench-exits` scenario: for each kind of VM exit, `kiln.bench.n` timed round trips
//! after `kiln.bench.warmup` untimed ones, timed with the TSC and converted to ns with
//! kvmclock's scale, into a histogram printed in the `hist` wire format. Around each timed
//! run the guest marks begin and end on kiln's bench device, so the VMM measures its vCPU
//! thread's CPU time (read back and printed as `host_user_us`/`host_sys_us`; all-ones where
//! the device doesn't exist).
//!
//! Tokens: `kiln.bench.kinds=a,b,...` (default: all), `kiln.bench.n`, `kiln.bench.warmup`,
//! `kiln.cpus` (the `ipi` kind needs a second vCPU).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use kiln_testguest::apic::{LAPIC_EOI, LAPIC_ICR_HIGH, LAPIC_ICR_LOW, LAPIC_LVT_TIMER};
use kiln_testguest::hist::Histogram;
use kiln_testguest::line::LineBuf;
use kiln_testguest::pvclock::{ns_at, TimeInfo};

use crate::smp::rdtsc;
use crate::{clock, io, irq, Ctx};

/// Vectors: the TSC-deadline timer, the IPI, the irqfd injection.
const VEC_TIMER: u8 = 0x60;
const VEC_IPI: u8 = 0x61;
const VEC_IRQFD: u8 = 0x62;
/// The vectors `irq` routes to [`isr`].
pub const VECTORS: [u8; 3] = [VEC_TIMER, VEC_IPI, VEC_IRQFD];

/// kiln's bench device (kiln-legacy `BenchDevice`) and exit-test windows.
const BENCH_PORT: u16 = 0x708;
const EXIT_PORT: u16 = 0x700;
const EXIT_MMIO: u64 = 0xC000_0000;
const IOEVENTFD_MMIO: u64 = 0xC000_0800;
const BENCH_MSR: u32 = 0x4b49_4c4e;
const BENCH_IRQ_GSI: u8 = 12;
const MARK_END: u32 = 1 << 31;
const IA32_APIC_BASE: u32 = 0x1b;
const IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Every kind, in the order they run.
const KINDS: [&str; 12] = [
    "pio-out",
    "pio-in",
    "mmio-out",
    "mmio-in",
    "mmio-ioeventfd",
    "serial-scr",
    "cpuid",
    "rdmsr",
    "msr-user",
    "hlt-timer",
    "ipi",
    "irqfd",
];

const DEFAULT_N: u64 = 10_000;
const MAX_N: u64 = 10_000_000;
/// How long a kind that waits for an interrupt may take, in TSC cycles (generous: seconds).
const WAIT_CYCLES: u64 = 5_000_000_000;

static mut HIST: Histogram = Histogram::new();

/// The histogram of the kind being measured (one CPU records at a time: the BSP, or its
/// interrupt handlers while it waits).
fn hist() -> &'static mut Histogram {
    // SAFETY: only the BSP and its own interrupt handlers touch HIST, never at the same time
    // as each other in a way that matters (handlers record while the BSP halts).
    unsafe { &mut *core::ptr::addr_of_mut!(HIST) }
}

/// TSC-to-ns scale from kvmclock.
static SCALE_MUL: AtomicU32 = AtomicU32::new(0);
static SCALE_SHIFT: AtomicU32 = AtomicU32::new(0);

fn to_ns(cycles: u64) -> u64 {
    let t = TimeInfo {
        tsc_timestamp: 0,
        system_time: 0,
        tsc_to_system_mul: SCALE_MUL.load(Ordering::Relaxed),
        tsc_shift: SCALE_SHIFT.load(Ordering::Relaxed) as i8,
    };
    ns_at(&t, cycles)
}

/// TSC cycles in `ns` nanoseconds (inverse of [`to_ns`], for timer deadlines).
fn cycles_in(ns: u64) -> u64 {
    let mul = u64::from(SCALE_MUL.load(Ordering::Relaxed)).max(1);
    let shift = SCALE_SHIFT.load(Ordering::Relaxed) as i8;
    let c = (u128::from(ns) << 32) / u128::from(mul);
    let c = if shift >= 0 {
        c >> shift
    } else {
        c << (-shift)
    };
    c as u64
}

/// `rdtsc` after earlier instructions completed, so a timestamp can't float into the timed
/// operation.
#[inline(always)]
fn tsc() -> u64 {
    // SAFETY: lfence and rdtsc have no side effects.
    unsafe {
        core::arch::asm!("lfence", options(nostack, preserves_flags));
        core::arch::x86_64::_rdtsc()
    }
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an MSR; callers only read ones that exist or are probed with GP_SKIP.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
            options(nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: writes the TSC-deadline MSR only (checked present through CPUID first).
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
            options(nostack, preserves_flags));
    }
}

/// Mark for kind `id` on kiln's bench device (a PIO exit, outside the timed loop).
fn mark(id: u32, end: bool) {
    io::outl(BENCH_PORT, id | if end { MARK_END } else { 0 });
}

/// Runs `warmup` then `n` timed calls of `op`, each bracketed by TSC reads.
fn timed(id: u32, n: u64, warmup: u64, mut op: impl FnMut()) {
    for _ in 0..warmup {
        op();
    }
    mark(id, false);
    for _ in 0..n {
        let t0 = tsc();
        op();
        let t1 = tsc();
        hist().record(to_ns(t1.wrapping_sub(t0)));
    }
    mark(id, true);
}

// ----- interrupt-driven kinds -----

static TIMER_AT: AtomicU64 = AtomicU64::new(0);
static IPI_AT: AtomicU64 = AtomicU64::new(0);
static IPI_ACK: AtomicU32 = AtomicU32::new(0);
/// irqfd slot: host kvmclock stamp at +0, guest acknowledgements at +8 (kiln-legacy
/// `IrqInjector` protocol).
#[repr(C, align(16))]
struct Slot {
    stamp: AtomicU64,
    ack: AtomicU64,
}
static SLOT: Slot = Slot {
    stamp: AtomicU64::new(0),
    ack: AtomicU64::new(0),
};
/// irqfd injections to leave out of the histogram (warm-up).
static IRQFD_SKIP: AtomicU64 = AtomicU64::new(0);

/// Interrupt handler for [`VECTORS`] (from `irq`'s dispatcher, which sends the EOI).
pub fn isr(vector: u8) {
    let now = tsc();
    match vector {
        VEC_TIMER => TIMER_AT.store(now, Ordering::SeqCst),
        VEC_IPI => {
            IPI_AT.store(now, Ordering::SeqCst);
            IPI_ACK.fetch_add(1, Ordering::SeqCst);
        }
        VEC_IRQFD => {
            let t = clock::now(0);
            let done = SLOT.ack.load(Ordering::SeqCst);
            if done >= IRQFD_SKIP.load(Ordering::SeqCst) {
                hist().record(t.saturating_sub(SLOT.stamp.load(Ordering::SeqCst)));
            }
            SLOT.ack.store(done + 1, Ordering::SeqCst);
        }
        _ => {}
    }
}

/// The AP side of the `ipi` kind (from `smp::ap_main`): take interrupts in `hlt` forever;
/// the next INIT ends it.
pub fn ap_ipi_task() {
    irq::init_ap();
    IPI_ACK.fetch_add(1, Ordering::SeqCst); // "ready"
    loop {
        // SAFETY: the IDT is loaded; sti;hlt waits for the next interrupt.
        unsafe { core::arch::asm!("sti; hlt", options(nomem, nostack)) };
    }
}

fn halt_until(cond: impl Fn() -> bool) -> bool {
    let start = rdtsc();
    while !cond() {
        if rdtsc().wrapping_sub(start) > WAIT_CYCLES {
            return false;
        }
        // SAFETY: interrupts are routed to handlers in the loaded IDT.
        unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
    }
    true
}

fn spin_until(cond: impl Fn() -> bool) -> bool {
    let start = rdtsc();
    while !cond() {
        if rdtsc().wrapping_sub(start) > WAIT_CYCLES {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn hlt_timer(id: u32, n: u64, warmup: u64) -> Result<(), &'static str> {
    if crate::cpuid(1, 0).ecx & (1 << 24) == 0 {
        return Err("no TSC-deadline timer (CPUID.1:ECX[24])");
    }
    // TSC-deadline mode.
    io::mmio_write32(LAPIC_LVT_TIMER, (0b10 << 17) | u32::from(VEC_TIMER));
    let delay = cycles_in(20_000);
    let run = |record: bool| -> Result<(), &'static str> {
        TIMER_AT.store(0, Ordering::SeqCst);
        let deadline = tsc() + delay;
        wrmsr(IA32_TSC_DEADLINE, deadline);
        if !halt_until(|| TIMER_AT.load(Ordering::SeqCst) != 0) {
            return Err("the timer never fired");
        }
        if record {
            let at = TIMER_AT.load(Ordering::SeqCst);
            hist().record(to_ns(at.saturating_sub(deadline)));
        }
        Ok(())
    };
    for _ in 0..warmup {
        run(false)?;
    }
    mark(id, false);
    for _ in 0..n {
        run(true)?;
    }
    mark(id, true);
    io::mmio_write32(LAPIC_LVT_TIMER, 1 << 16);
    Ok(())
}

fn ipi(ctx: &Ctx<'_>, id: u32, n: u64, warmup: u64) -> Result<(), &'static str> {
    let cpus = ctx
        .info
        .cmdline
        .get_u64("kiln.cpus")
        .ok()
        .flatten()
        .unwrap_or(1);
    if cpus < 2 {
        return Err("needs a second vCPU (kiln.cpus >= 2)");
    }
    IPI_ACK.store(0, Ordering::SeqCst);
    if !crate::smp::start_ap(1, crate::smp::TASK_BENCH_IPI, 10_000_000_000)
        || !spin_until(|| IPI_ACK.load(Ordering::SeqCst) >= 1)
    {
        return Err("AP 1 did not start");
    }
    let send = |record: bool| -> Result<(), &'static str> {
        let before = IPI_ACK.load(Ordering::SeqCst);
        io::mmio_write32(LAPIC_ICR_HIGH, 1 << 24);
        let t = tsc();
        io::mmio_write32(LAPIC_ICR_LOW, u32::from(VEC_IPI));
        if !spin_until(|| IPI_ACK.load(Ordering::SeqCst) != before) {
            return Err("AP 1 stopped answering IPIs");
        }
        if record {
            hist().record(to_ns(IPI_AT.load(Ordering::SeqCst).saturating_sub(t)));
        }
        Ok(())
    };
    for _ in 0..warmup {
        send(false)?;
    }
    mark(id, false);
    for _ in 0..n {
        send(true)?;
    }
    mark(id, true);
    Ok(())
}

fn irqfd(id: u32, n: u64, warmup: u64) -> Result<(), &'static str> {
    let total = n + warmup;
    let Ok(total32) = u32::try_from(total) else {
        return Err("kiln.bench.n too large for irqfd");
    };
    SLOT.stamp.store(0, Ordering::SeqCst);
    SLOT.ack.store(0, Ordering::SeqCst);
    IRQFD_SKIP.store(warmup, Ordering::SeqCst);
    irq::ioapic_write_at(
        kiln_testguest::apic::IOAPIC_BASE,
        kiln_testguest::apic::ioredtbl_index(BENCH_IRQ_GSI) + 1,
        kiln_testguest::apic::ioredtbl_high(0),
    );
    irq::ioapic_write_at(
        kiln_testguest::apic::IOAPIC_BASE,
        kiln_testguest::apic::ioredtbl_index(BENCH_IRQ_GSI),
        kiln_testguest::apic::ioredtbl_low(VEC_IRQFD, false),
    );
    let slot = &SLOT as *const Slot as u64;
    io::outl(BENCH_PORT + 4, slot as u32);
    mark(id, false);
    io::outl(BENCH_PORT + 8, total32);
    // Progress, not the whole series, is bounded: the series takes as long as the host's
    // pacing makes it.
    let mut ok = true;
    loop {
        let before = SLOT.ack.load(Ordering::SeqCst);
        if before >= total {
            break;
        }
        if !halt_until(|| SLOT.ack.load(Ordering::SeqCst) != before) {
            ok = false;
            break;
        }
    }
    mark(id, true);
    irq::ioapic_write_at(
        kiln_testguest::apic::IOAPIC_BASE,
        kiln_testguest::apic::ioredtbl_index(BENCH_IRQ_GSI),
        kiln_testguest::apic::ioredtbl_low(VEC_IRQFD, true),
    );
    if SLOT.ack.load(Ordering::SeqCst) == 0 {
        return Err("no irqfd injector (run kiln with --exit-bench)");
    }
    if !ok {
        return Err("the injector stopped before the end");
    }
    Ok(())
}

fn msr_user(id: u32, n: u64, warmup: u64) -> Result<(), &'static str> {
    // Probe once: #GP means the VMM doesn't answer it; 0 twice means something in the
    // kernel does (kvm.ignore_msrs), so no exit reaches user space.
    irq::GP_HIT.store(0, Ordering::SeqCst);
    irq::GP_SKIP.store(2, Ordering::SeqCst); // rdmsr is 2 bytes
    let a = rdmsr(BENCH_MSR);
    irq::GP_SKIP.store(0, Ordering::SeqCst);
    if irq::GP_HIT.load(Ordering::SeqCst) != 0 {
        return Err("the VMM does not forward unknown MSRs (#GP)");
    }
    let b = rdmsr(BENCH_MSR);
    if a == 0 && b == 0 {
        return Err("the MSR is answered in the kernel (kvm.ignore_msrs?)");
    }
    timed(id, n, warmup, || {
        core::hint::black_box(rdmsr(BENCH_MSR));
    });
    Ok(())
}

fn measure(ctx: &Ctx<'_>, kind: &str, id: u32, n: u64, warmup: u64) -> Result<(), &'static str> {
    match kind {
        "pio-out" => timed(id, n, warmup, || io::outl(EXIT_PORT, 0)),
        "pio-in" => timed(id, n, warmup, || {
            core::hint::black_box(io::inl(EXIT_PORT));
        }),
        "mmio-out" => timed(id, n, warmup, || io::mmio_write32(EXIT_MMIO, 0)),
        "mmio-in" => timed(id, n, warmup, || {
            core::hint::black_box(io::mmio_read32(EXIT_MMIO));
        }),
        "mmio-ioeventfd" => timed(id, n, warmup, || io::mmio_write32(IOEVENTFD_MMIO, 0)),
        "serial-scr" => timed(id, n, warmup, || io::outb(0x3ff, 0x5a)),
        "cpuid" => timed(id, n, warmup, || {
            core::hint::black_box(crate::cpuid(0, 0));
        }),
        "rdmsr" => timed(id, n, warmup, || {
            core::hint::black_box(rdmsr(IA32_APIC_BASE));
        }),
        "msr-user" => msr_user(id, n, warmup)?,
        "hlt-timer" => hlt_timer(id, n, warmup)?,
        "ipi" => ipi(ctx, id, n, warmup)?,
        "irqfd" => irqfd(id, n, warmup)?,
        _ => return Err("unknown kind"),
    }
    Ok(())
}

fn report(kind: &str) {
    let h = hist();
    h.emit_buckets(kind, 12, |l| io::serial_line(l.as_bytes()));
    let mut line = LineBuf::new();
    h.summary_line(kind, &mut line);
    line.push_str(" host_user_us=");
    line.push_dec(u64::from(io::inl(BENCH_PORT)));
    line.push_str(" host_sys_us=");
    line.push_dec(u64::from(io::inl(BENCH_PORT + 4)));
    line.push_str(" host_vmm_ns=");
    line.push_dec(u64::from(io::inl(BENCH_PORT + 12)));
    line.push_str(" host_vmm_typ_cns=");
    line.push_dec(u64::from(io::inl(BENCH_PORT + 16)));
    io::serial_line(line.as_bytes());
}

fn skipped(kind: &str, why: &str) {
    let mut line = LineBuf::new();
    line.push_str("KBENCH exits kind=");
    line.push_str(kind);
    line.push_str(" skipped=");
    line.push_str(why);
    io::serial_line(line.as_bytes());
}

/// Runs `bench-exits`.
pub fn run(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let c = &ctx.info.cmdline;
    let num = |key: &'static str, default: u64| c.get_u64(key).ok().flatten().unwrap_or(default);
    let n = num("kiln.bench.n", DEFAULT_N).clamp(1, MAX_N);
    let warmup = num("kiln.bench.warmup", n / 10).min(MAX_N);
    let features = if crate::cpuid(0x4000_0000, 0).eax >= 0x4000_0001 {
        crate::cpuid(0x4000_0001, 0).eax
    } else {
        0
    };
    if !clock::enable(0, features) {
        out.push_str("no kvmclock to convert TSC cycles to ns");
        return false;
    }
    let scale = clock::scale(0);
    SCALE_MUL.store(scale.tsc_to_system_mul, Ordering::Relaxed);
    SCALE_SHIFT.store(scale.tsc_shift as u32, Ordering::Relaxed);
    irq::init();
    let list = c.get("kiln.bench.kinds").unwrap_or(b"all");
    let mut ran = 0u64;
    let mut skips = 0u64;
    for (id, kind) in KINDS.iter().enumerate() {
        let wanted = list == b"all" || list.split(|&b| b == b',').any(|k| k == kind.as_bytes());
        if !wanted {
            continue;
        }
        // Lets a runner line two VMMs' runs up kind by kind (kiln-bench --interleave).
        let mut line = LineBuf::new();
        line.push_str("KBENCH begin kind=");
        line.push_str(kind);
        io::serial_line(line.as_bytes());
        hist().clear();
        match measure(ctx, kind, id as u32, n, warmup) {
            Ok(()) => {
                report(kind);
                ran += 1;
            }
            Err(why) => {
                skipped(kind, why);
                skips += 1;
            }
        }
    }
    // Unknown names in the list are an error, not a silent skip.
    for k in list.split(|&b| b == b',') {
        if k != b"all" && !KINDS.iter().any(|known| known.as_bytes() == k) {
            out.push_str("unknown kind '");
            out.push_escaped(k);
            out.push_str("'");
            return false;
        }
    }
    irq::disable();
    io::mmio_write32(LAPIC_EOI, 0);
    out.push_str("kinds=");
    out.push_dec(ran);
    out.push_str(" skipped=");
    out.push_dec(skips);
    out.push_str(" n=");
    out.push_dec(n);
    out.push_str(" warmup=");
    out.push_dec(warmup);
    ran > 0
}
