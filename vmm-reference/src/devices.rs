//! The devices kiln puts on its buses, as enums of their types.
//!
//! The buses hold a [`PioDev`] / [`MmioDev`] per range rather than an `Arc<dyn …>`, and a
//! vCPU's dispatch cache holds the matching borrow ([`PioDevRef`] / [`MmioDevRef`]), so an
//! exit reaches its device through a `match` and a static call: no function pointer or
//! vtable on the exit path. Virtio transports, many types behind one trait, stay one
//! dynamic call.
//!
//! One kind per bus is "hot": checked with one compare in the vCPU's exit loop, its code
//! inlined there; the others go through one out-of-line `match` (a `match` over all of them
//! compiles to a jump table, an indirect branch again). The hot one is the exit-test device:
//! its work is a single atomic add, so its exits are nothing but dispatch, and the exit
//! benchmark measures that path; the others' own work (a lock, a write to the console)
//! dwarfs a direct call.
//!
//! Each entry also says whether its accesses count as exits in the metrics (decided when it
//! is built: only when metrics go somewhere). Counting is done on the out-of-line path: a
//! counted hot device is borrowed as a cold one, so without metrics the hot path has no
//! branch for them at all.

use std::sync::Arc;

use kiln_bus::{MmioAddress, MmioDevice, MmioSlot, PioAddress, PioDevice, PioSlot};
use kiln_legacy as legacy;

use crate::metrics::{count_exit, counting, ExitCount};
use crate::virtio::VirtioMmio;

/// Declares a device set for one bus: the enum of `Arc`s (`$kind`), the bus entry (`$set`:
/// a kind and whether it is counted) with its borrow (`$set_ref`), `From<Arc<T>>` for each
/// device type, and the bus's slot trait.
macro_rules! device_set {
    (
        $(#[$doc:meta])*
        $set:ident / $set_ref:ident, $kind:ident:
        $slot:ident, $device:ident, $addr:ty, $off:ty,
        read: $read:ident => $count_read:expr,
        write: $write:ident => $count_write:expr,
        hot: $(#[$hdoc:meta])* $hot:ident($hot_ty:ty),
        { $( $(#[$vdoc:meta])* $variant:ident($ty:ty) ),* $(,)? }
    ) => {
        /// A device on this bus, by type.
        pub(crate) enum $kind {
            $(#[$hdoc])* $hot(Arc<$hot_ty>),
            $( $(#[$vdoc])* $variant(Arc<$ty>), )*
        }

        $(#[$doc])*
        pub(crate) struct $set {
            kind: $kind,
            /// Count this entry's accesses in the metrics.
            counted: bool,
        }

        #[doc = concat!("A borrowed [`", stringify!($set), "`], as a vCPU's dispatch cache holds it: ")]
        /// the hot device (uncounted) by itself, so a cached exit to it is one compare and its
        /// inlined code; any other entry as itself, dispatched out of line.
        #[derive(Clone, Copy)]
        pub(crate) enum $set_ref<'a> {
            /// The hot device, not counted in the metrics.
            Hot(&'a $hot_ty),
            /// Any other entry, or the hot device counted in the metrics.
            Cold(&'a $set),
        }

        impl $set {
            /// `kind`, counted in the metrics if `counted` (`From` decides by the metrics
            /// setting).
            #[cfg(test)]
            pub(crate) fn with_counting(kind: $kind, counted: bool) -> Self {
                $set { kind, counted }
            }

            /// Counts and dispatches a read: out of line, so the exit loop holds only the
            /// hot device's compare (a `match` over all kinds compiles to a jump table, an
            /// indirect branch). Cold, so the compiler lays the hot device's code out as the
            /// straight path: every code line that path spans is a miss after a world switch.
            #[cold]
            #[inline(never)]
            fn read_cold(&self, base: $addr, offset: $off, data: &mut [u8]) {
                if self.counted {
                    count_exit($count_read);
                }
                match &self.kind {
                    $kind::$hot(d) => $device::$read(&**d, base, offset, data),
                    $( $kind::$variant(d) => $device::$read(&**d, base, offset, data), )*
                }
            }

            /// See [`read_cold`](Self::read_cold).
            #[cold]
            #[inline(never)]
            fn write_cold(&self, base: $addr, offset: $off, data: &[u8]) {
                if self.counted {
                    count_exit($count_write);
                }
                match &self.kind {
                    $kind::$hot(d) => $device::$write(&**d, base, offset, data),
                    $( $kind::$variant(d) => $device::$write(&**d, base, offset, data), )*
                }
            }
        }

        $(
            /// The device, counted in the metrics when they go somewhere.
            impl From<Arc<$ty>> for $set {
                fn from(dev: Arc<$ty>) -> Self {
                    $set { kind: $kind::$variant(dev), counted: counting() }
                }
            }
        )*

        /// The device, counted in the metrics when they go somewhere.
        impl From<Arc<$hot_ty>> for $set {
            fn from(dev: Arc<$hot_ty>) -> Self {
                $set { kind: $kind::$hot(dev), counted: counting() }
            }
        }

        impl $slot for $set {
            type Ref<'a> = $set_ref<'a>;

            #[inline]
            fn borrow(&self) -> $set_ref<'_> {
                match &self.kind {
                    $kind::$hot(d) if !self.counted => $set_ref::Hot(&**d),
                    _ => $set_ref::Cold(self),
                }
            }

            #[inline(always)]
            fn read(dev: $set_ref<'_>, base: $addr, offset: $off, data: &mut [u8]) {
                match dev {
                    $set_ref::Hot(d) => $device::$read(d, base, offset, data),
                    $set_ref::Cold(e) => e.read_cold(base, offset, data),
                }
            }

            #[inline(always)]
            fn write(dev: $set_ref<'_>, base: $addr, offset: $off, data: &[u8]) {
                match dev {
                    $set_ref::Hot(d) => $device::$write(d, base, offset, data),
                    $set_ref::Cold(e) => e.write_cold(base, offset, data),
                }
            }
        }
    };
}

device_set! {
    /// What kiln's PIO bus holds for a range.
    PioDev / PioDevRef, PioKind:
    PioSlot, PioDevice, PioAddress, u16,
    read: pio_read => ExitCount::IoIn,
    write: pio_write => ExitCount::IoOut,
    hot:
        /// The exit-benchmark target.
        ExitTest(legacy::ExitTestDevice),
    {
        /// COM1.
        Serial(legacy::SerialDevice),
        /// The i8042 controller (reset line, keyboard IRQ).
        I8042(legacy::I8042Device),
        /// Port 0x80.
        Post(legacy::PostDevice),
        /// The ACPI power-management ports.
        Power(legacy::PowerDevice),
        /// An empty PCI configuration space.
        NoPci(legacy::NoPciHost),
        /// The exit-benchmark control device.
        Bench(legacy::BenchDevice),
    }
}

device_set! {
    /// What kiln's MMIO bus holds for a range.
    MmioDev / MmioDevRef, MmioKind:
    MmioSlot, MmioDevice, MmioAddress, u64,
    read: mmio_read => ExitCount::MmioRead,
    write: mmio_write => ExitCount::MmioWrite,
    hot:
        /// The exit-benchmark target's MMIO window.
        ExitTest(legacy::ExitTestDevice),
    {
        /// A virtio-mmio transport, whatever its device.
        Virtio(dyn VirtioMmio),
    }
}

// What the dispatch cache copies on every exit: a tag and a pointer.
const _: () = assert!(std::mem::size_of::<PioDevRef<'static>>() <= 16);
const _: () = assert!(std::mem::size_of::<MmioDevRef<'static>>() <= 16);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_bus::{DispatchCache, MmioBus, PioBus};

    #[test]
    fn buses_of_device_sets_dispatch_through_the_cache_and_without_it() {
        let dev = Arc::new(legacy::ExitTestDevice::new());
        let mut pio = PioBus::<PioDev>::default();
        pio.insert(
            PioAddress(legacy::EXIT_TEST_PORT),
            legacy::EXIT_TEST_PORT_SIZE,
            PioDev::with_counting(PioKind::ExitTest(dev.clone()), false),
        )
        .unwrap();
        pio.insert(
            PioAddress(legacy::POST_PORT),
            1,
            Arc::new(legacy::PostDevice::default()).into(),
        )
        .unwrap();
        let mut mmio = MmioBus::<MmioDev>::default();
        mmio.insert(
            MmioAddress(legacy::EXIT_TEST_MMIO_BASE),
            legacy::EXIT_TEST_MMIO_SIZE,
            MmioDev::with_counting(MmioKind::ExitTest(dev.clone()), true),
        )
        .unwrap();

        let port = PioAddress(legacy::EXIT_TEST_PORT);
        let addr = MmioAddress(legacy::EXIT_TEST_MMIO_BASE);
        let counted_before = crate::metrics::thread_exit_counts();
        let mut cache = DispatchCache::<PioDev, MmioDev>::default();
        for _ in 0..3 {
            if !cache.pio_write(port, &[1]) {
                pio.write_caching(&mut cache, port, &[1]).unwrap();
            }
            if !cache.mmio_write(addr, &[1; 4]) {
                mmio.write_caching(&mut cache, addr, &[1; 4]).unwrap();
            }
        }
        pio.write(port, &[1]).unwrap();
        assert_eq!(dev.pio_writes(), 4);
        assert_eq!(dev.mmio_writes(), 3);
        // The MMIO entry is counted in the metrics (so dispatched out of line), the PIO one
        // not (inline); cached or not, the counts are right.
        let counted = crate::metrics::thread_exit_counts();
        assert_eq!(
            [
                counted[1] - counted_before[1],
                counted[3] - counted_before[3]
            ],
            [0, 3]
        );
        let mut count = [0u8; 4];
        assert!(
            cache.mmio_read(addr, &mut count),
            "the cache remembers the MMIO range"
        );
        assert_eq!(u32::from_le_bytes(count), 3);
        pio.read(port, &mut count).unwrap();
        assert_eq!(u32::from_le_bytes(count), 4);
        // Another device on the same bus: the cache misses, the bus finds it.
        assert!(!cache.pio_write(PioAddress(legacy::POST_PORT), &[0x42]));
        pio.write_caching(&mut cache, PioAddress(legacy::POST_PORT), &[0x42])
            .unwrap();
        assert!(cache.pio_write(PioAddress(legacy::POST_PORT), &[0x43]));
        assert_eq!(
            dev.pio_writes(),
            4,
            "POST writes don't reach the exit-test device"
        );
    }
}
