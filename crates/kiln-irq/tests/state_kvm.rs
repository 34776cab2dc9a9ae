//! KVM test of `IrqChip::save` / `IrqChipState::restore`: program the PIC, IOAPIC and PIT of
//! one VM through the ioctls, let its clock run, save, restore into a fresh VM and read the
//! second VM back through the ioctls.
//!
//! Needs `/dev/kvm`; `KILN_SKIP_KVM=1` skips it.

use std::time::{Duration, Instant};

use kiln_irq::{IrqChip, IrqChipState};
use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VmFd};

fn kvm_or_skip(test: &str) -> Option<Kvm> {
    if std::env::var_os("KILN_SKIP_KVM").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED {test}: KILN_SKIP_KVM=1");
        return None;
    }
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => panic!("{test} needs /dev/kvm ({e}); set KILN_SKIP_KVM=1 to skip"),
    }
}

fn chip(vm: &VmFd, chip_id: u32) -> kvm_irqchip {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).expect("KVM_GET_IRQCHIP");
    c
}

/// IOAPIC pin 4 (COM1): vector 0x34, level-triggered, unmasked, destination APIC 1.
const REDIR4: u64 = (1 << 56) | (1 << 15) | 0x34;
/// IOAPIC pin 9: vector 0x39, edge, masked, destination APIC 2.
const REDIR9: u64 = (2 << 56) | (1 << 16) | 0x39;
const PIT_COUNT: u32 = 0x2e9c;
const PIT_MODE: u8 = 2;

/// Programs the first VM's chips with values a freshly created irqchip does not hold.
fn program(vm: &VmFd) {
    let mut master = chip(vm, KVM_IRQCHIP_PIC_MASTER);
    let mut slave = chip(vm, KVM_IRQCHIP_PIC_SLAVE);
    let mut ioapic = chip(vm, KVM_IRQCHIP_IOAPIC);
    // SAFETY: each chip's union holds the variant its chip_id names (KVM filled it); all are
    // plain integers, so any bit pattern is valid.
    unsafe {
        master.chip.pic.imr = 0xe8;
        master.chip.pic.irq_base = 0x20;
        master.chip.pic.elcr = 0x08;
        slave.chip.pic.imr = 0x7d;
        slave.chip.pic.irq_base = 0x28;
        ioapic.chip.ioapic.id = 5;
        ioapic.chip.ioapic.redirtbl[4].bits = REDIR4;
        ioapic.chip.ioapic.redirtbl[9].bits = REDIR9;
    }
    vm.set_irqchip(&master).expect("set PIC master");
    vm.set_irqchip(&slave).expect("set PIC slave");
    vm.set_irqchip(&ioapic).expect("set IOAPIC");

    let mut pit = vm.get_pit2().expect("KVM_GET_PIT2");
    let ch = &mut pit.channels[0];
    ch.count = PIT_COUNT;
    ch.mode = PIT_MODE;
    ch.rw_mode = 3; // lobyte/hibyte
    ch.gate = 1;
    pit.channels[2].mode = 3;
    pit.channels[2].count = 0x0533;
    vm.set_pit2(&pit).expect("KVM_SET_PIT2");
}

/// The fields `program` sets.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    master: [u8; 3],
    slave: [u8; 2],
    ioapic_id: u32,
    redir: [u64; 2],
    pit0: (u32, u8, u8),
    pit2: (u32, u8),
}

fn observe(vm: &VmFd) -> Observed {
    let master = chip(vm, KVM_IRQCHIP_PIC_MASTER);
    let slave = chip(vm, KVM_IRQCHIP_PIC_SLAVE);
    let ioapic = chip(vm, KVM_IRQCHIP_IOAPIC);
    let pit = vm.get_pit2().expect("KVM_GET_PIT2");
    // SAFETY: as in `program`: each union holds its chip's variant, all-integer types.
    let (m, s, io) = unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
    Observed {
        master: [m.imr, m.irq_base, m.elcr],
        slave: [s.imr, s.irq_base],
        ioapic_id: io.id,
        // SAFETY: `bits` spans the whole redirection-entry union; any value is valid.
        redir: unsafe { [io.redirtbl[4].bits, io.redirtbl[9].bits] },
        pit0: (
            pit.channels[0].count,
            pit.channels[0].mode,
            pit.channels[0].rw_mode,
        ),
        pit2: (pit.channels[2].count, pit.channels[2].mode),
    }
}

const EXPECTED: Observed = Observed {
    master: [0xe8, 0x20, 0x08],
    slave: [0x7d, 0x28],
    ioapic_id: 5,
    redir: [REDIR4, REDIR9],
    pit0: (PIT_COUNT, PIT_MODE, 3),
    pit2: (0x0533, 3),
};

#[test]
fn irqchip_pit_and_clock_state_move_to_a_new_vm() {
    let Some(kvm) = kvm_or_skip("irqchip_pit_and_clock_state_move_to_a_new_vm") else {
        return;
    };
    let vm1 = kvm.create_vm().expect("create VM 1");
    let chip1 = IrqChip::create(&vm1).expect("irqchip 1");
    program(&vm1);
    assert_eq!(
        observe(&vm1),
        EXPECTED,
        "KVM did not keep the programmed state"
    );

    // Let VM 1's clock run well past where a new VM's starts, so a restore that did nothing
    // can't pass the clock check.
    std::thread::sleep(Duration::from_millis(300));
    let saved = chip1.save(&vm1).expect("save");
    let saved_at = Instant::now();
    assert!(
        saved.clock.clock >= 300_000_000,
        "VM 1 clock {} ns after 300 ms",
        saved.clock.clock
    );
    assert_eq!(saved.clock.flags, 0, "saved clock must carry no flags");

    // Through the serialized form, as a snapshot file would carry it.
    let bytes = serde_json::to_vec(&saved).expect("serialize");
    let loaded: IrqChipState = serde_json::from_slice(&bytes).expect("deserialize");
    // Pause between save and restore; the guest must not see it.
    std::thread::sleep(Duration::from_millis(200));

    let vm2 = kvm.create_vm().expect("create VM 2");
    let _chip2 = IrqChip::create(&vm2).expect("irqchip 2");
    assert_ne!(
        observe(&vm2),
        EXPECTED,
        "a fresh VM already holds the test values"
    );
    let fresh_clock = vm2.get_clock().expect("KVM_GET_CLOCK").clock;
    assert!(
        fresh_clock < saved.clock.clock,
        "fresh VM clock {fresh_clock} is not behind the saved {}",
        saved.clock.clock
    );

    let before = Instant::now();
    loaded.restore(&vm2).expect("restore");
    let now = vm2.get_clock().expect("KVM_GET_CLOCK").clock;
    let since_restore = before.elapsed();

    assert_eq!(observe(&vm2), EXPECTED);
    // Never behind the saved value, and ahead of it by at most the time spent since the
    // restore call (plus slack for a loaded host), not by the 200 ms pause.
    assert!(
        now >= saved.clock.clock,
        "restored clock {now} ran backwards from {}",
        saved.clock.clock
    );
    let ahead = Duration::from_nanos(now - saved.clock.clock);
    assert!(
        ahead <= since_restore + Duration::from_millis(50),
        "restored clock is {ahead:?} ahead of the saved value ({since_restore:?} since restore, \
         {:?} since save): the pause leaked in",
        saved_at.elapsed()
    );
}

#[test]
fn save_and_restore_keep_a_fresh_chip_unchanged() {
    let Some(kvm) = kvm_or_skip("save_and_restore_keep_a_fresh_chip_unchanged") else {
        return;
    };
    let vm1 = kvm.create_vm().expect("create VM 1");
    let chip1 = IrqChip::create(&vm1).expect("irqchip 1");
    let before = observe(&vm1);
    let state = chip1.save(&vm1).expect("save");
    state.restore(&vm1).expect("restore onto the same VM");
    assert_eq!(observe(&vm1), before);

    // A VM without an in-kernel irqchip has nothing to save into: the error names the chip.
    let bare = kvm.create_vm().expect("create bare VM");
    match state.restore(&bare) {
        Err(kiln_irq::Error::SetPit(_)) => {}
        other => panic!("restore onto a VM without PIT/irqchip: {other:?}"),
    }
    match chip1.save(&bare) {
        Err(kiln_irq::Error::GetIrqChip { chip_id, .. }) => {
            assert_eq!(chip_id, KVM_IRQCHIP_PIC_MASTER)
        }
        other => panic!("save from a VM without irqchip: {other:?}"),
    }
}
