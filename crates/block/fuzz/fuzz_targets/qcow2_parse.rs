//! Fuzz the qcow2 header, table and snapshot parsing, the checker and the read path:
//! malformed images must produce errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("block-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join("img.qcow2")
}

fuzz_target!(|data: &[u8]| {
    // Pure parser on the bytes.
    let _ = block::qcow2::header::Header::parse(data, data.len() as u64);

    // Whole-image paths on a file holding the bytes.
    let path = scratch();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = block::ops::check(&path, false);
    let _ = block::ops::snapshot_list(&path);
    let ro = block::OpenOptions {
        read_only: true,
        format: Some(block::Format::Qcow2),
        lock: false,
        ..Default::default()
    };
    if let Ok(disk) = block::open(&path, ro) {
        let mut buf = vec![0u8; 4096];
        let size = disk.size();
        for off in [0, size / 2, size.saturating_sub(4096)] {
            if off + 4096 <= size {
                let _ = disk.read_at(&mut buf, off);
            }
        }
    }
});
