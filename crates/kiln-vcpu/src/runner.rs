//! The vCPU thread: `KVM_RUN` in a loop, with an explicit Running / Paused / Finished state
//! machine driven from other threads through a [`VcpuHandle`].
//!
//! Kicking a vCPU out of the guest uses a real-time signal whose handler sets the thread's
//! `kvm_run.immediate_exit`: if the signal lands while the thread is in user space, the next
//! `KVM_RUN` returns `EINTR` at once instead of entering the guest, so no kick is lost. The
//! hot loop itself takes no lock: state requests are only looked at after `EINTR`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{handle_exit_cached, ExitAction, ExitHandler, StopKind, StopReason};
use crate::exit_times::{ExitClock, ExitTimes};
use crate::regs::dump_registers;
use crate::{Error, Result};

/// Lifecycle state of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// In (or about to enter) `KVM_RUN`.
    Running = 0,
    /// Parked outside the guest until resumed; registers are stable and may be saved.
    Paused = 1,
    /// The thread has left its loop (or is about to).
    Finished = 2,
}

impl VcpuState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => VcpuState::Running,
            1 => VcpuState::Paused,
            _ => VcpuState::Finished,
        }
    }
}

/// Work for a paused vCPU's thread (see [`VcpuHandle::with_paused_fd`]).
type PausedJob = Box<dyn FnOnce(&VcpuFd) + Send>;

/// Shared between the vCPU thread and its handle.
struct Control {
    requested: Mutex<VcpuState>,
    changed: Condvar,
    current: AtomicU8,
    /// A job for the thread to run while it sits in Paused; set and taken with `requested`
    /// held, so the condvar wake-up that announces it can't be missed.
    job: Mutex<Option<PausedJob>>,
}

impl Control {
    fn take_job(&self) -> Option<PausedJob> {
        match self.job.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }
}

impl Control {
    fn set_current(&self, s: VcpuState) {
        self.current.store(s as u8, Ordering::Release);
        // Take the lock so a waiter between its check and its wait can't miss the wake-up.
        let _guard = self.requested.lock();
        self.changed.notify_all();
    }
}

thread_local! {
    // The kvm_run page of the vCPU this thread runs, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    // Set by `stop_current_vcpu` from a device model running on this vCPU thread.
    static STOP_SELF: Cell<bool> = const { Cell::new(false) };
}

/// Called by a device model while it handles an exit (so on a vCPU thread): this vCPU
/// stops before it re-enters the guest, with [`StopReason::Requested`]. Used for guest
/// power-off/reset requests, so the guest runs no further instruction after the write that
/// asked for it. A no-op on threads that aren't running a vCPU.
pub fn stop_current_vcpu() {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            STOP_SELF.with(|s| s.set(true));
            // SAFETY: the kvm_run page of this thread's own VcpuFd (see `kick_handler`);
            // we are on that thread, outside KVM_RUN.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is the mmap'd kvm_run page of the VcpuFd owned by this very
            // thread; it is set after the VcpuFd is in place and cleared before it is dropped,
            // and a signal handler runs on the thread it interrupts. A volatile byte store is
            // async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    static mut RESULT: i32 = 0;
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            // SAFETY: written only inside call_once, read only after it, which orders both.
            unsafe { RESULT = e.errno() };
        }
    });
    // SAFETY: see above: call_once has completed, no concurrent writer exists.
    let errno = unsafe { RESULT };
    if errno != 0 {
        return Err(Error::SignalHandler(errno));
    }
    Ok(())
}

/// Per-thread set-up run on a new vCPU thread before the guest does (see
/// [`Vcpu::start_with`]).
pub type ThreadInit = Box<dyn FnOnce() -> std::result::Result<(), String> + Send>;

fn control_finish(control: &Control) {
    control.set_current(VcpuState::Finished);
}

/// Whether vCPU threads time their user-space work per exit (off by default: it costs two
/// clock reads per exit). Read by each vCPU thread when its loop starts.
static EXIT_TIMING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The exit times of the vCPU this thread runs (in its run loop's frame), for device
    /// models reading them during an exit; null while no loop runs on this thread.
    static EXIT_TIMES: Cell<*const ExitTimes> = const { Cell::new(std::ptr::null()) };
}

/// Turns per-exit user-space timing on or off for vCPU threads started afterwards (for the
/// exit benchmark; see [`with_vcpu_exit_times`]).
pub fn set_exit_timing(on: bool) {
    if on {
        // Calibrates the clock now rather than on a vCPU thread's first run.
        let _ = ExitClock::get();
    }
    EXIT_TIMING.store(on, Ordering::Relaxed);
}

/// On a vCPU thread: runs `f` with that vCPU's per-exit user-space times (time from
/// `KVM_RUN` returning with an exit to the next `KVM_RUN`: the VMM's own share of each
/// exit; recorded only with exit timing on). `None` on other threads.
pub fn with_vcpu_exit_times<R>(f: impl FnOnce(&ExitTimes) -> R) -> Option<R> {
    let p = EXIT_TIMES.with(Cell::get);
    // SAFETY: a non-null pointer was set by this thread's run loop to an `ExitTimes` in its
    // own frame, and is reset to null (by `ExitTimesGuard`) before that frame ends; the loop
    // only ever uses it through shared references, so this one aliases nothing mutable.
    unsafe { p.as_ref() }.map(f)
}

/// Publishes a run loop's `ExitTimes` in `EXIT_TIMES` and takes it back on every way out.
struct ExitTimesGuard;

impl ExitTimesGuard {
    fn publish(times: &ExitTimes) -> Self {
        EXIT_TIMES.with(|p| p.set(times));
        ExitTimesGuard
    }
}

impl Drop for ExitTimesGuard {
    fn drop(&mut self) {
        EXIT_TIMES.with(|p| p.set(std::ptr::null()));
    }
}

/// One vCPU, configured and ready to run. `H` is its exit handler, a concrete type, so the
/// exit path is static calls that inline.
pub struct Vcpu<H: ExitHandler> {
    fd: VcpuFd,
    index: u32,
    handler: Arc<H>,
}

impl<H: ExitHandler + 'static> Vcpu<H> {
    /// Wraps a configured `VcpuFd` (index = APIC ID) with the exit handler it will use.
    pub fn new(fd: VcpuFd, index: u32, handler: Arc<H>) -> Self {
        Vcpu { fd, index, handler }
    }

    /// The vCPU's index (= APIC ID).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The KVM vCPU, for configuration before start.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Starts the vCPU on its own thread named `kiln-vcpu<N>`, in the Running state (or
    /// Paused if `start_paused`).
    pub fn start(self, start_paused: bool) -> Result<VcpuHandle> {
        self.start_with(start_paused, Box::new(|| Ok(())))
    }

    /// Like [`start`](Self::start), but first runs `init` on the new thread, before the
    /// guest runs a single instruction (install a seccomp filter, set affinity or priority).
    /// Waits for `init`; if it fails the thread ends and this returns
    /// [`Error::ThreadInit`].
    pub fn start_with(self, start_paused: bool, init: ThreadInit) -> Result<VcpuHandle> {
        install_kick_handler()?;
        let initial = if start_paused {
            VcpuState::Paused
        } else {
            VcpuState::Running
        };
        let control = Arc::new(Control {
            requested: Mutex::new(initial),
            changed: Condvar::new(),
            current: AtomicU8::new(initial as u8),
            job: Mutex::new(None),
        });
        let thread_control = control.clone();
        let index = self.index;
        let (init_tx, init_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("kiln-vcpu{index}"))
            .spawn(move || {
                let ok = init();
                let failed = ok.is_err();
                // The receiver waits below; it can only be gone if start_with panicked.
                let _ = init_tx.send(ok);
                if failed {
                    control_finish(&thread_control);
                    return StopReason::Requested;
                }
                self.run_loop(&thread_control)
            })
            .map_err(Error::Spawn)?;
        let init_result = init_rx.recv().unwrap_or_else(|_| Err("thread died".into()));
        if let Err(why) = init_result {
            let _ = thread.join();
            return Err(Error::ThreadInit { index, why });
        }
        Ok(VcpuHandle {
            index,
            thread: Some(thread),
            control,
        })
    }

    fn run_loop(mut self, control: &Control) -> StopReason {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let reason = self.run_until_stopped(control);
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        STOP_SELF.with(|s| s.set(false));
        self.handler.vcpu_stopped(self.index, &reason);
        control.set_current(VcpuState::Finished);
        reason
    }

    /// Honours the requested state; returns false when the vCPU must finish.
    fn obey_requests(&mut self, control: &Control) -> bool {
        let mut requested = match control.requested.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        loop {
            match *requested {
                VcpuState::Running => {
                    control
                        .current
                        .store(VcpuState::Running as u8, Ordering::Release);
                    control.changed.notify_all();
                    return true;
                }
                VcpuState::Finished => return false,
                VcpuState::Paused => {
                    control
                        .current
                        .store(VcpuState::Paused as u8, Ordering::Release);
                    control.changed.notify_all();
                    if let Some(job) = control.take_job() {
                        // Out of the guest and parked: the registers are stable. Run the job
                        // without the lock, so the handle can be asked about state meanwhile.
                        drop(requested);
                        job(&self.fd);
                        requested = match control.requested.lock() {
                            Ok(g) => g,
                            Err(p) => p.into_inner(),
                        };
                        continue;
                    }
                    requested = match control.changed.wait(requested) {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                }
            }
        }
    }

    fn run_until_stopped(&mut self, control: &Control) -> StopReason {
        if !self.obey_requests(control) {
            return StopReason::Requested;
        }
        let mut eagain_backoff = Duration::from_micros(50);
        // Exit timing, as the benchmark's floor does it (same clock, same record).
        let timing = EXIT_TIMING.load(Ordering::Relaxed).then(ExitClock::get);
        let times = ExitTimes::new();
        let _published = ExitTimesGuard::publish(&times);
        // Our own reference to the handler, so the exit loop's dispatch cache can borrow
        // from it while `self` is used mutably below.
        let handler = Arc::clone(&self.handler);
        loop {
            // Timed or not is decided here, once: each loop does only its own work per exit.
            let end = match timing {
                Some(clock) => exit_loop::<H, true>(&mut self.fd, &*handler, &times, clock),
                None => {
                    exit_loop::<H, false>(&mut self.fd, &*handler, &times, ExitClock::monotonic())
                }
            };
            let (errno, exited) = match end {
                LoopEnd::Stop(kind) => return self.stop_reason(kind),
                LoopEnd::RunError { errno, exited } => (errno, exited),
            };
            if exited {
                eagain_backoff = Duration::from_micros(50);
            }
            match errno {
                libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    if STOP_SELF.with(Cell::get) {
                        return StopReason::Requested;
                    }
                    if !self.obey_requests(control) {
                        return StopReason::Requested;
                    }
                }
                // An AP waiting for INIT/SIPI: KVM_RUN returns EAGAIN until its SIPI arrives.
                libc::EAGAIN => {
                    std::thread::sleep(eagain_backoff);
                    eagain_backoff = (eagain_backoff * 2).min(Duration::from_millis(2));
                    if control.requested_state() != VcpuState::Running
                        && !self.obey_requests(control)
                    {
                        return StopReason::Requested;
                    }
                }
                errno => return StopReason::RunFailed { errno },
            }
        }
    }

    fn stop_reason(&mut self, kind: StopKind) -> StopReason {
        match kind {
            StopKind::PowerOff => StopReason::PowerOff,
            StopKind::Reset => StopReason::Reset,
            StopKind::GuestCrash => StopReason::GuestCrash,
            StopKind::TripleFault => StopReason::TripleFault {
                registers: dump_registers(&self.fd),
            },
            StopKind::InternalError => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit
                // union is the one KVM filled in.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                StopReason::InternalError {
                    suberror,
                    registers: dump_registers(&self.fd),
                }
            }
            StopKind::FailEntry(reason) => StopReason::FailEntry {
                reason,
                registers: dump_registers(&self.fd),
            },
            StopKind::Unhandled(exit) => StopReason::Unhandled {
                exit,
                registers: dump_registers(&self.fd),
            },
        }
    }
}

/// Why [`exit_loop`] returned.
enum LoopEnd {
    /// An exit asked the vCPU to stop.
    Stop(StopKind),
    /// `KVM_RUN` failed with `errno`; `exited`: at least one exit was handled before.
    RunError { errno: i32, exited: bool },
}

/// The hot loop: `KVM_RUN`, handle the exit, again — until an exit stops the vCPU or
/// `KVM_RUN` fails (a kick's `EINTR`, an AP's `EAGAIN`, …), which the caller deals with.
///
/// A function of its own, kept out of line, so the exit path's code is a few contiguous
/// cache lines: inlined into the thread's start function it was interleaved with the
/// pause, back-off and start-up code, and after every world switch each extra line (and
/// page) it spans is another cold miss.
///
/// `TIMED` (the exit benchmark's `--exit-bench`) records each exit's user-space time in
/// `times` on `clock`; without it neither is touched. A constant rather than a flag: the
/// flag was a branch on every exit of every VM, and one more value the loop kept in its
/// frame (a stack cache line read inside the timed window).
#[inline(never)]
fn exit_loop<H: ExitHandler, const TIMED: bool>(
    fd: &mut VcpuFd,
    handler: &H,
    times: &ExitTimes,
    clock: ExitClock,
) -> LoopEnd {
    // The per-vCPU dispatch cache, in this frame beside the loop's other state (in the
    // caller's frame it was one more cache line to miss after each world switch). It starts
    // empty after every return (a kick, a pause): it is only a cache.
    let mut cache = H::Cache::default();
    let mut exited_at: u64 = 0;
    let mut exited = false;
    loop {
        if TIMED && exited_at != 0 {
            times.record(clock.ns_between(exited_at, clock.now()));
            exited_at = 0;
        }
        match fd.run() {
            Ok(exit) => {
                if TIMED {
                    exited_at = clock.now();
                }
                exited = true;
                if let ExitAction::Stop(kind) = handle_exit_cached(exit, handler, &mut cache) {
                    return LoopEnd::Stop(kind);
                }
            }
            Err(e) => {
                return LoopEnd::RunError {
                    errno: e.errno(),
                    exited,
                }
            }
        }
    }
}

impl Control {
    fn requested_state(&self) -> VcpuState {
        match self.requested.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }
}

/// Drives a running vCPU thread from elsewhere: pause, resume, stop, join.
pub struct VcpuHandle {
    index: u32,
    thread: Option<JoinHandle<StopReason>>,
    control: Arc<Control>,
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The state the thread is in now.
    pub fn state(&self) -> VcpuState {
        VcpuState::from_u8(self.control.current.load(Ordering::Acquire))
    }

    fn request(&self, state: VcpuState) {
        let mut r = match self.control.requested.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        // Finished is final.
        if *r != VcpuState::Finished {
            *r = state;
        }
        self.control.changed.notify_all();
        drop(r);
        self.kick();
    }

    /// Forces the vCPU out of the guest so it looks at its requested state.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                // An error means the thread is already gone, which is what a kick wants.
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Asks the vCPU to pause and waits (up to `timeout`) until it is out of the guest.
    /// Returns the state reached (Paused, or Finished if it stopped meanwhile).
    pub fn pause(&self, timeout: Duration) -> VcpuState {
        self.request(VcpuState::Paused);
        self.wait_for(|s| s != VcpuState::Running, timeout)
    }

    /// Runs `f` with the vCPU's fd on the vCPU's own thread while it is paused (KVM wants
    /// vCPU ioctls from the thread that runs the vCPU; Firecracker does the same), and
    /// returns its result. Used to save (or inspect) the state of a paused vCPU.
    ///
    /// Fails with [`Error::Stopped`] if the vCPU has finished, [`Error::NotPaused`] unless
    /// it is Paused, and with [`Error::VcpuGone`] if its thread ends, or doesn't answer
    /// within `timeout`, before the job ran. The hot loop is untouched: the thread only looks for jobs while paused.
    pub fn with_paused_fd<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&VcpuFd) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let requested = match self.control.requested.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            // A finished vCPU is not "not paused": say why it can't run the job (a guest
            // that powers off while it is being saved or migrated ends up here).
            let state = self.state();
            if state == VcpuState::Finished || *requested == VcpuState::Finished {
                return Err(Error::Stopped { index: self.index });
            }
            if *requested != VcpuState::Paused || state != VcpuState::Paused {
                return Err(Error::NotPaused { index: self.index });
            }
            let job: PausedJob = Box::new(move |fd| {
                // The caller may have given up waiting; then nobody wants the result.
                let _ = tx.send(f(fd));
            });
            match self.control.job.lock() {
                Ok(mut g) => *g = Some(job),
                Err(p) => *p.into_inner() = Some(job),
            }
            self.control.changed.notify_all();
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(_) => {
                // Don't leave a stale job behind for the next pause.
                drop(self.control.take_job());
                Err(Error::VcpuGone { index: self.index })
            }
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.request(VcpuState::Running);
    }

    /// Asks the vCPU to finish; it leaves the guest at once. Use [`VcpuHandle::join`] to wait.
    pub fn stop(&self) {
        self.request(VcpuState::Finished);
    }

    fn wait_for(&self, done: impl Fn(VcpuState) -> bool, timeout: Duration) -> VcpuState {
        let deadline = std::time::Instant::now() + timeout;
        let mut guard = match self.control.requested.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        loop {
            let s = self.state();
            let now = std::time::Instant::now();
            if done(s) || now >= deadline {
                return s;
            }
            guard = match self.control.changed.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Waits for the thread to end and returns why it stopped.
    pub fn join(mut self) -> StopReason {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(reason)) => reason,
            // The thread panicked: report it as a failure rather than propagate.
            _ => StopReason::Unhandled {
                exit: "vCPU thread panicked",
                registers: String::new(),
            },
        }
    }
}
