//! The virtio-vsock packet header (virtio 1.2, 5.10.6): 44 little-endian bytes in front of
//! every packet on the RX and TX queues.

/// Bytes of a packet header.
pub const HDR_LEN: usize = 44;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_OP_REQUEST`: connect.
pub const OP_REQUEST: u16 = 1;
/// `VIRTIO_VSOCK_OP_RESPONSE`: the connection is accepted.
pub const OP_RESPONSE: u16 = 2;
/// `VIRTIO_VSOCK_OP_RST`: the connection is refused or torn down.
pub const OP_RST: u16 = 3;
/// `VIRTIO_VSOCK_OP_SHUTDOWN`: the sender stops receiving and/or sending (see `flags`).
pub const OP_SHUTDOWN: u16 = 4;
/// `VIRTIO_VSOCK_OP_RW`: `len` bytes of stream data follow the header.
pub const OP_RW: u16 = 5;
/// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: the header's `buf_alloc`/`fwd_cnt` are news.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: please send a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A decoded packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (SHUTDOWN: `SHUTDOWN_*`).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of that buffer so far (wrapping).
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8; HDR_LEN], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
}

impl Header {
    /// Decodes a header (every bit pattern decodes; validation is the device's job).
    pub fn parse(b: &[u8; HDR_LEN]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The header of a reply to `self` (ports and CIDs swapped), with `op`, no payload.
    pub fn reply(&self, op: u16) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1111_2222,
            dst_port: 1234,
            len: 77,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(Header::parse(&b), h);
        assert_eq!(b[0], 0x08, "src_cid is little-endian at 0");
        assert_eq!(&b[20..24], &1234u32.to_le_bytes());
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
        let r = h.reply(OP_RST);
        assert_eq!((r.src_cid, r.dst_cid), (2, h.src_cid));
        assert_eq!((r.src_port, r.dst_port), (1234, 0x1111_2222));
        assert_eq!((r.op, r.len, r.type_), (OP_RST, 0, TYPE_STREAM));
    }
}
