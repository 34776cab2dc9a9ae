//! Capture and restore of the VM-level interrupt controller and clock state, for snapshots.
//!
//! [`IrqChip::save`] reads, on a paused VM (no vCPU running), the three in-kernel interrupt
//! controller chips (`KVM_GET_IRQCHIP` for the PIC master, the PIC slave and the IOAPIC), the
//! i8254 PIT (`KVM_GET_PIT2`) and the KVM clock (`KVM_GET_CLOCK`). [`IrqChipState::restore`]
//! writes them into another VM whose [`IrqChip`] was created the same way
//! ([`IrqChip::create`]), before its vCPUs run.
//!
//! # Clock semantics
//!
//! The KVM clock is the VM-wide nanosecond counter behind the guest's kvmclock. The state keeps
//! its value at save time and restore sets exactly that value (`KVM_SET_CLOCK`), so from the
//! guest's point of view the pause did not happen: its clock neither jumps forward by the time
//! the VM spent saved nor runs backwards. Wall-clock time in the guest therefore lags by the
//! length of the pause until the guest corrects it (NTP, a guest agent, or re-reading the RTC).
//!
//! The flags `KVM_GET_CLOCK` reports are not restored. `KVM_CLOCK_TSC_STABLE` describes the
//! source host and older kernels reject any flag in `KVM_SET_CLOCK` (Firecracker clears it for
//! that reason). `KVM_CLOCK_REALTIME` would ask the kernel to advance the clock by the host
//! real time elapsed since the save, the jump the semantics above rule out, and
//! `KVM_CLOCK_HOST_TSC` only has meaning on the source host. [`IrqChip::save`] therefore
//! stores the clock with `flags`, `realtime` and `host_tsc` zeroed, and
//! [`IrqChipState::restore`] writes `flags = 0` whatever the state holds.
//!
//! # Serialization
//!
//! [`IrqChipState`] implements serde's `Serialize` and `Deserialize` (through kvm-bindings'
//! `serde` feature, which encodes each KVM struct as its raw bytes, zero-padding or truncating
//! on load if a later kernel grows a struct at its end), so any serde format can carry it.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::{Error, IrqChip, Result};

/// The saved state of a VM's in-kernel interrupt controllers, PIT and KVM clock.
///
/// Fields are the structs KVM's ioctls exchange, unchanged except for the clock (see the
/// [module documentation](self) for its semantics).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct IrqChipState {
    /// The master 8259 PIC (`KVM_IRQCHIP_PIC_MASTER`).
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC (`KVM_IRQCHIP_PIC_SLAVE`).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (`KVM_IRQCHIP_IOAPIC`).
    pub ioapic: kvm_irqchip,
    /// The i8254 PIT (`KVM_GET_PIT2`).
    pub pit: kvm_pit_state2,
    /// The KVM clock at save time, with `flags`, `realtime` and `host_tsc` zeroed.
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|source| Error::GetIrqChip { chip_id, source })?;
    Ok(chip)
}

/// A state whose chips are swapped would program e.g. the IOAPIC with PIC bytes: refuse it.
fn check_id(chip: &kvm_irqchip, expected_id: u32) -> Result<()> {
    if chip.chip_id == expected_id {
        Ok(())
    } else {
        Err(Error::WrongChipId {
            expected: expected_id,
            found: chip.chip_id,
        })
    }
}

fn set_chip(vm: &VmFd, chip: &kvm_irqchip, expected_id: u32) -> Result<()> {
    check_id(chip, expected_id)?;
    vm.set_irqchip(chip).map_err(|source| Error::SetIrqChip {
        chip_id: expected_id,
        source,
    })
}

impl IrqChip {
    /// Captures the PIC pair, IOAPIC, PIT and KVM clock of `vm` (the VM this chip was created
    /// for).
    ///
    /// Call it with every vCPU paused, after their own state is saved or before, but without
    /// any running in between, or the pieces won't describe one moment.
    pub fn save(&self, vm: &VmFd) -> Result<IrqChipState> {
        let pic_master = get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?;
        let pic_slave = get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?;
        let ioapic = get_chip(vm, KVM_IRQCHIP_IOAPIC)?;
        let pit = vm.get_pit2().map_err(Error::GetPit)?;
        let read = vm.get_clock().map_err(Error::GetClock)?;
        let clock = kvm_clock_data {
            clock: read.clock,
            ..Default::default()
        };
        Ok(IrqChipState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }
}

impl IrqChipState {
    /// Writes this state into `vm`, whose [`IrqChip`] was created with [`IrqChip::create`] and
    /// whose vCPUs have not run yet (or are paused).
    ///
    /// Order: PIT, KVM clock, then the PIC master, PIC slave and IOAPIC. The clock is set to
    /// the saved value with no flags (see the [module documentation](self)).
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        vm.set_pit2(&self.pit).map_err(Error::SetPit)?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(Error::SetClock)?;
        set_chip(vm, &self.pic_master, KVM_IRQCHIP_PIC_MASTER)?;
        set_chip(vm, &self.pic_slave, KVM_IRQCHIP_PIC_SLAVE)?;
        set_chip(vm, &self.ioapic, KVM_IRQCHIP_IOAPIC)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_irqchip__bindgen_ty_1, kvm_pic_state};

    fn sample() -> IrqChipState {
        let mut s = IrqChipState {
            pic_master: kvm_irqchip {
                chip_id: KVM_IRQCHIP_PIC_MASTER,
                ..Default::default()
            },
            pic_slave: kvm_irqchip {
                chip_id: KVM_IRQCHIP_PIC_SLAVE,
                ..Default::default()
            },
            ioapic: kvm_irqchip {
                chip_id: KVM_IRQCHIP_IOAPIC,
                ..Default::default()
            },
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data {
                clock: 0x0123_4567_89ab_cdef,
                ..Default::default()
            },
        };
        s.pic_master.chip = kvm_irqchip__bindgen_ty_1 {
            pic: kvm_pic_state {
                imr: 0xfb,
                irq_base: 0x20,
                elcr: 0x08,
                ..Default::default()
            },
        };
        // SAFETY: the IOAPIC chip's union holds `ioapic`; every bit pattern of it is valid
        // (plain integers), so reading and writing it is sound.
        unsafe {
            s.ioapic.chip.ioapic.id = 3;
            s.ioapic.chip.ioapic.redirtbl[4].bits = 0x0100_0000_0001_a034;
        }
        s.pit.channels[0].count = 0x1234;
        s.pit.channels[0].mode = 2;
        s.pit.flags = 1;
        s
    }

    #[test]
    fn state_round_trips_through_serde() {
        let s = sample();
        let json = serde_json::to_vec(&s).expect("serialize");
        let back: IrqChipState = serde_json::from_slice(&json).expect("deserialize");
        // The encoding is the raw bytes of every struct, so equal encodings mean equal state.
        assert_eq!(serde_json::to_vec(&back).expect("serialize again"), json);
        assert_eq!(back.pic_master.chip_id, KVM_IRQCHIP_PIC_MASTER);
        assert_eq!(back.pic_slave.chip_id, KVM_IRQCHIP_PIC_SLAVE);
        assert_eq!(back.ioapic.chip_id, KVM_IRQCHIP_IOAPIC);
        // SAFETY: these chips' unions hold `pic` and `ioapic`; all bit patterns are valid.
        let (pic, ioapic) = unsafe { (back.pic_master.chip.pic, back.ioapic.chip.ioapic) };
        assert_eq!((pic.imr, pic.irq_base, pic.elcr), (0xfb, 0x20, 0x08));
        assert_eq!(ioapic.id, 3);
        // SAFETY: `bits` covers the whole redirection entry union; any value is valid.
        assert_eq!(unsafe { ioapic.redirtbl[4].bits }, 0x0100_0000_0001_a034);
        assert_eq!(back.pit.channels[0].count, 0x1234);
        assert_eq!(back.pit.channels[0].mode, 2);
        assert_eq!(back.pit.flags, 1);
        assert_eq!(back.clock, s.clock);
    }

    #[test]
    fn chip_id_check_refuses_a_swapped_chip() {
        let s = sample();
        assert!(check_id(&s.ioapic, KVM_IRQCHIP_IOAPIC).is_ok());
        assert!(matches!(
            check_id(&s.pic_master, KVM_IRQCHIP_IOAPIC),
            Err(Error::WrongChipId {
                expected: KVM_IRQCHIP_IOAPIC,
                found: KVM_IRQCHIP_PIC_MASTER
            })
        ));
    }
}
