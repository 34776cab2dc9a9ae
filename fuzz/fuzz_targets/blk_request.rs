//! virtio-blk request processing over a guest-built queue: whatever the descriptors, ring and
//! headers say, no panic, no write to guest memory outside device-writable buffers and the
//! used ring, the image keeps its size, and a read-only image keeps its contents.
#![no_main]

use std::os::unix::fs::FileExt;
use std::time::Duration;

use arbitrary::Arbitrary;
use kiln_fuzz::{guest_memory, memfd_disk, run_queue, QueueInput};
use kiln_ratelimit::{BucketConfig, RateLimiter};
use kiln_virtio::{Block, BlockConfig};
use libfuzzer_sys::fuzz_target;

const DISK_LEN: u64 = 64 << 10;

#[derive(Debug, Arbitrary)]
struct Input {
    read_only: bool,
    discard: bool,
    write_zeroes: bool,
    /// An ops bucket of 1 to 4 requests that never refills in a run: deterministic throttling.
    ops_limit: Option<u8>,
    /// Initial image bytes (at offset 0).
    image: Vec<u8>,
    queue: QueueInput,
}

fuzz_target!(|input: Input| {
    let mem = guest_memory();
    let disk = memfd_disk(DISK_LEN);
    let image = &input.image[..input.image.len().min(DISK_LEN as usize)];
    disk.write_all_at(image, 0).expect("image");
    let rate_limiter = input.ops_limit.map(|n| {
        let ops = BucketConfig {
            size: u64::from(n % 4) + 1,
            one_time_burst: 0,
            refill_time: Duration::from_secs(3600),
        };
        RateLimiter::new(None, Some(ops)).expect("limiter")
    });
    let cfg = BlockConfig {
        read_only: input.read_only,
        discard: input.discard,
        write_zeroes: input.write_zeroes,
        id: b"kiln-fuzz".to_vec(),
        rate_limiter,
        ..Default::default()
    };
    let blk = Block::new(disk.try_clone().expect("dup"), cfg).expect("block");
    run_queue(blk, &mem, &input.queue);

    assert_eq!(disk.metadata().expect("stat").len(), DISK_LEN);
    if input.read_only {
        let mut now = vec![0u8; DISK_LEN as usize];
        disk.read_exact_at(&mut now, 0).expect("read image");
        assert_eq!(&now[..image.len()], image, "read-only image changed");
        assert!(
            now[image.len()..].iter().all(|&b| b == 0),
            "read-only image changed"
        );
    }
});
