//! Confinement of a VMM process.
//!
//! - [`seccomp`]: a system-call filter per thread class (vCPU, device worker, block I/O,
//!   console, API, migration, pager, main), on by default, and the spawner that gives every
//!   thread of the process exactly its own class's filter.
//! - [`sandbox`]: the jail, Firecracker's jailer done in-process: namespaces, a root holding
//!   only the VM's files, landlock, a cgroup v2 with limits, an unprivileged uid/gid with no
//!   capabilities; a keeper process waits and cleans up.
//! - [`affinity`]: vCPU threads pinned to host CPUs.
//! - [`random`]: the host's randomness without opening a file.

pub mod affinity;
pub mod random;
pub mod sandbox;
pub mod seccomp;
