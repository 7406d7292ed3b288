//! virtio-net's stream socket framing (QEMU's stream protocol, passt's): what a hostile peer
//! sends, read in pieces of any size, and frames written to a stream that takes any amount.
//!
//! Input: 1 byte selector, then (reader) a quarter of read sizes and the stream, or (writer)
//! frame lengths and write sizes, or (backend) bytes written into a real socket pair.
//!
//! Asserted: the reader gives exactly the frames a straight parse of the stream finds, fails
//! exactly where a prefix is 0 or above `MAX_FRAME_LEN`, and never reads past a frame and the
//! next prefix; the writer's output is every frame with its prefix, in order, however short
//! the writes; the backend hands the device whole packets (zero header + frame) within
//! `MAX_PACKET_LEN`, and after any error only errors.

#![no_main]

use std::io::{self, Write};
use std::os::unix::net::UnixStream;

use devices::virtio::net::{
    FrameReader, FrameWriter, NetBackend, StreamBackend, HDR_LEN, MAX_FRAME_LEN, MAX_PACKET_LEN,
    PREFIX_LEN,
};
use libfuzzer_sys::fuzz_target;

/// The frames of `stream` by a straight parse, and whether it ends at a bad prefix.
fn reference(stream: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut frames = Vec::new();
    let mut at = 0;
    while stream.len() - at >= PREFIX_LEN {
        let p = &stream[at..at + PREFIX_LEN];
        let n = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
        if n == 0 || n > MAX_FRAME_LEN {
            return (frames, true);
        }
        match stream.get(at + PREFIX_LEN..at + PREFIX_LEN + n) {
            Some(f) => frames.push(f),
            None => break,
        }
        at += PREFIX_LEN + n;
    }
    (frames, false)
}

fn reader(data: &[u8]) {
    // The first quarter sizes the reads, the rest is the stream.
    let (sizes, stream) = data.split_at(data.len() / 4);
    let (want, bad) = reference(stream);
    let mut r = FrameReader::new();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    let failed = loop {
        match r.frame() {
            Err(_) => break true,
            Ok(Some(f)) => {
                assert!((1..=MAX_FRAME_LEN).contains(&f.len()));
                got.push(f.to_vec());
                r.consume();
                continue;
            }
            Ok(None) => {}
        }
        if rest.is_empty() {
            break false;
        }
        let space = r.space();
        assert!(!space.is_empty(), "no room while no frame is whole");
        assert!(space.len() <= MAX_FRAME_LEN + 2 * PREFIX_LEN);
        let size = usize::from(sizes.get(i).copied().unwrap_or(255)).max(1) * 37;
        i += 1;
        let n = space.len().min(size).min(rest.len());
        space[..n].copy_from_slice(&rest[..n]);
        r.filled(n);
        rest = &rest[n..];
    };
    assert_eq!(failed, bad);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(&g[..], *w);
    }
}

/// Takes the next of `sizes` (times 13) bytes per write (0: would block), cycling; all of
/// it with no sizes.
struct Trickle<'a> {
    out: Vec<u8>,
    sizes: &'a [u8],
    calls: usize,
}

impl Write for Trickle<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self
            .sizes
            .get(self.calls % self.sizes.len().max(1))
            .map_or(usize::MAX, |&s| usize::from(s) * 13);
        self.calls += 1;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = n.min(buf.len());
        self.out.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn writer(data: &[u8]) {
    // Pairs of bytes are frame lengths (up to the largest frame), the rest write sizes.
    let (lens, sizes) = data.split_at((data.len() / 2).min(64) & !1);
    let frames: Vec<Vec<u8>> = lens
        .chunks(2)
        .map(|c| {
            let n = usize::from(u16::from_le_bytes([c[0], c[1]])) + 1;
            vec![c[0]; n.min(MAX_FRAME_LEN)]
        })
        .collect();
    let mut w = Trickle {
        out: Vec::new(),
        sizes,
        calls: 0,
    };
    let mut fw = FrameWriter::new();
    let mut want = Vec::new();
    for f in &frames {
        // Sizes that are all zero never let a byte through: give up then.
        let mut tries = 0;
        loop {
            match fw.send(&mut w, f) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(fw.pending() > 0);
                    tries += 1;
                    if tries > 10_000 {
                        return;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(fw.pending() <= PREFIX_LEN + f.len());
        want.extend_from_slice(&(f.len() as u32).to_be_bytes());
        want.extend_from_slice(f);
    }
    let mut tries = 0;
    while !fw.flush(&mut w).unwrap() {
        tries += 1;
        if tries > 10_000 {
            return;
        }
    }
    assert_eq!(w.out, want);
    for bad in [0, MAX_FRAME_LEN + 1] {
        assert!(fw.send(&mut w, &vec![0u8; bad]).is_err());
    }
}

fn backend(data: &[u8]) {
    let Ok((a, mut b)) = UnixStream::pair() else {
        return;
    };
    let Ok(backend) = StreamBackend::new(a) else {
        return;
    };
    // What the socket buffer takes without blocking, then the end of the stream.
    let _ = b.set_nonblocking(true);
    let _ = b.write(data);
    drop(b);
    let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
    // Each frame takes 5 bytes at least: the end comes within that many reads.
    let mut frames = 0;
    loop {
        match backend.recv(&mut buf) {
            Ok(n) => {
                assert!((HDR_LEN + 1..=MAX_PACKET_LEN).contains(&n));
                assert!(buf[..HDR_LEN].iter().all(|&x| x == 0));
                frames += 1;
                assert!(
                    frames <= data.len() / 5,
                    "more frames than the stream holds"
                );
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => panic!("blocked after the end"),
            Err(_) => break,
        }
    }
    // Closed for good.
    assert!(backend.recv(&mut buf).is_err());
    assert!(backend.send(&[0u8; HDR_LEN + 60]).is_err());
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => reader(rest),
        1 => writer(rest),
        _ => backend(rest),
    }
});
