//! MSI-X (PCI Local Bus 3.0 §6.8.2): the capability, the vector table and the pending bit array.
//!
//! Delivery goes through [`MsiVectors`]: the VM monitor gives each vector an irqfd and a KVM MSI
//! route, and [`Msix`] re-programs a vector's route when the guest changes its message. A masked
//! vector (or a masked function) records its interrupt in the PBA; unmasking delivers it.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::PciError;

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// The most vectors a function may have.
pub const MAX_VECTORS: u16 = 2048;
/// Message control bits.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// An MSI message: the address and data the guest programmed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// How a function's vectors reach the CPUs.
pub trait MsiVectors: Send + Sync {
    /// Deliver vector `vector` with the message last given to [`MsiVectors::program`].
    fn trigger(&self, vector: u16) -> io::Result<()>;
    /// Vector `vector` now delivers `msg`.
    fn program(&self, vector: u16, msg: MsiMessage) -> io::Result<()>;
}

/// One table entry as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl MsixEntry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32),
            data: self.data,
        }
    }
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// MSI-X state for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pba: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// A function's MSI-X table and PBA.
pub struct Msix {
    entries: Vec<MsixEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// The message each vector's route carries now.
    programmed: Vec<Option<MsiMessage>>,
    vectors: Arc<dyn MsiVectors>,
}

impl Msix {
    /// `count` vectors (1 to [`MAX_VECTORS`]), all masked, MSI-X disabled.
    pub fn new(count: u16, vectors: Arc<dyn MsiVectors>) -> Result<Msix, PciError> {
        if count == 0 || count > MAX_VECTORS {
            return Err(PciError::Msix(format!(
                "{count} vectors (1 to {MAX_VECTORS})"
            )));
        }
        let n = usize::from(count);
        Ok(Msix {
            entries: vec![
                MsixEntry {
                    addr_lo: 0,
                    addr_hi: 0,
                    data: 0,
                    control: VECTOR_MASKED,
                };
                n
            ],
            pba: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            programmed: vec![None; n],
            vectors,
        })
    }

    pub fn count(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Size of the PBA in bytes.
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// The capability's body (after ID and next pointer) and its write mask, for a table and PBA
    /// in BARs `table_bar`/`pba_bar` at the given (8-byte aligned) offsets.
    pub fn capability(
        &self,
        table_bar: u8,
        table_off: u32,
        pba_bar: u8,
        pba_off: u32,
    ) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.count() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_off | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_off | u32::from(pba_bar & 7)).to_le_bytes());
        let mut wmask = [0u8; 10];
        wmask[1] = 0xc0;
        (body, wmask)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The guest wrote message control (from the configuration space).
    pub fn set_control(&mut self, control: u16) {
        let was_active = self.enabled && !self.function_masked;
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if self.enabled && !self.function_masked && !was_active {
            for v in 0..self.count() {
                self.unmasked(v);
            }
        }
    }

    /// Reads the table at `offset` (aligned accesses of 4 or 8 bytes; others read zero).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * k as u64;
            if let Some(v) = self.table_dword(at) {
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    fn table_dword(&self, at: u64) -> Option<u32> {
        let e = self.entries.get(usize::try_from(at / ENTRY_SIZE).ok()?)?;
        Some(match at % ENTRY_SIZE {
            0 => e.addr_lo,
            4 => e.addr_hi,
            8 => e.data,
            _ => e.control,
        })
    }

    /// Writes the table at `offset` (aligned 4- or 8-byte accesses; others are ignored).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            tracing::debug!(
                "msi-x: {}-byte table write at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        for (k, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * k as u64;
            let Some(index) = usize::try_from(at / ENTRY_SIZE)
                .ok()
                .filter(|&i| i < self.entries.len())
            else {
                tracing::debug!("msi-x: table write at {at:#x} past the table ignored");
                return;
            };
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let e = &mut self.entries[index];
            let was_masked = e.masked();
            match at % ENTRY_SIZE {
                0 => e.addr_lo = v & !3,
                4 => e.addr_hi = v,
                8 => e.data = v,
                _ => e.control = v & VECTOR_MASKED,
            }
            let now_masked = e.masked();
            let vector = index as u16;
            if !now_masked && self.active() {
                if was_masked {
                    self.unmasked(vector);
                } else {
                    // The message changed under an unmasked vector: re-program its route.
                    self.sync(vector);
                }
            }
        }
    }

    /// Reads the PBA at `offset` (aligned 4 or 8 bytes); writes to it are ignored.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        let Some(&word) = usize::try_from(offset / 8)
            .ok()
            .and_then(|i| self.pba.get(i))
        else {
            return;
        };
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    fn active(&self) -> bool {
        self.enabled && !self.function_masked
    }

    fn pending(&self, v: u16) -> bool {
        self.pba[usize::from(v) / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: u16, on: bool) {
        let w = &mut self.pba[usize::from(v) / 64];
        if on {
            *w |= 1 << (v % 64);
        } else {
            *w &= !(1 << (v % 64));
        }
    }

    /// Re-programs vector `v`'s route if its message changed.
    fn sync(&mut self, v: u16) {
        let msg = self.entries[usize::from(v)].message();
        if self.programmed[usize::from(v)] != Some(msg) {
            match self.vectors.program(v, msg) {
                Ok(()) => self.programmed[usize::from(v)] = Some(msg),
                Err(e) => crate::warn_limited!("msi-x: cannot route vector {v}: {e}"),
            }
        }
    }

    /// Vector `v` may deliver again: program it and deliver what is pending.
    fn unmasked(&mut self, v: u16) {
        if self.entries[usize::from(v)].masked() {
            return;
        }
        self.sync(v);
        if self.pending(v) {
            self.set_pending(v, false);
            if let Err(e) = self.vectors.trigger(v) {
                crate::warn_limited!("msi-x: vector {v}: {e}");
            }
        }
    }

    /// Signal vector `v`: delivered now, or made pending if masked. Returns false if MSI-X is
    /// disabled (the caller falls back to INTx) ; a vector past the table is dropped.
    pub fn notify(&mut self, v: u16) -> io::Result<bool> {
        if !self.enabled {
            return Ok(false);
        }
        let Some(e) = self.entries.get(usize::from(v)) else {
            return Ok(true);
        };
        if self.function_masked || e.masked() {
            self.set_pending(v, true);
            return Ok(true);
        }
        self.sync(v);
        self.vectors.trigger(v).map(|()| true)
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Restores saved state into a table of the same size, re-programming every route.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), PciError> {
        if s.entries.len() != self.entries.len() || s.pba.len() != self.pba.len() {
            return Err(PciError::StateMismatch);
        }
        self.entries.clone_from(&s.entries);
        self.pba.clone_from(&s.pba);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        self.programmed.fill(None);
        if self.active() {
            for v in 0..self.count() {
                self.unmasked(v);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what the transport asked of its vectors.
    #[derive(Default)]
    pub(crate) struct FakeVectors {
        pub fired: Mutex<Vec<u16>>,
        pub routes: Mutex<Vec<(u16, MsiMessage)>>,
    }

    impl MsiVectors for FakeVectors {
        fn trigger(&self, vector: u16) -> io::Result<()> {
            self.fired.lock().unwrap().push(vector);
            Ok(())
        }
        fn program(&self, vector: u16, msg: MsiMessage) -> io::Result<()> {
            self.routes.lock().unwrap().push((vector, msg));
            Ok(())
        }
    }

    fn w32(m: &mut Msix, off: u64, v: u32) {
        m.write_table(off, &v.to_le_bytes());
    }
    fn r32(m: &Msix, off: u64) -> u32 {
        let mut d = [0u8; 4];
        m.read_table(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn capability_layout() {
        let m = Msix::new(3, Arc::new(FakeVectors::default())).unwrap();
        let (body, mask) = m.capability(0, 0x4000, 0, 0x6000);
        assert_eq!(&body[0..2], &[2, 0]);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x6000);
        assert_eq!(mask[1], 0xc0);
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
        assert!(Msix::new(0, Arc::new(FakeVectors::default())).is_err());
        assert!(Msix::new(4096, Arc::new(FakeVectors::default())).is_err());
    }

    #[test]
    fn table_masking_and_pba() {
        let fake = Arc::new(FakeVectors::default());
        let mut m = Msix::new(2, fake.clone()).unwrap();
        // Disabled: the caller must use INTx.
        assert!(!m.notify(0).unwrap());
        m.set_control(CONTROL_ENABLE);
        // Entries start masked: pending, not delivered.
        assert_eq!(r32(&m, 12), 1);
        assert!(m.notify(1).unwrap());
        let mut p = [0u8; 8];
        m.read_pba(0, &mut p);
        assert_eq!(u64::from_le_bytes(p), 0b10);
        assert!(fake.fired.lock().unwrap().is_empty());
        // Program entry 1, then unmask: the route is set and the pending interrupt delivered.
        w32(&mut m, 16, 0xfee0_1000);
        w32(&mut m, 20, 0);
        w32(&mut m, 24, 0x41);
        assert!(
            fake.routes.lock().unwrap().is_empty(),
            "no route while masked"
        );
        w32(&mut m, 28, 0);
        let msg = MsiMessage {
            address: 0xfee0_1000,
            data: 0x41,
        };
        assert_eq!(*fake.routes.lock().unwrap(), vec![(1, msg)]);
        assert_eq!(*fake.fired.lock().unwrap(), vec![1]);
        m.read_pba(0, &mut p);
        assert_eq!(p, [0; 8]);
        assert_eq!(
            (r32(&m, 16), r32(&m, 24), r32(&m, 28)),
            (0xfee0_1000, 0x41, 0)
        );
        // Delivered straight away now.
        assert!(m.notify(1).unwrap());
        assert_eq!(fake.fired.lock().unwrap().len(), 2);
        // Changing the data of an unmasked vector re-programs the route.
        w32(&mut m, 24, 0x42);
        assert_eq!(fake.routes.lock().unwrap().len(), 2);
        // A function mask holds everything back until it is lifted.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.notify(1).unwrap();
        assert_eq!(fake.fired.lock().unwrap().len(), 2);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(*fake.fired.lock().unwrap(), vec![1, 1, 1]);
        // 8-byte access.
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        m.write_table(0, &0x0000_0000_fee0_2000u64.to_le_bytes());
        assert_eq!(r32(&m, 0), 0xfee0_2000);
    }

    #[test]
    fn bad_accesses_are_harmless() {
        let fake = Arc::new(FakeVectors::default());
        let mut m = Msix::new(1, fake.clone()).unwrap();
        m.set_control(CONTROL_ENABLE);
        // Past the table, misaligned, odd sizes, a vector that does not exist.
        w32(&mut m, 16, 1);
        w32(&mut m, u64::MAX - 3, 1);
        m.write_table(2, &[1, 2, 3, 4]);
        m.write_table(0, &[1, 2]);
        assert_eq!(r32(&m, 16), 0);
        assert_eq!(r32(&m, 2), 0);
        let mut p = [0xffu8; 4];
        m.read_pba(64, &mut p);
        assert_eq!(p, [0; 4]);
        m.read_pba(u64::MAX - 7, &mut p);
        assert!(m.notify(7).unwrap());
        assert!(fake.fired.lock().unwrap().is_empty());
    }

    #[test]
    fn state_round_trip() {
        let fake = Arc::new(FakeVectors::default());
        let mut m = Msix::new(1, fake.clone()).unwrap();
        m.set_control(CONTROL_ENABLE);
        w32(&mut m, 0, 0xfee0_0000);
        w32(&mut m, 8, 0x30);
        m.notify(0).unwrap();
        let s = m.state();
        let fake2 = Arc::new(FakeVectors::default());
        let mut n = Msix::new(1, fake2.clone()).unwrap();
        n.restore(&s).unwrap();
        assert_eq!(n.state(), s);
        w32(&mut n, 12, 0);
        assert_eq!(*fake2.fired.lock().unwrap(), vec![0]);
        assert!(Msix::new(2, fake2).unwrap().restore(&s).is_err());
    }
}
