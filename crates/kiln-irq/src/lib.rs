//! Interrupt plumbing for Kiln VMs on x86_64 KVM.
//!
//! Devices raise interrupts through the [`InterruptLine`] trait and never see KVM. The VMM
//! creates the in-kernel interrupt controller ([`IrqChip`]: 8259 PIC pair, IOAPIC and PIT),
//! hands out GSIs from a [`GsiAllocator`], and backs each line with an [`IrqfdLine`]: writing its
//! eventfd makes KVM inject the interrupt without the vCPU threads ever leaving the guest.
#![warn(missing_docs)]
#![doc = include_str!("../README.md")]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, kvm_pit_config, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod state;
pub use state::IrqChipState;

/// Number of IOAPIC input pins KVM's in-kernel IOAPIC has; GSIs below this are legacy lines.
pub const IOAPIC_PINS: u32 = 24;

/// Errors of the interrupt layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("creating the in-kernel interrupt controller (KVM_CREATE_IRQCHIP): {0}")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("creating the in-kernel PIT (KVM_CREATE_PIT2): {0}")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// Creating an eventfd for an interrupt line failed.
    #[error("creating the eventfd for GSI {gsi}: {source}")]
    EventFd {
        /// The GSI the line was for.
        gsi: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `KVM_IRQFD` failed.
    #[error("registering irqfd for GSI {gsi}: {source}")]
    RegisterIrqfd {
        /// The GSI the line was for.
        gsi: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A legacy GSI outside the IOAPIC's pins was requested.
    #[error("GSI {0} is not a legacy IOAPIC pin (0..{IOAPIC_PINS})")]
    InvalidLegacyGsi(u32),
    /// `KVM_SET_GSI_ROUTING` failed.
    #[error("setting the GSI routing table ({entries} entries): {source}")]
    SetRouting {
        /// Entries in the table.
        entries: usize,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The routing table does not fit KVM's container.
    #[error("GSI routing table too large ({0} entries)")]
    RoutingTooLarge(usize),
    /// An MSI route was requested on a legacy GSI.
    #[error("GSI {0} is a legacy IOAPIC pin and can't carry an MSI route")]
    MsiOnLegacyGsi(u32),
    /// The GSI space is exhausted.
    #[error("no free GSI left (limit {0})")]
    GsiExhausted(u32),
    /// `KVM_GET_IRQCHIP` failed.
    #[error("reading interrupt controller chip {chip_id} (KVM_GET_IRQCHIP): {source}")]
    GetIrqChip {
        /// The chip (`KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE` or `KVM_IRQCHIP_IOAPIC`).
        chip_id: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_IRQCHIP` failed.
    #[error("writing interrupt controller chip {chip_id} (KVM_SET_IRQCHIP): {source}")]
    SetIrqChip {
        /// The chip (`KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE` or `KVM_IRQCHIP_IOAPIC`).
        chip_id: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved chip carries another chip's id (the state is corrupt or its chips are swapped).
    #[error("saved interrupt controller state has chip id {found} where chip {expected} belongs")]
    WrongChipId {
        /// The chip id the slot must hold.
        expected: u32,
        /// The chip id the state holds.
        found: u32,
    },
    /// `KVM_GET_PIT2` failed.
    #[error("reading the PIT state (KVM_GET_PIT2): {0}")]
    GetPit(#[source] kvm_ioctls::Error),
    /// `KVM_SET_PIT2` failed.
    #[error("writing the PIT state (KVM_SET_PIT2): {0}")]
    SetPit(#[source] kvm_ioctls::Error),
    /// `KVM_GET_CLOCK` failed.
    #[error("reading the KVM clock (KVM_GET_CLOCK): {0}")]
    GetClock(#[source] kvm_ioctls::Error),
    /// `KVM_SET_CLOCK` failed.
    #[error("setting the KVM clock (KVM_SET_CLOCK): {0}")]
    SetClock(#[source] kvm_ioctls::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An interrupt line a device can raise.
///
/// Implementations must be cheap and non-blocking: devices call `trigger` from vCPU threads
/// and from I/O threads.
pub trait InterruptLine: Send + Sync {
    /// Raise the interrupt (edge: inject once).
    fn trigger(&self) -> io::Result<()>;
}

/// The in-kernel interrupt controller of one VM: PIC pair + IOAPIC (`KVM_CREATE_IRQCHIP`) and
/// the i8254 PIT (`KVM_CREATE_PIT2`).
///
/// Must be created before any vCPU, as KVM requires.
#[derive(Debug)]
pub struct IrqChip {
    _private: (),
}

impl IrqChip {
    /// Creates the in-kernel PIC, IOAPIC and PIT for `vm`.
    ///
    /// The PIT's speaker port is a dummy so port 0x61 reads don't exit to user space.
    pub fn create(vm: &VmFd) -> Result<Self> {
        vm.create_irq_chip().map_err(Error::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(Error::CreatePit)?;
        Ok(IrqChip { _private: () })
    }

    /// Creates an irqfd-backed line for the legacy IOAPIC/PIC pin `gsi` (for example 4 for
    /// COM1).
    pub fn legacy_line(&self, vm: &VmFd, gsi: u32) -> Result<IrqfdLine> {
        if gsi >= IOAPIC_PINS {
            return Err(Error::InvalidLegacyGsi(gsi));
        }
        IrqfdLine::register(vm, gsi)
    }
}

/// Hands out GSIs: legacy pins are fixed by the board, message-signalled ones (MSI, for PCI)
/// are allocated from [`IOAPIC_PINS`] upwards.
#[derive(Debug)]
pub struct GsiAllocator {
    next: AtomicU64,
    limit: u32,
}

impl GsiAllocator {
    /// An allocator for GSIs `IOAPIC_PINS..limit` (`limit` is KVM's routing table size,
    /// `KVM_CAP_IRQ_ROUTING`, typically 4096).
    pub fn new(limit: u32) -> Self {
        GsiAllocator {
            next: AtomicU64::new(u64::from(IOAPIC_PINS)),
            limit,
        }
    }

    /// Allocates the next free non-legacy GSI.
    pub fn allocate(&self) -> Result<u32> {
        let gsi = self.next.fetch_add(1, Ordering::Relaxed);
        match u32::try_from(gsi) {
            Ok(g) if g < self.limit => Ok(g),
            _ => Err(Error::GsiExhausted(self.limit)),
        }
    }
}

/// One MSI message: where the device writes and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low 32 bits; 0xFEEx_xxxx on x86).
    pub address_lo: u32,
    /// Message address (high 32 bits).
    pub address_hi: u32,
    /// Message data (vector, delivery mode, trigger).
    pub data: u32,
}

/// The VM's GSI routing table: the board's legacy routes (GSI 0..16 to both PICs and the
/// IOAPIC, 16..24 to the IOAPIC, as KVM sets up by default) plus MSI routes for PCI devices.
///
/// `KVM_SET_GSI_ROUTING` replaces the whole table, so this keeps the full set and writes it
/// back on every change (rare: device setup and MSI-X vector programming, never per
/// interrupt).
#[derive(Debug, Default)]
pub struct GsiRouting {
    msi: std::collections::BTreeMap<u32, MsiMessage>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

impl GsiRouting {
    /// An empty table (legacy routes only).
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes `gsi` (from [`GsiAllocator`]) to `msg`, replacing any previous route.
    pub fn set_msi(&mut self, gsi: u32, msg: MsiMessage) -> Result<()> {
        if gsi < IOAPIC_PINS {
            return Err(Error::MsiOnLegacyGsi(gsi));
        }
        self.msi.insert(gsi, msg);
        Ok(())
    }

    /// Removes the MSI route of `gsi`, if any.
    pub fn remove_msi(&mut self, gsi: u32) {
        self.msi.remove(&gsi);
    }

    /// The full table as KVM takes it: legacy routes first, then MSI routes by GSI.
    pub fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::with_capacity(16 * 2 + 24 + self.msi.len());
        for gsi in 0..16 {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            v.push(irqchip_entry(gsi, chip, pin));
        }
        for gsi in 0..IOAPIC_PINS {
            v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, m) in &self.msi {
            v.push(kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        address_lo: m.address_lo,
                        address_hi: m.address_hi,
                        data: m.data,
                        ..Default::default()
                    },
                },
                ..Default::default()
            });
        }
        v
    }

    /// Writes the table to KVM (`KVM_SET_GSI_ROUTING`).
    pub fn commit(&self, vm: &VmFd) -> Result<()> {
        let entries = self.entries();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| Error::RoutingTooLarge(entries.len()))?;
        vm.set_gsi_routing(&table)
            .map_err(|source| Error::SetRouting {
                entries: entries.len(),
                source,
            })
    }
}

/// An interrupt line backed by a KVM irqfd: `trigger` is one eventfd write, and KVM injects
/// the interrupt through the in-kernel IOAPIC/PIC.
#[derive(Debug)]
pub struct IrqfdLine {
    gsi: u32,
    fd: EventFd,
}

impl IrqfdLine {
    /// Creates an eventfd and registers it with KVM as the irqfd for `gsi`.
    pub fn register(vm: &VmFd, gsi: u32) -> Result<Self> {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd { gsi, source })?;
        vm.register_irqfd(&fd, gsi)
            .map_err(|source| Error::RegisterIrqfd { gsi, source })?;
        Ok(IrqfdLine { gsi, fd })
    }

    /// The GSI this line injects.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd behind the line (for registering elsewhere, e.g. a vhost backend).
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }
}

impl InterruptLine for IrqfdLine {
    fn trigger(&self) -> io::Result<()> {
        match self.fd.write(1) {
            Ok(()) => Ok(()),
            // The counter is saturated: an interrupt is already pending, which is all an edge
            // needs.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// An [`InterruptLine`] on a plain eventfd, not registered with KVM: for tests and for
/// device models run outside a VM. Each trigger adds one to the counter.
#[derive(Debug)]
pub struct EventFdLine {
    fd: EventFd,
}

impl EventFdLine {
    /// Creates a non-blocking eventfd line.
    pub fn new() -> io::Result<Self> {
        Ok(EventFdLine {
            fd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Reads and clears the number of triggers since the last call (0 if none).
    pub fn take_count(&self) -> u64 {
        self.fd.read().unwrap_or(0)
    }
}

impl InterruptLine for EventFdLine {
    fn trigger(&self) -> io::Result<()> {
        self.fd.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsi_allocator_starts_after_legacy_pins_and_stops_at_limit() {
        let a = GsiAllocator::new(IOAPIC_PINS + 2);
        assert_eq!(a.allocate().ok(), Some(IOAPIC_PINS));
        assert_eq!(a.allocate().ok(), Some(IOAPIC_PINS + 1));
        assert!(matches!(a.allocate(), Err(Error::GsiExhausted(_))));
    }

    #[test]
    fn routing_table_keeps_legacy_routes_and_adds_msi() {
        let mut r = GsiRouting::new();
        assert!(matches!(
            r.set_msi(
                4,
                MsiMessage {
                    address_lo: 0xfee0_0000,
                    address_hi: 0,
                    data: 0x41
                }
            ),
            Err(Error::MsiOnLegacyGsi(4))
        ));
        let msg = MsiMessage {
            address_lo: 0xfee0_0000,
            address_hi: 0,
            data: 0x41,
        };
        r.set_msi(30, msg).unwrap();
        r.set_msi(25, msg).unwrap();
        let e = r.entries();
        assert_eq!(e.len(), 16 + 24 + 2);
        // PIC routes for 0..16 and IOAPIC routes for 0..24.
        assert_eq!(
            e.iter()
                .filter(|x| x.type_ == KVM_IRQ_ROUTING_IRQCHIP)
                .count(),
            40
        );
        let pin9 = e
            .iter()
            .filter(|x| x.gsi == 9)
            // SAFETY: every GSI-9 entry is an IRQCHIP entry, whose union variant is irqchip.
            .map(|x| unsafe { x.u.irqchip })
            .collect::<Vec<_>>();
        assert_eq!(pin9.len(), 2);
        assert_eq!((pin9[0].irqchip, pin9[0].pin), (KVM_IRQCHIP_PIC_SLAVE, 1));
        assert_eq!((pin9[1].irqchip, pin9[1].pin), (KVM_IRQCHIP_IOAPIC, 9));
        let msis: Vec<u32> = e
            .iter()
            .filter(|x| x.type_ == KVM_IRQ_ROUTING_MSI)
            .map(|x| x.gsi)
            .collect();
        assert_eq!(msis, [25, 30]);
        r.remove_msi(25);
        assert_eq!(r.entries().len(), 41);
    }

    #[test]
    fn eventfd_line_counts_triggers() -> io::Result<()> {
        let l = EventFdLine::new()?;
        assert_eq!(l.take_count(), 0);
        l.trigger()?;
        l.trigger()?;
        assert_eq!(l.take_count(), 2);
        assert_eq!(l.take_count(), 0);
        Ok(())
    }

    /// Opens KVM, or returns `None` when the environment says KVM tests are skipped
    /// (`KILN_SKIP_KVM=1`). Without that variable a missing `/dev/kvm` fails the test.
    fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
        if std::env::var_os("KILN_SKIP_KVM").is_some_and(|v| v == "1") {
            eprintln!("SKIPPED {test}: KILN_SKIP_KVM=1");
            return None;
        }
        match kvm_ioctls::Kvm::new() {
            Ok(kvm) => Some(kvm),
            Err(e) => panic!("{test} needs /dev/kvm ({e}); set KILN_SKIP_KVM=1 to skip"),
        }
    }

    #[test]
    fn legacy_lines_register_and_range_is_checked() {
        let Some(kvm) = kvm_or_skip("legacy_lines_register_and_range_is_checked") else {
            return;
        };
        let vm = kvm.create_vm().expect("create VM");
        let chip = IrqChip::create(&vm).expect("create irqchip");
        assert!(matches!(
            chip.legacy_line(&vm, IOAPIC_PINS),
            Err(Error::InvalidLegacyGsi(_))
        ));
        let line = chip.legacy_line(&vm, 4).expect("GSI 4 line");
        assert_eq!(line.gsi(), 4);
        line.trigger().expect("trigger");
        let mut routing = GsiRouting::new();
        let gsi = GsiAllocator::new(4096).allocate().expect("gsi");
        routing
            .set_msi(
                gsi,
                MsiMessage {
                    address_lo: 0xfee0_0000,
                    address_hi: 0,
                    data: 0x41,
                },
            )
            .expect("msi");
        routing.commit(&vm).expect("KVM_SET_GSI_ROUTING");
        let msi_line = IrqfdLine::register(&vm, gsi).expect("irqfd on an MSI route");
        msi_line.trigger().expect("trigger MSI");
    }
}
