//! The Kiln conformance guest kernel (hardware side). Built only by kiln-testguest-builder,
//! with the `guest` feature, a static relocation model, no SSE and `linker.ld`; see README.md.
//!
//! No `core::fmt` here or in what it calls: the precompiled formatting code uses SSE, which
//! some hypervisors cannot emulate (README.md, "Why no SSE"). Output goes through `LineBuf`.
#![no_std]
#![no_main]

mod benchexits;
mod clock;
mod counter_ap;
mod entry;
mod io;
mod irq;
mod mem;
mod memstress;
mod smp;
mod virtio_hw;

use core::sync::atomic::{AtomicU32, Ordering};

use kiln_testguest::acpi as kacpi;
use kiln_testguest::boot::check_boot;
use kiln_testguest::bootinfo::{BootInfo, PhysMem};
use kiln_testguest::cpuid::{self as kcpuid, CpuidResult};
use kiln_testguest::exits::{self, Window};
use kiln_testguest::line::{done_line, result_line, Describe, InputLine, LineBuf};
use kiln_testguest::memmap::{FOUR_GIB, MMIO_HOLE_START};
use kiln_testguest::scenario::{select, Scenario, SelectError};
use kiln_testguest::virtio as vio;

/// Results so far; also read by the panic handler.
static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Guest-physical memory through the guest's identity map of the first 4 GiB.
struct IdentityMem;

impl PhysMem for IdentityMem {
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let end = addr.checked_add(len as u64)?;
        // Address 0 would be a null pointer; above 4 GiB is unmapped; the MMIO hole has
        // side effects on read.
        if addr == 0 || end > FOUR_GIB || (addr < FOUR_GIB && end > MMIO_HOLE_START) {
            return None;
        }
        // SAFETY: [addr, end) is non-null, inside the identity map and outside MMIO, so it is
        // readable memory. Nothing writes it while the slice lives (one CPU, the guest never
        // writes the VMM's structures, and the VMM does not change them while the guest runs).
        Some(unsafe { core::slice::from_raw_parts(addr as usize as *const u8, len) })
    }
}

static MEM: IdentityMem = IdentityMem;

/// What every scenario gets.
struct Ctx<'a> {
    info: BootInfo<'a>,
}

type RunFn = fn(&Ctx<'_>, &mut LineBuf) -> bool;

/// The scenario table: a new scenario adds a row here.
const TABLE: &[(Scenario, RunFn)] = &[
    (Scenario::Boot, run_boot),
    (Scenario::Cpuid, run_cpuid),
    (Scenario::Serial, run_serial),
    (Scenario::Exits, run_exits),
    (Scenario::Acpi, run_acpi),
    (Scenario::Smp, run_smp),
    (Scenario::Irq, run_irq),
    (Scenario::Clock, run_clock),
    (Scenario::Poweroff, run_poweroff),
    (Scenario::Reset, run_reset),
    (Scenario::VirtioBlk, |c, o| {
        virtio_hw::run(c, o, vio::blk::run_blk)
    }),
    (Scenario::VirtioRng, |c, o| {
        virtio_hw::run(c, o, vio::rng::run_rng)
    }),
    (Scenario::VirtioReset, |c, o| {
        virtio_hw::run(c, o, vio::reset::run_reset)
    }),
    (Scenario::VirtioEvil, |c, o| {
        virtio_hw::run(c, o, vio::evil::run_evil)
    }),
    (Scenario::BlkBench, |c, o| {
        virtio_hw::run(c, o, vio::bench::run_bench)
    }),
    (Scenario::Balloon, |c, o| {
        virtio_hw::run(c, o, vio::balloon::run_balloon)
    }),
    (Scenario::VirtioNet, |c, o| {
        virtio_hw::run(c, o, vio::net::run_net)
    }),
    (Scenario::NetEvil, |c, o| {
        virtio_hw::run(c, o, vio::net::run_net_evil)
    }),
    (Scenario::NetBench, |c, o| {
        virtio_hw::run(c, o, vio::net::run_net_bench)
    }),
    (Scenario::Vsock, |c, o| {
        virtio_hw::run(c, o, vio::vsock::run_vsock)
    }),
    (Scenario::VsockEvil, |c, o| {
        virtio_hw::run(c, o, vio::vsock::run_vsock_evil)
    }),
    (Scenario::VsockBench, |c, o| {
        virtio_hw::run(c, o, vio::vsock::run_vsock_bench)
    }),
    (Scenario::MemoryStress, memstress::run),
    (Scenario::BenchExits, benchexits::run),
    (Scenario::Counter, |c, o| {
        virtio_hw::run(c, o, vio::counter::run_counter)
    }),
    (Scenario::CtrlAltDel, run_ctrl_alt_del),
];

fn report(name: &str, pass: bool, detail: &[u8]) {
    let mut line = LineBuf::new();
    result_line(&mut line, name, pass, detail);
    io::serial_line(line.as_bytes());
    if pass {
        PASSED.fetch_add(1, Ordering::Relaxed);
    } else {
        FAILED.fetch_add(1, Ordering::Relaxed);
    }
}

fn finish() -> ! {
    let mut line = LineBuf::new();
    done_line(
        &mut line,
        PASSED.load(Ordering::Relaxed),
        FAILED.load(Ordering::Relaxed),
    );
    io::serial_line(line.as_bytes());
    io::power_off()
}

/// Called by the entry code with `protocol` (1 Linux 64-bit, 2 PVH, 3 Linux 32-bit) and the
/// address of boot_params / hvm_start_info.
#[unsafe(no_mangle)]
pub extern "C" fn kmain(protocol: u32, info_addr: u64) -> ! {
    let info = BootInfo::collect(protocol, info_addr, &MEM);
    let ctx = Ctx { info };
    match select(&ctx.info.cmdline) {
        Ok(sel) => {
            for sc in sel.as_slice() {
                if let Some((_, run)) = TABLE.iter().find(|(s, _)| s == sc) {
                    let mut detail = LineBuf::new();
                    let pass = run(&ctx, &mut detail);
                    report(sc.name(), pass, detail.as_bytes());
                }
            }
        }
        Err(e) => {
            let mut detail = LineBuf::new();
            match e {
                SelectError::Unknown(name) => {
                    detail.push_bytes(b"unknown scenario '");
                    detail.push_escaped(name);
                    detail.push_bytes(b"'");
                }
                SelectError::TooMany => detail.push_bytes(b"too many scenarios"),
            }
            report("kiln.test", false, detail.as_bytes());
        }
    }
    finish()
}

fn cmdline_cpus(ctx: &Ctx<'_>) -> Option<u32> {
    ctx.info
        .cmdline
        .get_u64("kiln.cpus")
        .ok()
        .flatten()
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn acpi_tables(ctx: &Ctx<'_>, out: &mut LineBuf) -> Option<kacpi::AcpiInfo> {
    match kacpi::parse(&MEM, ctx.info.rsdp) {
        Ok(i) => Some(i),
        Err(e) => {
            e.describe(out);
            None
        }
    }
}

fn run_acpi(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let Some(info) = acpi_tables(ctx, out) else {
        return false;
    };
    let exp = kacpi::Expect {
        cpus: cmdline_cpus(ctx),
        bsp_apic_id: Some(cpuid(1, 0).ebx >> 24),
        kiln: ctx.info.cmdline.get("kiln.layout") == Some(b"kiln"),
    };
    kacpi::check(&info, &exp, out)
}

/// The vCPU count: `kiln.cpus`, else the MADT's enabled CPUs.
fn vcpu_count(ctx: &Ctx<'_>) -> Option<u32> {
    cmdline_cpus(ctx).or_else(|| kacpi::parse(&MEM, ctx.info.rsdp).ok().map(|i| i.lapics))
}

/// False if the command line (still read after the APs start) lies in the trampoline's page,
/// which another VMM's firmware might have used.
fn trampoline_page_free(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let c = ctx.info.cmdline.as_bytes();
    let start = c.as_ptr() as u64;
    let end = start + c.len() as u64;
    let page = smp::TRAMPOLINE..smp::TRAMPOLINE + 0x1000;
    if !c.is_empty() && start < page.end && page.start < end {
        out.push_str("the command line overlaps the AP trampoline page ");
        out.push_hex(smp::TRAMPOLINE);
        return false;
    }
    true
}

/// Starts every AP with INIT/SIPI/SIPI; each checks in with its APIC ID and halts.
fn run_smp(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let Some(cpus) = vcpu_count(ctx) else {
        out.push_str("vCPU count unknown: no kiln.cpus and no ACPI MADT");
        return false;
    };
    if cpus <= 1 {
        out.push_str("single vCPU: no APs to start");
        return true;
    }
    if cpus as usize - 1 > kiln_testguest::apic::MAX_APS {
        out.push_str("more APs than the guest has stacks for");
        return false;
    }
    if !trampoline_page_free(ctx, out) {
        return false;
    }
    // The BSP must be APIC ID 0 both in its local APIC and in CPUID (the APs are 1..N-1).
    let bsp_lapic = io::mmio_read32(0xfee0_0020) >> 24;
    let bsp_cpuid = cpuid(1, 0).ebx >> 24;
    if bsp_lapic != 0 || bsp_cpuid != 0 {
        out.push_str("BSP APIC ID is not 0: LAPIC ");
        out.push_dec(u64::from(bsp_lapic));
        out.push_str(", CPUID ");
        out.push_dec(u64::from(bsp_cpuid));
        return false;
    }
    // A generous bound in TSC cycles (seconds at any plausible TSC rate): emulated AP
    // start-up under kvm-pvm is slow.
    let count = smp::start_aps(cpus - 1, 10_000_000_000);
    let mut seen = [0u64; 4];
    for (s, a) in seen.iter_mut().zip(&smp::AP_SEEN) {
        *s = a.load(Ordering::SeqCst);
    }
    out.push_str("aps=");
    out.push_dec(u64::from(count));
    out.push_str(" of ");
    out.push_dec(u64::from(cpus - 1));
    out.push_str(" ids=");
    let mut first = true;
    for id in 0..256u64 {
        if seen[(id / 64) as usize] & (1 << (id % 64)) != 0 {
            if !first {
                out.push_str(",");
            }
            out.push_dec(id);
            first = false;
        }
    }
    kiln_testguest::apic::aps_complete(cpus, count, &seen)
}

fn run_clock(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    use kiln_testguest::pvclock::{pit_ticks_to_ns, ppm_off, PIT_HZ};
    let features = if cpuid(0x4000_0000, 0).eax >= 0x4000_0001 {
        cpuid(0x4000_0001, 0).eax
    } else {
        0
    };
    if !clock::enable(0, features) {
        out.push_str("no working kvmclock (CPUID 0x40000001 eax=");
        out.push_hex(u64::from(features));
        out.push_str(")");
        return false;
    }
    // Monotonic over many back-to-back reads.
    let mut last = clock::now(0);
    for _ in 0..2000 {
        let t = clock::now(0);
        if t < last {
            out.push_str("kvmclock went backwards by ");
            out.push_dec(last - t);
            out.push_str(" ns");
            return false;
        }
        last = t;
    }
    // Rate against one second of PIT input clocks.
    let Some((kvm_ns, ticks, method)) = clock::measure(0, PIT_HZ) else {
        out.push_str("the PIT never advanced");
        return false;
    };
    let pit_ns = pit_ticks_to_ns(ticks);
    let ppm = ppm_off(kvm_ns, pit_ns);
    out.push_str("kvmclock_ns=");
    out.push_dec(kvm_ns);
    out.push_str(" pit_ns=");
    out.push_dec(pit_ns);
    out.push_str(" off_ppm=");
    out.push_dec(ppm);
    out.push_str(match method {
        clock::PitMethod::Ch2Gate => " pit=ch2(best 50ms window)",
        clock::PitMethod::Ch0Latch => " pit=ch0",
    });
    out.push_str(" tsc_stable=");
    out.push_dec(u64::from(clock::flags(0) & 1));
    let rate_ok = ppm <= 10_000;
    if !rate_ok {
        out.push_str(" rate off by more than 1%");
    }
    // Across vCPUs: each AP in turn answers ping-pongs with its own kvmclock.
    out.push_str(" cross-vcpu=");
    let cross_ok = match vcpu_count(ctx) {
        None => {
            out.push_str("unchecked(vCPU count unknown)");
            true
        }
        Some(0 | 1) => {
            out.push_str("n/a(1 vCPU)");
            true
        }
        Some(n) if n as usize - 1 > kiln_testguest::apic::MAX_APS => {
            out.push_str("unchecked(more APs than stacks)");
            true
        }
        Some(_) if !trampoline_page_free(ctx, out) => false,
        Some(n) => {
            let mut ok = true;
            for id in 1..n {
                if let Err(e) = clock::cross_check(id as u8) {
                    ok = false;
                    out.push_str("FAILED ap=");
                    out.push_dec(u64::from(id));
                    match e {
                        clock::PingFail::NotStarted => out.push_str(" did not start"),
                        clock::PingFail::NoClock => out.push_str(" has no kvmclock"),
                        clock::PingFail::Timeout(r) => {
                            out.push_str(" stopped answering in round ");
                            out.push_dec(u64::from(r));
                        }
                        clock::PingFail::Backwards(r, b, a, c) => {
                            out.push_str(" round ");
                            out.push_dec(u64::from(r));
                            out.push_str(" bsp_before=");
                            out.push_dec(b);
                            out.push_str(" ap=");
                            out.push_dec(a);
                            out.push_str(" bsp_after=");
                            out.push_dec(c);
                        }
                    }
                    break;
                }
            }
            if ok {
                out.push_str("ok(aps=");
                out.push_dec(u64::from(n - 1));
                out.push_str(" rounds=");
                out.push_dec(u64::from(clock::PING_ROUNDS));
                out.push_str(")");
            }
            ok
        }
    };
    rate_ok && cross_ok
}

fn run_irq(_ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let (rx, thre, timer, other) = irq::run(30_000_000_000);
    out.push_str("com1_rx=");
    out.push_dec(u64::from(rx));
    out.push_str(" com1_thre=");
    out.push_dec(u64::from(thre));
    out.push_str(" lapic_timer=");
    out.push_dec(u64::from(timer));
    out.push_str(" unexpected=");
    out.push_dec(u64::from(other));
    rx > 0 && thre > 0 && timer > 0 && other == 0
}

/// Ctrl+Alt+Del as set-2 make codes (what Firecracker's `SendCtrlAltDel` types).
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Waits for the host's Ctrl+Alt+Del on the keyboard (IRQ 1 and the scan codes), then
/// resets through the i8042 as Linux's `reboot=k` does; PASS first, as for `poweroff`.
fn run_ctrl_alt_del(_ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let want = CTRL_ALT_DEL.len() as u32;
    let (irqs, n) = irq::keyboard(want, 60_000_000_000);
    out.push_str("kbd_irqs=");
    out.push_dec(u64::from(irqs));
    out.push_str(" bytes=");
    for i in 0..(n as usize).min(irq::KBD_KEEP) {
        out.push_hex(u64::from(irq::KBD_BYTES[i].load(Ordering::SeqCst)));
        out.push_str(",");
    }
    let got_all = n == want
        && CTRL_ALT_DEL
            .iter()
            .enumerate()
            .all(|(i, &b)| irq::KBD_BYTES[i].load(Ordering::SeqCst) == b);
    if irqs == 0 || !got_all {
        return false;
    }
    report("ctrl-alt-del", true, out.as_bytes());
    // The i8042's pulse-reset command.
    io::outb(0x64, 0xfe);
    spin_tsc(1_000_000_000);
    out.push_str(" still running after the i8042 reset command");
    false
}

/// Writes `value` to an 8-bit FADT register: system I/O, or system memory below 4 GiB
/// (identity-mapped; QEMU microvm's GED registers are MMIO).
fn write_gas8(reg: &kacpi::Gas, value: u8, out: &mut LineBuf) -> bool {
    match reg.space {
        kacpi::GAS_IO if reg.address <= 0xffff => io::outb(reg.address as u16, value),
        kacpi::GAS_MEMORY if reg.address != 0 && reg.address < FOUR_GIB => {
            io::mmio_write8(reg.address, value)
        }
        _ => {
            out.push_str("unsupported register ");
            reg.describe_into(out);
            return false;
        }
    }
    true
}

/// Powers off as Linux does on a hardware-reduced ACPI machine: SLP_TYP from `\_S5_` (5 if
/// the package can't be read), SLP_EN, written to the FADT's sleep control register. PASS
/// is reported first, since a working power-off ends the VM (the harness checks the VMM's
/// exit status).
fn run_poweroff(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let Some(info) = acpi_tables(ctx, out) else {
        return false;
    };
    if info.sleep_control.address == 0 {
        out.push_str("FADT has no sleep control register");
        return false;
    }
    let typ = info.slp_typ_s5();
    let value = ((typ & 7) << 2) | (1 << 5);
    let mut detail = LineBuf::new();
    detail.push_str("writing ");
    detail.push_hex(u64::from(value));
    detail.push_str(if info.s5_slp_typ.is_some() {
        " (SLP_TYP from _S5_ | SLP_EN) to "
    } else {
        " (SLP_TYP 5: _S5_ unparsed | SLP_EN) to "
    });
    info.sleep_control.describe_into(&mut detail);
    report("poweroff", true, detail.as_bytes());
    let mut why = LineBuf::new();
    write_gas8(&info.sleep_control, value, &mut why);
    spin_tsc(1_000_000_000);
    out.push_str("still running after the S5 write ");
    out.push_bytes(why.as_bytes());
    false
}

/// Resets through the FADT reset register; PASS first, as for `poweroff`.
fn run_reset(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let Some(info) = acpi_tables(ctx, out) else {
        return false;
    };
    if info.fadt_flags & kacpi::FADT_RESET_REG_SUP == 0 || info.reset_reg.address == 0 {
        out.push_str("FADT has no reset register");
        return false;
    }
    let mut detail = LineBuf::new();
    detail.push_str("writing ");
    detail.push_hex(u64::from(info.reset_value));
    detail.push_str(" to ");
    info.reset_reg.describe_into(&mut detail);
    report("reset", true, detail.as_bytes());
    let mut why = LineBuf::new();
    write_gas8(&info.reset_reg, info.reset_value, &mut why);
    spin_tsc(1_000_000_000);
    out.push_str("still running after the reset write ");
    out.push_bytes(why.as_bytes());
    false
}

/// Busy-waits about `cycles` TSC cycles (a VMM may finish a power request asynchronously).
fn spin_tsc(cycles: u64) {
    // SAFETY: rdtsc has no side effects.
    let t = unsafe { core::arch::x86_64::_rdtsc() };
    // SAFETY: as above.
    while unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(t) < cycles {
        core::hint::spin_loop();
    }
}

fn run_boot(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    check_boot(&ctx.info, &MEM, out)
}

fn cpuid(leaf: u32, sub: u32) -> CpuidResult {
    // Ring 3 is fine: CPUID exits to the hypervisor at any CPL under KVM.
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    CpuidResult {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

fn run_cpuid(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let cpus = match ctx.info.cmdline.get_u64("kiln.cpus") {
        Ok(v) => v.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        Err(e) => {
            out.push_str("bad value for ");
            out.push_str(e.key);
            return false;
        }
    };
    match kcpuid::check_cpuid(&mut cpuid, cpus) {
        Ok(s) => {
            kcpuid::describe(&s, out);
            if cpus.is_none() {
                out.push_str(" topology=unchecked(no kiln.cpus)");
            }
            true
        }
        Err(e) => {
            e.describe(out);
            false
        }
    }
}

fn run_serial(_ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    io::serial_line(b"KTEST-SERIAL-READY");
    let mut input = InputLine::new();
    while !input.push(io::serial_getb()) {}
    let mut echo = LineBuf::new();
    echo.push_bytes(b"KTEST-ECHO ");
    echo.push_escaped(input.as_bytes());
    io::serial_line(echo.as_bytes());
    if input.as_bytes().is_empty() {
        out.push_str("empty line");
        false
    } else {
        out.push_str("echoed ");
        out.push_dec(input.as_bytes().len() as u64);
        out.push_str(" bytes");
        true
    }
}

fn run_exits(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let c = &ctx.info.cmdline;
    let n = match c.get_u64("kiln.exits") {
        Ok(v) => v.unwrap_or(exits::DEFAULT_EXITS),
        Err(e) => {
            out.push_str("bad value for ");
            out.push_str(e.key);
            return false;
        }
    };
    if n > exits::MAX_EXITS {
        out.push_str("kiln.exits too large: ");
        out.push_dec(n);
        return false;
    }
    let verify = c.get("kiln.verify") != Some(b"0");
    let (pio0, mmio0) = if verify {
        (
            io::inl(exits::EXIT_TEST_PORT),
            io::mmio_read32(exits::EXIT_TEST_MMIO),
        )
    } else {
        (0, 0)
    };
    for i in 0..n {
        io::outl(exits::EXIT_TEST_PORT, i as u32);
    }
    for i in 0..n {
        io::mmio_write32(exits::EXIT_TEST_MMIO, i as u32);
    }
    out.push_str("pio=");
    out.push_dec(n);
    out.push_str(" mmio=");
    out.push_dec(n);
    if !verify {
        out.push_str(" (kiln.verify=0: counts not read back)");
        return true;
    }
    let pio1 = io::inl(exits::EXIT_TEST_PORT);
    let mmio1 = io::mmio_read32(exits::EXIT_TEST_MMIO);
    let checks = [
        exits::check_count(Window::Pio, pio0, pio1, n),
        exits::check_count(Window::Mmio, mmio0, mmio1, n),
    ];
    for r in checks {
        if let Err(e) = r {
            out.clear();
            e.describe(out);
            return false;
        }
    }
    out.push_str(" verified");
    true
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // Only static messages and the location: formatting arguments would run core::fmt.
    let mut line = LineBuf::new();
    line.push_str("KTEST-PANIC ");
    line.push_str(info.message().as_str().unwrap_or("(formatted message)"));
    if let Some(loc) = info.location() {
        line.push_str(" at ");
        line.push_str(loc.file());
        line.push_str(":");
        line.push_dec(u64::from(loc.line()));
    }
    die(line.as_bytes())
}

/// Prints `line` (a `KTEST-PANIC ...` line), counts a failure and ends the run.
pub fn die(line: &[u8]) -> ! {
    io::serial_line(line);
    FAILED.fetch_add(1, Ordering::Relaxed);
    finish()
}
