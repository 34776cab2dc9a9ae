//! The fixed guest-physical memory the virtio driver uses (docs/guest-contract.md, "virtio
//! driver memory"). It lies well above the guest image (which ends below 2 MiB) and below
//! where VMMs put an initrd in any VM of 32 MiB or more; each scenario checks that the part
//! it uses is RAM and clear of the initrd and command line before touching it.

/// Start of the region.
pub const START: u64 = 0x0080_0000;

/// Bytes of memory given to each queue (descriptor table, available and used rings of up
/// to 1024 entries fit in 32 KiB).
pub const QUEUE_AREA: u64 = 0x1_0000;
/// Queue memory: four areas, so a re-initialised device gets fresh memory.
pub const QUEUES: u64 = START;
/// blk's first queue area.
pub const BLK_QA: u64 = QUEUES;
/// blk's second queue area (after a reset).
pub const BLK_QB: u64 = QUEUES + QUEUE_AREA;
/// rng's first queue area.
pub const RNG_QA: u64 = QUEUES + 2 * QUEUE_AREA;
/// rng's second queue area.
pub const RNG_QB: u64 = QUEUES + 3 * QUEUE_AREA;

/// Small buffers: request headers (16 bytes each), status bytes, GET_ID answers, discard
/// segments, indirect tables, canaries.
pub const SMALL: u64 = QUEUES + 4 * QUEUE_AREA;
/// Request headers, 16 bytes apart, one per request slot.
pub const HEADERS: u64 = SMALL;
/// Status bytes, 8 bytes apart, one per request slot.
pub const STATUS: u64 = SMALL + 0x2000;
/// Request slots (headers and status bytes).
pub const SLOTS: usize = 256;
/// Scratch for single requests: GET_ID answers, discard segments, indirect tables.
pub const SCRATCH: u64 = SMALL + 0x4000;
/// End of the small-buffer area.
pub const SMALL_END: u64 = SMALL + 0x1_0000;

/// Data buffers.
pub const DATA: u64 = 0x0090_0000;
/// What the functional scenarios use: 2 MiB of data buffers.
pub const FUNCTIONAL_END: u64 = DATA + 0x20_0000;
/// End of the region: the bench's data buffers at its deepest queue (64 × 128 KiB).
pub const END: u64 = DATA + 0x80_0000;
/// What the entropy scenarios use (no large data).
pub const RNG_END: u64 = SMALL_END;

/// Header address of request slot `i`.
pub const fn header(i: usize) -> u64 {
    HEADERS + 16 * i as u64
}

/// Status byte address of request slot `i`.
pub const fn status(i: usize) -> u64 {
    STATUS + 8 * i as u64
}

// The areas don't overlap, a 1024-entry queue fits its area, and the bench's buffers at its
// deepest queue end at END.
const _: () = {
    assert!(layout_ok());
};

const fn layout_ok() -> bool {
    header(SLOTS) <= STATUS
        && status(SLOTS) <= SCRATCH
        && SCRATCH < SMALL_END
        && SMALL_END <= DATA
        && RNG_QB + QUEUE_AREA == SMALL
        && crate::virtio::ring::QueueMem::bytes(1024) <= QUEUE_AREA
        && FUNCTIONAL_END <= END
        && DATA + crate::virtio::bench::MAX_QD * crate::virtio::bench::SEQ_LEN as u64 == END
}
