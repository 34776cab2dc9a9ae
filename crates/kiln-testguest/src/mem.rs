//! `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`: compiler_builtins does not export them on
//! x86_64-unknown-linux-gnu and there is no libc. The copies use `rep movsb`/`rep stosb` and the
//! comparison uses volatile reads, so LLVM cannot turn them back into calls to themselves.
//! The direction flag is clear everywhere (entry code `cld`, and the ABI keeps it so).
//!
//! Forward copies and fills move 8 bytes per `rep` iteration: under kvm-pvm guest ring-0 code
//! is emulated and every iteration of a string instruction costs about a microsecond, so
//! byte-wise `rep movsb` made the boot-info copies alone take over 10 ms.

use core::arch::asm;

/// # Safety
/// `dest` and `src` valid for `n` bytes, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid; rep movsq copies n / 8 qwords,
    // then rep movsb the n % 8 remaining bytes, exactly n bytes in all.
    unsafe {
        asm!("rep movsq", "mov rcx, {tail}", "rep movsb",
             tail = in(reg) n % 8,
             inout("rcx") n / 8 => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `dest` and `src` valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest before src or no overlap: a forward copy never reads a byte it already wrote.
        // SAFETY: as for memcpy.
        unsafe { memcpy(dest, src, n) }
    } else {
        // Overlap with dest after src: copy backwards, then restore DF = 0.
        // SAFETY: the caller guarantees both ranges are valid; n > 0 here so n - 1 is in range.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _,
                 inout("rdi") dest.add(n - 1) => _,
                 inout("rsi") src.add(n - 1) => _,
                 options(nostack));
        }
        dest
    }
}

/// # Safety
/// `dest` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // Broadcast the byte to all 8 lanes of RAX.
    let fill = u64::from(c as u8).wrapping_mul(0x0101_0101_0101_0101);
    // SAFETY: the caller guarantees the range is valid; rep stosq writes n / 8 qwords, then
    // rep stosb the n % 8 remaining bytes, exactly n bytes in all.
    unsafe {
        asm!("rep stosq", "mov rcx, {tail}", "rep stosb",
             tail = in(reg) n % 8,
             inout("rcx") n / 8 => _, inout("rdi") dest => _, in("rax") fill,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n and the caller guarantees both ranges are valid.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
