//! The KVM layer against the real /dev/kvm: ioeventfds and kicking a running vCPU.

use std::sync::mpsc;
use std::time::Duration;

use guestmem::GuestMem;
use hypervisor::{install_kick_handler, Hypervisor, IoSpace, KickHandle, Vcpu, VcpuExit};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

mod common;

/// A VM with 64 KiB of RAM running `code` in real mode at 0x1000.
fn real_mode_vm(code: &[u8]) -> (hypervisor::Vm, Vcpu, GuestMem) {
    let hv = Hypervisor::new().expect("/dev/kvm");
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    mem.write_slice(code, GuestAddress(0x1000)).unwrap();
    let vm = hv.create_vm().unwrap();
    vm.register_memory(&mem).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    common::start_real_mode(&vcpu);
    (vm, vcpu, mem)
}

#[test]
fn ioeventfd_signals_without_an_exit() {
    // mov dx, 0x7000; out dx, al; mov dx, 0x7001; out dx, al; hlt
    let code = [0xba, 0x00, 0x70, 0xee, 0xba, 0x01, 0x70, 0xee, 0xf4];
    let (vm, mut vcpu, _mem) = real_mode_vm(&code);
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_ioevent(&evt, IoSpace::Pio, 0x7000, None)
        .unwrap();
    // The write to 0x7000 is absorbed by KVM; the one to 0x7001 exits.
    match vcpu.run().unwrap() {
        VcpuExit::IoOut(0x7001, _) => {}
        other => panic!("expected the exit at 0x7001, got {other:?}"),
    }
    assert_eq!(evt.read().unwrap(), 1);
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    vm.unregister_ioevent(&evt, IoSpace::Pio, 0x7000, None)
        .unwrap();
}

#[test]
fn a_kick_interrupts_a_spinning_vcpu() {
    // 1: jmp 1b
    let (_vm, vcpu, _mem) = real_mode_vm(&[0xeb, 0xfe]);
    install_kick_handler().unwrap();
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let mut vcpu = vcpu;
        vcpu.bind_to_current_thread();
        tx.send(()).unwrap();
        let exit = format!("{:?}", vcpu.run().unwrap());
        vcpu.unbind_thread();
        exit
    });
    rx.recv().unwrap();
    let kick = KickHandle::for_thread(&thread);
    // Kicks sent before the vCPU enters KVM_RUN are not lost: keep kicking until it returns.
    for _ in 0..200 {
        if thread.is_finished() {
            break;
        }
        kick.kick();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(thread.join().unwrap(), "Interrupted");
}

// ---- Saving and restoring state ----

use hypervisor::dirty::{take_vmm_dirty, TrackedMemory};
use hypervisor::state::msr;
use hypervisor::{ClockMode, FpuState, VcpuState, VmState};

/// A VM with the in-kernel irqchip and PIT (as Vessel builds them), `mem` registered, and vCPU 0
/// given the host's supported CPUID.
fn irqchip_vm(mem: &GuestMem) -> (Hypervisor, hypervisor::Vm, Vcpu) {
    let hv = Hypervisor::new().expect("/dev/kvm");
    let vm = hv.create_vm().unwrap();
    vm.setup_irqchip_and_timers().unwrap();
    vm.register_memory(mem).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid(&hv.supported_cpuid().unwrap()).unwrap();
    (hv, vm, vcpu)
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

fn lapic_reg(l: &hypervisor::kvm::kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut hypervisor::kvm::kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

const APIC_SVR: usize = 0xf0;
const APIC_TPR: usize = 0x80;
const APIC_LVTT: usize = 0x320;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const APIC_TDCR: usize = 0x3e0;

/// Distinctive values in every part of a vCPU's state.
fn make_distinctive(s: &mut VcpuState) {
    s.regs.rax = 0x1111_2222_3333_4444;
    s.regs.rbx = 0x5555;
    s.regs.r15 = 0xdead_beef_cafe_f00d;
    s.regs.rip = 0x1234;
    s.regs.rflags = 0x2 | 0x1 | 0x800; // carry, overflow
    s.sregs.cr2 = 0xdead_b000;
    s.sregs.gdt.base = 0x500;
    s.sregs.gdt.limit = 0x3f;
    s.sregs.idt.base = 0x520;
    s.sregs.idt.limit = 0xfff;
    s.sregs.ds.base = 0x7000;
    s.sregs.ds.selector = 0x700;
    let set = |s: &mut VcpuState, index: u32, data: u64| {
        let m = s.msrs.iter_mut().find(|m| m.index == index);
        m.unwrap_or_else(|| panic!("MSR {index:#x} was not saved"))
            .data = data;
    };
    set(s, msr::IA32_SYSENTER_CS, 0x10);
    set(s, msr::IA32_SYSENTER_ESP, 0xffff_8000_0000_1000);
    set(s, msr::IA32_SYSENTER_EIP, 0xffff_8000_0000_2000);
    set(s, msr::STAR, 0x0023_0010_0000_0000);
    set(s, msr::LSTAR, 0xffff_8000_0000_3000);
    set(s, msr::KERNEL_GS_BASE, 0xffff_8880_0000_0000);
    set(s, msr::SYSCALL_MASK, 0x4_7700);
    if s.msr(msr::TSC_AUX).is_some() {
        set(s, msr::TSC_AUX, 7);
    }
    set_lapic_reg(&mut s.lapic, APIC_SVR, 0x1ff);
    set_lapic_reg(&mut s.lapic, APIC_TPR, 0x20);
    // Periodic timer, vector 0xec, divide by 1, a long period so it never fires here.
    set_lapic_reg(&mut s.lapic, APIC_LVTT, (1 << 17) | 0xec);
    set_lapic_reg(&mut s.lapic, APIC_TDCR, 0xb);
    set_lapic_reg(&mut s.lapic, APIC_TMICT, 0x7fff_ffff);
    s.events.nmi.pending = 1;
    s.events.nmi.masked = 1;
    s.debugregs.db = [0x1000, 0x2000, 0x3000, 0x4000];
    s.debugregs.dr7 = 0x401 | (1 << 2);
    if let Some(x) = s.xcrs.as_mut() {
        // x87 | SSE (the reset value is x87 only).
        x.xcrs[0].value = 0x3;
    }
    match &mut s.fpu {
        FpuState::Xsave(words) => {
            words[6] = 0x9f80; // MXCSR with flush-to-zero
            words[40..44].copy_from_slice(&[0xa1, 0xb2, 0xc3, 0xd4]); // XMM0
            words[128] |= 0x3; // XSTATE_BV: x87 and SSE state present
        }
        FpuState::Fpu(f) => {
            f.mxcsr = 0x9f80;
            f.xmm[0] = [0xa1; 16];
        }
    }
}

/// The state with the parts that move on their own (TSC, the LAPIC's current count) taken
/// out, as JSON.
fn comparable(s: &VcpuState) -> serde_json::Value {
    let mut s = s.clone();
    s.msrs
        .retain(|m| m.index != msr::IA32_TSC && m.index != msr::IA32_TSC_DEADLINE);
    set_lapic_reg(&mut s.lapic, APIC_TMCCT, 0);
    json(&s)
}

#[test]
fn vcpu_state_round_trips_through_json_into_a_fresh_vm() {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let (hv, vm, vcpu) = irqchip_vm(&mem);
    let msrs = hv.msrs_to_save().unwrap();
    let mut state = vcpu.save_state(&msrs).unwrap();
    assert!(!state.cpuid.is_empty());
    make_distinctive(&mut state);
    vcpu.restore_state(&state).unwrap();
    let saved = vcpu.save_state(&msrs).unwrap();

    // What was set is what was saved.
    assert_eq!(saved.regs.rax, 0x1111_2222_3333_4444);
    assert_eq!(saved.regs.rflags, 0x803);
    assert_eq!(saved.sregs.cr2, 0xdead_b000);
    assert_eq!(saved.sregs.ds.base, 0x7000);
    assert_eq!(
        saved.msr(msr::IA32_SYSENTER_EIP),
        Some(0xffff_8000_0000_2000)
    );
    assert_eq!(saved.msr(msr::LSTAR), Some(0xffff_8000_0000_3000));
    assert_eq!(saved.msr(msr::KERNEL_GS_BASE), Some(0xffff_8880_0000_0000));
    if state.msr(msr::TSC_AUX).is_some() {
        assert_eq!(saved.msr(msr::TSC_AUX), Some(7));
    }
    assert_eq!(lapic_reg(&saved.lapic, APIC_LVTT), (1 << 17) | 0xec);
    assert_eq!(lapic_reg(&saved.lapic, APIC_TDCR), 0xb);
    assert_eq!(lapic_reg(&saved.lapic, APIC_TMICT), 0x7fff_ffff);
    assert_ne!(lapic_reg(&saved.lapic, APIC_TMCCT), 0, "the timer counts");
    assert_eq!(lapic_reg(&saved.lapic, APIC_TPR), 0x20);
    assert_eq!((saved.events.nmi.pending, saved.events.nmi.masked), (1, 1));
    assert_eq!(saved.debugregs.db, [0x1000, 0x2000, 0x3000, 0x4000]);
    assert_eq!(saved.debugregs.dr7 & 0xff, 0x05);
    if let Some(x) = &saved.xcrs {
        assert_eq!(x.xcrs[0].value, 0x3);
    }
    match &saved.fpu {
        FpuState::Xsave(w) => {
            assert_eq!(w[6], 0x9f80);
            assert_eq!(&w[40..44], &[0xa1, 0xb2, 0xc3, 0xd4]);
        }
        FpuState::Fpu(f) => assert_eq!((f.mxcsr, f.xmm[0]), (0x9f80, [0xa1; 16])),
    }
    let tsc = saved.msr(msr::IA32_TSC).expect("the TSC is saved");

    // Through JSON into a new VM.
    let text = serde_json::to_string(&saved).unwrap();
    let back: VcpuState = serde_json::from_str(&text).unwrap();
    assert_eq!(comparable(&back), comparable(&saved));
    drop((vcpu, vm));
    let hv2 = Hypervisor::new().unwrap();
    let vm2 = hv2.create_vm().unwrap();
    vm2.setup_irqchip_and_timers().unwrap();
    vm2.register_memory(&mem).unwrap();
    let vcpu2 = vm2.create_vcpu(0).unwrap();
    vcpu2.restore_state(&back).unwrap();
    let again = vcpu2.save_state(&msrs).unwrap();
    assert_eq!(comparable(&again), comparable(&saved));
    let tsc2 = again.msr(msr::IA32_TSC).unwrap();
    assert!(
        tsc2 >= tsc,
        "the TSC continues from the saved value: {tsc} -> {tsc2}"
    );
}

#[test]
fn a_restored_vcpu_goes_on_where_it_stopped() {
    // 1: inc ax; out 0x80, ax; jmp 1b
    let code = [0x40, 0xe7, 0x80, 0xeb, 0xfb];
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let (hv, _vm, mut vcpu) = irqchip_vm(&mem);
    common::start_real_mode(&vcpu);
    let mut regs = vcpu.regs().unwrap();
    regs.rax = 0x41;
    vcpu.set_regs(&regs).unwrap();
    let out = |vcpu: &mut Vcpu| {
        let d = common::run_until_out(vcpu, 0x80);
        u16::from_le_bytes([d[0], d[1]])
    };
    assert_eq!(out(&mut vcpu), 0x42);
    assert_eq!(out(&mut vcpu), 0x43);
    let msrs = hv.msrs_to_save().unwrap();
    let text = serde_json::to_string(&vcpu.save_state(&msrs).unwrap()).unwrap();

    let (_hv2, _vm2, mut vcpu2) = irqchip_vm(&mem);
    vcpu2
        .restore_state(&serde_json::from_str(&text).unwrap())
        .unwrap();
    assert_eq!(out(&mut vcpu2), 0x44);
    assert_eq!(out(&mut vcpu2), 0x45);
}

/// Writes `bytes` at `offset` into the raw-bytes serialization of a KVM structure.
fn poke(v: &mut serde_json::Value, offset: usize, bytes: &[u8]) {
    let a = v.as_array_mut().expect("a byte array");
    for (i, b) in bytes.iter().enumerate() {
        a[offset + i] = serde_json::Value::from(*b);
    }
}

#[test]
fn vm_state_round_trips_into_a_fresh_vm() {
    let hv = Hypervisor::new().unwrap();
    let vm = hv.create_vm().unwrap();
    vm.setup_irqchip_and_timers().unwrap();
    let state = vm.save_state().unwrap();
    // kvm_irqchip: chip_id, pad, then the chip. PIC: imr at +2, irq_base at +5.
    // IOAPIC: redirection table at +24, 8 bytes per pin. PIT channel 0: count at 0, mode at 13.
    let mut v = json(&state);
    poke(&mut v["pic_master"], 8 + 2, &[0xfa]);
    poke(&mut v["pic_master"], 8 + 5, &[0x20]);
    poke(&mut v["pic_slave"], 8 + 2, &[0x7f]);
    poke(&mut v["pic_slave"], 8 + 5, &[0x28]);
    let rte: u64 = 0x0300_0000_0001_a0e5; // dest 3, level, masked, vector 0xe5
    poke(&mut v["ioapic"], 8 + 24 + 5 * 8, &rte.to_le_bytes());
    poke(&mut v["pit"], 0, &0x1234u32.to_le_bytes());
    poke(&mut v["pit"], 13, &[2]);
    let edited: VmState = serde_json::from_value(v).unwrap();
    vm.restore_state(&edited, ClockMode::Continue).unwrap();
    let saved = vm.save_state().unwrap();
    let sv = json(&saved);
    for chip in ["pic_master", "pic_slave", "ioapic"] {
        assert_eq!(sv[chip], json(&edited)[chip], "{chip} as set");
    }
    assert_eq!(saved.pit.channels[0].count, 0x1234);
    assert_eq!(saved.pit.channels[0].mode, 2);

    let text = serde_json::to_string(&saved).unwrap();
    let back: VmState = serde_json::from_str(&text).unwrap();
    let vm2 = hv.create_vm().unwrap();
    vm2.setup_irqchip_and_timers().unwrap();
    vm2.restore_state(&back, ClockMode::Continue).unwrap();
    let again = vm2.save_state().unwrap();
    let av = json(&again);
    for chip in ["pic_master", "pic_slave", "ioapic"] {
        assert_eq!(av[chip], sv[chip], "{chip} restored");
    }
    for (a, b) in again.pit.channels.iter().zip(saved.pit.channels.iter()) {
        assert_eq!(
            (a.count, a.mode, a.rw_mode, a.gate, a.bcd),
            (b.count, b.mode, b.rw_mode, b.gate, b.bcd)
        );
    }
    assert!(again.clock.clock >= saved.clock.clock, "kvmclock continues");
}

#[test]
fn kvmclock_continues_or_advances_by_the_time_the_vm_was_stopped() {
    let hv = Hypervisor::new().unwrap();
    let vm = hv.create_vm().unwrap();
    vm.setup_irqchip_and_timers().unwrap();
    let mut state = vm.save_state().unwrap();
    // As if the state had been saved an hour ago.
    const HOUR: u64 = 3600 * 1_000_000_000;
    state.saved_at_ns -= HOUR;
    state.clock.realtime = state.clock.realtime.saturating_sub(HOUR);
    let saved = state.clock.clock;

    let vm2 = hv.create_vm().unwrap();
    vm2.setup_irqchip_and_timers().unwrap();
    vm2.restore_state(&state, ClockMode::Continue).unwrap();
    let cont = vm2.clock_ns().unwrap();
    assert!(cont >= saved && cont - saved < HOUR, "{saved} -> {cont}");

    let vm3 = hv.create_vm().unwrap();
    vm3.setup_irqchip_and_timers().unwrap();
    vm3.restore_state(&state, ClockMode::AdvanceByWallTime)
        .unwrap();
    let adv = vm3.clock_ns().unwrap();
    assert!(adv >= saved + HOUR, "{saved} -> {adv}");
}

#[test]
fn cpuid_compatibility_of_a_saved_vcpu() {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let (hv, _vm, vcpu) = irqchip_vm(&mem);
    let state = vcpu.save_state(&[]).unwrap();
    let host = hv.offered_cpuid().unwrap();
    // What this host gave is what it can restore.
    assert_eq!(arch::compat::missing_features(&state.cpuid, &host), vec![]);
    // A vCPU that had a feature this host hides is refused, by name.
    let mut fewer = host.clone();
    for e in fewer.as_mut_slice() {
        if e.function == 1 {
            e.ecx &= !(1 << 20); // sse4.2
        }
    }
    let mut with = state.cpuid.clone();
    for e in with.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= 1 << 20;
    }
    let err = arch::compat::check(&with, &fewer).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert!(err.to_string().contains("sse4.2"), "{err}");
}

#[test]
fn dirty_log_has_exactly_the_pages_the_guest_wrote() {
    // Real mode: mov byte [0x3000], 0x11; mov word [0x5ffe], 0x2222; mov byte [0xa000], 0x33;
    // mov ax, 0xffff; mov ds, ax; mov byte [0x10], 0x44 (= 0x100000); out 0x80, al
    let code = [
        0xc6, 0x06, 0x00, 0x30, 0x11, //
        0xc7, 0x06, 0xfe, 0x5f, 0x22, 0x22, //
        0xc6, 0x06, 0x00, 0xa0, 0x33, //
        0xb8, 0xff, 0xff, 0x8e, 0xd8, //
        0xc6, 0x06, 0x10, 0x00, 0x44, //
        0xe6, 0x80,
    ];
    // VMM writes are logged by the memory's own bitmap, never by KVM.
    let mem = TrackedMemory::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10_0000), 0x10000),
    ])
    .unwrap();
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let hv = Hypervisor::new().unwrap();
    let vm = hv.create_vm().unwrap();
    vm.register_memory(&mem).unwrap();
    assert!(
        vm.dirty_bitmap(&mem).is_err(),
        "no log before logging is turned on"
    );
    vm.set_dirty_logging(&mem, true).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    common::start_real_mode(&vcpu);
    common::run_until_out(&mut vcpu, 0x80);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0x44);
    assert_eq!(mem.read_obj::<u16>(GuestAddress(0x5ffe)).unwrap(), 0x2222);

    let pages = |maps: &[hypervisor::dirty::DirtyBitmap]| -> Vec<u64> {
        maps.iter()
            .flat_map(|m| m.dirty_pages())
            .map(|g| g.0)
            .collect()
    };
    let kvm = vm.dirty_bitmap(&mem).unwrap();
    assert_eq!(kvm.len(), 2);
    assert_eq!(pages(&kvm), vec![0x3000, 0x5000, 0xa000, 0x10_0000]);
    assert_eq!(
        pages(&take_vmm_dirty(&mem)),
        vec![0x1000],
        "the code the VMM wrote"
    );
    // Reading the log cleared it.
    assert_eq!(pages(&vm.dirty_bitmap(&mem).unwrap()), Vec::<u64>::new());
    vm.set_dirty_logging(&mem, false).unwrap();
    assert!(vm.dirty_bitmap(&mem).is_err());
}
