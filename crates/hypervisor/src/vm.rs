//! A KVM virtual machine: memory slots, the in-kernel interrupt controllers and timers, irqfds.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, NoDatamatch, VmFd};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::cpu::VcpuCaps;
use crate::{op, Result, Vcpu};

/// Where KVM keeps the TSS it needs for real-mode emulation on Intel hosts: three pages just below
/// the 4 GiB boundary's BIOS area, inside the 32-bit MMIO hole, where no RAM and no device lives.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The identity-map page KVM needs on Intel hosts, the page just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Which address space an ioeventfd watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoSpace {
    Pio,
    Mmio,
}

/// A KVM VM. Clones are handles to the same VM (for device code that re-programs interrupt
/// routes or moves ioeventfds while the vCPUs run).
#[derive(Clone)]
pub struct Vm {
    fd: Arc<VmFd>,
    max_memslots: usize,
}

/// An interrupt line into the in-kernel irqchip: writing the event fd raises the line's GSI
/// (edge-triggered). Devices get one of these and know nothing else of KVM.
pub struct IrqLine {
    pub gsi: u32,
    pub event: EventFd,
}

impl Vm {
    pub(crate) fn new(fd: VmFd, max_memslots: usize) -> Self {
        Vm {
            fd: Arc::new(fd),
            max_memslots,
        }
    }

    /// The KVM VM file descriptor, for the other modules of this crate.
    pub(crate) fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Creates the in-kernel PIC, IOAPIC and LAPICs and the PIT, and the TSS/identity-map pages
    /// KVM needs on Intel hosts. Must run before any vCPU is created.
    pub fn setup_irqchip_and_timers(&self) -> Result<()> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(op("KVM_SET_TSS_ADDR"))?;
        // Not every KVM implements this ioctl (it is an Intel real-mode helper); ignore ENOTTY.
        let _ = self.fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS);
        self.fd
            .create_irq_chip()
            .map_err(op("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(op("KVM_CREATE_PIT2"))?;
        Ok(())
    }

    /// Registers every region of `mem` as a KVM memory slot (region `i` is slot `i`). The regions
    /// must stay mapped for as long as this VM exists; the caller keeps `mem` alive alongside
    /// the VM.
    pub fn register_memory<B: Bitmap>(&self, mem: &GuestMemoryMmap<B>) -> Result<()> {
        self.set_memory_slots(mem, 0)
    }

    /// (Re-)registers every region of `mem` as slot `i` with `flags` (re-registering a slot with
    /// only other flags is how KVM turns dirty logging on and off).
    pub(crate) fn set_memory_slots<B: Bitmap>(
        &self,
        mem: &GuestMemoryMmap<B>,
        flags: u32,
    ) -> Result<()> {
        for (slot, region) in mem.iter().enumerate() {
            if slot >= self.max_memslots {
                return Err(crate::Error::MissingCap("enough memory slots"));
            }
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| crate::Error::MissingCap("host-mapped guest memory"))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `r` describes a mapping owned by `mem`, valid for `memory_size` bytes at
            // `userspace_addr`; the caller keeps `mem` alive for the VM's whole life, so KVM never
            // sees the mapping go away underneath it. Slots do not overlap: regions of one
            // GuestMemoryMmap are disjoint.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(op("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Creates an edge-triggered interrupt line for `gsi` backed by an irqfd.
    pub fn irq_line(&self, gsi: u32) -> Result<IrqLine> {
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(crate::Error::EventFd)?;
        self.fd
            .register_irqfd(&event, gsi)
            .map_err(op("KVM_IRQFD"))?;
        Ok(IrqLine { gsi, event })
    }

    /// Makes guest writes to `addr` signal `fd` inside KVM, without an exit to the VM monitor.
    /// With `datamatch`, only 32-bit writes of that value do (a virtio queue index).
    pub fn register_ioevent(
        &self,
        fd: &EventFd,
        space: IoSpace,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let a = match space {
            IoSpace::Pio => IoEventAddress::Pio(addr),
            IoSpace::Mmio => IoEventAddress::Mmio(addr),
        };
        match datamatch {
            Some(v) => self.fd.register_ioevent(fd, &a, v),
            None => self.fd.register_ioevent(fd, &a, NoDatamatch),
        }
        .map_err(op("KVM_IOEVENTFD"))
    }

    /// Undoes [`Vm::register_ioevent`] (same arguments).
    pub fn unregister_ioevent(
        &self,
        fd: &EventFd,
        space: IoSpace,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let a = match space {
            IoSpace::Pio => IoEventAddress::Pio(addr),
            IoSpace::Mmio => IoEventAddress::Mmio(addr),
        };
        match datamatch {
            Some(v) => self.fd.unregister_ioevent(fd, &a, v),
            None => self.fd.unregister_ioevent(fd, &a, NoDatamatch),
        }
        .map_err(op("KVM_IOEVENTFD (deassign)"))
    }

    /// Creates vCPU `id` (its initial APIC ID).
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu> {
        let fd = self.fd.create_vcpu(id).map_err(op("KVM_CREATE_VCPU"))?;
        let caps = VcpuCaps {
            xsave: self.fd.check_extension(Cap::Xsave),
            xsave2_size: usize::try_from(self.fd.check_extension_int(Cap::Xsave2)).unwrap_or(0),
            xcrs: self.fd.check_extension(Cap::Xcrs),
            get_tsc_khz: self.fd.check_extension(Cap::GetTscKhz),
        };
        Ok(Vcpu::new(fd, id as u32, caps))
    }
}
