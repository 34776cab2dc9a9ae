//! Host harness: the virtio scenarios against kiln-virtio's device models (transport,
//! virtio-blk on a temporary image, virtio-rng, virtio-balloon) over a guest memory mapping.
//! Register writes run the device synchronously, as a `QueueNotify` without an ioeventfd
//! does in kiln; interrupts are counted and "handled" (status read and acknowledged) when the
//! scenario looks at the count, as the guest's handler would. Each clock read retries the
//! balloon's queues, as kiln's event loop does when a throttled queue's timer expires (the
//! statistics queue holds its buffer for the interval).

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::string::String;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;
use std::vec::Vec;

use kiln_bus::{MmioAddress, MmioDevice};
use kiln_virtio::{Balloon, BalloonConfig, Block, BlockConfig, MmioTransport, Rng};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::blk::{fresh_word, written_word, SECTOR};
use super::discover::DevList;
use super::transport::regs;
use super::{Env, MmioDev, Platform};
use crate::cmdline::Cmdline;
use crate::line::LineBuf;
use crate::memmap::{MemEntry, MemMap, E820_RAM};

type Mem = GuestMemoryMmap<()>;
/// The balloon as the harness holds it (statistics, counters, retries).
pub type BalloonDev = MmioTransport<Mem, Balloon<Mem>>;

/// Guest memory of the harness: 48 MiB from 0.
const MEM_SIZE: u64 = 48 << 20;

struct CountLine(AtomicU32);

impl kiln_irq::InterruptLine for CountLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Slot {
    dev: MmioDev,
    regs: Arc<dyn MmioDevice>,
    line: Arc<CountLine>,
    enabled: bool,
    seen: u32,
    handled: u32,
}

pub struct Host {
    mem: Mem,
    slots: RefCell<Vec<Slot>>,
    pub lines: RefCell<Vec<String>>,
    start: Instant,
    pub memmap: MemMap,
    /// The balloon, if there is one.
    pub balloon: Option<Arc<BalloonDev>>,
}

/// A unique scratch file name.
fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(std::format!(
        "kiln-testguest-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

/// An image of `sectors` in the contract's pattern.
pub fn image(sectors: u64) -> (PathBuf, File) {
    let path = scratch("disk.img");
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let mut buf = Vec::with_capacity(1 << 20);
    for s in 0..sectors {
        for _ in 0..SECTOR / 8 {
            buf.extend_from_slice(&fresh_word(s).to_le_bytes());
        }
        if buf.len() >= 1 << 20 {
            f.write_all(&buf).unwrap();
            buf.clear();
        }
    }
    f.write_all(&buf).unwrap();
    (path, f)
}

/// The first u64 of sector `s` of `f`.
pub fn sector_word(f: &File, s: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, s * SECTOR).unwrap();
    u64::from_le_bytes(b)
}

impl Host {
    /// Devices: a block device on `disk` (if any), then an entropy device (if `rng`).
    pub fn new(disk: Option<&File>, rng: bool) -> Host {
        Host::build(disk, rng, None)
    }

    /// An entropy device, then a balloon configured by `cfg` (last, as kiln places it).
    pub fn with_balloon(cfg: BalloonConfig) -> Host {
        Host::build(None, true, Some(cfg))
    }

    fn build(disk: Option<&File>, rng: bool, balloon: Option<BalloonConfig>) -> Host {
        let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let mut slots = Vec::new();
        let mut add = |regs: Arc<dyn MmioDevice>, line: Arc<CountLine>| {
            let i = slots.len() as u64;
            slots.push(Slot {
                dev: MmioDev {
                    base: 0xd000_0000 + 0x1000 * i,
                    size: 0x1000,
                    gsi: 16 + i as u32,
                    slot: i as u8,
                    ..MmioDev::default()
                },
                regs,
                line,
                enabled: false,
                seen: 0,
                handled: 0,
            });
        };
        if let Some(f) = disk {
            let line = Arc::new(CountLine(AtomicU32::new(0)));
            let blk = Block::new(
                f.try_clone().unwrap(),
                BlockConfig {
                    id: b"kiln-disk-0".to_vec(),
                    ..Default::default()
                },
            )
            .unwrap();
            add(
                Arc::new(MmioTransport::new(mem.clone(), blk, line.clone())),
                line,
            );
        }
        if rng {
            let line = Arc::new(CountLine(AtomicU32::new(0)));
            let r = Rng::new(256, None).unwrap();
            add(
                Arc::new(MmioTransport::new(mem.clone(), r, line.clone())),
                line,
            );
        }
        let balloon = balloon.map(|cfg| {
            let line = Arc::new(CountLine(AtomicU32::new(0)));
            let t = Arc::new(MmioTransport::new(
                mem.clone(),
                Balloon::new(cfg).unwrap(),
                line.clone(),
            ));
            add(t.clone(), line);
            t
        });
        let mut memmap = MemMap::new();
        memmap.push(MemEntry {
            addr: 0x10_0000,
            size: MEM_SIZE - 0x10_0000,
            kind: E820_RAM,
        });
        Host {
            mem,
            slots: RefCell::new(slots),
            lines: RefCell::new(Vec::new()),
            start: Instant::now(),
            memmap,
            balloon,
        }
    }

    /// The u64 at `a` in guest memory (for checks after a scenario).
    pub fn mem_u64(&self, a: u64) -> u64 {
        self.mem.read_obj(GuestAddress(a)).unwrap()
    }

    pub fn devs(&self) -> DevList {
        let mut l = DevList::new();
        for s in self.slots.borrow().iter() {
            l.push(s.dev);
        }
        l
    }

    /// Runs `f` with an [`Env`] over this machine and `cmdline`; returns (pass, detail).
    pub fn run(
        &self,
        cmdline: &str,
        f: impl FnOnce(&Host, &Env<'_>, &mut LineBuf) -> bool,
    ) -> (bool, String) {
        let devs = self.devs();
        let env = Env {
            devs: devs.as_slice(),
            source: "host",
            cmdline: Cmdline::new(cmdline.as_bytes()),
            memmap: &self.memmap,
            reserved: [(0, 0); 2],
        };
        let mut out = LineBuf::new();
        let ok = f(self, &env, &mut out);
        (ok, out.as_str().into())
    }

    fn with_reg<R>(&self, addr: u64, f: impl FnOnce(&dyn MmioDevice, MmioAddress, u64) -> R) -> R {
        let slots = self.slots.borrow();
        let s = slots
            .iter()
            .find(|s| (s.dev.base..s.dev.base + s.dev.size).contains(&addr))
            .unwrap_or_else(|| panic!("register access outside any device: {addr:#x}"));
        let regs = s.regs.clone();
        let base = s.dev.base;
        drop(slots);
        f(&*regs, MmioAddress(base), addr - base)
    }

    /// A `page_*` access: aligned, in RAM above 1 MiB and outside the driver's region.
    fn check_page(&self, a: u64) {
        use super::layout::{END, START};
        assert!(
            a % 8 == 0 && a >= 0x10_0000 && a + 8 <= MEM_SIZE && (a >= END || a + 8 <= START),
            "page access at {a:#x} outside free RAM"
        );
    }

    fn check(&self, addr: u64, n: u64) {
        assert!(
            addr >= super::layout::START && addr + n <= MEM_SIZE,
            "driver touched {addr:#x} outside its region"
        );
    }
}

impl Platform for Host {
    fn read8(&self, a: u64) -> u8 {
        self.check(a, 1);
        self.mem.read_obj(GuestAddress(a)).unwrap()
    }
    fn read16(&self, a: u64) -> u16 {
        self.check(a, 2);
        self.mem.read_obj(GuestAddress(a)).unwrap()
    }
    fn read32(&self, a: u64) -> u32 {
        self.check(a, 4);
        self.mem.read_obj(GuestAddress(a)).unwrap()
    }
    fn read64(&self, a: u64) -> u64 {
        self.check(a, 8);
        self.mem.read_obj(GuestAddress(a)).unwrap()
    }
    fn write8(&self, a: u64, v: u8) {
        self.check(a, 1);
        self.mem.write_obj(v, GuestAddress(a)).unwrap()
    }
    fn write16(&self, a: u64, v: u16) {
        self.check(a, 2);
        self.mem.write_obj(v, GuestAddress(a)).unwrap()
    }
    fn write32(&self, a: u64, v: u32) {
        self.check(a, 4);
        self.mem.write_obj(v, GuestAddress(a)).unwrap()
    }
    fn write64(&self, a: u64, v: u64) {
        self.check(a, 8);
        self.mem.write_obj(v, GuestAddress(a)).unwrap()
    }
    fn reg_read(&self, addr: u64) -> u32 {
        self.with_reg(addr, |d, base, off| {
            let mut b = [0u8; 4];
            d.mmio_read(base, off, &mut b);
            u32::from_le_bytes(b)
        })
    }
    fn reg_write(&self, addr: u64, v: u32) {
        self.with_reg(addr, |d, base, off| {
            d.mmio_write(base, off, &v.to_le_bytes())
        })
    }
    fn now_ns(&self) -> u64 {
        if let Some(b) = &self.balloon {
            for q in 0..b.num_queues() as u32 {
                let _ = b.notify_queue(q);
            }
        }
        self.start.elapsed().as_nanos() as u64
    }
    fn irq_enable(&self, dev: &MmioDev) -> bool {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[usize::from(dev.slot)];
        s.enabled = true;
        // Edges raised while masked are lost.
        s.seen = s.line.0.load(Ordering::SeqCst);
        true
    }
    fn irq_disable(&self, dev: &MmioDev) {
        self.slots.borrow_mut()[usize::from(dev.slot)].enabled = false;
    }
    fn irq_count(&self, dev: &MmioDev) -> u32 {
        let (raised, base) = {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[usize::from(dev.slot)];
            let raised = s.line.0.load(Ordering::SeqCst);
            if !s.enabled || raised == s.seen {
                return s.handled;
            }
            s.seen = raised;
            s.handled += 1;
            (raised, s.dev.base)
        };
        // The handler: read the status, acknowledge it.
        let st = self.reg_read(base + regs::INTERRUPT_STATUS);
        if st != 0 {
            self.reg_write(base + regs::INTERRUPT_ACK, st);
        }
        let _ = raised;
        self.slots.borrow()[usize::from(dev.slot)].handled
    }
    fn info(&self, line: &[u8]) {
        self.lines
            .borrow_mut()
            .push(String::from_utf8_lossy(line).into_owned());
    }
    fn hold(&self) {
        self.info(b"(hold)");
    }
    fn page_read64(&self, a: u64) -> u64 {
        self.check_page(a);
        self.mem.read_obj(GuestAddress(a)).unwrap()
    }
    fn page_write64(&self, a: u64, v: u64) {
        self.check_page(a);
        self.mem.write_obj(v, GuestAddress(a)).unwrap()
    }
    fn wait_line(&self) {
        self.info(b"(wait_line)");
    }
}

mod tests {
    use super::*;
    use crate::virtio::{bench, blk, evil, reset, rng};

    const SECTORS: u64 = 65536;

    #[test]
    fn blk_scenario_against_kiln_virtio() {
        let (path, f) = image(SECTORS);
        let h = Host::new(Some(&f), true);
        let (ok, detail) = h.run(
            "kiln.blk.id=kiln-disk-0 kiln.blk.sectors=65536",
            blk::run_blk,
        );
        assert!(ok, "{detail}\n{:?}", h.lines.borrow());
        assert!(detail.contains("irqs="), "{detail}");
        assert!(!detail.contains("irqs=0"), "{detail}");
        assert!(
            detail.contains("discard=zeroed write_zeroes=zeroed"),
            "{detail}"
        );
        // What the guest wrote, discarded and zeroed is in the file; nothing else changed.
        for s in 64..72 {
            assert_eq!(sector_word(&f, s), written_word(s));
        }
        for s in [2048, 3000, 4095, 4096, 4103] {
            assert_eq!(sector_word(&f, s), 0, "sector {s}");
        }
        for s in [0, 63, 72, 2047, 4104, SECTORS - 1] {
            assert_eq!(sector_word(&f, s), fresh_word(s), "sector {s}");
        }
        // Wrong expectations are caught.
        let (ok, detail) = h.run("kiln.blk.id=other", blk::run_blk);
        assert!(
            !ok && detail.contains("GET_ID returned 'kiln-disk-0'"),
            "{detail}"
        );
        let (ok, detail) = h.run("kiln.blk.sectors=5", blk::run_blk);
        assert!(!ok && detail.contains("capacity 65536"), "{detail}");
        // Hold prints its line.
        h.lines.borrow_mut().clear();
        let (ok, _) = h.run("kiln.blk.hold=1", blk::run_blk);
        assert!(ok);
        assert!(h
            .lines
            .borrow()
            .iter()
            .any(|l| l == "KTEST-INFO virtio-blk flushed"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn blk_scenario_needs_a_device_and_ram() {
        let h = Host::new(None, true);
        let (ok, detail) = h.run("", blk::run_blk);
        assert!(!ok && detail.contains("no writable virtio-blk"), "{detail}");
        let (path, f) = image(1000);
        let h = Host::new(Some(&f), false);
        let (ok, detail) = h.run("", blk::run_blk);
        assert!(!ok && detail.contains("32768"), "{detail}");
        let mut h = Host::new(Some(&f), false);
        h.memmap = MemMap::new();
        let (ok, detail) = h.run("", blk::run_blk);
        assert!(!ok && detail.contains("is not RAM"), "{detail}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn rng_scenario() {
        let h = Host::new(None, true);
        let (ok, detail) = h.run("", rng::run_rng);
        assert!(ok, "{detail}");
        assert!(detail.contains("lens=1024,1024,1024"), "{detail}");
        let h = Host::new(None, false);
        let (ok, detail) = h.run("", rng::run_rng);
        assert!(!ok && detail.contains("no virtio-rng"), "{detail}");
    }

    #[test]
    fn reset_scenario() {
        let (path, f) = image(SECTORS);
        let h = Host::new(Some(&f), true);
        let (ok, detail) = h.run("", reset::run_reset);
        assert!(ok, "{detail}");
        assert!(detail.contains("rng=ok"), "{detail}");
        // Synchronous devices finish the 16 reads at the notify, before the reset.
        assert!(detail.contains("16 had completed"), "{detail}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn evil_scenario_against_kiln_virtio() {
        let (path, f) = image(SECTORS);
        let h = Host::new(Some(&f), true);
        let (ok, detail) = h.run("", evil::run_evil);
        let lines = h.lines.borrow().join("\n");
        assert!(ok, "{detail}\n{lines}");
        assert!(
            detail.contains("blk_cases=15 rng_cases=13 skipped=0"),
            "{detail}"
        );
        for want in [
            "blk loop len0",
            "blk indirect-loop len0",
            "blk oob-ram-end ioerr",
            "blk oob-top ioerr",
            "blk oob-mmio ioerr",
            "blk huge-len len0",
            "blk hdr-writable ioerr",
            "blk read-into-ro ioerr",
            "blk no-status len0",
            "blk avail-overrun needs_reset",
            "blk head-oob needs_reset",
            "blk qnum3 refused",
            "blk notify-early ignored",
            "blk no-version1 refused",
            "rng oob-top len0",
            "rng read-into-ro len0",
            "rng avail-overrun needs_reset",
        ] {
            assert!(lines.contains(want), "{want} missing:\n{lines}");
        }
        // Nothing was written to the disk.
        for s in [0, 1, 4095, SECTORS - 1] {
            assert_eq!(sector_word(&f, s), fresh_word(s), "sector {s}");
        }
        // Skip and allow lists.
        h.lines.borrow_mut().clear();
        let (ok, detail) = h.run(
            "kiln.evil.skip=loop,rng:qnum3,blk:huge-len,xyz:oob-top kiln.evil.allow=oob-top",
            evil::run_evil,
        );
        assert!(ok, "{detail}");
        assert!(detail.contains("skipped=4"), "{detail}");
        let lines = h.lines.borrow();
        for l in ["blk loop", "rng loop", "rng qnum3", "blk huge-len"] {
            let want = std::format!("{l} skipped");
            assert!(lines.iter().any(|x| x.ends_with(&want)), "{l}");
        }
        assert!(lines.iter().any(|x| x.contains("blk qnum3 refused")));
        assert!(lines
            .iter()
            .any(|x| x.contains("blk oob-top ioerr addr=0xfffffffff000")));
        drop(lines);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bench_scenario() {
        let (path, f) = image(SECTORS);
        let h = Host::new(Some(&f), false);
        let (ok, detail) = h.run("kiln.blk.bench_ms=50 kiln.blk.qd=4", bench::run_bench);
        assert!(ok, "{detail}");
        let lines = h.lines.borrow();
        let k = lines.iter().find(|l| l.starts_with("KBENCH blk ")).unwrap();
        for key in [
            "randread_iops=",
            "randwrite_iops=",
            "seqread_mibs=",
            "seqwrite_mibs=",
        ] {
            let v: f64 = k
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .unwrap()
                .parse()
                .unwrap();
            assert!(v > 0.0, "{k}");
        }
        assert!(k.ends_with(" qd=4"), "{k}");
        drop(lines);
        let (ok, detail) = h.run("kiln.blk.qd=100", bench::run_bench);
        assert!(!ok && detail.contains("1..=64"), "{detail}");
        let (ok, detail) = h.run("kiln.blk.qd=x", bench::run_bench);
        assert!(
            !ok && detail.contains("bad value for kiln.blk.qd"),
            "{detail}"
        );
        std::fs::remove_file(path).unwrap();
    }
}
