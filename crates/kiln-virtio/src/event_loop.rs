//! The device event loop: one thread that waits on every queue's notification eventfd (an
//! ioeventfd the VMM registered with KVM, so a guest's `QueueNotify` write never leaves the
//! kernel) and on one retry timer per queue, and processes queues when they fire.
//!
//! Plain epoll rather than `event-manager`: the loop has exactly two kinds of event source
//! (notification, retry timer) known at construction, and dispatches by index into a fixed
//! table, so a subscriber framework would add dynamic dispatch and locking for nothing.
//!
//! No allocation per event: the epoll event buffer and the "still pending" list are sized at
//! construction.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
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
}

/// Pending queues get this many more rounds per wake-up before the loop checks for new events
/// again (fairness between a busy queue and the others).
const PENDING_ROUNDS: usize = 1;

/// Epoll token of the stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;

static LOOP_WARN: RateLimitedWarn = RateLimitedWarn::new();

struct Source {
    handler: Arc<dyn QueueHandler>,
    queue: u32,
    name: String,
    notify: EventFd,
    timer: TimerFd,
    pending: bool,
}

/// Builder and state of the event loop; [`EventLoop::spawn`] moves it onto its own thread.
pub struct EventLoop {
    epoll: Epoll,
    sources: Vec<Source>,
    stop: EventFd,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("sources", &self.sources.len())
            .finish()
    }
}

/// Stops and joins the event loop thread.
#[derive(Debug)]
pub struct EventLoopHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopHandle {
    /// Asks the thread to stop after the queue it is processing, and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        // Can only fail on counter overflow, when the loop is already woken.
        let _ = self.stop.write(1);
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
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        Ok(EventLoop {
            epoll,
            sources: Vec::new(),
            stop,
        })
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
        let timer = TimerFd::new()?;
        let i = self.sources.len() as u64;
        self.epoll.ctl(
            ControlOperation::Add,
            notify.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i * 2),
        )?;
        self.epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i * 2 + 1),
        )?;
        self.sources.push(Source {
            handler,
            queue,
            name,
            notify,
            timer,
            pending: false,
        });
        Ok(())
    }

    /// Number of queues registered.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether no queue is registered.
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
        let stop = self.stop.try_clone()?;
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
            stop,
            thread: Some(thread),
        })
    }

    /// Processes one source; records whether it has work left.
    fn process(&mut self, i: usize) {
        let Some(s) = self.sources.get_mut(i) else {
            return;
        };
        s.pending = false;
        match s.handler.handle_queue(s.queue) {
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
            for ev in events.iter().take(n) {
                let token = ev.data();
                if token == STOP_TOKEN {
                    return;
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
                    let _ = s.notify.read();
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
}
