//! What a VM is, apart from where it runs: the value types that the command line, the control
//! API and the image tools share, parsed once.
//!
//! - [`size`]: the one size parser (`512M`, `1.5G`, `4096B`, `2GiB`).

pub mod size;
