//! The device event loop: one thread that waits on every queue's notification eventfd (an
//! ioeventfd the VMM registered with KVM, so a guest's `QueueNotify` write never leaves the
//! kernel), on the devices' backend fds (a tap, a vsock backend's epoll fd) and on one retry
//! timer per source, and processes queues and backends when they fire.
//!
//! Plain epoll rather than `event-manager`: the loop has a few kinds of event source known at
//! construction, and dispatches by index into a fixed table, so a subscriber framework would
//! add dynamic dispatch and locking for nothing.
//!
//! No allocation per event: the epoll event buffer and the "still pending" list are sized at
//! construction.
//!
//! The loop can be paused ([`EventLoopHandle::pause`]): it finishes the request it is
//! processing, then touches no queue and raises no interrupt until resumed. Notifications
//! that arrive meanwhile stay in their eventfds and are processed after
//! [`EventLoopHandle::resume`]. Snapshots and migration use this to quiesce the devices.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kiln_bus::RateLimitedWarn;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::{QueueOutcome, Result};

/// Something whose queues can be processed on notification: implemented by
/// [`MmioTransport`](crate::MmioTransport) (and by test doubles).
pub trait QueueHandler: Send + Sync {
    /// Processes queue `index` (see [`MmioTransport::notify_queue`](crate::MmioTransport::notify_queue)).
    fn handle_queue(&self, index: u32) -> Result<QueueOutcome>;

    /// Handles readiness of backend source `token` (see
    /// [`MmioTransport::notify_backend`](crate::MmioTransport::notify_backend)). Handlers
    /// without backend sources keep the default, which does nothing.
    fn handle_backend(&self, token: u32) -> Result<QueueOutcome> {
        let _ = token;
        Ok(QueueOutcome::Done)
    }
}

/// Pending sources get this many more rounds per wake-up before the loop checks for new
/// events again (fairness between a busy queue and the others).
const PENDING_ROUNDS: usize = 1;

/// Epoll token of the stop/pause eventfd.
const CONTROL_TOKEN: u64 = u64::MAX;

static LOOP_WARN: RateLimitedWarn = RateLimitedWarn::new();

/// What fires a source.
enum Trigger {
    /// A queue notification eventfd (owned by the loop).
    Queue(EventFd),
    /// A backend fd owned by the device (polled edge-triggered).
    Backend,
}

struct Source {
    handler: Arc<dyn QueueHandler>,
    /// The queue index or the backend token.
    index: u32,
    trigger: Trigger,
    name: String,
    timer: TimerFd,
    pending: bool,
}

impl Source {
    fn process(&self) -> Result<QueueOutcome> {
        match self.trigger {
            Trigger::Queue(_) => self.handler.handle_queue(self.index),
            Trigger::Backend => self.handler.handle_backend(self.index),
        }
    }
}

/// Requested and reached state of the loop thread.
#[derive(Debug, Default)]
struct LoopState {
    stop: bool,
    pause: bool,
    paused: bool,
}

/// Shared between the loop thread and its handle.
#[derive(Debug)]
struct Shared {
    state: Mutex<LoopState>,
    changed: Condvar,
    wake: EventFd,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, LoopState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        // Can only fail on counter overflow, when the loop is already woken.
        let _ = self.wake.write(1);
    }
}

/// Builder and state of the event loop; [`EventLoop::spawn`] moves it onto its own thread.
pub struct EventLoop {
    epoll: Epoll,
    sources: Vec<Source>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("sources", &self.sources.len())
            .finish()
    }
}

/// Pauses, resumes, stops and joins the event loop thread.
#[derive(Debug)]
pub struct EventLoopHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopHandle {
    /// Asks the thread to stop after the request it is processing, and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    /// Asks the loop to pause after the request it is processing and waits until it has: from
    /// then on no queue is processed and no interrupt raised until [`resume`](Self::resume).
    /// Returns false if the loop thread is gone (nothing runs either way).
    pub fn pause(&self) -> bool {
        let mut st = self.shared.state();
        st.pause = true;
        self.shared.wake();
        while !st.paused {
            if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
                return false;
            }
            st = match self
                .shared
                .changed
                .wait_timeout(st, Duration::from_millis(50))
            {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }

    /// Lets a paused loop run again; it first looks at every source, so notifications that
    /// arrived while paused are not lost.
    pub fn resume(&self) {
        let mut st = self.shared.state();
        st.pause = false;
        self.shared.changed.notify_all();
    }

    /// Whether the loop is paused now.
    pub fn is_paused(&self) -> bool {
        self.shared.state().paused
    }

    fn stop_and_join(&mut self) {
        {
            let mut st = self.shared.state();
            st.stop = true;
            st.pause = false;
            self.shared.changed.notify_all();
        }
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl EventLoop {
    /// An empty loop.
    pub fn new() -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, CONTROL_TOKEN),
        )?;
        Ok(EventLoop {
            epoll,
            sources: Vec::new(),
            shared: Arc::new(Shared {
                state: Mutex::new(LoopState::default()),
                changed: Condvar::new(),
                wake,
            }),
        })
    }

    fn push(
        &mut self,
        handler: Arc<dyn QueueHandler>,
        index: u32,
        trigger: Trigger,
        fd: RawFd,
        events: EventSet,
        name: String,
    ) -> io::Result<()> {
        let timer = TimerFd::new()?;
        let i = self.sources.len() as u64;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, i * 2))?;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i * 2 + 1),
        ) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return Err(e);
        }
        self.sources.push(Source {
            handler,
            index,
            trigger,
            name,
            timer,
            pending: false,
        });
        Ok(())
    }

    /// Processes queue `queue` of `handler` whenever `notify` is signalled. `name` is used in
    /// log lines ("virtio-blk 0 queue 0").
    pub fn add(
        &mut self,
        handler: Arc<dyn QueueHandler>,
        queue: u32,
        notify: EventFd,
        name: String,
    ) -> io::Result<()> {
        let fd = notify.as_raw_fd();
        self.push(
            handler,
            queue,
            Trigger::Queue(notify),
            fd,
            EventSet::IN,
            name,
        )
    }

    /// Calls `handler.handle_backend(token)` whenever `fd` becomes readable (edge-triggered:
    /// see [`VirtioDevice::backend_fds`](crate::VirtioDevice::backend_fds)). The caller keeps
    /// `fd` open for as long as the loop runs.
    pub fn add_backend(
        &mut self,
        handler: Arc<dyn QueueHandler>,
        token: u32,
        fd: RawFd,
        name: String,
    ) -> io::Result<()> {
        self.push(
            handler,
            token,
            Trigger::Backend,
            fd,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            name,
        )
    }

    /// Number of sources (queues and backends) registered.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether no source is registered.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Starts the loop on a thread named `kiln-virtio`.
    pub fn spawn(self) -> io::Result<EventLoopHandle> {
        self.spawn_with(|| Ok(()))
    }

    /// Starts the loop on a thread named `kiln-virtio` that first runs `init` (install a
    /// seccomp filter, set affinity) before it touches any queue; waits for `init` and
    /// returns its error, with the thread gone, if it fails.
    pub fn spawn_with(
        self,
        init: impl FnOnce() -> std::result::Result<(), String> + Send + 'static,
    ) -> io::Result<EventLoopHandle> {
        let shared = self.shared.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("kiln-virtio".into())
            .spawn(move || {
                let r = init();
                let ok = r.is_ok();
                let _ = tx.send(r);
                if ok {
                    self.run();
                }
            })?;
        if let Err(why) = rx.recv().unwrap_or_else(|_| Err("thread died".into())) {
            let _ = thread.join();
            return Err(io::Error::other(format!(
                "device event loop thread set-up: {why}"
            )));
        }
        Ok(EventLoopHandle {
            shared,
            thread: Some(thread),
        })
    }

    /// Processes one source; records whether it has work left.
    fn process(&mut self, i: usize) {
        let Some(s) = self.sources.get_mut(i) else {
            return;
        };
        s.pending = false;
        match s.process() {
            Ok(QueueOutcome::Done) => {}
            Ok(QueueOutcome::Pending) => s.pending = true,
            Ok(QueueOutcome::Throttled(after)) => {
                // A zero duration would disarm the timer.
                let after = after.max(Duration::from_micros(1));
                if let Err(e) = s.timer.reset(after, None) {
                    LOOP_WARN.warn(format_args!(
                        "{}: arming the retry timer: {e}; retrying at once",
                        s.name
                    ));
                    s.pending = true;
                }
            }
            // The transport already logged it and flagged DEVICE_NEEDS_RESET.
            Err(_) => {}
        }
    }

    /// Handles a wake-up of the control eventfd; returns false when the loop must end.
    /// Blocks here while paused.
    fn obey_control(&mut self) -> bool {
        let _ = self.shared.wake.read();
        let shared = self.shared.clone();
        let mut st = shared.state();
        if st.pause && !st.stop {
            st.paused = true;
            shared.changed.notify_all();
            while st.pause && !st.stop {
                st = match shared.changed.wait(st) {
                    Ok(g) => g,
                    Err(e) => e.into_inner(),
                };
            }
            st.paused = false;
            shared.changed.notify_all();
            drop(st);
            // Edge-triggered backends that fired while paused gave their only wake-up to
            // nobody; queue kicks are still counted in their eventfds. Look at all.
            for s in &mut self.sources {
                s.pending = true;
            }
            return true;
        }
        !st.stop
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); self.sources.len() * 2 + 1];
        loop {
            let any_pending = self.sources.iter().any(|s| s.pending);
            let timeout = if any_pending { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    LOOP_WARN.warn(format_args!("kiln-virtio event loop: epoll_wait: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            // Control first: a pause must not process one more request than it has to.
            if events.iter().take(n).any(|ev| ev.data() == CONTROL_TOKEN) && !self.obey_control() {
                return;
            }
            for ev in events.iter().take(n) {
                let token = ev.data();
                if token == CONTROL_TOKEN {
                    continue;
                }
                let Ok(i) = usize::try_from(token / 2) else {
                    continue;
                };
                let Some(s) = self.sources.get_mut(i) else {
                    continue;
                };
                if token % 2 == 0 {
                    // Consume the notification before processing, so a kick that arrives
                    // during processing wakes us again rather than being lost.
                    if let Trigger::Queue(notify) = &s.trigger {
                        let _ = notify.read();
                    }
                } else {
                    let _ = s.timer.wait();
                }
                self.process(i);
            }
            if n == 0 || any_pending {
                for _ in 0..PENDING_ROUNDS {
                    for i in 0..self.sources.len() {
                        if self.sources[i].pending {
                            self.process(i);
                        }
                    }
                }
            }
        }
    }
}

impl<M, D> QueueHandler for crate::MmioTransport<M, D>
where
    M: vm_memory::GuestMemory + Clone + Send + Sync,
    D: crate::VirtioDevice<M>,
{
    fn handle_queue(&self, index: u32) -> Result<QueueOutcome> {
        self.notify_queue(index)
    }

    fn handle_backend(&self, token: u32) -> Result<QueueOutcome> {
        self.notify_backend(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    use std::time::Instant;

    /// Returns scripted outcomes and counts calls.
    struct Scripted {
        calls: AtomicU32,
        script: Mutex<Vec<QueueOutcome>>,
    }

    impl QueueHandler for Scripted {
        fn handle_queue(&self, _index: u32) -> Result<QueueOutcome> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut s = self.script.lock().unwrap();
            Ok(if s.is_empty() {
                QueueOutcome::Done
            } else {
                s.remove(0)
            })
        }
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn setup(script: Vec<QueueOutcome>) -> (Arc<Scripted>, EventFd, EventLoopHandle) {
        let h = Arc::new(Scripted {
            calls: AtomicU32::new(0),
            script: Mutex::new(script),
        });
        let mut el = EventLoop::new().unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        el.add(h.clone(), 0, evt.try_clone().unwrap(), "test".into())
            .unwrap();
        assert_eq!(el.len(), 1);
        (h, evt, el.spawn().unwrap())
    }

    #[test]
    fn notification_processes_the_queue() {
        let (h, evt, handle) = setup(vec![]);
        evt.write(1).unwrap();
        wait_for("one call", || h.calls.load(Ordering::SeqCst) == 1);
        evt.write(1).unwrap();
        wait_for("two calls", || h.calls.load(Ordering::SeqCst) == 2);
        handle.stop();
    }

    #[test]
    fn pending_is_processed_again_without_a_kick() {
        let (h, evt, handle) = setup(vec![QueueOutcome::Pending, QueueOutcome::Pending]);
        evt.write(1).unwrap();
        wait_for("three calls", || h.calls.load(Ordering::SeqCst) == 3);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            h.calls.load(Ordering::SeqCst),
            3,
            "Done must stop the retries"
        );
        handle.stop();
    }

    #[test]
    fn throttled_retries_after_the_delay() {
        let (h, evt, handle) = setup(vec![QueueOutcome::Throttled(Duration::from_millis(30))]);
        let start = Instant::now();
        evt.write(1).unwrap();
        wait_for("the retry", || h.calls.load(Ordering::SeqCst) == 2);
        assert!(start.elapsed() >= Duration::from_millis(30));
        handle.stop();
    }

    #[test]
    fn a_failing_init_is_reported_and_nothing_runs() {
        let el = EventLoop::new().unwrap();
        let e = el.spawn_with(|| Err("no filter".into())).unwrap_err();
        assert!(e.to_string().contains("no filter"), "{e}");
    }

    #[test]
    fn errors_do_not_stop_the_loop() {
        struct Failing(AtomicU32);
        impl QueueHandler for Failing {
            fn handle_queue(&self, _: u32) -> Result<QueueOutcome> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Err(crate::Error::NotActivated { device: "test" })
            }
        }
        let f = Arc::new(Failing(AtomicU32::new(0)));
        let mut el = EventLoop::new().unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        el.add(f.clone(), 0, evt.try_clone().unwrap(), "f".into())
            .unwrap();
        let handle = el.spawn().unwrap();
        evt.write(1).unwrap();
        wait_for("first", || f.0.load(Ordering::SeqCst) == 1);
        evt.write(1).unwrap();
        wait_for("second", || f.0.load(Ordering::SeqCst) == 2);
        drop(handle); // Drop stops and joins too.
    }

    /// Counts backend calls; reads its pipe dry like a device would.
    struct Backend {
        calls: AtomicU32,
        rx: std::fs::File,
    }

    impl QueueHandler for Backend {
        fn handle_queue(&self, _: u32) -> Result<QueueOutcome> {
            Ok(QueueOutcome::Done)
        }
        fn handle_backend(&self, token: u32) -> Result<QueueOutcome> {
            assert_eq!(token, 7);
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 64];
            while matches!(std::io::Read::read(&mut &self.rx, &mut buf), Ok(n) if n > 0) {}
            Ok(QueueOutcome::Done)
        }
    }

    fn pipe() -> (std::fs::File, std::fs::File) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) };
        assert_eq!(rc, 0);
        // SAFETY: fresh fds owned by nothing else.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    #[test]
    fn backend_readiness_calls_the_handler_once_per_edge() {
        let (rx, mut tx) = pipe();
        let fd = rx.as_raw_fd();
        let b = Arc::new(Backend {
            calls: AtomicU32::new(0),
            rx,
        });
        let mut el = EventLoop::new().unwrap();
        el.add_backend(b.clone(), 7, fd, "backend".into()).unwrap();
        let handle = el.spawn().unwrap();
        std::io::Write::write_all(&mut tx, b"frame").unwrap();
        wait_for("the backend call", || b.calls.load(Ordering::SeqCst) == 1);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(b.calls.load(Ordering::SeqCst), 1, "drained: no busy loop");
        std::io::Write::write_all(&mut tx, b"again").unwrap();
        wait_for("the second call", || b.calls.load(Ordering::SeqCst) == 2);
        handle.stop();
    }

    #[test]
    fn a_paused_loop_processes_nothing_until_resumed() {
        let (h, evt, handle) = setup(vec![]);
        assert!(handle.pause());
        assert!(handle.is_paused());
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            h.calls.load(Ordering::SeqCst),
            0,
            "paused loops touch no queue"
        );
        handle.resume();
        wait_for("the kick from the pause", || {
            h.calls.load(Ordering::SeqCst) >= 1
        });
        assert!(!handle.is_paused());
        // Pausing twice and stopping while paused both work.
        assert!(handle.pause());
        assert!(handle.pause());
        handle.stop();
    }
}
