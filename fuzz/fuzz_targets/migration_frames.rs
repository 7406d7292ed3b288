//! The incoming side of a live migration: frames read from a byte stream (tag, length, body)
//! and each body decoded as the target does: `Hello` (magic, version, the machine's
//! configuration, which is validated), `Pages` (written into guest memory), `Round`,
//! `Postcopy` (the dirty set, checked against guest memory, then walked the way the target
//! drops the stale pages and the post-copy fetcher takes arriving pages off it) and `State`
//! (the whole VM's state).
//!
//! Input: the byte stream, as the source would send it.

#![no_main]

use guestmem::GuestMem;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::migration::postcopy::DirtySet;
use vmm::migration::protocol::{self, Hello, Round, Tag};
use vmm::snapshot::VmSnapshot;
use vmm::VmConfig;

/// Guest memory: 1 MiB, with a hole, then 1 MiB.
const RAM: [(u64, usize); 2] = [(0, 1 << 20), (2 << 20, 1 << 20)];

fuzz_target!(|data: &[u8]| {
    let ranges: Vec<(GuestAddress, usize)> =
        RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMem::from_ranges(&ranges).unwrap();
    let ram: Vec<(u64, u64)> = RAM.iter().map(|&(a, l)| (a, l as u64)).collect();
    let mut stream = data;
    let mut buf = Vec::new();
    let mut postcopy: Option<DirtySet> = None;
    for _ in 0..64 {
        let Ok(tag) = protocol::read_plain_frame(&mut stream, &mut buf) else {
            break;
        };
        match tag {
            Tag::Hello => {
                let Ok(hello) = protocol::json::<Hello>(&buf) else {
                    continue;
                };
                if hello.magic != protocol::MAGIC || hello.version != protocol::VERSION {
                    continue;
                }
                let config = VmConfig::new(hello.machine, hello.source_paths);
                let _ = config.validate(240, Some(64 << 30));
                let _ = arch::layout::ram_ranges(config.spec.memory);
            }
            Tag::Pages => {
                let Ok((addr, pages)) = protocol::pages(&buf) else {
                    continue;
                };
                let _ = mem.write_slice(pages, GuestAddress(addr));
                // The post-copy fetcher takes each arriving page off the set.
                if let Some(set) = &mut postcopy {
                    for i in 0..pages.len() as u64 / 4096 {
                        set.take(addr + i * 4096);
                    }
                }
            }
            Tag::Round => {
                let _ = protocol::json::<Round>(&buf);
            }
            Tag::Postcopy => {
                let Ok(set) = protocol::json::<DirtySet>(&buf) else {
                    continue;
                };
                // Bounded and without overflow even before the check.
                let _ = set.next(0);
                if set.check(&ram).is_err() {
                    continue;
                }
                // The target drops the stale pages, run by run.
                let mut pages = 0u64;
                let _ = set.for_each_run(|a, end| {
                    assert!(a < end, "empty run at {a:#x}");
                    pages += (end - a) / 4096;
                    Ok::<(), ()>(())
                });
                assert_eq!(pages, set.count(), "runs and count disagree");
                postcopy = Some(set);
            }
            Tag::State => {
                let _ = serde_json::from_slice::<VmSnapshot>(&buf);
            }
            _ => break,
        }
    }
});
