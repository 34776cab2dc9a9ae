//! The `kiln` reference VMM as a library: a thin composition of the kiln-* crates. Logic
//! another VMM would want lives in those crates, not here.
#![warn(missing_docs)]

pub mod api;
pub mod bench;
pub mod config;
pub mod control;
pub mod control_sock;
mod devices;
pub mod guest;
pub mod logger;
pub mod metrics;
pub mod migration;
pub mod snapshot;
pub mod virtio;
pub mod vm;
