//! Dirty-page tracking through KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES`).
//!
//! [`DirtyTracker::enable`] re-registers every slot of the guest memory with the log flag;
//! from then on KVM sets a bit for each 4 KiB page the guest (or KVM itself, e.g. kvmclock
//! updates) writes. [`DirtyTracker::get_and_clear`] fetches and clears those bits
//! (`KVM_GET_DIRTY_LOG`), one [`RegionBitmap`] per region.
//!
//! What the log does not see: writes the VMM makes through its own mapping of guest memory
//! (virtio devices filling read buffers and used rings). Live migration covers those
//! separately (docs/migration.md, "Device writes").

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::{Error, GuestMemoryMmap, Result, PAGE_SIZE};

/// Dirty bits of one region: bit `i` of word `i / 64` is the page at `gpa + i * 4096`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionBitmap {
    /// Guest-physical start of the region.
    pub gpa: u64,
    /// Region length in bytes.
    pub len: u64,
    /// The bits, `len / 4096` of them rounded up to whole words.
    pub bits: Vec<u64>,
}

impl RegionBitmap {
    /// An all-clear bitmap for `len` bytes at `gpa`.
    pub fn new(gpa: u64, len: u64) -> RegionBitmap {
        RegionBitmap {
            gpa,
            len,
            bits: vec![0; pages(len).div_ceil(64) as usize],
        }
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        pages(self.len)
    }

    /// Whether page `i` of the region is dirty.
    pub fn is_set(&self, i: u64) -> bool {
        self.bits
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Marks page `i` dirty (ignored past the end).
    pub fn set(&mut self, i: u64) {
        if i < self.pages() {
            if let Some(w) = self.bits.get_mut((i / 64) as usize) {
                *w |= 1 << (i % 64);
            }
        }
    }

    /// Dirty pages.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds `other`'s bits (same region).
    pub fn merge(&mut self, other: &RegionBitmap) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }
}

fn pages(len: u64) -> u64 {
    len.div_ceil(PAGE_SIZE)
}

/// One registered slot, as [`crate::register_memory`] numbered it.
#[derive(Clone, Copy, Debug)]
struct Slot {
    slot: u32,
    gpa: u64,
    len: u64,
    host: u64,
}

/// Turns KVM's dirty log on and off for all slots of a guest memory and reads it.
#[derive(Debug)]
pub struct DirtyTracker {
    slots: Vec<Slot>,
    enabled: bool,
}

impl DirtyTracker {
    /// A tracker for `mem`, registered with [`crate::register_memory`] (region `i` is slot `i`).
    pub fn new(mem: &GuestMemoryMmap) -> DirtyTracker {
        let slots = mem
            .iter()
            .enumerate()
            .map(|(i, r)| Slot {
                slot: i as u32,
                gpa: r.start_addr().0,
                len: r.len(),
                host: r.as_ptr() as u64,
            })
            .collect();
        DirtyTracker {
            slots,
            enabled: false,
        }
    }

    /// Whether logging is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    fn set_flags(&self, vm: &VmFd, flags: u32) -> Result<()> {
        for s in &self.slots {
            let desc = kvm_userspace_memory_region {
                slot: s.slot,
                flags,
                guest_phys_addr: s.gpa,
                memory_size: s.len,
                userspace_addr: s.host,
            };
            // SAFETY: the same slot, address, size and mapping as `register_memory` gave KVM
            // (taken from the same `GuestMemoryMmap`): only the flags change, so the
            // caller's promise to `register_memory` (the mapping outlives the slot) still
            // covers it.
            unsafe { vm.set_user_memory_region(desc) }.map_err(|source| Error::RegisterSlot {
                slot: s.slot,
                addr: s.gpa,
                size: s.len,
                source,
            })?;
        }
        Ok(())
    }

    /// Starts logging on every slot (the log starts clear). The memory must have been
    /// registered with `vm` by [`crate::register_memory`] and still be.
    pub fn enable(&mut self, vm: &VmFd) -> Result<()> {
        self.set_flags(vm, KVM_MEM_LOG_DIRTY_PAGES)?;
        self.enabled = true;
        Ok(())
    }

    /// Stops logging (KVM frees its bitmaps).
    pub fn disable(&mut self, vm: &VmFd) -> Result<()> {
        self.set_flags(vm, 0)?;
        self.enabled = false;
        Ok(())
    }

    /// The pages dirtied since logging started or the previous call, per region; clears
    /// the log.
    pub fn get_and_clear(&self, vm: &VmFd) -> Result<Vec<RegionBitmap>> {
        if !self.enabled {
            return Err(Error::DirtyLog {
                slot: 0,
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        self.slots
            .iter()
            .map(|s| {
                let bits =
                    vm.get_dirty_log(s.slot, s.len as usize)
                        .map_err(|source| Error::DirtyLog {
                            slot: s.slot,
                            source,
                        })?;
                let mut b = RegionBitmap::new(s.gpa, s.len);
                // KVM sized its bitmap from the host page size; 4 KiB on x86_64.
                for (a, w) in b.bits.iter_mut().zip(bits) {
                    *a = w;
                }
                Ok(b)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create_guest_memory, register_memory, Backing, MemoryConfig};

    #[test]
    fn bitmap_basics() {
        let mut b = RegionBitmap::new(0x10_0000, 65 * PAGE_SIZE);
        assert_eq!(b.bits.len(), 2);
        assert_eq!(b.count(), 0);
        b.set(0);
        b.set(64);
        b.set(65); // past the end: ignored
        assert!(b.is_set(0) && b.is_set(64) && !b.is_set(1) && !b.is_set(65));
        let mut c = RegionBitmap::new(0x10_0000, 65 * PAGE_SIZE);
        c.set(3);
        c.merge(&b);
        assert_eq!(c.count(), 3);
    }

    /// A guest that writes bytes to chosen pages, then halts.
    #[test]
    fn logs_the_pages_a_guest_writes() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipping: /dev/kvm not available");
            return;
        };
        let mem = create_guest_memory(&MemoryConfig {
            size: 16 << 20,
            backing: Backing::Anonymous,
        })
        .unwrap();
        let vm = kvm.create_vm().unwrap();
        // SAFETY: `mem` is declared before `vm` and outlives it.
        unsafe { register_memory(&vm, &mem) }.unwrap();
        let mut t = DirtyTracker::new(&mem);
        assert!(t.get_and_clear(&vm).is_err());
        t.enable(&vm).unwrap();
        assert_eq!(t.get_and_clear(&vm).unwrap()[0].count(), 0);

        // Real mode at 0x1000: mov byte [0x5000], al; mov byte [0x7000], al; (twice) hlt.
        let code: &[u8] = &[
            0xa2, 0x00, 0x50, // mov [0x5000], al
            0xa2, 0x00, 0x70, // mov [0x7000], al
            0xa2, 0x08, 0x70, // mov [0x7008], al (same page)
            0xf4, // hlt
        ];
        use vm_memory::{Bytes, GuestAddress};
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        sregs.ds.base = 0;
        sregs.ds.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let regs = kvm_bindings::kvm_regs {
            rip: 0x1000,
            rax: 0x5a,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).unwrap();
        // The first write or two may exit to user space on some hosts; run until hlt.
        for _ in 0..16 {
            match vcpu.run() {
                Ok(kvm_ioctls::VcpuExit::Hlt) => break,
                Ok(_) => continue,
                Err(e) => panic!("KVM_RUN: {e}"),
            }
        }
        let d = t.get_and_clear(&vm).unwrap();
        let b = &d[0];
        assert!(b.is_set(5) && b.is_set(7), "{:x?}", &b.bits[..1]);
        // A host write through the mapping is not in KVM's log.
        mem.write_obj(1u8, GuestAddress(0x9000)).unwrap();
        // Cleared by the read; the code page was only read (fetches don't dirty).
        let again = t.get_and_clear(&vm).unwrap();
        assert!(!again[0].is_set(5) && !again[0].is_set(7) && !again[0].is_set(9));
        t.disable(&vm).unwrap();
        assert!(!t.is_enabled());
    }
}
