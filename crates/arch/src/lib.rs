//! Vessel's x86_64 platform knowledge, free of any KVM handle: where things live in guest
//! physical memory, what CPUID and MSRs a vCPU starts with, the registers for each boot protocol,
//! the MP and ACPI tables, and loading a kernel (through `linux-loader`).
//!
//! Everything here writes into guest memory or fills plain KVM structures; the VM monitor applies
//! them to a vCPU.

pub mod acpi;
pub mod boot;
pub mod compat;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod template;

/// The most vCPUs a Vessel VM can have: xAPIC IDs are 8 bits wide and 0xff is the broadcast ID,
/// and the MP table and MADT entries Vessel writes carry 8-bit IDs.
pub const MAX_VCPUS: u32 = 254;
