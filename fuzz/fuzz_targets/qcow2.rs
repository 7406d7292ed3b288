//! qcow2 images from untrusted bytes, through the block crate's public entry points only: the
//! header parser, then the image written to a file (under TMPDIR) and opened
//! read-only the way a VM opens a disk, read at a few offsets, described (`vessel image info`)
//! and checked (`vessel image check`, without repair). Every failure must be an error, never a
//! panic; nothing may write to the image.
//!
//! Input: the image file.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use block::qcow2::header::Header;
use block::{Format, OpenOptions};
use libfuzzer_sys::fuzz_target;

/// Largest image tried (a larger input is cut).
const MAX_IMAGE: usize = 1 << 20;

fn image_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        // scripts/fuzz points TMPDIR at a directory of its own (in /dev/shm) and removes it.
        let dir = std::env::temp_dir().join(format!("vessel-fuzz-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("image.qcow2")
    })
}

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_IMAGE)];
    let _ = Header::parse(data, data.len() as u64);
    let path = image_path();
    std::fs::write(path, data).unwrap();
    let opts = OpenOptions {
        read_only: true,
        format: Some(Format::Qcow2),
        lock: false,
        repair_dirty: false,
        direct: false,
    };
    if let Ok(disk) = block::open(path, opts) {
        let size = disk.size();
        let mut buf = vec![0u8; 4096];
        for off in [
            0,
            size / 2,
            size.saturating_sub(4096),
            size.saturating_sub(512),
        ] {
            let n = (size - off.min(size)).min(4096) as usize;
            let _ = disk.read_at(&mut buf[..n], off);
        }
        // Past the end: an error.
        assert!(disk.read_at(&mut buf[..512], size).is_err() || size > u64::MAX - 512);
        assert!(
            disk.write_at(&buf[..512], 0).is_err(),
            "read-only disk took a write"
        );
    }
    let _ = block::ops::info::info(path, false, false);
    let _ = block::ops::check(path, false);
    assert_eq!(
        std::fs::read(path).unwrap(),
        data,
        "the image was written to"
    );
});
