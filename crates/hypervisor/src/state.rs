//! Saving and restoring what KVM holds of a VM: each vCPU's registers, FPU/XSAVE, LAPIC, MSRs,
//! pending events and CPUID ([`VcpuState`]), and the VM-wide in-kernel devices and clock (PIC,
//! IOAPIC, PIT, kvmclock: [`VmState`]).
//!
//! The states are plain serde structs; the KVM structures inside them serialize as their raw
//! bytes (kvm-bindings' `serde` feature), so a state file is only meaningful to the same
//! architecture and a KVM with the same structure layouts (KVM keeps those stable).
//!
//! Ordering follows KVM's requirements (the KVM API documentation and the comments in Cloud
//! Hypervisor's and Firecracker's save/restore code, which agree):
//! - Save: `KVM_GET_MP_STATE` first (it makes KVM accept pending INIT/SIPI events, which may
//!   change the other state), `KVM_GET_VCPU_EVENTS` last (the other GETs can still move events).
//! - Restore: CPUID first (much of KVM's behaviour depends on it), then the TSC frequency, MP
//!   state, REGS (which clears pending exceptions, so events come after it), SREGS (which holds
//!   the APIC base, so the LAPIC comes after it), XSAVE, XCRS, debug registers, LAPIC (the
//!   TSC-deadline MSR only restores once the LAPIC is in TSC-deadline mode), MSRs (the TSC before
//!   the TSC deadline), and vCPU events last.
//!
//! The vCPU must not be running while its state is saved or restored, and no vCPU of the VM may
//! be running while any vCPU's events are (`KVM_GET/SET_VCPU_EVENTS` are unsafe against other
//! running vCPUs): the caller parks every vCPU first.

use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, Xsave, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING,
};
use kvm_ioctls::Cap;
use serde::{Deserialize, Serialize};

use crate::{op, Error, Hypervisor, Result, Vcpu, Vm};

/// MSR indices (Intel SDM vol. 4, KVM's `msr-index.h` and `kvm_para.h`).
pub mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_TSC_ADJUST: u32 = 0x3b;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_PAT: u32 = 0x277;
    pub const MTRR_PHYS_BASE0: u32 = 0x200;
    pub const MTRR_PHYS_MASK7: u32 = 0x20f;
    pub const MTRR_FIX_64K_00000: u32 = 0x250;
    pub const MTRR_FIX_16K_80000: u32 = 0x258;
    pub const MTRR_FIX_16K_A0000: u32 = 0x259;
    pub const MTRR_FIX_4K_C0000: u32 = 0x268;
    pub const MTRR_FIX_4K_F8000: u32 = 0x26f;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
    pub const KVM_WALL_CLOCK: u32 = 0x11;
    pub const KVM_SYSTEM_TIME: u32 = 0x12;
    /// `MSR_KVM_WALL_CLOCK_NEW` .. `MSR_KVM_ASYNC_PF_INT` (0x4b564d00..=0x4b564d06).
    pub const KVM_PV_FIRST: u32 = 0x4b56_4d00;
    pub const KVM_PV_LAST: u32 = 0x4b56_4d06;
}

/// MSRs saved whatever KVM's index list says (KVM leaves the MTRRs and PAT out of it, and
/// older KVMs some of the others); [`Vcpu::save_state`] drops any that this KVM refuses.
fn essential_msrs() -> Vec<u32> {
    use msr::*;
    let mut v = vec![
        IA32_TSC,
        IA32_TSC_ADJUST,
        IA32_SYSENTER_CS,
        IA32_SYSENTER_ESP,
        IA32_SYSENTER_EIP,
        IA32_MISC_ENABLE,
        IA32_PAT,
        MTRR_FIX_64K_00000,
        MTRR_FIX_16K_80000,
        MTRR_FIX_16K_A0000,
        MTRR_DEF_TYPE,
        IA32_TSC_DEADLINE,
        STAR,
        LSTAR,
        CSTAR,
        SYSCALL_MASK,
        KERNEL_GS_BASE,
        TSC_AUX,
        KVM_WALL_CLOCK,
        KVM_SYSTEM_TIME,
    ];
    v.extend(MTRR_PHYS_BASE0..=MTRR_PHYS_MASK7);
    v.extend(MTRR_FIX_4K_C0000..=MTRR_FIX_4K_F8000);
    v.extend(KVM_PV_FIRST..=KVM_PV_LAST);
    v
}

/// Puts `indices` in restore order: sorted, without duplicates, the TSC deadline last (after
/// the TSC it is relative to).
fn restore_order(mut indices: Vec<u32>) -> Vec<u32> {
    indices.sort_unstable();
    indices.dedup();
    if let Some(i) = indices.iter().position(|&m| m == msr::IA32_TSC_DEADLINE) {
        indices.remove(i);
        indices.push(msr::IA32_TSC_DEADLINE);
    }
    indices
}

/// KVM_GET/SET_MSRS refuse lists of `MAX_IO_MSRS` (256) entries or more.
const MSR_CHUNK: usize = 255;

/// Two TSC frequencies within this many parts per million count as the same (calibration at
/// boot differs slightly between hosts of one model; Firecracker uses the same tolerance).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

/// LAPIC register offsets and bits used to fix up the TSC deadline.
const APIC_LVTT: usize = 0x320;
const APIC_LVT_MASKED: u32 = 1 << 16;
const APIC_LVT_TIMER_MODE_MASK: u32 = 3 << 17;
const APIC_LVT_TIMER_TSC_DEADLINE: u32 = 2 << 17;

/// One MSR's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// The legacy FPU/SSE state (`KVM_GET_FPU`), as a serde-friendly copy of `kvm_fpu`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyFpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for LegacyFpu {
    fn from(f: &kvm_fpu) -> Self {
        LegacyFpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&LegacyFpu> for kvm_fpu {
    fn from(f: &LegacyFpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The FPU, SSE and extended (AVX, ...) register state, in whichever form the host offered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FpuState {
    /// The XSAVE area from `KVM_GET_XSAVE`/`KVM_GET_XSAVE2`, as 32-bit words: the 4 KiB
    /// `kvm_xsave` region, then any extra words `KVM_CAP_XSAVE2` asked for (AMX).
    Xsave(Vec<u32>),
    /// `KVM_GET_FPU`, on hosts without `KVM_CAP_XSAVE` (x87 and SSE only).
    Fpu(Box<LegacyFpu>),
}

/// Everything KVM holds of one vCPU. Serialize it with serde; restore it with
/// [`Vcpu::restore_state`] into a fresh vCPU of the same index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index (its initial APIC ID).
    pub id: u32,
    /// The CPUID the vCPU was given (`KVM_GET_CPUID2`, including the bits KVM updates at run
    /// time such as OSXSAVE).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// `None` when the host lacks `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// In restore order (the TSC before the TSC deadline).
    pub msrs: Vec<MsrEntry>,
    pub events: kvm_vcpu_events,
    /// The vCPU's TSC frequency, if the host reports it (`KVM_CAP_GET_TSC_KHZ`).
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// The saved CPUID as a `CpuId` (for [`Vcpu::set_cpuid`] or a compatibility check).
    pub fn cpuid(&self) -> Result<CpuId> {
        CpuId::from_entries(&self.cpuid).map_err(|_| Error::BadState("too many CPUID entries"))
    }

    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

impl Hypervisor {
    /// The MSRs to save for each vCPU: KVM's index list (`KVM_GET_MSR_INDEX_LIST`) plus the
    /// essentials it may leave out (MTRRs, PAT, syscall MSRs, TSC_AUX, KVM's paravirtual MSRs),
    /// in restore order. Pass it to [`Vcpu::save_state`]; MSRs a vCPU refuses are dropped then.
    pub fn msrs_to_save(&self) -> Result<Vec<u32>> {
        let mut v = self.msr_index_list()?;
        v.extend(essential_msrs());
        Ok(restore_order(v))
    }

    /// The CPUID a vCPU of this host really gets when given the supported CPUID: what a saved
    /// vCPU's CPUID must be compared with before a restore (`arch::compat`). It is read back
    /// from a scratch vCPU (`KVM_GET_CPUID2`): on most hosts it is the supported CPUID itself,
    /// but some paravirtual KVMs (`kvm_pvm`) report a minimal supported CPUID (leaf 1 ECX
    /// without even SSE3) and give every vCPU the hardware's feature bits whatever it was set.
    pub fn offered_cpuid(&self) -> Result<CpuId> {
        let vm = self.create_vm()?;
        let vcpu = vm.create_vcpu(0)?;
        vcpu.set_cpuid(&self.supported_cpuid()?)?;
        CpuId::from_entries(&vcpu.cpuid()?).map_err(|_| Error::BadState("too many CPUID entries"))
    }
}

impl Vcpu {
    /// Reads the MSRs in `indices` with as few `KVM_GET_MSRS` as possible (one per 255). KVM stops
    /// at the first MSR it refuses and says how many it read: that one is dropped and the read
    /// goes on after it (as Cloud Hypervisor does). Returns the values read, in `indices` order,
    /// and the refused indices.
    pub fn get_msrs(&self, indices: &[u32]) -> Result<(Vec<MsrEntry>, Vec<u32>)> {
        let mut got = Vec::with_capacity(indices.len());
        let mut refused = Vec::new();
        let mut rest = indices;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(MSR_CHUNK)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs =
                Msrs::from_entries(&entries).map_err(|_| Error::BadState("MSR list too long"))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(op("KVM_GET_MSRS"))?;
            let n = n.min(chunk.len());
            got.extend(msrs.as_slice()[..n].iter().map(|e| MsrEntry {
                index: e.index,
                data: e.data,
            }));
            if n < chunk.len() {
                refused.push(chunk[n]);
                rest = &rest[n + 1..];
            } else {
                rest = &rest[n..];
            }
        }
        Ok((got, refused))
    }

    /// Writes `entries` in order with as few `KVM_SET_MSRS` as possible; an MSR KVM refuses is
    /// skipped and the others are still written. Returns the refused indices.
    pub fn set_msrs_skipping(&self, entries: &[MsrEntry]) -> Result<Vec<u32>> {
        let mut refused = Vec::new();
        let mut rest = entries;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(MSR_CHUNK)];
            let raw: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|m| kvm_msr_entry {
                    index: m.index,
                    data: m.data,
                    ..Default::default()
                })
                .collect();
            let msrs =
                Msrs::from_entries(&raw).map_err(|_| Error::BadState("MSR list too long"))?;
            let n = self.fd.set_msrs(&msrs).map_err(op("KVM_SET_MSRS"))?;
            let n = n.min(chunk.len());
            if n < chunk.len() {
                refused.push(chunk[n].index);
                rest = &rest[n + 1..];
            } else {
                rest = &rest[n..];
            }
        }
        Ok(refused)
    }

    /// The vCPU's TSC frequency in kHz (`KVM_GET_TSC_KHZ`), if the host reports it.
    pub fn tsc_khz(&self) -> Result<Option<u32>> {
        if !self.caps.get_tsc_khz {
            return Ok(None);
        }
        self.fd
            .get_tsc_khz()
            .map(Some)
            .map_err(op("KVM_GET_TSC_KHZ"))
    }

    /// Tells KVM the guest was stopped (`KVM_KVMCLOCK_CTRL`), so a guest using kvmclock does not
    /// report soft lockups for the time it was paused. Fails harmlessly (EINVAL) when the
    /// guest has not enabled kvmclock.
    pub fn kvmclock_ctrl(&self) -> Result<()> {
        self.fd.kvmclock_ctrl().map_err(op("KVM_KVMCLOCK_CTRL"))
    }

    /// The CPUID KVM holds for this vCPU (`KVM_GET_CPUID2`): what was set, with the bits KVM
    /// keeps up to date at run time (OSXSAVE, ...).
    pub fn cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(op("KVM_GET_CPUID2"))?;
        // KVM may leave zeroed slots after the entries it holds.
        Ok(cpuid
            .as_slice()
            .iter()
            .filter(|e| !(e.function == 0 && e.index == 0 && e.flags == 0 && e.eax == 0))
            .copied()
            .collect())
    }

    /// Words of `kvm_xsave2.extra` this host's XSAVE area needs beyond the 4 KiB region.
    fn xsave_extra_words(&self) -> usize {
        self.caps
            .xsave2_size
            .saturating_sub(std::mem::size_of::<kvm_xsave>())
            .div_ceil(4)
    }

    fn get_fpu_state(&self) -> Result<FpuState> {
        if !self.caps.xsave {
            let fpu = self.fd.get_fpu().map_err(op("KVM_GET_FPU"))?;
            return Ok(FpuState::Fpu(Box::new(LegacyFpu::from(&fpu))));
        }
        if self.caps.xsave2_size == 0 {
            let x = self.fd.get_xsave().map_err(op("KVM_GET_XSAVE"))?;
            return Ok(FpuState::Xsave(x.region.to_vec()));
        }
        let mut x =
            Xsave::new(self.xsave_extra_words()).map_err(|_| Error::BadState("XSAVE area size"))?;
        // SAFETY: `x` holds the 4 KiB region plus the extra words KVM_CAP_XSAVE2 reported for
        // this VM, which is all KVM_GET_XSAVE2 writes; Vessel enables no XSTATE feature
        // dynamically (arch_prctl) after that size was read.
        unsafe { self.fd.get_xsave2(&mut x) }.map_err(op("KVM_GET_XSAVE2"))?;
        let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(x.as_slice());
        Ok(FpuState::Xsave(words))
    }

    fn set_fpu_state(&self, fpu: &FpuState) -> Result<()> {
        match fpu {
            FpuState::Fpu(f) => self.set_fpu(&kvm_fpu::from(&**f)),
            FpuState::Xsave(words) => {
                if !self.caps.xsave {
                    return Err(Error::BadState(
                        "the state has an XSAVE area and this host's KVM lacks KVM_CAP_XSAVE",
                    ));
                }
                const REGION: usize = 1024;
                if words.len() < REGION {
                    return Err(Error::BadState("XSAVE area shorter than 4 KiB"));
                }
                if self.caps.xsave2_size == 0 {
                    let mut x = kvm_xsave::default();
                    x.region.copy_from_slice(&words[..REGION]);
                    // SAFETY: without KVM_CAP_XSAVE2 (kernels before 5.17) KVM_SET_XSAVE reads
                    // exactly the 4 KiB `kvm_xsave` region, which `x` is.
                    return unsafe { self.fd.set_xsave(&x) }.map_err(op("KVM_SET_XSAVE"));
                }
                let extra = self.xsave_extra_words().max(words.len() - REGION);
                let mut x = Xsave::new(extra).map_err(|_| Error::BadState("XSAVE area size"))?;
                // SAFETY: only the fixed 4 KiB region is written; the length field that
                // FamStructWrapper relies on is left alone.
                unsafe { x.as_mut_fam_struct() }
                    .xsave
                    .region
                    .copy_from_slice(&words[..REGION]);
                x.as_mut_slice()[..words.len() - REGION].copy_from_slice(&words[REGION..]);
                // SAFETY: `x` is at least as large as the XSAVE area KVM_CAP_XSAVE2 reported for
                // this VM, which is all KVM_SET_XSAVE reads.
                unsafe { self.fd.set_xsave2(&x) }.map_err(op("KVM_SET_XSAVE"))
            }
        }
    }

    /// Saves this vCPU's state, reading the MSRs in `msr_indices` (normally
    /// [`Hypervisor::msrs_to_save`]; MSRs KVM refuses are left out). The VM must have the
    /// in-kernel irqchip ([`Vm::setup_irqchip_and_timers`]): the LAPIC state lives there.
    ///
    /// The vCPU must not be running, and no other vCPU of the VM either (the caller parks them
    /// all): KVM_GET_VCPU_EVENTS is not safe against running vCPUs.
    ///
    /// A zero TSC deadline while the LAPIC timer is armed in TSC-deadline mode is saved as the
    /// current TSC: KVM clears the MSR when the timer fires, and an expiry whose interrupt was
    /// not yet injected is in no state KVM exposes, so it would be lost (the guest would wait for
    /// a timer interrupt forever). The restored vCPU takes that interrupt at once; a guest that
    /// had disarmed its timer by writing 0 sees one spurious timer interrupt. Firecracker does
    /// the same.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState> {
        let mp_state = self.mp_state()?;
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let fpu = self.get_fpu_state()?;
        let xcrs = if self.caps.xcrs {
            Some(self.fd.get_xcrs().map_err(op("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debugregs = self.fd.get_debug_regs().map_err(op("KVM_GET_DEBUGREGS"))?;
        let lapic = self.lapic()?;
        let tsc_khz = self.tsc_khz()?;
        let cpuid = self.cpuid()?;
        let (mut msrs, _refused) = self.get_msrs(msr_indices)?;
        let lvtt = lapic_reg(&lapic, APIC_LVTT);
        let deadline_armed = lvtt & APIC_LVT_TIMER_MODE_MASK == APIC_LVT_TIMER_TSC_DEADLINE
            && lvtt & APIC_LVT_MASKED == 0;
        let tsc = msrs
            .iter()
            .find(|m| m.index == msr::IA32_TSC)
            .map(|m| m.data);
        if let (true, Some(tsc)) = (deadline_armed, tsc) {
            for m in msrs.iter_mut() {
                if m.index == msr::IA32_TSC_DEADLINE && m.data == 0 {
                    m.data = tsc;
                }
            }
        }
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(op("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id: self.id(),
            cpuid,
            mp_state,
            regs,
            sregs,
            fpu,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Restores `state` into this vCPU, which must be freshly created with the same index and
    /// never run, in a VM whose in-kernel irqchip exists already.
    ///
    /// The vCPU must not be running (nor any other vCPU of the VM). Check the saved CPUID
    /// against the host first (`arch::compat` with [`Hypervisor::offered_cpuid`]): KVM refuses
    /// some features the host lacks, but not all of them. If the saved TSC frequency differs from this vCPU's (beyond 250 ppm) it is
    /// set with `KVM_SET_TSC_KHZ`; a host that cannot scale the TSC fails with
    /// [`Error::TscFrequency`]. MSRs KVM refuses fail with [`Error::MsrsRefused`] after every
    /// other MSR was written.
    pub fn restore_state(&self, state: &VcpuState) -> Result<()> {
        if state.id != self.id() {
            return Err(Error::BadState("the state is of another vCPU index"));
        }
        self.set_cpuid(&state.cpuid()?)?;
        if let (Some(saved), Some(here)) = (state.tsc_khz, self.tsc_khz()?) {
            let diff = u64::from(saved.abs_diff(here));
            if diff * 1_000_000 > u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
                self.fd
                    .set_tsc_khz(saved)
                    .map_err(|source| Error::TscFrequency {
                        saved,
                        host: here,
                        source,
                    })?;
            }
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(op("KVM_SET_MP_STATE"))?;
        self.set_regs(&state.regs)?;
        self.set_sregs(&state.sregs)?;
        self.set_fpu_state(&state.fpu)?;
        match (&state.xcrs, self.caps.xcrs) {
            (Some(x), true) => self.fd.set_xcrs(x).map_err(op("KVM_SET_XCRS"))?,
            (Some(_), false) => {
                return Err(Error::BadState(
                    "the state has XCRs and this host's KVM lacks KVM_CAP_XCRS",
                ))
            }
            (None, _) => {}
        }
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(op("KVM_SET_DEBUGREGS"))?;
        self.set_lapic(&state.lapic)?;
        let refused = self.set_msrs_skipping(&state.msrs)?;
        if !refused.is_empty() {
            return Err(Error::MsrsRefused(refused));
        }
        // Current KVMs report a pending NMI with this flag set; older ones left it out, and
        // KVM_SET_VCPU_EVENTS ignores `nmi.pending` without it. (The SIPI vector is never
        // reported: KVM_GET_MP_STATE has already taken any pending SIPI.)
        let mut events = state.events;
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
        self.fd
            .set_vcpu_events(&events)
            .map_err(op("KVM_SET_VCPU_EVENTS"))?;
        // Best effort, as in Firecracker: only meaningful once the guest uses kvmclock.
        let _ = self.kvmclock_ctrl();
        Ok(())
    }
}

/// How guest time continues after [`Vm::restore_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClockMode {
    /// kvmclock goes on from the saved value, as if no time had passed (the guest's TSC does
    /// the same, from the saved MSR value).
    #[default]
    Continue,
    /// kvmclock advances by the wall-clock time since the state was saved (guest kernels then
    /// see the time the VM was stopped pass at once, as after a suspend). The TSC still goes on
    /// from its saved value.
    AdvanceByWallTime,
}

/// The VM-wide state KVM holds: the in-kernel PICs, IOAPIC, PIT and kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// kvmclock (`KVM_GET_CLOCK`): guest nanoseconds, and with `KVM_CLOCK_REALTIME` in its
    /// flags the host's CLOCK_REALTIME at the same instant.
    pub clock: kvm_clock_data,
    /// Host CLOCK_REALTIME (ns since the epoch) when the state was saved, for
    /// [`ClockMode::AdvanceByWallTime`] on hosts whose KVM does not report it with the clock.
    pub saved_at_ns: u64,
}

fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Vm {
    fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd()
            .get_irqchip(&mut chip)
            .map_err(op("KVM_GET_IRQCHIP"))?;
        Ok(chip)
    }

    /// Saves the in-kernel PICs, IOAPIC, PIT and kvmclock. Every vCPU must be parked.
    pub fn save_state(&self) -> Result<VmState> {
        Ok(VmState {
            pic_master: self.irqchip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.irqchip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd().get_pit2().map_err(op("KVM_GET_PIT2"))?,
            clock: self.fd().get_clock().map_err(op("KVM_GET_CLOCK"))?,
            saved_at_ns: realtime_ns(),
        })
    }

    /// Restores the state [`Vm::save_state`] returned into a VM built the same way (irqchip and
    /// PIT created by [`Vm::setup_irqchip_and_timers`]). Call it after the vCPUs' states and
    /// before any vCPU runs; `clock` says whether guest time continues from the saved value or
    /// advances by the wall-clock time that passed.
    pub fn restore_state(&self, state: &VmState, clock: ClockMode) -> Result<()> {
        let check_chip = |c: &kvm_irqchip, id: u32| {
            if c.chip_id == id {
                Ok(())
            } else {
                Err(Error::BadState("irqchip state of the wrong chip"))
            }
        };
        check_chip(&state.pic_master, KVM_IRQCHIP_PIC_MASTER)?;
        check_chip(&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE)?;
        check_chip(&state.ioapic, KVM_IRQCHIP_IOAPIC)?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd().set_irqchip(chip).map_err(op("KVM_SET_IRQCHIP"))?;
        }
        self.fd().set_pit2(&state.pit).map_err(op("KVM_SET_PIT2"))?;
        let mut data = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        if clock == ClockMode::AdvanceByWallTime {
            let kvm_realtime = u32::try_from(self.fd().check_extension_int(Cap::AdjustClock))
                .is_ok_and(|flags| flags & KVM_CLOCK_REALTIME != 0);
            if kvm_realtime && state.clock.flags & KVM_CLOCK_REALTIME != 0 {
                // KVM adds the CLOCK_REALTIME elapsed since `realtime` itself, at the instant
                // it sets the clock (never stepping it backwards).
                data.flags = KVM_CLOCK_REALTIME;
                data.realtime = state.clock.realtime;
            } else {
                data.clock = data
                    .clock
                    .saturating_add(realtime_ns().saturating_sub(state.saved_at_ns));
            }
        }
        self.fd().set_clock(&data).map_err(op("KVM_SET_CLOCK"))
    }

    /// kvmclock now, in guest nanoseconds (`KVM_GET_CLOCK`).
    pub fn clock_ns(&self) -> Result<u64> {
        Ok(self.fd().get_clock().map_err(op("KVM_GET_CLOCK"))?.clock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_order_puts_the_tsc_deadline_after_the_tsc() {
        let v = restore_order(vec![
            msr::IA32_TSC_DEADLINE,
            0xc000_0081,
            msr::IA32_TSC,
            0x10,
        ]);
        assert_eq!(v, vec![msr::IA32_TSC, 0xc000_0081, msr::IA32_TSC_DEADLINE]);
        let e = restore_order(essential_msrs());
        assert_eq!(e.last(), Some(&msr::IA32_TSC_DEADLINE));
        assert!(e.contains(&msr::TSC_AUX) && e.contains(&0x20f) && e.contains(&0x26f));
    }

    #[test]
    fn legacy_fpu_round_trips() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 7,
            ..Default::default()
        };
        f.xmm[3][5] = 9;
        f.fpr[7][0] = 1;
        let back = kvm_fpu::from(&LegacyFpu::from(&f));
        assert_eq!(LegacyFpu::from(&back), LegacyFpu::from(&f));
    }
}
