//! VM snapshots: a directory with a state file ([`format`]) and a memory file ([`memory`]).

pub mod format;
pub mod memory;
