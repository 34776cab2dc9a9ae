//! Property tests, the stable-toolchain side of fuzzing (the libFuzzer targets, nightly, are
//! in `fuzz/` at the workspace root): whatever a guest writes to the registers or puts in a
//! descriptor table, nothing panics and every call returns.

use std::sync::Arc;

use kiln_bus::{MmioAddress, MmioDevice};
use kiln_irq::EventFdLine;
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use crate::block::request_type;
use crate::mmio::{regs, status};
use crate::test_util::*;
use crate::{Block, BlockConfig, MmioTransport, Rng, VirtioDevice, VIRTIO_F_VERSION_1};

/// Fills guest memory with a cheap deterministic pseudo-random pattern.
fn scramble(mem: &Mem, seed: u64) {
    let mut x = seed | 1;
    let mut buf = vec![0u8; MEM_SIZE as usize];
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    mem.write_slice(&buf, GuestAddress(0)).unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    Read { off: u64, len: usize },
    Write { off: u64, len: usize, val: u64 },
    Notify(u32),
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        // Registers, aligned: most interesting.
        (0u64..0x40).prop_map(|i| i * 4),
        0u64..0x1000,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![Just(4usize), Just(1), Just(2), Just(8)];
    let val = prop_oneof![
        0u64..16,
        Just(u64::from(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        )),
        Just(0xf),
        Just(DESC),
        Just(AVAIL),
        Just(USED),
        any::<u64>(),
    ];
    prop_oneof![
        1 => (offset(), len.clone()).prop_map(|(off, len)| Op::Read { off, len }),
        4 => (offset(), len, val).prop_map(|(off, len, val)| Op::Write { off, len, val }),
        1 => (0u32..3).prop_map(Op::Notify),
    ]
}

fn run_ops<D: VirtioDevice<Mem>>(t: &MmioTransport<Mem, D>, init: bool, ops: &[Op]) {
    let base = MmioAddress(0xd000_0000);
    let w = |off: u64, v: u32| t.mmio_write(base, off, &v.to_le_bytes());
    if init {
        // A correct bring-up first, so random writes hit a live device too.
        w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(regs::DRIVER_FEATURES_SEL, 1);
        w(regs::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
        w(
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(regs::QUEUE_NUM, u32::from(QS));
        w(regs::QUEUE_DESC_LOW, DESC as u32);
        w(regs::QUEUE_DRIVER_LOW, AVAIL as u32);
        w(regs::QUEUE_DEVICE_LOW, USED as u32);
        w(regs::QUEUE_READY, 1);
        w(regs::STATUS, 0xf);
    }
    for op in ops {
        match *op {
            Op::Read { off, len } => {
                let mut b = [0u8; 8];
                t.mmio_read(base, off.min(0x1000 - len as u64), &mut b[..len]);
            }
            Op::Write { off, len, val } => {
                t.mmio_write(
                    base,
                    off.min(0x1000 - len as u64),
                    &val.to_le_bytes()[..len],
                );
            }
            Op::Notify(q) => {
                let _ = t.notify_queue(q);
            }
        }
    }
}

fn disk() -> TempFile {
    let tf = TempFile::new().unwrap();
    tf.as_file().set_len(64 << 10).unwrap();
    tf
}

/// A guest-controlled descriptor: address, length, flags, next.
fn descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    let addr = prop_oneof![
        (0u64..8).prop_map(|i| DATA + i * 0x1000),
        (0u64..8, 0u64..0x1000).prop_map(|(i, o)| DATA + i * 0x1000 + o),
        Just(MEM_SIZE - 1),
        (0u64..4).prop_map(|i| DESC + 16 * i),
        any::<u64>(),
    ];
    let len = prop_oneof![
        Just(1u32),
        Just(16),
        Just(512),
        0u32..64,
        0u32..0x2_0000,
        any::<u32>(),
    ];
    (addr, len, 0u16..8, prop_oneof![0u16..QS, any::<u16>()])
}

/// Random header contents at the data pages: mostly real request types.
fn header() -> impl Strategy<Value = (u32, u64)> {
    let t = prop_oneof![
        Just(request_type::IN),
        Just(request_type::OUT),
        Just(request_type::FLUSH),
        Just(request_type::GET_ID),
        Just(request_type::DISCARD),
        Just(request_type::WRITE_ZEROES),
        any::<u32>(),
    ];
    (t, prop_oneof![0u64..256, any::<u64>()])
}

/// Lays out a random queue: descriptor table, available ring entries and index, headers.
fn lay_out(
    mem: &Mem,
    seed: u64,
    descs: &[(u64, u32, u16, u16)],
    avail: &[u16],
    avail_idx: u16,
    headers: &[(u32, u64)],
) {
    scramble(mem, seed);
    mem.write_slice(&[0u8; 0x3000], GuestAddress(0)).unwrap();
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        write_desc(mem, DESC, i as u16, addr, len, flags, next);
    }
    for (i, &h) in avail.iter().enumerate() {
        mem.write_obj(h, GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
    for (i, &(t, sector)) in headers.iter().enumerate() {
        let at = DATA + i as u64 * 0x1000;
        mem.write_obj(t, GuestAddress(at)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }
}

/// A descriptor table (address, length, flags, next), available ring entries, available index.
type Table = (Vec<(u64, u32, u16, u16)>, Vec<u16>, u16);

/// Five chains of header / data / status descriptors, as a driver would build them, with
/// random sizes, directions and a few random corruptions on top.
fn plausible_table() -> impl Strategy<Value = Table> {
    let chain = (0u32..5, any::<bool>(), any::<bool>());
    let corruption = (0usize..QS as usize, 0u8..4, any::<u64>());
    (
        proptest::collection::vec(chain, 5),
        proptest::collection::vec(corruption, 0..3),
        0u16..=5,
    )
        .prop_map(|(chains, corruptions, avail_idx)| {
            let mut descs = vec![(0u64, 0u32, 0u16, 0u16); QS as usize];
            for (c, &(sectors, writable, two_part)) in chains.iter().enumerate() {
                let i = 3 * c as u16;
                let c = c as u64;
                let data_len = if two_part {
                    sectors * 512
                } else {
                    16 * sectors
                };
                let data_flags = F_NEXT | if writable { F_WRITE } else { 0 };
                descs[usize::from(i)] = (DATA + c * 0x1000, 16, F_NEXT, i + 1);
                descs[usize::from(i) + 1] =
                    (DATA + 0x8000 + c * 0x1000, data_len, data_flags, i + 2);
                descs[usize::from(i) + 2] = (DATA + 0x1_0000 + c, 1, F_WRITE, 0);
            }
            for (i, field, v) in corruptions {
                let d = &mut descs[i];
                match field {
                    0 => d.0 = v,
                    1 => d.1 = v as u32,
                    2 => d.2 = v as u16 & 7,
                    _ => d.3 = v as u16,
                }
            }
            (
                descs,
                vec![0, 3, 6, 9, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                avail_idx,
            )
        })
}

fn random_table() -> impl Strategy<Value = Table> {
    (
        proptest::collection::vec(descriptor(), QS as usize),
        proptest::collection::vec(prop_oneof![0u16..QS, any::<u16>()], QS as usize),
        prop_oneof![0u16..=QS, any::<u16>()],
    )
}

/// Memory seed, table, headers.
fn queue_strategy() -> impl Strategy<Value = (u64, Table, Vec<(u32, u64)>)> {
    (
        any::<u64>(),
        prop_oneof![random_table(), plausible_table()],
        proptest::collection::vec(header(), 8),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mmio_register_sequences_never_panic(
        init in any::<bool>(),
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 0..64),
    ) {
        let m = mem();
        scramble(&m, seed);
        let line = Arc::new(EventFdLine::new().unwrap());
        let rng = MmioTransport::new(m.clone(), Rng::new(QS, None).unwrap(), line.clone());
        run_ops(&rng, init, &ops);
        let tf = disk();
        let blk = Block::new(tf.as_file().try_clone().unwrap(), BlockConfig::default()).unwrap();
        let blk = MmioTransport::new(m, blk, line);
        run_ops(&blk, init, &ops);
        // Whatever happened, a reset brings the transport back to power-on.
        blk.mmio_write(MmioAddress(0), regs::STATUS, &0u32.to_le_bytes());
        prop_assert_eq!(blk.status(), 0);
        prop_assert!(!blk.is_active());
    }

    #[test]
    fn blk_survives_arbitrary_descriptor_tables(
        (seed, (descs, avail, avail_idx), headers) in queue_strategy(),
        read_only in any::<bool>(),
    ) {
        let m = mem();
        lay_out(&m, seed, &descs, &avail, avail_idx, &headers);
        let tf = disk();
        let cfg = BlockConfig { read_only, ..Default::default() };
        let mut blk = Block::new(tf.as_file().try_clone().unwrap(), cfg).unwrap();
        blk.activate(m.clone(), vec![Driver::default().queue()], CountingInterrupt::new())
            .unwrap();
        for _ in 0..3 {
            let _ = blk.process_queue(0);
        }
        prop_assert_eq!(tf.as_file().metadata().unwrap().len(), 64 << 10);
        prop_assert!(Driver::used_idx(&m) <= QS);
    }

    #[test]
    fn rng_survives_arbitrary_descriptor_tables(
        (seed, (descs, avail, avail_idx), headers) in queue_strategy(),
    ) {
        let m = mem();
        lay_out(&m, seed, &descs, &avail, avail_idx, &headers);
        let mut rng = Rng::new(QS, None).unwrap();
        rng.activate(m.clone(), vec![Driver::default().queue()], CountingInterrupt::new())
            .unwrap();
        for _ in 0..3 {
            let _ = rng.process_queue(0);
        }
        // At most one ring's worth was published, so at most that much can be used.
        prop_assert!(Driver::used_idx(&m) <= QS);
    }
}
