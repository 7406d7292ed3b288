//! Helpers shared by the KVM integration tests.

use hypervisor::{Vcpu, VcpuExit};

/// Sets `vcpu` up to run real-mode code at 0x1000 (CS base 0).
pub fn start_real_mode(vcpu: &Vcpu) {
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
}

/// Runs `vcpu` until it writes to I/O port `port`; returns the bytes written. Any other exit
/// but an interruption fails the test.
pub fn run_until_out(vcpu: &mut Vcpu, port: u16) -> Vec<u8> {
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(p, d) if p == port => return d.to_vec(),
            VcpuExit::Interrupted => continue,
            other => panic!("unexpected exit {other:?}"),
        }
    }
}
