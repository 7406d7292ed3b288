//! vCPU threads: one per vCPU, each running `KVM_RUN` and dispatching exits to the buses.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::bus::lock;
use devices::Bus;
use hypervisor::{KickHandle, Vcpu, VcpuExit};

use crate::control::Control;
use crate::exit::ExitReason;

// KVM_SYSTEM_EVENT_* types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

/// What a vCPU thread shares with the rest of the VM.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<Control>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    pub index: u32,
    pub kick: KickHandle,
    pub thread: JoinHandle<()>,
}

/// A vCPU shared between its thread, which holds the lock while the vCPU runs, and the main
/// thread, which may take it while the vCPU is parked (to save or load its state).
pub type SharedVcpu = Arc<Mutex<Vcpu>>;

/// Starts vCPU `vcpu`'s thread.
pub fn spawn(vcpu: SharedVcpu, ctx: VcpuContext) -> std::io::Result<VcpuHandle> {
    let index = lock(&vcpu).id();
    let thread = jail::seccomp::spawn(
        jail::seccomp::ThreadClass::Vcpu,
        format!("vcpu{index}"),
        move || {
            if let Err(e) = jail::affinity::pin_vcpu(index) {
                tracing::warn!("vcpu{index}: cannot pin to the CPUs of --cpu-affinity: {e}");
            }
            // The vCPU's run page does not move: it stays in the same Arc'ed mutex.
            lock(&vcpu).bind_to_current_thread();
            run_loop(&vcpu, &ctx);
            lock(&vcpu).unbind_thread();
        },
    )?;
    Ok(VcpuHandle {
        index,
        kick: KickHandle::for_thread(&thread),
        thread,
    })
}

/// Runs until the VM stops. Never panics on guest behaviour: every exit either is handled or
/// ends the VM with a reason.
fn run_loop(shared: &SharedVcpu, ctx: &VcpuContext) {
    let index = lock(shared).id();
    while ctx.control.vcpu_checkpoint() {
        let mut guard = lock(shared);
        let vcpu = &mut *guard;
        let stop = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    // Nothing there: an ISA bus floats high.
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !ctx.pio.write(u64::from(port), data) {
                    tracing::trace!("vcpu{index}: write to unclaimed port {port:#x}");
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    tracing::debug!("vcpu{index}: read of unclaimed MMIO {addr:#x}");
                    data.fill(0);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    tracing::debug!("vcpu{index}: write to unclaimed MMIO {addr:#x}");
                }
                None
            }
            Ok(VcpuExit::Interrupted) => {
                vcpu.clear_kick();
                None
            }
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::Shutdown) => Some(ExitReason::Crash(format!(
                "vCPU {index} shut down (triple fault)"
            ))),
            Ok(VcpuExit::SystemEvent(SYSTEM_EVENT_SHUTDOWN)) => Some(ExitReason::PowerOff),
            Ok(VcpuExit::SystemEvent(SYSTEM_EVENT_RESET)) => Some(ExitReason::Reset),
            Ok(VcpuExit::SystemEvent(SYSTEM_EVENT_CRASH)) => Some(ExitReason::Crash(format!(
                "vCPU {index} reported a guest crash"
            ))),
            Ok(VcpuExit::SystemEvent(t)) => {
                tracing::warn!("vcpu{index}: ignoring KVM system event {t}");
                None
            }
            Ok(VcpuExit::InternalError { suberror }) => Some(ExitReason::Crash(format!(
                "vCPU {index}: KVM could not emulate an instruction (internal error, suberror {suberror}){}",
                host_hint(vcpu)
            ))),
            Ok(VcpuExit::FailEntry(reason)) => Some(ExitReason::Crash(format!(
                "vCPU {index}: VM entry failed (hardware reason {reason:#x})"
            ))),
            Ok(VcpuExit::Other(what)) => Some(ExitReason::Crash(format!(
                "vCPU {index}: unexpected KVM exit '{what}'"
            ))),
            Err(e) => Some(ExitReason::Error(format!("vCPU {index}: {e}"))),
        };
        if let Some(reason) = stop {
            ctx.control.request_exit(reason);
            break;
        }
    }
}

/// Where the guest was, for the message of a failed emulation.
fn host_hint(vcpu: &Vcpu) -> String {
    match (vcpu.regs(), vcpu.sregs()) {
        (Ok(r), Ok(s)) => format!(" at rip {:#x} (cpl {})", r.rip, s.cs.selector & 3),
        _ => String::new(),
    }
}
