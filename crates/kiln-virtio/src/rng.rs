//! virtio-rng (device ID 4): fills the driver's device-writable buffers from the host's
//! `getrandom(2)`, optionally throttled to a number of bytes per second.

use std::sync::Arc;
use std::time::Instant;

use kiln_ratelimit::RateLimiter;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemory};

use crate::queue::{drain, ChainDone};
use crate::{
    check_queue_size, Error, QueueOutcome, Result, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_ID_RNG, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const DEVICE: &str = "virtio-rng";

/// Most bytes given per request: the spec lets the device fill less than the buffers offer,
/// and this bounds the work (and the buffer) per chain.
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// A virtio entropy device with one request queue.
pub struct Rng<M> {
    queue_sizes: [u16; 1],
    limiter: Option<RateLimiter>,
    buf: Vec<u8>,
    active: Option<(M, Queue, Arc<dyn VirtioInterrupt>)>,
}

impl<M> std::fmt::Debug for Rng<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("rate_limited", &self.limiter.is_some())
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl<M> Rng<M> {
    /// An entropy device with a queue of `queue_size` entries, throttled by `limiter`'s
    /// bandwidth bucket (bytes) and ops bucket (requests) if given.
    pub fn new(queue_size: u16, limiter: Option<RateLimiter>) -> Result<Self> {
        check_queue_size(DEVICE, queue_size)?;
        Ok(Rng {
            queue_sizes: [queue_size],
            limiter,
            buf: vec![0; MAX_BYTES_PER_REQUEST],
            active: None,
        })
    }
}

/// Fills `buf` from `getrandom(2)` (the urandom pool; blocks only before it is initialised).
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the call.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // r >= 0 and <= rest.len().
        done += r as usize;
    }
    Ok(())
}

/// Fills the writable descriptors of one chain; returns the bytes written.
fn handle<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    buf: &mut [u8],
    limiter: Option<&mut RateLimiter>,
) -> Result<ChainDone> {
    // First pass: how much will we give (readable descriptors are ignored, the spec has none).
    let want = chain
        .clone()
        .filter(|d| d.is_write_only())
        .map(|d| d.len() as usize)
        .fold(0usize, |a, l| a.saturating_add(l))
        .min(buf.len());
    if let Some(l) = limiter {
        let now = Instant::now();
        if want > 0 && !l.consume_at(1, want as u64, now) {
            return Ok(ChainDone::Throttled(l.time_until_at(1, want as u64, now)));
        }
    }
    let buf = &mut buf[..want];
    fill_random(buf).map_err(Error::Entropy)?;
    let mut written = 0usize;
    for d in chain.filter(|d| d.is_write_only()) {
        if written == want {
            break;
        }
        let n = (d.len() as usize).min(want - written);
        if mem
            .write_slice(&buf[written..written + n], d.addr())
            .is_err()
        {
            // A buffer outside guest memory ends the request with what was written so far.
            break;
        }
        written += n;
    }
    // written <= MAX_BYTES_PER_REQUEST.
    Ok(ChainDone::Used(written as u32))
}

impl<M: GuestMemory + Send> VirtioDevice<M> for Rng<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: M,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<()> {
        match (queues.pop(), queues.is_empty()) {
            (Some(q), true) => {
                self.active = Some((mem, q, interrupt));
                Ok(())
            }
            (q, _) => Err(Error::QueueCount {
                device: DEVICE,
                expected: 1,
                got: queues.len() + usize::from(q.is_some()),
            }),
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn save_state(&self) -> Result<crate::DeviceState> {
        // Stateless beyond its queue; the rate limiter's budget starts afresh on restore.
        Ok(crate::DeviceState {
            queues: crate::positions(self.active.as_ref().map(|(_, q, _)| q)),
            data: Vec::new(),
        })
    }

    fn restore_state(&mut self, _data: &[u8]) -> Result<()> {
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<QueueOutcome> {
        if index != 0 {
            return Err(Error::QueueIndex {
                device: DEVICE,
                index,
                count: 1,
            });
        }
        let Some((mem, queue, interrupt)) = self.active.as_mut() else {
            return Err(Error::NotActivated { device: DEVICE });
        };
        let (buf, limiter) = (&mut self.buf, &mut self.limiter);
        let mem = &*mem;
        drain(DEVICE, index, queue, mem, interrupt, |chain| {
            handle(mem, chain, buf, limiter.as_mut())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kiln_ratelimit::BucketConfig;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::test_util::*;

    fn active(limiter: Option<RateLimiter>) -> (Mem, Driver, Rng<Mem>, Arc<CountingInterrupt>) {
        let mem = mem();
        let drv = Driver::default();
        let mut rng = Rng::new(QS, limiter).unwrap();
        let irq = CountingInterrupt::new();
        rng.activate(mem.clone(), vec![drv.queue()], irq.clone())
            .unwrap();
        (mem, drv, rng, irq)
    }

    fn bytes(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn fills_writable_buffers() {
        let (mem, mut drv, mut rng, irq) = active(None);
        let (a, b) = (DATA, DATA + 0x1000);
        drv.add(&mem, &[(a, 64, true), (b, 100, true)]);
        assert_eq!(rng.process_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(Driver::used_idx(&mem), 1);
        assert_eq!(Driver::used(&mem, 0), (0, 164));
        assert_eq!(irq.queue_count(), 1);
        let first = [bytes(&mem, a, 64), bytes(&mem, b, 100)].concat();
        // 164 zero bytes from getrandom would be a 2^-1312 event.
        assert!(first.iter().any(|&x| x != 0));
        assert_eq!(
            bytes(&mem, b + 100, 16),
            vec![0; 16],
            "wrote past the buffer"
        );
        drv.add(&mem, &[(a, 64, true), (b, 100, true)]);
        rng.process_queue(0).unwrap();
        let second = [bytes(&mem, a, 64), bytes(&mem, b, 100)].concat();
        assert_ne!(first, second);
    }

    #[test]
    fn ignores_readable_and_caps_length() {
        let (mem, mut drv, mut rng, _) = active(None);
        drv.add(&mem, &[(DATA, 64, false)]);
        drv.add(&mem, &[(DATA, 64, false), (DATA + 0x100, 32, true)]);
        drv.add(&mem, &[(DATA, 0x2_0000, true)]);
        // Second buffer runs out of guest memory: only the first is filled.
        drv.add(&mem, &[(DATA, 16, true), (MEM_SIZE - 8, 16, true)]);
        rng.process_queue(0).unwrap();
        assert_eq!(Driver::used_idx(&mem), 4);
        assert_eq!(Driver::used(&mem, 0).1, 0);
        assert_eq!(Driver::used(&mem, 1).1, 32);
        assert_eq!(Driver::used(&mem, 2).1, MAX_BYTES_PER_REQUEST as u32);
        assert_eq!(Driver::used(&mem, 3).1, 16);
    }

    #[test]
    fn rate_limit_throttles_bytes() {
        let bw = BucketConfig {
            size: 100,
            one_time_burst: 0,
            refill_time: Duration::from_millis(40),
        };
        let (mem, mut drv, mut rng, _) = active(Some(RateLimiter::new(Some(bw), None).unwrap()));
        drv.add(&mem, &[(DATA, 100, true)]);
        drv.add(&mem, &[(DATA, 50, true)]);
        let QueueOutcome::Throttled(wait) = rng.process_queue(0).unwrap() else {
            panic!("expected throttling");
        };
        assert_eq!(Driver::used_idx(&mem), 1);
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(20));
        std::thread::sleep(wait);
        assert_eq!(rng.process_queue(0).unwrap(), QueueOutcome::Done);
        assert_eq!(Driver::used_idx(&mem), 2);
    }

    #[test]
    fn bad_avail_index_is_a_device_error() {
        let (mem, _drv, mut rng, _) = active(None);
        // avail idx 1000 ahead of next_avail 0 with a 16-entry queue.
        mem.write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(matches!(
            rng.process_queue(0),
            Err(Error::Queue { queue: 0, .. })
        ));
    }

    #[test]
    fn no_config_space() {
        let rng = Rng::<Mem>::new(QS, None).unwrap();
        let mut b = [0xffu8; 4];
        rng.read_config(0, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(rng.device_type(), VIRTIO_ID_RNG);
        assert!(Rng::<Mem>::new(0, None).is_err());
        assert!(Rng::<Mem>::new(48, None).is_err());
    }
}
