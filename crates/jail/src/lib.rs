//! Confinement of a VMM process.
//!
//! - [`seccomp`]: a system-call filter per thread class (vCPU, device worker, block I/O,
//!   console, API, migration, pager, main), on by default, and the spawner that gives every
//!   thread of the process exactly its own class's filter.
//! - [`random`]: the host's randomness without opening a file.

pub mod random;
pub mod seccomp;
