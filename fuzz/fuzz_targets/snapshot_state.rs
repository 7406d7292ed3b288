//! The snapshot state file's read path: magic line, JSON header (version, length, CRC-32,
//! lineage), then the JSON body as the whole VM's state (`VmSnapshot`: configuration, memory
//! layout, vCPUs, irqchips, platform and virtio devices), and then the checks a restore makes
//! before it touches KVM: rebinding the backends, the CPU features, the configuration and the
//! memory layout.
//!
//! Input: 1 byte mode, then either (mode bit 0 clear) the whole file, or (set) the body alone,
//! which the target wraps in a header with the right length and checksum (so that mutations
//! of the body reach the state parser), format version 1 or 2 (mode bit 1) and a parent (bit 2).

#![no_main]

use std::path::Path;

use hypervisor::kvm::{kvm_cpuid_entry2, CpuId};
use libfuzzer_sys::fuzz_target;
use vmm::snapshot::format::{read_state_from, Lineage};
use vmm::snapshot::{check_cpu, VmSnapshot};

/// A host that offers leaves 1 and 7 with some features.
fn offered() -> CpuId {
    let leaf = |function, ebx, ecx, edx| kvm_cpuid_entry2 {
        function,
        ebx,
        ecx,
        edx,
        ..Default::default()
    };
    CpuId::from_entries(&[
        leaf(1, 0, 0x7ffa_3203, 0x178b_fbff),
        leaf(7, 0x0000_0209, 0, 0),
    ])
    .unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let parent = if mode & 4 != 0 {
            r#","snapshot_id":"a1","parent":{"dir":"/snaps/base","id":"b2"}"#
        } else {
            ""
        };
        let header = format!(
            r#"{{"format_version":{},"vessel_version":"0.1.0","body_len":{},"body_crc32":{}{parent}}}"#,
            1 + ((mode >> 1) & 1),
            rest.len(),
            crc32fast::hash(rest)
        );
        let mut f = format!("VESSEL-SNAPSHOT\n{header}\n").into_bytes();
        f.extend_from_slice(rest);
        f
    };
    let Ok((mut snap, lineage)) =
        read_state_from::<VmSnapshot>(file.as_slice(), Path::new("state"))
    else {
        return;
    };
    let _: Lineage = lineage;
    // What a restore checks before building anything.
    let _ = snap.rebind(&[], None);
    let _ = check_cpu(&offered(), &snap);
    let _ = snap.config.validate(240, Some(64 << 30));
    let _ = arch::layout::ram_ranges(snap.config.spec.memory);
    let _ = serde_json::to_vec(&snap);
});
