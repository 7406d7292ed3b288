//! MSI delivery through KVM: one GSI per vector, routed by `KVM_SET_GSI_ROUTING` to an MSI
//! message and raised through an irqfd.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole routing table, so every update re-installs KVM's
//! default routes for the in-kernel irqchip (GSIs 0-15 to the IOAPIC and the PICs, 16-23 to the
//! IOAPIC) alongside the MSI routes. MSI GSIs are allocated from 24 up.
//!
//! PCI INTx (the fallback when a guest does not enable MSI-X) needs level-triggered lines:
//! [`Vm::level_irq_line`] is an irqfd with a resample eventfd. Writing the trigger asserts the
//! line until the guest's EOI; KVM then de-asserts it and signals the resample eventfd, and the
//! device re-asserts it if its interrupt is still pending.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use vmm_sys_util::eventfd::EventFd;

use crate::{op, Error, Result, Vm};

/// The first GSI past the IOAPIC's 24 pins.
pub const FIRST_MSI_GSI: u32 = 24;
/// The most MSI vectors a VM gets here.
pub const MAX_MSI_VECTORS: u32 = 1024;

/// One MSI vector: writing `event` raises `gsi`, which [`MsiRouter::set_route`] points at an MSI
/// message.
pub struct MsiVector {
    pub gsi: u32,
    pub event: EventFd,
}

/// A level-triggered interrupt line: `trigger` asserts `gsi`; `resample` (blocking) is signalled
/// when the guest's EOI de-asserted it.
pub struct LevelIrqLine {
    pub gsi: u32,
    pub trigger: EventFd,
    pub resample: EventFd,
}

impl Vm {
    /// Creates a level-triggered line for IOAPIC pin `gsi` (an irqfd with resampling).
    pub fn level_irq_line(&self, gsi: u32) -> Result<LevelIrqLine> {
        let trigger = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let resample = EventFd::new(0).map_err(Error::EventFd)?;
        self.fd()
            .register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(op("KVM_IRQFD (resample)"))?;
        Ok(LevelIrqLine {
            gsi,
            trigger,
            resample,
        })
    }
}

#[derive(Default)]
struct Routes {
    msi: BTreeMap<u32, (u64, u32)>,
    next_gsi: u32,
}

/// The VM's GSI routing table.
pub struct MsiRouter {
    vm: Vm,
    routes: Mutex<Routes>,
}

/// KVM's default routes for the in-kernel PIC and IOAPIC (as `kvm_setup_default_irq_routing`).
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut v = Vec::new();
    for gsi in 0..24 {
        v.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(chip(gsi, pic, gsi % 8));
        }
    }
    v
}

impl MsiRouter {
    /// A router for `vm`, whose irqchip must exist already.
    pub fn new(vm: &Vm) -> Arc<MsiRouter> {
        Arc::new(MsiRouter {
            vm: vm.clone(),
            routes: Mutex::new(Routes {
                msi: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
        })
    }

    /// A new vector: a GSI with an irqfd and, until [`MsiRouter::set_route`], no route (raising
    /// it does nothing).
    pub fn add_vector(&self) -> Result<MsiVector> {
        let gsi = {
            let mut r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            if r.next_gsi >= FIRST_MSI_GSI + MAX_MSI_VECTORS {
                return Err(Error::MissingCap("more MSI vectors"));
            }
            r.next_gsi += 1;
            r.next_gsi - 1
        };
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        self.vm
            .fd()
            .register_irqfd(&event, gsi)
            .map_err(op("KVM_IRQFD"))?;
        Ok(MsiVector { gsi, event })
    }

    /// Routes `gsi` to the MSI message `address`/`data`.
    pub fn set_route(&self, gsi: u32, address: u64, data: u32) -> Result<()> {
        let mut r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if r.msi.get(&gsi) == Some(&(address, data)) {
            return Ok(());
        }
        let old = r.msi.insert(gsi, (address, data));
        let res = self.commit(&r);
        if res.is_err() {
            match old {
                Some(o) => r.msi.insert(gsi, o),
                None => r.msi.remove(&gsi),
            };
        }
        res
    }

    /// The number of routes the table holds (defaults included).
    pub fn route_count(&self) -> usize {
        default_routes().len()
            + self
                .routes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .msi
                .len()
    }

    fn commit(&self, r: &Routes) -> Result<()> {
        let mut entries = default_routes();
        for (&gsi, &(address, data)) in &r.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| Error::MissingCap("a GSI routing table this large"))?;
        self.vm
            .fd()
            .set_gsi_routing(&table)
            .map_err(op("KVM_SET_GSI_ROUTING"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_cover_the_irqchip() {
        let d = default_routes();
        // 24 IOAPIC pins and 16 PIC pins.
        assert_eq!(d.len(), 40);
        assert!(d
            .iter()
            .all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP && e.gsi < 24));
        assert_eq!(d.iter().filter(|e| e.gsi < 16).count(), 32);
    }

    #[test]
    fn msi_routes_on_a_real_vm() {
        let hv = crate::Hypervisor::new().expect("/dev/kvm");
        let vm = hv.create_vm().unwrap();
        vm.setup_irqchip_and_timers().unwrap();
        let router = MsiRouter::new(&vm);
        let a = router.add_vector().unwrap();
        let b = router.add_vector().unwrap();
        assert_eq!((a.gsi, b.gsi), (FIRST_MSI_GSI, FIRST_MSI_GSI + 1));
        // Raising an unrouted vector is harmless.
        a.event.write(1).unwrap();
        router.set_route(a.gsi, 0xfee0_0000, 0x4041).unwrap();
        router.set_route(b.gsi, 0xfee0_1000, 0x4042).unwrap();
        // Re-programming replaces the route; the table keeps the defaults.
        router.set_route(a.gsi, 0xfee0_0000, 0x4043).unwrap();
        assert_eq!(router.route_count(), 42);
        a.event.write(1).unwrap();
        // The legacy lines still work after the table was replaced.
        let line = vm.irq_line(4).unwrap();
        line.event.write(1).unwrap();
        let level = vm.level_irq_line(17).unwrap();
        level.trigger.write(1).unwrap();
    }
}
