//! Guest physical addresses of the boot structures, from `docs/guest-contract.md`.
//! Change the contract first, then these.

/// Boot GDT: 5 descriptors, `[0x500, 0x528)`.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Boot IDT base (IDTR limit 0): 8 zero bytes at `[0x528, 0x530)`.
pub const BOOT_IDT_ADDR: u64 = 0x528;
/// Bytes written (zeroed) at [`BOOT_IDT_ADDR`].
pub const IDT_SIZE: u64 = 8;
/// PVH `hvm_start_info` (version 1).
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// Size of `hvm_start_info` version 1.
pub const START_INFO_SIZE: u64 = 56;
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// Room reserved for PVH memory map entries.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 128;
/// Size of one `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_SIZE: usize = 24;
/// PVH module list (one `hvm_modlist_entry` for the initrd), right after the room
/// reserved for the memory map: `0x6040 + 128 * 24`.
pub const PVH_MODLIST_ADDR: u64 =
    PVH_MEMMAP_ADDR + (PVH_MEMMAP_MAX_ENTRIES * MEMMAP_ENTRY_SIZE) as u64;
/// Size of one `hvm_modlist_entry`.
pub const MODLIST_ENTRY_SIZE: u64 = 32;
/// Linux `boot_params` (the zero page).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Size of `boot_params`.
pub const ZERO_PAGE_SIZE: u64 = 0x1000;
/// Initial stack pointer for the Linux 64-bit protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Bottom of the page holding the boot stack (for overlap checks only).
pub const BOOT_STACK_BOTTOM: u64 = 0x8000;
/// PML4 (CR3) for the Linux 64-bit protocol.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the 4 page directories (2 MiB pages), `[0xb000, 0xf000)`.
pub const PD_ADDR: u64 = 0xb000;
/// PML4 + PDPT + 4 PDs.
pub const PAGE_TABLES_SIZE: u64 = 0x6000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Maximum command line size including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Kernel load address (1 MiB); also the lowest address a kernel may occupy.
pub const KERNEL_LOAD_ADDR: u64 = 0x10_0000;
/// A bzImage's 64-bit entry point is this far past its load address.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest initrd byte when the kernel gives no `initrd_addr_max` (ELF kernels).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37FF_FFFF;
/// Alignment of the initrd.
pub const PAGE_SIZE: u64 = 0x1000;

/// `hdr.boot_flag` of a synthesized setup header.
pub const BOOT_FLAG_MAGIC: u16 = 0xAA55;
/// `hdr.header` ("HdrS") of a synthesized setup header.
pub const HDRS_MAGIC_U32: u32 = 0x5372_6448;
/// `hdr.version` of a synthesized setup header (boot protocol 2.15).
pub const SYNTHETIC_HEADER_VERSION: u16 = 0x020F;
/// `hdr.kernel_alignment` of a synthesized setup header (16 MiB, as Firecracker uses).
pub const SYNTHETIC_KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// `hdr.type_of_loader`: 0xFF, "undefined" boot loader.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
/// `hdr.heap_end_ptr`: end of the real-mode heap minus 0x200, relative to the setup code
/// (unused by the 64-bit entry, filled as boot.rst asks when CAN_USE_HEAP is set).
pub const HEAP_END_PTR: u16 = 0xFE00;

// The PVH structures must stay below boot_params.
const _: () = assert!(PVH_START_INFO_ADDR + START_INFO_SIZE <= PVH_MEMMAP_ADDR);
const _: () = assert!(PVH_MODLIST_ADDR + MODLIST_ENTRY_SIZE <= ZERO_PAGE_ADDR);
const _: () = assert!(BOOT_IDT_ADDR == BOOT_GDT_ADDR + 5 * 8);
const _: () = assert!(PD_ADDR + 4 * 0x1000 == PML4_ADDR + PAGE_TABLES_SIZE);
