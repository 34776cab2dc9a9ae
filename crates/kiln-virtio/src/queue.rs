//! The available-ring loop shared by the devices.

use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::{Error, InterruptKind, QueueOutcome, Result, VirtioInterrupt};

/// Chains handled per `process_queue` call before yielding with [`QueueOutcome::Pending`]
/// (one event loop serves several devices; a busy queue must not starve the others).
pub(crate) const BUDGET: usize = 1024;

/// What a device did with one descriptor chain.
pub(crate) enum ChainDone {
    /// Put it in the used ring with this many bytes written to device-writable buffers.
    Used(u32),
    /// The rate limiter refused it: leave it in the available ring and retry after this long.
    Throttled(Duration),
}

/// Pops chains from `queue` and hands them to `handle` until the ring is empty, the budget is
/// spent or `handle` is throttled; then raises the used-buffer interrupt if the driver wants
/// one. Terminates whatever the guest put in memory: each round either consumes a chain or
/// stops.
pub(crate) fn drain<M, F>(
    device: &'static str,
    index: usize,
    queue: &mut Queue,
    mem: &M,
    interrupt: &Arc<dyn VirtioInterrupt>,
    mut handle: F,
) -> Result<QueueOutcome>
where
    M: GuestMemory,
    F: FnMut(DescriptorChain<&M>) -> Result<ChainDone>,
{
    if !queue.ready() {
        // The driver didn't enable this queue: its notifications mean nothing.
        return Ok(QueueOutcome::Done);
    }
    let qerr = |source| Error::Queue {
        device,
        queue: index,
        source,
    };
    let mut used = 0usize;
    let outcome = 'outer: loop {
        queue.disable_notification(mem).map_err(qerr)?;
        let mut progressed = false;
        loop {
            // A fresh iterator per chain: it borrows the queue, which add_used needs next.
            let next = queue.iter(mem).map_err(qerr)?.next();
            let Some(chain) = next else {
                break;
            };
            let head = chain.head_index();
            match handle(chain)? {
                ChainDone::Used(len) => {
                    queue.add_used(mem, head, len).map_err(qerr)?;
                    used += 1;
                    progressed = true;
                }
                ChainDone::Throttled(wait) => {
                    queue.go_to_previous_position();
                    break 'outer QueueOutcome::Throttled(wait);
                }
            }
            if used >= BUDGET {
                break 'outer QueueOutcome::Pending;
            }
        }
        // Re-enable notifications, then look again: the driver may have added a chain after
        // our last look and before it saw notifications enabled. A round that consumed
        // nothing ends the loop even if the ring claims more (a ring we can't read).
        if !queue.enable_notification(mem).map_err(qerr)? || !progressed {
            break QueueOutcome::Done;
        }
    };
    if used > 0 && queue.needs_notification(mem).map_err(qerr)? {
        let q = u16::try_from(index).unwrap_or(u16::MAX);
        interrupt
            .trigger(InterruptKind::Queue(q))
            .map_err(|source| Error::Interrupt {
                device,
                what: "used buffer",
                source,
            })?;
    }
    Ok(outcome)
}
