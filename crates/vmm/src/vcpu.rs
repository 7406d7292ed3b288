//! vCPU threads: one per vCPU, each running `KVM_RUN` and dispatching exits to the buses, and
//! counting them by kind ([`VcpuCounters`]).

use std::sync::atomic::{AtomicU64, Ordering};
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

/// The kinds of exits [`VcpuCounters`] counts, as the vCPU loop tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitKind {
    Io,
    Mmio,
    Hlt,
    Interrupted,
    Shutdown,
    SystemEvent,
    Other,
}

impl ExitKind {
    const COUNT: usize = 7;

    fn of(exit: &VcpuExit<'_>) -> ExitKind {
        match exit {
            VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => ExitKind::Io,
            VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => ExitKind::Mmio,
            VcpuExit::Hlt => ExitKind::Hlt,
            VcpuExit::Interrupted => ExitKind::Interrupted,
            VcpuExit::Shutdown => ExitKind::Shutdown,
            VcpuExit::SystemEvent(_) => ExitKind::SystemEvent,
            VcpuExit::InternalError { .. } | VcpuExit::FailEntry(_) | VcpuExit::Other(_) => {
                ExitKind::Other
            }
        }
    }
}

/// One vCPU's exits to Vessel, by kind: written by its thread only (one relaxed addition per
/// exit, no lock), read by the API. Kept by the machine across the vCPU threads of a guest
/// reboot; not saved: a restored VM or a migration's target counts from 0.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    by_kind: [AtomicU64; ExitKind::COUNT],
}

impl VcpuCounters {
    fn count(&self, kind: ExitKind) {
        self.by_kind[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now, for vCPU `index`; the total is the sum of the kinds as read.
    pub fn snapshot(&self, index: u32) -> api::types::VcpuCounters {
        let kinds: [u64; ExitKind::COUNT] =
            std::array::from_fn(|k| self.by_kind[k].load(Ordering::Relaxed));
        let get = |k: ExitKind| kinds[k as usize];
        api::types::VcpuCounters {
            index,
            exits: kinds.iter().sum(),
            io_exits: get(ExitKind::Io),
            mmio_exits: get(ExitKind::Mmio),
            hlt_exits: get(ExitKind::Hlt),
            interrupted_exits: get(ExitKind::Interrupted),
            shutdown_exits: get(ExitKind::Shutdown),
            system_event_exits: get(ExitKind::SystemEvent),
            other_exits: get(ExitKind::Other),
        }
    }
}

/// Starts vCPU `vcpu`'s thread, counting its exits in `counters`.
pub fn spawn(
    vcpu: SharedVcpu,
    ctx: VcpuContext,
    counters: Arc<VcpuCounters>,
) -> std::io::Result<VcpuHandle> {
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
            run_loop(&vcpu, &ctx, &counters);
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
fn run_loop(shared: &SharedVcpu, ctx: &VcpuContext, counters: &VcpuCounters) {
    let index = lock(shared).id();
    while ctx.control.vcpu_checkpoint() {
        let mut guard = lock(shared);
        let vcpu = &mut *guard;
        let exit = vcpu.run();
        if let Ok(e) = &exit {
            counters.count(ExitKind::of(e));
        }
        let stop = match exit {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_by_kind_and_in_total() {
        let c = VcpuCounters::default();
        assert_eq!(
            c.snapshot(3),
            api::types::VcpuCounters {
                index: 3,
                ..Default::default()
            }
        );
        let mut data = [0u8; 4];
        let exits = [
            VcpuExit::IoOut(0x3f8, &[0x41]),
            VcpuExit::IoIn(0x3fd, &mut data[..1]),
            VcpuExit::MmioWrite(0xd000_0000, &[0; 4]),
            VcpuExit::Hlt,
            VcpuExit::Interrupted,
            VcpuExit::Interrupted,
            VcpuExit::Shutdown,
            VcpuExit::SystemEvent(SYSTEM_EVENT_RESET),
            VcpuExit::InternalError { suberror: 1 },
            VcpuExit::FailEntry(7),
            VcpuExit::Other("nmi"),
        ];
        for e in &exits {
            c.count(ExitKind::of(e));
        }
        let mut read = [0u8; 4];
        c.count(ExitKind::of(&VcpuExit::MmioRead(0xd000_0000, &mut read)));
        let s = c.snapshot(0);
        assert_eq!(
            s,
            api::types::VcpuCounters {
                index: 0,
                exits: 12,
                io_exits: 2,
                mmio_exits: 2,
                hlt_exits: 1,
                interrupted_exits: 2,
                shutdown_exits: 1,
                system_event_exits: 1,
                other_exits: 3,
            }
        );
        // Only growing, and a snapshot is a copy.
        c.count(ExitKind::Io);
        assert_eq!(s.io_exits, 2);
        let t = c.snapshot(0);
        assert_eq!((t.io_exits, t.exits), (3, 13));
    }
}
