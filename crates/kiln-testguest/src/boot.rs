//! The `boot` scenario's checks: boot information, memory map, command line, initrd.

use crate::bootinfo::{BootInfo, PhysMem};
use crate::cmdline::EXPECTED_MARKER;
use crate::fnv::Fnv1a64;
use crate::line::{Describe, LineBuf};
use crate::memmap::{check_kiln_layout, check_ram_at_most, check_sane, Compact, LayoutError};

/// Initrd bytes are hashed in chunks so that no single slice spans a huge range.
const HASH_CHUNK: u64 = 1 << 20;

/// Runs the `boot` checks. Returns true on PASS; `out` receives the detail (PASS) or the reason
/// (FAIL).
pub fn check_boot(info: &BootInfo<'_>, mem: &dyn PhysMem, out: &mut LineBuf) -> bool {
    out.clear();
    let proto = info.protocol.map_or("unknown", |p| p.name());
    if let Some(p) = info.problem {
        out.push_str(proto);
        out.push_str(": ");
        p.describe(out);
        return false;
    }
    out.push_str("protocol=");
    out.push_str(proto);
    let c = &info.cmdline;

    // Memory map.
    if let Err(e) = check_sane(&info.memmap) {
        return layout_fail(out, &e, info);
    }
    let mem_size = match c.get_u64("kiln.mem") {
        Ok(v) => v,
        Err(e) => return bad_token(out, e.key, e.value),
    };
    let strict = c.get("kiln.layout") == Some(b"kiln");
    match mem_size {
        None => out.push_str(" memmap=sane(no kiln.mem)"),
        Some(m) if strict => {
            if let Err(e) = check_kiln_layout(&info.memmap, m) {
                return layout_fail(out, &e, info);
            }
            out.push_str(" memmap=kiln-layout(");
            out.push_dec(m);
            out.push_str("B)");
        }
        Some(m) => {
            if let Err(e) = check_ram_at_most(&info.memmap, m) {
                return layout_fail(out, &e, info);
            }
            out.push_str(" memmap=ram<=kiln.mem(no kiln.layout=kiln)");
        }
    }

    // Command line.
    match c.get("kiln.marker") {
        None => out.push_str(" marker=absent"),
        Some(v) if v == EXPECTED_MARKER => out.push_str(" marker=ok"),
        Some(v) => {
            out.clear();
            out.push_str("kiln.marker mismatch: got '");
            out.push_escaped(v);
            out.push_str("'");
            return false;
        }
    }

    // Initrd.
    let want_size = match c.get_u64("kiln.initrd_size") {
        Ok(v) => v,
        Err(e) => return bad_token(out, e.key, e.value),
    };
    let want_sum = match c.get_hex("kiln.initrd_sum") {
        Ok(v) => v,
        Err(e) => return bad_token(out, e.key, e.value),
    };
    let Some(r) = info.initrd else {
        if want_size.is_some() || want_sum.is_some() {
            out.clear();
            out.push_str("kiln.initrd_* given but the VMM reported no initrd");
            return false;
        }
        out.push_str(" initrd=none");
        return true;
    };
    let fail_at = |out: &mut LineBuf, what: &str| {
        out.clear();
        out.push_str("initrd [");
        out.push_hex(r.addr);
        out.push_str("+");
        out.push_hex(r.size);
        out.push_str("] ");
        out.push_str(what);
        false
    };
    if !info.memmap.contains_ram(r.addr, r.size) {
        return fail_at(out, "not inside RAM");
    }
    if strict && r.addr % 4096 != 0 {
        return fail_at(out, "not page aligned");
    }
    if let Some(w) = want_size {
        if w != r.size {
            out.clear();
            out.push_str("initrd size ");
            out.push_dec(r.size);
            out.push_str(" != kiln.initrd_size ");
            out.push_dec(w);
            return false;
        }
    }
    out.push_str(" initrd=");
    out.push_dec(r.size);
    out.push_str("B@");
    out.push_hex(r.addr);
    match want_sum {
        None => out.push_str(",sum-skipped"),
        Some(w) => match hash_region(mem, r.addr, r.size) {
            None => return fail_at(out, "unreadable"),
            Some(h) if h != w => {
                out.clear();
                out.push_str("initrd fnv1a64 ");
                out.push_hex_digits(h, 16);
                out.push_str(" != kiln.initrd_sum ");
                out.push_hex_digits(w, 16);
                return false;
            }
            Some(_) => out.push_str(",sum-ok"),
        },
    }
    true
}

fn layout_fail(out: &mut LineBuf, e: &LayoutError, info: &BootInfo<'_>) -> bool {
    out.clear();
    e.describe(out);
    out.push_str("; map: ");
    Compact(&info.memmap).describe(out);
    false
}

fn bad_token(out: &mut LineBuf, key: &str, value: &[u8]) -> bool {
    out.clear();
    out.push_str("bad value for ");
    out.push_str(key);
    out.push_str(": '");
    out.push_escaped(value);
    out.push_str("'");
    false
}

/// FNV-1a 64 of guest memory `[addr, addr + size)`, chunked.
pub fn hash_region(mem: &dyn PhysMem, addr: u64, size: u64) -> Option<u64> {
    let mut h = Fnv1a64::new();
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(HASH_CHUNK);
        h.update(mem.read(addr.checked_add(off)?, usize::try_from(n).ok()?)?);
        off += n;
    }
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootinfo::testmem::FakeMem;
    use crate::bootinfo::{bp, BootInfo, HDRS_MAGIC};
    use crate::fnv::fnv1a64;
    use crate::memmap::kiln_layout;

    const MEM: u64 = 2 << 20;
    const BP: u64 = 0x7000;
    const CMD: u64 = 0x2_0000;
    const INITRD: u64 = 0x1f_0000;

    fn setup(cmdline: &str, initrd: Option<&[u8]>) -> FakeMem {
        let mut m = FakeMem::new(MEM as usize);
        m.put_u(BP + bp::BOOT_FLAG as u64, 0xAA55, 2);
        m.put_u(BP + bp::HEADER as u64, u64::from(HDRS_MAGIC), 4);
        m.put_u(BP + bp::TYPE_OF_LOADER as u64, 0xff, 1);
        let layout = kiln_layout(MEM);
        m.put_u(BP + bp::E820_ENTRIES as u64, layout.len() as u64, 1);
        for (i, e) in layout.as_slice().iter().enumerate() {
            let off = BP + (bp::E820_TABLE + i * 20) as u64;
            m.put_u(off, e.addr, 8);
            m.put_u(off + 8, e.size, 8);
            m.put_u(off + 16, u64::from(e.kind), 4);
        }
        m.put_u(BP + bp::CMD_LINE_PTR as u64, CMD, 4);
        m.put(CMD, cmdline.as_bytes());
        if let Some(data) = initrd {
            m.put_u(BP + bp::RAMDISK_IMAGE as u64, INITRD, 4);
            m.put_u(BP + bp::RAMDISK_SIZE as u64, data.len() as u64, 4);
            m.put(INITRD, data);
        }
        m
    }

    fn run(m: &FakeMem) -> (bool, String) {
        let info = BootInfo::collect(1, BP, m);
        let mut out = LineBuf::new();
        let ok = check_boot(&info, m, &mut out);
        (ok, out.as_str().to_string())
    }

    #[test]
    fn full_pass_with_every_token() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let cmd = format!(
            "kiln.mem={MEM} kiln.layout=kiln kiln.marker=Kiln-cmdline_0123456789~!@#%^&*() \
             kiln.initrd_size={} kiln.initrd_sum={:016x}\0",
            data.len(),
            fnv1a64(&data)
        );
        let (ok, detail) = run(&setup(&cmd, Some(&data)));
        assert!(ok, "{detail}");
        assert!(detail.contains("memmap=kiln-layout"), "{detail}");
        assert!(detail.contains("marker=ok"), "{detail}");
        assert!(detail.contains("sum-ok"), "{detail}");
    }

    #[test]
    fn wrong_memory_size_fails_only_in_kiln_layout_mode() {
        let (ok, detail) = run(&setup("kiln.mem=4194304 kiln.layout=kiln\0", None));
        assert!(!ok);
        assert!(detail.contains("memory map entry 2"), "{detail}");
        // Loose mode: less RAM than asked is fine, more is not.
        assert!(run(&setup("kiln.mem=4194304\0", None)).0);
        assert!(!run(&setup("kiln.mem=1048576\0", None)).0);
    }

    #[test]
    fn marker_mismatch_fails() {
        let (ok, detail) = run(&setup(
            "kiln.marker=Kiln-cmdline_0123456789~!@#%^&*(\0",
            None,
        ));
        assert!(!ok);
        assert!(detail.contains("mismatch"), "{detail}");
    }

    #[test]
    fn initrd_checks() {
        let data = [7u8; 100];
        // Size and sum mismatches.
        assert!(!run(&setup("kiln.initrd_size=99\0", Some(&data))).0);
        assert!(!run(&setup("kiln.initrd_sum=0123456789abcdef\0", Some(&data))).0);
        // Tokens say an initrd was given, the VMM reported none.
        let (ok, detail) = run(&setup("kiln.initrd_size=100\0", None));
        assert!(!ok);
        assert!(detail.contains("no initrd"), "{detail}");
        // Present without tokens: PASS with sum skipped.
        let (ok, detail) = run(&setup("\0", Some(&data)));
        assert!(ok, "{detail}");
        assert!(detail.contains("sum-skipped"), "{detail}");
        // Bad token value.
        assert!(!run(&setup("kiln.initrd_size=lots\0", Some(&data))).0);
    }

    #[test]
    fn initrd_outside_ram_is_not_read() {
        let mut m = setup("kiln.initrd_sum=00\0", Some(&[1, 2, 3]));
        m.put_u(BP + bp::RAMDISK_IMAGE as u64, 0x9_fc00, 4);
        let (ok, detail) = run(&m);
        assert!(!ok);
        assert!(detail.contains("not inside RAM"), "{detail}");
    }

    #[test]
    fn structural_problem_fails() {
        let mut m = setup("\0", None);
        m.put_u(BP + bp::TYPE_OF_LOADER as u64, 0, 1);
        let (ok, detail) = run(&m);
        assert!(!ok);
        assert!(detail.contains("type_of_loader"), "{detail}");
    }

    #[test]
    fn hash_region_chunks_match_one_shot() {
        let mut m = FakeMem::new(3 << 20);
        let data: Vec<u8> = (0..(2 << 20) + 17).map(|i: u32| (i * 31) as u8).collect();
        m.put(0x1000, &data);
        assert_eq!(
            hash_region(&m, 0x1000, data.len() as u64),
            Some(fnv1a64(&data))
        );
        assert_eq!(hash_region(&m, 0x1000, 4 << 20), None);
    }
}
