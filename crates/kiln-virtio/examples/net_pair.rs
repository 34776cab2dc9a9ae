//! A virtio-net device over a socket pair instead of a tap: the test end of the pair plays
//! the host network. One frame goes guest → host through the transmit queue, one host →
//! guest through the receive queue, driven through the `VirtioDevice` API the way the MMIO
//! transport and the event loop drive it.
//!
//! Run with `cargo run -p kiln-virtio --example net_pair`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use kiln_irq::EventFdLine;
use kiln_virtio::net::{NetBackend, NetHdr, BACKEND_TOKEN, HDR_LEN, TX_QUEUE};
use kiln_virtio::{InterruptKind, Net, NetConfig, VirtioDevice, VirtioInterrupt};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One end of a `SOCK_SEQPACKET` pair: one frame per message, like a tap.
struct Pair(OwnedFd);

impl NetBackend for Pair {
    unsafe fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs.
        let n = unsafe { libc::readv(self.0.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    unsafe fn writev(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs.
        let n = unsafe { libc::writev(self.0.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
    fn supports_offloads(&self) -> bool {
        false
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// Prints the interrupts instead of raising them.
struct Irq(EventFdLine);

impl VirtioInterrupt for Irq {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        println!("interrupt: {kind:?}");
        kiln_irq::InterruptLine::trigger(&self.0)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: both fds are fresh and ours.
    let (dev_end, host_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    let mut net = Net::new(Pair(dev_end), NetConfig::default())?;
    let features = VirtioDevice::<GuestMemoryMmap<()>>::device_features(&net);
    VirtioDevice::<GuestMemoryMmap<()>>::ack_features(&mut net, features);
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
    let queues: Vec<Queue> = vec![rxq.create_queue()?, txq.create_queue()?];
    net.activate(mem.clone(), queues, Arc::new(Irq(EventFdLine::new()?)))?;

    // Guest → host: header + a 60-byte frame.
    let (tx_buf, rx_buf) = (0x1_0000u64, 0x2_0000u64);
    let mut frame = NetHdr::default().to_bytes().to_vec();
    frame.extend((0..60u8).map(|i| i ^ 0x5a));
    mem.write_slice(&frame, GuestAddress(tx_buf))?;
    let d = |addr: u64, len: usize, flags: u16| {
        RawDescriptor::from(Descriptor::new(addr, len as u32, flags, 0))
    };
    txq.add_desc_chains(&[d(tx_buf, frame.len(), 0)], 0)?;
    net.process_queue(TX_QUEUE)?;
    let mut got = [0u8; 2048];
    // SAFETY: got is writable for its length.
    let n = unsafe { libc::read(host_end.as_raw_fd(), got.as_mut_ptr().cast(), got.len()) };
    println!(
        "host received {n} bytes (header + frame), same as sent: {}",
        got[..n.max(0) as usize] == frame[..]
    );

    // Host → guest: the receive buffer is posted, the frame arrives, the device is told.
    rxq.add_desc_chains(&[d(rx_buf, 2048, 2)], 0)?;
    // SAFETY: frame is readable for its length.
    unsafe { libc::write(host_end.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    net.process_backend(BACKEND_TOKEN)?;
    let used_len = rxq
        .used()
        .ring()
        .ref_at(0)
        .map(|e| e.load().len())
        .unwrap_or(0);
    let mut hdr = [0u8; HDR_LEN];
    mem.read_slice(&mut hdr, GuestAddress(rx_buf))?;
    println!(
        "guest received {used_len} bytes, num_buffers {}, stats {:?}",
        NetHdr::from_bytes(&hdr).num_buffers,
        net.stats()
    );
    Ok(())
}
