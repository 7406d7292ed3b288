//! A KVM vCPU: state setters and the run call.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};

use crate::{kick, op, Error, Result};

/// Why `KVM_RUN` returned, in the terms the VM monitor dispatches on.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `in` from an I/O port: fill `data`.
    IoIn(u16, &'a mut [u8]),
    /// `out` to an I/O port.
    IoOut(u16, &'a [u8]),
    /// A read of an address no memory slot backs: fill `data`.
    MmioRead(u64, &'a mut [u8]),
    /// A write to an address no memory slot backs.
    MmioWrite(u64, &'a [u8]),
    /// The guest halted with interrupts off (only without an in-kernel LAPIC halt).
    Hlt,
    /// Triple fault or other shutdown condition.
    Shutdown,
    /// A system event KVM reports (reset, shutdown, crash) with its raw type.
    SystemEvent(u32),
    /// The run was interrupted by a kick (signal or `immediate_exit`).
    Interrupted,
    /// KVM could not handle something the guest did; `suberror` and raw data say what.
    InternalError { suberror: u32 },
    /// VM entry failed with a hardware reason code.
    FailEntry(u64),
    /// Any other exit, by KVM's name for it.
    Other(&'static str),
}

/// What the host's KVM offers for saving and restoring a vCPU's state (checked once, when the
/// vCPU is created).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct VcpuCaps {
    /// `KVM_CAP_XSAVE`: KVM_GET/SET_XSAVE work (else only KVM_GET/SET_FPU).
    pub xsave: bool,
    /// `KVM_CAP_XSAVE2`: the size in bytes of the XSAVE area KVM_GET_XSAVE2 fills (0: no cap).
    pub xsave2_size: usize,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// `KVM_CAP_GET_TSC_KHZ`.
    pub get_tsc_khz: bool,
}

/// A KVM vCPU.
pub struct Vcpu {
    pub(crate) fd: VcpuFd,
    id: u32,
    pub(crate) caps: VcpuCaps,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, id: u32, caps: VcpuCaps) -> Self {
        Vcpu { fd, id, caps }
    }

    /// The vCPU index (and initial APIC ID).
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<()> {
        self.fd.set_cpuid2(cpuid).map_err(op("KVM_SET_CPUID2"))
    }

    /// Sets the given MSRs; every one must be accepted.
    pub fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<()> {
        let msrs = Msrs::from_entries(entries).map_err(|_| Error::PartialMsrs {
            set: 0,
            wanted: entries.len(),
            first_rejected: entries.first().map_or(0, |e| e.index),
        })?;
        let n = self.fd.set_msrs(&msrs).map_err(op("KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(Error::PartialMsrs {
                set: n,
                wanted: entries.len(),
                first_rejected: entries[n].index,
            });
        }
        Ok(())
    }

    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(op("KVM_GET_REGS"))
    }
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).map_err(op("KVM_SET_REGS"))
    }
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(op("KVM_GET_SREGS"))
    }
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(op("KVM_SET_SREGS"))
    }
    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        self.fd.set_fpu(fpu).map_err(op("KVM_SET_FPU"))
    }
    pub fn lapic(&self) -> Result<kvm_lapic_state> {
        self.fd.get_lapic().map_err(op("KVM_GET_LAPIC"))
    }
    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<()> {
        self.fd.set_lapic(lapic).map_err(op("KVM_SET_LAPIC"))
    }
    pub fn mp_state(&self) -> Result<kvm_mp_state> {
        self.fd.get_mp_state().map_err(op("KVM_GET_MP_STATE"))
    }

    /// Makes this vCPU kickable from other threads (see [`crate::KickHandle`]). Call on the
    /// thread that will run it, before the first [`Vcpu::run`].
    pub fn bind_to_current_thread(&mut self) {
        let page: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        kick::bind(page);
    }

    /// Undoes [`Vcpu::bind_to_current_thread`]; call before the vCPU is dropped.
    pub fn unbind_thread(&mut self) {
        kick::bind(std::ptr::null_mut());
    }

    /// Clears a pending kick so the next run enters the guest.
    pub fn clear_kick(&mut self) {
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Runs the vCPU until the next exit that needs the VM monitor.
    pub fn run(&mut self) -> Result<VcpuExit<'_>> {
        // The exit data borrows the run page; an internal error's suberror is read through a
        // pointer taken before the call.
        let page: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                KvmExit::IoIn(port, data) => VcpuExit::IoIn(port, data),
                KvmExit::IoOut(port, data) => VcpuExit::IoOut(port, data),
                KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead(addr, data),
                KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite(addr, data),
                KvmExit::Hlt => VcpuExit::Hlt,
                KvmExit::Shutdown => VcpuExit::Shutdown,
                KvmExit::SystemEvent(t, _) => VcpuExit::SystemEvent(t),
                KvmExit::Intr => VcpuExit::Interrupted,
                KvmExit::FailEntry(reason, _) => VcpuExit::FailEntry(reason),
                KvmExit::InternalError => {
                    // SAFETY: `page` points at this vCPU's mmap'ed run page, alive as long as
                    // `self.fd`; KVM filled its `internal` union member for this exit reason and
                    // reading a plain integer from it is sound.
                    let suberror = unsafe { (*page).__bindgen_anon_1.internal.suberror };
                    VcpuExit::InternalError { suberror }
                }
                KvmExit::Unknown => VcpuExit::Other("unknown"),
                KvmExit::Exception => VcpuExit::Other("exception"),
                KvmExit::Debug(_) => VcpuExit::Other("debug"),
                KvmExit::IrqWindowOpen => VcpuExit::Other("irq window open"),
                KvmExit::Nmi => VcpuExit::Other("nmi"),
                KvmExit::IoapicEoi(_) => VcpuExit::Other("ioapic eoi"),
                _ => VcpuExit::Other("unexpected"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VcpuExit::Interrupted)
            }
            Err(e) => Err(Error::Kvm {
                op: "KVM_RUN",
                source: e,
            }),
        }
    }
}
