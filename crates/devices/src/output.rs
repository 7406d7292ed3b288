//! Console output a guest cannot turn against the host: a file that stops growing at a cap,
//! and a socket client that never makes the writer (a vCPU, a device thread) wait.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{send, MsgFlags};

/// How much a console file takes at most: a guest printing for ever cannot fill the disk.
pub const FILE_CAP: u64 = 256 << 20;

/// A console file that keeps the first [`FILE_CAP`] bytes and drops the rest, saying so once
/// at the end of the file.
pub struct CappedFile {
    file: File,
    written: u64,
    cap: u64,
    full: bool,
}

impl CappedFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> io::Result<CappedFile> {
        Ok(CappedFile::new(File::create(path)?, FILE_CAP))
    }

    fn new(file: File, cap: u64) -> CappedFile {
        CappedFile {
            file,
            written: 0,
            cap,
            full: false,
        }
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.full {
            return Ok(buf.len());
        }
        let room = self.cap.saturating_sub(self.written);
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.file.write_all(&buf[..take])?;
        self.written += take as u64;
        if take < buf.len() {
            self.full = true;
            let note = format!(
                "\n[vessel: the console file reached its {} MiB cap; later output is dropped]\n",
                self.cap >> 20
            );
            self.file.write_all(note.as_bytes())?;
            tracing::warn!("the console file reached its cap: later guest output is dropped");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Sends `buf` to a console client without waiting: what its socket cannot take now is
/// dropped for that client (a slow or stopped client loses output, the guest never stalls).
/// An error means the client is gone.
pub fn send_without_waiting(client: &UnixStream, buf: &[u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match send(
            client.as_raw_fd(),
            &buf[at..],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(n) => at += n,
            Err(Errno::EAGAIN) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_capped_file_keeps_its_cap_and_says_so_once() {
        let mut tmp = tempfile::tempfile().unwrap();
        let mut f = CappedFile::new(tmp.try_clone().unwrap(), 10 << 20);
        let chunk = vec![b'x'; 3 << 20];
        for _ in 0..5 {
            assert_eq!(f.write(&chunk).unwrap(), chunk.len());
        }
        let mut all = Vec::new();
        std::io::Seek::rewind(&mut tmp).unwrap();
        tmp.read_to_end(&mut all).unwrap();
        let text = String::from_utf8_lossy(&all[10 << 20..]);
        assert!(all[..10 << 20].iter().all(|&b| b == b'x'));
        assert!(text.contains("reached its 10 MiB cap"), "{text}");
        assert_eq!(text.matches("cap").count(), 1);
    }

    #[test]
    fn a_client_that_never_reads_never_blocks_the_writer() {
        let (writer, reader) = UnixStream::pair().unwrap();
        let chunk = vec![b'y'; 64 << 10];
        // Far more than a socket buffer holds: every call returns at once.
        for _ in 0..256 {
            send_without_waiting(&writer, &chunk).unwrap();
        }
        drop(reader);
        assert!(send_without_waiting(&writer, &chunk).is_err());
    }
}
