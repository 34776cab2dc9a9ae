//! Pure logic of the Kiln conformance guest.
//!
//! The guest kernel (`src/main.rs`, built by `kiln-testguest-builder` with the `guest` feature)
//! does the hardware side: entry code, port I/O, serial, CPUID, power-off. Everything that only
//! interprets bytes lives here so that it runs and is tested on the host:
//! command-line parsing ([`cmdline`]), boot information parsing ([`bootinfo`]), memory map
//! checks against docs/guest-contract.md ([`memmap`]), the free RAM `memory-stress` and
//! `balloon` use ([`freeram`]), the `boot` checks ([`boot`]), CPUID
//! interpretation ([`cpuid`]), the exit counter arithmetic ([`exits`]), FNV-1a 64 ([`fnv`]),
//! scenario selection ([`scenario`]), output lines ([`line`]), ACPI table discovery and checks
//! ([`acpi`]), local APIC / IOAPIC / IDT encodings ([`apic`]), kvmclock arithmetic
//! ([`pvclock`]), latency histograms ([`hist`]) and the virtio-mmio driver with its
//! scenarios, generic over the machine so that they also run against kiln's device models
//! on the host ([`virtio`]).
//!
//! ```
//! use kiln_testguest::cmdline::Cmdline;
//! use kiln_testguest::scenario::{select, Scenario};
//!
//! let c = Cmdline::new(b"console=ttyS0 kiln.test=boot,cpuid kiln.mem=134217728\0");
//! let sel = select(&c).unwrap();
//! assert_eq!(sel.as_slice(), &[Scenario::Boot, Scenario::Cpuid]);
//! assert_eq!(c.get_u64("kiln.mem"), Ok(Some(128 << 20)));
//! ```
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

pub mod acpi;
pub mod apic;
pub mod boot;
pub mod bootinfo;
pub mod cmdline;
pub mod cpuid;
pub mod exits;
pub mod fnv;
pub mod freeram;
pub mod hist;
pub mod line;
pub mod memmap;
pub mod pvclock;
pub mod scenario;
pub mod virtio;
