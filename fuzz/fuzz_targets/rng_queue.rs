//! virtio-rng over a guest-built queue: no panic, no write outside device-writable buffers
//! and the used ring.
#![no_main]

use kiln_fuzz::{guest_memory, run_queue, QueueInput};
use kiln_virtio::Rng;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: QueueInput| {
    let mem = guest_memory();
    let rng = Rng::new(16, None).expect("rng");
    run_queue(rng, &mem, &input);
});
