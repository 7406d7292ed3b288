//! The KVM layer against the real /dev/kvm: ioeventfds and kicking a running vCPU.

use std::sync::mpsc;
use std::time::Duration;

use hypervisor::{install_kick_handler, Hypervisor, IoSpace, KickHandle, Vcpu, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// A VM with 64 KiB of RAM running `code` in real mode at 0x1000.
fn real_mode_vm(code: &[u8]) -> (hypervisor::Vm, Vcpu, GuestMemoryMmap) {
    let hv = Hypervisor::new().expect("/dev/kvm");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    mem.write_slice(code, GuestAddress(0x1000)).unwrap();
    let vm = hv.create_vm().unwrap();
    vm.register_memory(&mem).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
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
