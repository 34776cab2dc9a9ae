//! The `memory-stress` scenario: writes a word in every page of free RAM (the memory map's
//! RAM from the end of the guest image up to the MMIO hole, without the virtio driver's
//! region, the initrd and the command line: [`FreeRam`]), then reads every one back. One
//! u64 per 4 KiB page is enough to make the host back the page, and keeps the loops short
//! where ring-0 code is emulated (README, "Why no SSE").
//!
//! With `kiln.stress.hold=1` it prints `KTEST-INFO memory-stress touched pages=N` after
//! writing and waits for a line on the console before reading back (the host reads the
//! VMM's RSS meanwhile).

use kiln_testguest::freeram::{FreeRam, PAGE};
use kiln_testguest::line::{InputLine, LineBuf};
use kiln_testguest::virtio::layout;

use crate::{io, Ctx};

unsafe extern "C" {
    /// End of the loaded image and its BSS (linker.ld).
    static __ktg_image_end: u8;
}

/// The word written at `addr` ("MEMS" in the high half).
const fn word(addr: u64) -> u64 {
    addr ^ 0x4d45_4d53_0000_0000
}

/// Runs `memory-stress`.
pub fn run(ctx: &Ctx<'_>, out: &mut LineBuf) -> bool {
    let hold = match ctx.info.cmdline.get_u64("kiln.stress.hold") {
        Ok(v) => v == Some(1),
        Err(e) => {
            out.push_str("bad value for ");
            out.push_str(e.key);
            return false;
        }
    };
    let image_end = core::ptr::addr_of!(__ktg_image_end) as u64;
    let c = ctx.info.cmdline.as_bytes();
    let cmd = c.as_ptr() as u64;
    let initrd = ctx
        .info
        .initrd
        .map_or((0, 0), |r| (r.addr, r.addr.saturating_add(r.size)));
    let holes = [
        (layout::START, layout::END),
        initrd,
        (cmd, cmd + c.len() as u64 + 1),
    ];
    let fr = FreeRam::new(&ctx.info.memmap, image_end, &holes);
    let pages = fr.pages();
    if pages == 0 {
        out.push_str("no free RAM in the memory map above the image end ");
        out.push_hex(image_end);
        return false;
    }

    for r in fr.as_slice() {
        let mut a = r.start;
        while a < r.end {
            // SAFETY: `a` is 8-byte aligned and lies in a RAM entry of the memory map below
            // the MMIO hole (identity-mapped), above the image's end (no Rust object there)
            // and outside the virtio driver's region, the initrd and the command line (the
            // only memory above the image anything still refers to).
            unsafe { (a as usize as *mut u64).write_volatile(word(a)) };
            a += PAGE;
        }
    }
    if hold {
        let mut l = LineBuf::new();
        l.push_str("KTEST-INFO memory-stress touched pages=");
        l.push_dec(pages);
        io::serial_line(l.as_bytes());
        let mut line = InputLine::new();
        while !line.push(io::serial_getb()) {}
    }
    let mut bad = 0u64;
    let mut first_bad = None;
    for r in fr.as_slice() {
        let mut a = r.start;
        while a < r.end {
            // SAFETY: as for the write above.
            let v = unsafe { (a as usize as *const u64).read_volatile() };
            if v != word(a) {
                bad += 1;
                first_bad.get_or_insert((a, v));
            }
            a += PAGE;
        }
    }

    out.push_str("pages=");
    out.push_dec(pages);
    out.push_str(" mib=");
    out.push_dec((pages * PAGE) >> 20);
    out.push_str(" ranges=");
    out.push_dec(fr.as_slice().len() as u64);
    out.push_str(" from=");
    out.push_hex(fr.as_slice()[0].start);
    if fr.unmapped > 0 {
        out.push_str(" unmapped_high_mib=");
        out.push_dec(fr.unmapped >> 20);
    }
    if fr.dropped > 0 {
        out.push_str(" dropped_mib=");
        out.push_dec(fr.dropped >> 20);
    }
    if let Some((a, v)) = first_bad {
        out.push_str(" MISMATCH pages=");
        out.push_dec(bad);
        out.push_str(" first=");
        out.push_hex(a);
        out.push_str(" read=");
        out.push_hex(v);
        return false;
    }
    true
}
