//! virtio-rng (entropy device, type 4, virtio 1.2 §5.4): one request queue
//! of device-writable buffers. Reads 64 bytes twice; they must not be all
//! zero and must differ.

use super::dma;
use super::queue::{Buf, Queue};
use super::Transport;
use crate::println;

const BYTES: usize = 64;
const TIMEOUT_US: u64 = 5_000_000;

/// Fill `out` from the device (it may return fewer bytes than asked).
fn read(t: &Transport, q: &mut Queue, buf: u64, out: &mut [u8]) -> Result<(), &'static str> {
    let mut have = 0;
    let mut tries = 0;
    while have < out.len() {
        tries += 1;
        if tries > 64 {
            return Err("device returns no data");
        }
        let want = out.len() - have;
        dma::fill(buf, 0, want);
        q.add(&[Buf::write(buf, want as u32)], 0)?;
        q.kick(t);
        let used = q.wait_used(TIMEOUT_US).ok_or("request timed out")?;
        let got = (used.len as usize).min(want);
        dma::read_bytes(buf, &mut out[have..have + got]);
        have += got;
    }
    Ok(())
}

pub fn test(t: &mut Transport) -> Result<(), &'static str> {
    t.begin(0)?;
    let mut q = Queue::new(t, 0)?;
    t.ready();
    let buf = dma::alloc(BYTES as u64, 64)?;
    let mut first = [0u8; BYTES];
    let mut second = [0u8; BYTES];
    read(t, &mut q, buf, &mut first)?;
    read(t, &mut q, buf, &mut second)?;
    if first.iter().all(|&b| b == 0) || second.iter().all(|&b| b == 0) {
        return Err("read all zero bytes");
    }
    if first == second {
        return Err("two reads returned the same bytes");
    }
    println!("virtio-rng {t}: ok");
    Ok(())
}
