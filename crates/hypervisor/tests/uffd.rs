//! userfaultfd under KVM: a guest whose memory a handler thread supplies page by page.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use guestmem::GuestMem;
use hypervisor::mem::PAGE_SIZE;
use hypervisor::uffd::{UffdEvent, Userfault};
use hypervisor::Hypervisor;
use vm_memory::{Bytes, GuestAddress};

mod common;

/// Serves faults until `stop`: the page at 0x1000 gets `code`, 0x3000 gets 0x5a bytes, the
/// rest zeroes; pages reported removed come back as zeroes too. Returns the events seen.
fn handler(
    uffd: Arc<Userfault>,
    code: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<UffdEvent>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut removed = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&uffd.fd()),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 20) };
            while let Some(ev) = uffd.read_event().unwrap() {
                seen.push(ev);
                match ev {
                    UffdEvent::Fault(g) => {
                        let mut page = vec![0u8; PAGE_SIZE as usize];
                        if removed.contains(&g.0) {
                            // Discarded: zero.
                        } else if g.0 == 0x1000 {
                            page[..code.len()].copy_from_slice(&code);
                        } else if g.0 == 0x3000 {
                            page.fill(0x5a);
                        }
                        let f = if page.iter().all(|&b| b == 0) {
                            uffd.zero(g, PAGE_SIZE).unwrap()
                        } else {
                            uffd.copy(g, &page).unwrap()
                        };
                        assert_eq!(f.done, PAGE_SIZE);
                    }
                    UffdEvent::Remove { guest, len } => {
                        for p in (0..len).step_by(PAGE_SIZE as usize) {
                            removed.push(guest.0 + p);
                        }
                    }
                }
            }
        }
        seen
    })
}

#[test]
fn kvm_guest_memory_comes_from_the_fault_handler() {
    let mut uffd = match Userfault::new() {
        Ok(u) => u,
        Err(e) => panic!("userfaultfd unavailable on this host: {e}"),
    };
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    uffd.register(&mem).unwrap();
    let uffd = Arc::new(uffd);
    // Real mode: mov al, [0x3000]; mov [0x4000], al; out 0x80, al
    let code = vec![0xa0, 0x00, 0x30, 0xa2, 0x00, 0x40, 0xe6, 0x80];
    let stop = Arc::new(AtomicBool::new(false));
    let h = handler(uffd.clone(), code, stop.clone());

    let hv = Hypervisor::new().expect("/dev/kvm");
    let vm = hv.create_vm().unwrap();
    vm.register_memory(&mem).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    common::start_real_mode(&vcpu);
    assert_eq!(common::run_until_out(&mut vcpu, 0x80), [0x5a]);
    // The VMM's own accesses fault through the handler as well.
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(), 0x5a);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3001)).unwrap(), 0x5a);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8000)).unwrap(), 0);
    // A discard is announced first; the page then faults again (and the handler zeroes it).
    hypervisor::mem::discard(&mem, GuestAddress(0x3000), PAGE_SIZE).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0);
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    let faults: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            UffdEvent::Fault(g) => Some(g.0),
            _ => None,
        })
        .collect();
    for p in [0x1000, 0x3000, 0x4000, 0x8000] {
        assert!(faults.contains(&p), "{p:#x} not in {faults:x?}");
    }
    assert_eq!(
        faults.iter().filter(|&&p| p == 0x3000).count(),
        2,
        "{faults:x?}"
    );
    assert!(seen.contains(&UffdEvent::Remove {
        guest: GuestAddress(0x3000),
        len: PAGE_SIZE
    }));
}

#[test]
fn fills_outside_registered_memory_are_refused() {
    let mut uffd = Userfault::new().unwrap();
    let mem = GuestMem::from_ranges(&[(GuestAddress(0x10000), 0x10000)]).unwrap();
    uffd.register(&mem).unwrap();
    assert!(uffd.zero(GuestAddress(0), PAGE_SIZE).is_err());
    assert!(uffd.zero(GuestAddress(0x1f000), 2 * PAGE_SIZE).is_err());
    assert!(uffd.copy(GuestAddress(0x10001), &[0; 4096]).is_err());
    // Filling twice: the second finds the page present.
    let f = uffd.copy(GuestAddress(0x10000), &[7; 4096]).unwrap();
    assert_eq!((f.done, f.filled), (PAGE_SIZE, PAGE_SIZE));
    let f = uffd.zero(GuestAddress(0x10000), 2 * PAGE_SIZE).unwrap();
    assert_eq!((f.done, f.filled), (2 * PAGE_SIZE, PAGE_SIZE));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10fff)).unwrap(), 7);
}
