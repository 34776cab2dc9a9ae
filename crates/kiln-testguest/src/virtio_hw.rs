//! The machine side of the virtio scenarios: the [`Platform`] the driver logic in
//! `kiln_testguest::virtio` runs on (identity-mapped memory, MMIO registers, kvmclock, the
//! IOAPIC), the interrupt handler, and device discovery (DSDT, then the command line).

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use kiln_testguest::acpi::AcpiInfo;
use kiln_testguest::apic::{
    ioapic_entries, ioredtbl_high, ioredtbl_index, ioredtbl_low_mode, IOAPIC_BASE,
    IOAPIC_REG_VERSION,
};
use kiln_testguest::bootinfo::PhysMem;
use kiln_testguest::line::{InputLine, LineBuf};
use kiln_testguest::memmap::{MemMap, E820_RAM, MMIO_HOLE_START};
use kiln_testguest::virtio::discover::{self, DevList, MAX_DEVICES};
use kiln_testguest::virtio::transport::regs;
use kiln_testguest::virtio::{layout, Env, MmioDev, Platform};

use crate::{io, irq, Ctx, MEM};

/// First interrupt vector of the virtio devices (device slot i uses `VEC_BASE + i`).
pub const VEC_BASE: u8 = 0x50;
/// One past the last virtio vector.
pub const VEC_END: u8 = VEC_BASE + MAX_DEVICES as u8;

/// Register window of the device behind each vector (0: none).
static BASES: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];
/// Interrupts handled per slot.
static IRQS: [AtomicU32; MAX_DEVICES] = [const { AtomicU32::new(0) }; MAX_DEVICES];
/// The device list was printed once.
static LISTED: AtomicBool = AtomicBool::new(false);

/// Interrupt handler for slot `slot` (the dispatcher EOIs): acknowledge what the device
/// reports, as Linux's vm_interrupt does.
pub fn isr(slot: usize) {
    let Some(base) = BASES.get(slot).map(|b| b.load(Ordering::SeqCst)) else {
        return;
    };
    if base == 0 {
        return;
    }
    let st = io::mmio_read32(base + regs::INTERRUPT_STATUS);
    if st != 0 {
        io::mmio_write32(base + regs::INTERRUPT_ACK, st);
        IRQS[slot].fetch_add(1, Ordering::SeqCst);
    }
}

/// The guest as a [`Platform`].
pub struct Guest {
    devs: DevList,
    /// Driver memory is `[layout::START, limit)`: RAM, and clear of what the boot
    /// information still refers to (checked once here, so every access is one compare).
    limit: u64,
    kvmclock: bool,
    acpi: Option<AcpiInfo>,
    /// The memory map and the boot information's ranges, for [`Guest::page`].
    ram: MemMap,
    reserved: [(u64, u64); 2],
}

impl Guest {
    #[inline(always)]
    fn mem(&self, addr: u64, len: u64) -> usize {
        if addr < layout::START || addr.wrapping_add(len) > self.limit {
            crate::die(b"KTEST-PANIC virtio driver memory access outside its region");
        }
        addr as usize
    }

    /// Checks a `page_*` access: 8-byte aligned, at or above the driver's region, below the
    /// MMIO hole, inside one RAM entry and clear of the boot information's ranges.
    #[inline(always)]
    fn page(&self, addr: u64) -> usize {
        let end = addr.wrapping_add(8);
        let ok = addr % 8 == 0
            && addr >= layout::END
            && end <= MMIO_HOLE_START
            && self
                .reserved
                .iter()
                .all(|&(s, e)| s >= e || end <= s || e <= addr)
            && self
                .ram
                .as_slice()
                .iter()
                .any(|r| r.kind == E820_RAM && r.addr <= addr && end <= r.end());
        if !ok {
            crate::die(b"KTEST-PANIC virtio scenario page access outside free RAM");
        }
        addr as usize
    }

    #[inline(always)]
    fn reg(&self, addr: u64) -> u64 {
        if !self
            .devs
            .as_slice()
            .iter()
            .any(|d| addr >= d.base && addr + 4 <= d.base + d.size)
        {
            crate::die(b"KTEST-PANIC virtio register access outside every device window");
        }
        addr
    }

    /// The IOAPIC (base) and pin of `gsi`.
    fn route(&self, gsi: u32) -> Option<(u64, u8)> {
        let (base, gsi_base) = match &self.acpi {
            Some(a) => a.ioapic_for_gsi(gsi).map(|(b, g)| (u64::from(b), g))?,
            None => (IOAPIC_BASE, 0),
        };
        let pin = gsi - gsi_base;
        (pin < ioapic_entries(irq::ioapic_read_at(base, IOAPIC_REG_VERSION)))
            .then_some((base, pin as u8))
    }
}

// SAFETY (for every accessor below): `mem` checked that [addr, addr + size) lies in the
// driver's region, which is RAM in the identity map, holds no Rust object (the image ends
// below it, see linker.ld) and overlaps nothing the boot information borrows; volatile
// accesses because a device writes it concurrently.
impl Platform for Guest {
    fn read8(&self, a: u64) -> u8 {
        // SAFETY: see above.
        unsafe { (self.mem(a, 1) as *const u8).read_volatile() }
    }
    fn read16(&self, a: u64) -> u16 {
        // SAFETY: see above.
        unsafe { (self.mem(a, 2) as *const u16).read_volatile() }
    }
    fn read32(&self, a: u64) -> u32 {
        // SAFETY: see above.
        unsafe { (self.mem(a, 4) as *const u32).read_volatile() }
    }
    fn read64(&self, a: u64) -> u64 {
        // SAFETY: see above.
        unsafe { (self.mem(a, 8) as *const u64).read_volatile() }
    }
    fn write8(&self, a: u64, v: u8) {
        // SAFETY: see above.
        unsafe { (self.mem(a, 1) as *mut u8).write_volatile(v) }
    }
    fn write16(&self, a: u64, v: u16) {
        // SAFETY: see above.
        unsafe { (self.mem(a, 2) as *mut u16).write_volatile(v) }
    }
    fn write32(&self, a: u64, v: u32) {
        // SAFETY: see above.
        unsafe { (self.mem(a, 4) as *mut u32).write_volatile(v) }
    }
    fn write64(&self, a: u64, v: u64) {
        // SAFETY: see above.
        unsafe { (self.mem(a, 8) as *mut u64).write_volatile(v) }
    }
    fn reg_read(&self, addr: u64) -> u32 {
        io::mmio_read32(self.reg(addr))
    }
    fn reg_write(&self, addr: u64, v: u32) {
        io::mmio_write32(self.reg(addr), v)
    }
    fn now_ns(&self) -> u64 {
        if self.kvmclock {
            crate::clock::now(0)
        } else {
            // Without kvmclock, TSC cycles stand in for ns: timeouts only get longer on
            // any TSC of 1 GHz or more.
            crate::smp::rdtsc()
        }
    }
    fn irq_enable(&self, dev: &MmioDev) -> bool {
        let slot = usize::from(dev.slot);
        let Some((ioapic, pin)) = self.route(dev.gsi).filter(|_| slot < MAX_DEVICES) else {
            return false;
        };
        irq::init();
        BASES[slot].store(dev.base, Ordering::SeqCst);
        let vector = VEC_BASE + dev.slot;
        irq::ioapic_write_at(ioapic, ioredtbl_index(pin) + 1, ioredtbl_high(0));
        irq::ioapic_write_at(
            ioapic,
            ioredtbl_index(pin),
            ioredtbl_low_mode(vector, false, dev.level, dev.active_low),
        );
        irq::enable();
        true
    }
    fn irq_disable(&self, dev: &MmioDev) {
        irq::disable();
        if let Some((ioapic, pin)) = self.route(dev.gsi) {
            let low = ioredtbl_low_mode(VEC_BASE + dev.slot, true, dev.level, dev.active_low);
            irq::ioapic_write_at(ioapic, ioredtbl_index(pin), low);
        }
    }
    fn irq_count(&self, dev: &MmioDev) -> u32 {
        IRQS.get(usize::from(dev.slot))
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
    fn info(&self, line: &[u8]) {
        io::serial_line(line);
    }
    fn hold(&self) {
        // Interrupts off and a spin, not `hlt`: `cli; hlt` ends the VM on some hypervisors
        // (README, "Why no SSE"), and the host wants to kill a live VMM.
        irq::disable();
        loop {
            core::hint::spin_loop();
        }
    }
    fn page_read64(&self, a: u64) -> u64 {
        // SAFETY: `page` checked that the aligned u64 at `a` is RAM in the identity map
        // (below the MMIO hole), above the image and the driver's region (so no Rust object
        // lives there) and outside what the boot information borrows; volatile because a
        // device may discard it.
        unsafe { (self.page(a) as *const u64).read_volatile() }
    }
    fn page_write64(&self, a: u64, v: u64) {
        // SAFETY: as for `page_read64`.
        unsafe { (self.page(a) as *mut u64).write_volatile(v) }
    }
    fn wait_line(&self) {
        let mut line = InputLine::new();
        while !line.push(io::serial_getb()) {}
    }
    fn counter_ap_count(&self) -> u32 {
        let cpus = self.acpi.as_ref().map_or(1, |a| a.lapics);
        let t = crate::smp::TRAMPOLINE;
        // The APs start through the trampoline page: not if the boot information lies there.
        if self
            .reserved
            .iter()
            .any(|&(s, e)| s < e && s < t + 0x1000 && t < e)
        {
            return 0;
        }
        cpus.saturating_sub(1)
            .min(kiln_testguest::apic::MAX_APS as u32)
    }
    fn counter_aps_start(&self, base: u64, pages: u64, rate_pages: u64) -> u32 {
        match self.counter_ap_count() {
            0 => 0,
            n => crate::counter_ap::start(base, pages, rate_pages, n),
        }
    }
    fn counter_aps_status(&self) -> (u64, u64) {
        (
            crate::counter_ap::STEPS.load(Ordering::Relaxed),
            crate::counter_ap::ERRORS.load(Ordering::Relaxed),
        )
    }
    fn counter_aps_stop(&self) {
        crate::counter_ap::stop()
    }
}

/// The end of the driver's usable memory (see [`Guest::limit`]).
fn limit(ctx: &Ctx<'_>) -> u64 {
    let start = layout::START;
    let Some(ram) =
        ctx.info.memmap.as_slice().iter().find(|e| {
            e.kind == kiln_testguest::memmap::E820_RAM && e.addr <= start && start < e.end()
        })
    else {
        return start;
    };
    let mut end = ram.end().min(layout::END);
    for (s, e) in reserved(ctx) {
        if s < e && e > start {
            end = end.min(s.max(start));
        }
    }
    end
}

/// The initrd and the command line, which the boot information borrows.
fn reserved(ctx: &Ctx<'_>) -> [(u64, u64); 2] {
    let c = ctx.info.cmdline.as_bytes();
    let cmd = c.as_ptr() as u64;
    let initrd = ctx
        .info
        .initrd
        .map_or((0, 0), |r| (r.addr, r.addr.saturating_add(r.size)));
    [initrd, (cmd, cmd + c.len() as u64 + 1)]
}

/// virtio-mmio devices: the DSDT's `LNRO0005` devices, then `virtio_mmio.device=` tokens.
fn discover(ctx: &Ctx<'_>, acpi: &Option<AcpiInfo>) -> (DevList, &'static str) {
    let mut l = DevList::new();
    if let Some(a) = acpi {
        if let Some(dsdt) = MEM.read(a.dsdt_addr, a.dsdt_len as usize) {
            discover::scan_dsdt(dsdt, &mut l);
        }
    }
    let from_dsdt = l.as_slice().len();
    discover::scan_cmdline(&ctx.info.cmdline, &mut l);
    let from_cmdline = l.as_slice().len() > from_dsdt;
    let source = match (from_dsdt > 0, from_cmdline) {
        (true, false) => "dsdt",
        (true, true) => "dsdt+cmdline",
        (false, true) => "cmdline",
        (false, false) => "none",
    };
    (l, source)
}

/// Prints the devices found, once per boot.
fn list_once(devs: &DevList, source: &str) {
    if LISTED.swap(true, Ordering::SeqCst) {
        return;
    }
    let mut l = LineBuf::new();
    l.push_str("KTEST-INFO virtio devices=");
    l.push_dec(devs.as_slice().len() as u64);
    l.push_str(" source=");
    l.push_str(source);
    for d in devs.as_slice() {
        l.push_str(" ");
        l.push_hex(d.base);
        l.push_str("+");
        l.push_hex(d.size);
        l.push_str(":gsi");
        l.push_dec(u64::from(d.gsi));
        l.push_str(if d.level { ":level" } else { ":edge" });
        if d.active_low {
            l.push_str(":low");
        }
    }
    if devs.dropped > 0 {
        l.push_str(" dropped=");
        l.push_dec(u64::from(devs.dropped));
    }
    io::serial_line(l.as_bytes());
}

/// Runs a virtio scenario: discovery, kvmclock, the platform, then `f`.
pub fn run(
    ctx: &Ctx<'_>,
    out: &mut LineBuf,
    f: fn(&Guest, &Env<'_>, &mut LineBuf) -> bool,
) -> bool {
    let acpi = kiln_testguest::acpi::parse(&MEM, ctx.info.rsdp).ok();
    let (devs, source) = discover(ctx, &acpi);
    list_once(&devs, source);
    let features = if crate::cpuid(0x4000_0000, 0).eax >= 0x4000_0001 {
        crate::cpuid(0x4000_0001, 0).eax
    } else {
        0
    };
    let g = Guest {
        devs,
        limit: limit(ctx),
        kvmclock: crate::clock::enable(0, features),
        acpi,
        ram: ctx.info.memmap,
        reserved: reserved(ctx),
    };
    let env = Env {
        devs: devs.as_slice(),
        source,
        cmdline: ctx.info.cmdline,
        memmap: &ctx.info.memmap,
        reserved: reserved(ctx),
    };
    let ok = f(&g, &env, out);
    irq::disable();
    ok
}
