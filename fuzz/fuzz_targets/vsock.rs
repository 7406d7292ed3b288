//! virtio-vsock: packets parsed from arbitrary transmit chains and fed to the muxer, whose
//! answers go into arbitrary receive chains, with host-side Unix sockets that accept, send,
//! close and connect as a script says.
//!
//! Input: 1 byte queue size exponent, 2 x 3 x 2 bytes of ring offsets (desc, avail, used;
//! aligned down) for the receive and transmit queues, 1 byte script length L, L x 4 bytes of
//! script, then guest memory contents.
//!
//! Script records `op, a, b, c`: serve the transmit queue; serve the receive queue; dispatch
//! the muxer's socket events; accept a connection on host port 1024 + a % 2 and write `b`
//! bytes to it; write `b` bytes to accepted connection `a`; close accepted connection `a`;
//! connect a host client asking for guest port `a | b << 8`; let `a` seconds pass (answer
//! timeouts); write `c` into guest memory at `(a | b << 8) * 2` (the driver adding buffers).
//!
//! Host ports 1024 and 1025 have listeners (`<path>_1024`, `<path>_1025`); other ports refuse.

#![no_main]

#[path = "common.rs"]
#[allow(dead_code)]
mod common;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use devices::virtio::vsock::muxer::{Muxer, TOKEN_LISTENER, TOKEN_STREAM_BASE};
use devices::virtio::vsock::WorkerState;
use devices::virtio::{VirtioInterrupt, VirtioInterruptType};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EpollEvent;

const GUEST_CID: u64 = 3;

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        Ok(())
    }
    fn set_needs_reset(&self) {}
}

/// The host side, made once per process: the device's socket path and the listeners of host
/// ports 1024 and 1025.
struct Host {
    path: PathBuf,
    ports: [UnixListener; 2],
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vessel-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v");
        let listen = |port: u32| {
            let l = UnixListener::bind(format!("{}_{port}", path.display())).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        };
        Host {
            ports: [listen(1024), listen(1025)],
            path,
        }
    })
}

/// The worker's epoll events for the muxer (none of the worker's own fds are registered).
fn dispatch(muxer: &mut Muxer) {
    let mut events = [EpollEvent::default(); 32];
    let n = muxer.epoll().wait(0, &mut events).unwrap_or(0);
    for ev in &events[..n] {
        let t = ev.data();
        if t == TOKEN_LISTENER || t >= TOKEN_STREAM_BASE {
            muxer.handle_event(t, ev.event_set());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 14 {
        return;
    }
    let size = 1u16 << (data[0] % 9);
    let script_len = usize::from(data[13]) * 4;
    let rest = &data[14..];
    let (script, memory) = rest.split_at(script_len.min(rest.len()));
    let mem = common::guest_memory(memory);
    let (Some(rx), Some(tx)) = (
        common::queue(data, 1, size, false, &mem),
        common::queue(data, 7, size, false, &mem),
    ) else {
        return;
    };
    let host = host();
    // A listener of its own per run, so that no stale client of an earlier run is accepted.
    let _ = std::fs::remove_file(&host.path);
    let device_listener = UnixListener::bind(&host.path).unwrap();
    let muxer = Muxer::new(GUEST_CID, host.path.clone(), Some(device_listener)).unwrap();
    let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(NoInterrupt);
    let mut w = WorkerState::new(muxer, vec![rx, tx], mem.clone(), interrupt);
    let mut accepted: Vec<UnixStream> = Vec::new();
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut now = Instant::now();
    let junk = [0x5au8; 255];
    for rec in script.chunks_exact(4) {
        let (a, b, c) = (rec[1], rec[2], rec[3]);
        match rec[0] % 9 {
            0 => w.serve_tx(),
            1 => w.serve_rx(),
            2 => dispatch(&mut w.muxer),
            3 => {
                if let Ok((mut s, _)) = host.ports[usize::from(a % 2)].accept() {
                    s.set_nonblocking(true).unwrap();
                    let _ = s.write(&junk[..usize::from(b)]);
                    accepted.push(s);
                }
            }
            4 => {
                if let Some(s) = accepted.get_mut(usize::from(a)) {
                    let _ = s.write(&junk[..usize::from(b)]);
                }
            }
            5 => {
                if usize::from(a) < accepted.len() {
                    accepted.remove(usize::from(a));
                }
            }
            6 => {
                if clients.len() < 8 {
                    if let Ok(mut s) = UnixStream::connect(&host.path) {
                        s.set_nonblocking(true).unwrap();
                        let _ = write!(s, "CONNECT {}\n", u16::from_le_bytes([a, b]));
                        clients.push(s);
                    }
                }
            }
            7 => {
                now += Duration::from_secs(u64::from(a));
                w.muxer.tick(now);
            }
            _ => {
                let at = u64::from(u16::from_le_bytes([a, b])) * 2;
                let _ = mem.write_obj(c, GuestAddress(at));
            }
        }
    }
    drop(w);
    drop(clients);
    // Take (and close) what the device connected to the host ports and nobody accepted.
    for l in &host.ports {
        while l.accept().is_ok() {}
    }
});
