//! Measuring how this host's KVM runs guest kernel code.
//!
//! Ordinary VT-x/AMD-V hosts run guest ring 0 natively. Some paravirtual KVMs (such as
//! `kvm_pvm`, used when the host is itself a VM without nested virtualization) emulate guest
//! ring 0 one instruction at a time; stock Linux kernels are then very slow or fail outright.

use std::time::{Duration, Instant};

use guestmem::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use crate::{Hypervisor, Result, VcpuExit};

/// Iterations of the probe loop (two instructions each).
pub const PROBE_ITERATIONS: u32 = 100_000;

/// Real-mode code at 0x1000: `mov ecx, N; 1: dec ecx; jnz 1b; hlt`.
fn probe_code() -> Vec<u8> {
    let mut c = vec![0x66, 0xb9];
    c.extend_from_slice(&PROBE_ITERATIONS.to_le_bytes());
    c.extend_from_slice(&[0x66, 0x49, 0x75, 0xfc, 0xf4]);
    c
}

/// What the probe measured.
#[derive(Debug, Clone, Copy)]
pub struct Ring0Probe {
    /// Time to run the loop, VM entry to the final `hlt`.
    pub elapsed: Duration,
    /// Estimated time per guest instruction.
    pub per_instruction: Duration,
}

impl Ring0Probe {
    /// Native execution runs 200,000 simple instructions in well under a millisecond; an
    /// instruction-by-instruction emulator needs tens of milliseconds or more.
    pub fn is_native(&self) -> bool {
        self.elapsed < Duration::from_millis(10)
    }
}

impl Hypervisor {
    /// Runs a short ring-0 (real-mode) loop in a scratch VM and times it.
    pub fn probe_ring0(&self) -> Result<Ring0Probe> {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)])
            .map_err(|_| crate::Error::MissingCap("anonymous memory for the probe VM"))?;
        mem.write_slice(&probe_code(), GuestAddress(0x1000))
            .map_err(|_| crate::Error::MissingCap("probe VM memory"))?;
        let vm = self.create_vm()?;
        vm.register_memory(&mem)?;
        let mut vcpu = vm.create_vcpu(0)?;
        let mut sregs = vcpu.sregs()?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)?;
        let mut regs = vcpu.regs()?;
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs)?;
        let t = Instant::now();
        loop {
            match vcpu.run()? {
                VcpuExit::Hlt => break,
                VcpuExit::Interrupted => continue,
                other => {
                    return Err(crate::Error::Probe(format!("unexpected exit {other:?}")));
                }
            }
        }
        let elapsed = t.elapsed();
        Ok(Ring0Probe {
            elapsed,
            per_instruction: elapsed / (2 * PROBE_ITERATIONS),
        })
    }
}
