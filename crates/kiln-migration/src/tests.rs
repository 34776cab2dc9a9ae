//! Both ends against fake VMs over a Unix socket pair.

use super::*;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;

fn host() -> HostInfo {
    HostInfo {
        kiln_version: "test".into(),
        cpu_vendor: *b"GenuineIntel",
        cpu_features: vec![0xff, 0x0f],
    }
}

/// Guest memory shared with a "vCPU" thread that dirties it.
struct Mem {
    regions: Vec<Region>,
    bytes: Vec<Vec<u8>>,
    /// Dirty bits the fake KVM log keeps (guest writes only).
    dirty: Vec<Vec<u64>>,
    /// Pages ever written (the rest are "untouched": known zero).
    touched: Vec<Vec<u64>>,
    logging: bool,
    /// Reads of untouched pages (should be none: they are hinted).
    untouched_reads: u64,
}

impl Mem {
    fn new(regions: &[Region]) -> Mem {
        Mem {
            regions: regions.to_vec(),
            bytes: regions.iter().map(|r| vec![0; r.len as usize]).collect(),
            dirty: regions
                .iter()
                .map(|r| vec![0; r.pages().div_ceil(64) as usize])
                .collect(),
            touched: regions
                .iter()
                .map(|r| vec![0; r.pages().div_ceil(64) as usize])
                .collect(),
            logging: false,
            untouched_reads: 0,
        }
    }

    fn locate(&self, gpa: u64) -> (usize, usize) {
        let r = self
            .regions
            .iter()
            .position(|r| gpa >= r.gpa && gpa < r.gpa + r.len)
            .unwrap();
        (r, (gpa - self.regions[r].gpa) as usize)
    }

    fn touch(&mut self, r: usize, off: usize) {
        let p = off as u64 / PAGE;
        self.touched[r][(p / 64) as usize] |= 1 << (p % 64);
    }

    /// A guest write: logged.
    fn guest_write(&mut self, gpa: u64, v: u64) {
        let (r, off) = self.locate(gpa);
        self.touch(r, off);
        self.bytes[r][off..off + 8].copy_from_slice(&v.to_le_bytes());
        if self.logging {
            let p = off as u64 / PAGE;
            self.dirty[r][(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// A device write: not logged.
    fn device_write(&mut self, gpa: u64, v: u64) {
        let (r, off) = self.locate(gpa);
        self.touch(r, off);
        self.bytes[r][off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// Device writes made while paused.
type OnPause = Box<dyn FnMut(&mut Mem) + Send>;

struct FakeSource {
    mem: Arc<Mutex<Mem>>,
    paused: Arc<AtomicBool>,
    resumes: u32,
    /// Whether the "disk lock" is held; `take_back` fails when `lock_taken` says the
    /// destination got it.
    locked: bool,
    lock_taken: bool,
    /// Every dirty log has page 0 dirty (a guest that never stops writing).
    always_dirty: bool,
    /// Called once when paused: device writes that land behind the log.
    on_pause: Option<OnPause>,
}

impl SourceVm for FakeSource {
    fn regions(&self) -> Vec<Region> {
        self.mem.lock().unwrap().regions.clone()
    }
    fn vcpus(&self) -> u32 {
        2
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        let mut m = self.mem.lock().unwrap();
        let (r, off) = m.locate(gpa);
        buf.copy_from_slice(&m.bytes[r][off..off + buf.len()]);
        for p in (off / PAGE as usize)..(off + buf.len()).div_ceil(PAGE as usize) {
            if m.touched[r][p / 64] & (1 << (p % 64)) == 0 {
                m.untouched_reads += 1;
            }
        }
        Ok(())
    }
    fn known_zero(&self) -> Option<Vec<Vec<u64>>> {
        let m = self.mem.lock().unwrap();
        Some(
            m.touched
                .iter()
                .map(|t| t.iter().map(|w| !w).collect())
                .collect(),
        )
    }
    fn start_dirty_log(&mut self) -> std::result::Result<(), String> {
        self.mem.lock().unwrap().logging = true;
        Ok(())
    }
    fn dirty_log(&mut self) -> std::result::Result<Vec<Vec<u64>>, String> {
        let mut m = self.mem.lock().unwrap();
        let mut d = m.dirty.clone();
        if self.always_dirty {
            d[0][0] |= 1;
        }
        for b in &mut m.dirty {
            b.iter_mut().for_each(|w| *w = 0);
        }
        Ok(d)
    }
    fn stop_dirty_log(&mut self) {
        self.mem.lock().unwrap().logging = false;
    }
    fn pause(&mut self) -> std::result::Result<(), String> {
        self.paused.store(true, Ordering::SeqCst);
        if let Some(f) = self.on_pause.as_mut() {
            f(&mut self.mem.lock().unwrap());
        }
        Ok(())
    }
    fn resume(&mut self) {
        self.resumes += 1;
        self.paused.store(false, Ordering::SeqCst);
    }
    fn save_state(&mut self) -> std::result::Result<Vec<u8>, String> {
        Ok(b"device-state".to_vec())
    }
    fn hand_over(&mut self) -> std::result::Result<(), String> {
        self.locked = false;
        Ok(())
    }
    fn take_back(&mut self) -> std::result::Result<(), String> {
        if self.lock_taken {
            return Err("held by another".into());
        }
        self.locked = true;
        Ok(())
    }
}

struct FakeDest {
    regions: Vec<Region>,
    bytes: Vec<Vec<u8>>,
    state: Option<Vec<u8>>,
    fail_restore: bool,
}

impl FakeDest {
    fn new(regions: &[Region]) -> FakeDest {
        FakeDest {
            regions: regions.to_vec(),
            // Not zero: zero markers must really zero.
            bytes: regions.iter().map(|r| vec![0xee; r.len as usize]).collect(),
            state: None,
            fail_restore: false,
        }
    }
    fn at(&mut self, gpa: u64, len: usize) -> &mut [u8] {
        let r = self
            .regions
            .iter()
            .position(|r| gpa >= r.gpa && gpa < r.gpa + r.len)
            .unwrap();
        let off = (gpa - self.regions[r].gpa) as usize;
        &mut self.bytes[r][off..off + len]
    }
}

impl DestVm for FakeDest {
    fn prepare(&mut self, hello: &Hello) -> std::result::Result<(), String> {
        if hello.regions != self.regions {
            return Err(format!(
                "guest memory {:?} (start kiln with the same --memory)",
                hello.regions
            ));
        }
        if hello.vcpus != 2 {
            return Err("vCPUs differ".into());
        }
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), String> {
        self.at(gpa, data.len()).copy_from_slice(data);
        Ok(())
    }
    fn zero(&mut self, gpa: u64, len: u64) -> std::result::Result<(), String> {
        self.at(gpa, len as usize).fill(0);
        Ok(())
    }
    fn restore_and_run(&mut self, state: &[u8]) -> std::result::Result<(), String> {
        if self.fail_restore {
            return Err("restore failed on purpose".into());
        }
        self.state = Some(state.to_vec());
        Ok(())
    }
}

fn regions() -> Vec<Region> {
    vec![
        Region {
            gpa: 0,
            len: 4 * MIB,
        },
        Region {
            gpa: 1 << 32,
            len: MIB,
        },
    ]
}

/// Starts a "vCPU" that keeps writing pages (a counter) until paused or stopped.
fn dirtier(
    mem: Arc<Mutex<Mem>>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if !paused.load(Ordering::SeqCst) {
                let mut m = mem.lock().unwrap();
                // Re-check under the lock: pause() flips the flag before it takes it.
                if !paused.load(Ordering::SeqCst) {
                    for _ in 0..16 {
                        n += 1;
                        let page = (n * 7919) % 1024;
                        m.guest_write(page * PAGE + 8 * (n % 512), n);
                    }
                }
            }
            std::thread::yield_now();
        }
        n
    })
}

fn source(mem: &Arc<Mutex<Mem>>, paused: &Arc<AtomicBool>) -> FakeSource {
    FakeSource {
        mem: mem.clone(),
        paused: paused.clone(),
        resumes: 0,
        locked: true,
        lock_taken: false,
        always_dirty: false,
        on_pause: None,
    }
}

#[test]
fn a_running_guest_arrives_intact_with_device_writes() {
    let regs = regions();
    let mem = Arc::new(Mutex::new(Mem::new(&regs)));
    {
        let mut m = mem.lock().unwrap();
        for p in (0..1024).step_by(3) {
            m.guest_write(p * PAGE, p ^ 0xabcd);
        }
        m.guest_write((1 << 32) + 5 * PAGE, 99);
    }
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let t = dirtier(mem.clone(), paused.clone(), stop.clone());
    let mut src = source(&mem, &paused);
    // While paused a "device" fills a read buffer and a used ring: not in the dirty log.
    src.on_pause = Some(Box::new(|m: &mut Mem| {
        m.device_write(2 * MIB + 16, 0x1234_5678);
        m.device_write((1 << 32) + 100 * PAGE, 42);
    }));
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let d = std::thread::spawn(move || {
        let mut dst = FakeDest::new(&regions());
        receive(&mut dst, &mut b, &host()).map(|g| (g, dst))
    });
    let params = Params {
        max_downtime: Duration::from_millis(50),
        max_iterations: 5,
    };
    let report = send(&mut src, &mut a, &host(), &params).unwrap();
    stop.store(true, Ordering::SeqCst);
    let writes = t.join().unwrap();
    let (got, dst) = d.join().unwrap().unwrap();
    assert!(writes > 0);
    assert_eq!(dst.state.as_deref(), Some(&b"device-state"[..]));
    let m = mem.lock().unwrap();
    assert!(m.bytes == dst.bytes, "destination memory differs: {report}");
    // The write in region 1 is found by fingerprint; the one in region 0 may share its page
    // with the guest's last writes and then go out as a dirty page anyway.
    assert!(report.device_pages >= 1, "{report}");
    assert!(report.zero_pages > 0 && report.pages > 0, "{report}");
    assert_eq!(got.pages + got.zero_pages, report.pages + report.zero_pages);
    assert_eq!(src.resumes, 0);
    assert!(!m.logging);
    assert_eq!(m.untouched_reads, 0, "known-zero pages were read");
}

#[test]
fn the_source_keeps_its_vm_when_the_destination_dies() {
    let regs = regions();
    let mem = Arc::new(Mutex::new(Mem::new(&regs)));
    let paused = Arc::new(AtomicBool::new(false));
    let mut src = source(&mem, &paused);
    let (mut a, mut b) = UnixStream::pair().unwrap();
    // The destination takes the hello, reads a little, then goes away.
    let d = std::thread::spawn(move || {
        let _ = wire::read_frame(&mut b).unwrap();
        wire::write_frame(&mut b, &Frame::HelloOk).unwrap();
        let _ = wire::read_frame(&mut b).unwrap();
        drop(b);
    });
    let err = send(&mut src, &mut a, &host(), &Params::default()).unwrap_err();
    d.join().unwrap();
    assert!(matches!(err, Error::Io(..) | Error::Truncated(_)), "{err}");
    assert!(!paused.load(Ordering::SeqCst));
    assert!(!mem.lock().unwrap().logging);

    // Dying after the commit, before `Running`: the source resumes.
    let mut src = source(&mem, &paused);
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let d = std::thread::spawn(move || loop {
        match wire::read_frame(&mut b).unwrap() {
            Frame::Hello(_) => {
                wire::write_frame(&mut b, &Frame::HelloOk).unwrap();
            }
            Frame::Commit => break,
            _ => {}
        }
    });
    let err = send(&mut src, &mut a, &host(), &Params::default()).unwrap_err();
    d.join().unwrap();
    assert!(matches!(err, Error::Truncated(_)), "{err}");
    assert_eq!(src.resumes, 1);
    assert!(src.locked, "the lock was taken back");
    assert!(!paused.load(Ordering::SeqCst));

    // The same, but the destination kept the lock (it may be running the VM): the source
    // must not run a second copy.
    let mut src = source(&mem, &paused);
    src.lock_taken = true;
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let d = std::thread::spawn(move || loop {
        match wire::read_frame(&mut b).unwrap() {
            Frame::Hello(_) => {
                wire::write_frame(&mut b, &Frame::HelloOk).unwrap();
            }
            Frame::Commit => break,
            _ => {}
        }
    });
    let err = send(&mut src, &mut a, &host(), &Params::default()).unwrap_err();
    d.join().unwrap();
    assert!(matches!(err, Error::Stuck(_)), "{err}");
    assert_eq!(src.resumes, 0);
    assert!(paused.load(Ordering::SeqCst));
}

#[test]
fn a_failed_restore_is_refused_and_the_source_resumes() {
    let mem = Arc::new(Mutex::new(Mem::new(&regions())));
    let paused = Arc::new(AtomicBool::new(false));
    let mut src = source(&mem, &paused);
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let d = std::thread::spawn(move || {
        let mut dst = FakeDest::new(&regions());
        dst.fail_restore = true;
        receive(&mut dst, &mut b, &host()).unwrap_err()
    });
    let err = send(&mut src, &mut a, &host(), &Params::default()).unwrap_err();
    let derr = d.join().unwrap();
    assert!(
        matches!(&err, Error::Refused(m) if m.contains("on purpose")),
        "{err}"
    );
    assert!(matches!(derr, Error::Vm(_)), "{derr}");
    assert_eq!(src.resumes, 1);
}

#[test]
fn incompatible_sources_are_refused_before_any_page() {
    let cases: Vec<(HostInfo, Vec<Region>, &str)> = vec![
        (
            HostInfo {
                cpu_vendor: *b"AuthenticAMD",
                ..host()
            },
            regions(),
            "CPU vendor",
        ),
        (
            HostInfo {
                cpu_features: vec![0x1ff, 0x0f],
                ..host()
            },
            regions(),
            "feature word 0",
        ),
        (
            HostInfo {
                kiln_version: "other".into(),
                ..host()
            },
            regions(),
            "kiln other",
        ),
        (host(), regions()[..1].to_vec(), "--memory"),
    ];
    for (h, regs, why) in cases {
        let mem = Arc::new(Mutex::new(Mem::new(&regs)));
        let paused = Arc::new(AtomicBool::new(false));
        let mut src = source(&mem, &paused);
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let d = std::thread::spawn(move || {
            let mut dst = FakeDest::new(&regions());
            receive(&mut dst, &mut b, &host()).unwrap_err()
        });
        let err = send(&mut src, &mut a, &h, &Params::default()).unwrap_err();
        let derr = d.join().unwrap();
        assert!(
            matches!(&err, Error::Refused(m) if m.contains(why)),
            "{why}: {err}"
        );
        assert!(matches!(derr, Error::Incompatible(_)), "{derr}");
        assert!(!mem.lock().unwrap().logging, "logging never started");
    }
}

#[test]
fn the_destination_rejects_truncated_and_hostile_streams() {
    let mut hello = Vec::new();
    wire::write_frame(
        &mut hello,
        &Frame::Hello(Hello {
            version: wire::PROTOCOL_VERSION,
            host: host(),
            regions: regions(),
            vcpus: 2,
        }),
    )
    .unwrap();
    let run = |extra: &[Frame], cut: Option<usize>| {
        let mut bytes = hello.clone();
        for f in extra {
            wire::write_frame(&mut bytes, f).unwrap();
        }
        if let Some(c) = cut {
            bytes.truncate(bytes.len() - c);
        }
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let w = std::thread::spawn(move || {
            let _ = a.write_all(&bytes);
            // Drain what the destination says until it hangs up.
            let mut sink = Vec::new();
            let _ = a.shutdown(std::net::Shutdown::Write);
            let _ = a.read_to_end(&mut sink);
        });
        let mut dst = FakeDest::new(&regions());
        let r = receive(&mut dst, &mut b, &host());
        drop(b);
        w.join().unwrap();
        (r, dst.state.is_some())
    };
    // Ends after some pages: truncated, nothing started.
    let (r, started) = run(
        &[Frame::Pages {
            gpa: 0,
            data: vec![1; 8192],
        }],
        Some(100),
    );
    assert!(matches!(r, Err(Error::Truncated(_))), "{r:?}");
    assert!(!started);
    // Commit without state.
    let (r, started) = run(&[Frame::Commit], None);
    assert!(matches!(r, Err(Error::Unexpected { .. })), "{r:?}");
    assert!(!started);
    // Pages outside guest memory, a zero run that wraps.
    let (r, _) = run(
        &[Frame::Pages {
            gpa: 4 * MIB,
            data: vec![1; 4096],
        }],
        None,
    );
    assert!(matches!(r, Err(Error::Malformed("pages", _))), "{r:?}");
    let (r, _) = run(
        &[Frame::Zero {
            gpa: 0,
            count: u64::MAX / 2,
        }],
        None,
    );
    assert!(matches!(r, Err(Error::Malformed(..))), "{r:?}");
    // An abort.
    let (r, started) = run(&[Frame::Abort("bye".into())], None);
    assert!(matches!(r, Err(Error::Aborted(m)) if m == "bye"));
    assert!(!started);
    // And a good one: state, commit.
    let (r, started) = run(&[Frame::State(vec![1]), Frame::Commit], None);
    assert!(r.is_ok() && started, "{r:?}");
}

#[test]
fn the_iteration_limit_ends_pre_copy() {
    let mem = Arc::new(Mutex::new(Mem::new(&regions())));
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let t = dirtier(mem.clone(), paused.clone(), stop.clone());
    let mut src = source(&mem, &paused);
    src.always_dirty = true;
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let d = std::thread::spawn(move || {
        let mut dst = FakeDest::new(&regions());
        receive(&mut dst, &mut b, &host()).map(|_| dst)
    });
    // A zero downtime can never be met: iteration stops at the limit.
    let params = Params {
        max_downtime: Duration::ZERO,
        max_iterations: 3,
    };
    let report = send(&mut src, &mut a, &host(), &params).unwrap();
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
    let dst = d.join().unwrap().unwrap();
    assert!(
        report.hit_iteration_limit && report.iterations == 3,
        "{report}"
    );
    assert!(mem.lock().unwrap().bytes == dst.bytes);
}

#[test]
fn fingerprints_see_one_changed_bit_and_depend_on_the_key() {
    let a = vec![0u8; 4096];
    let mut b = a.clone();
    b[4095] = 1;
    assert_ne!(fingerprint(1, &a), fingerprint(1, &b));
    assert_ne!(fingerprint(1, &a), fingerprint(2, &a));
}
