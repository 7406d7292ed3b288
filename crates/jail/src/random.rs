//! Randomness from the `getrandom` system call itself. The `getrandom` crate looks the libc
//! function up with `dlsym`, which finds nothing in a static binary, and then falls back to
//! opening `/dev/urandom`: a confined thread (the entropy device's worker) may not open files.

/// Fills `buf` with random bytes from the host kernel.
pub fn fill(buf: &mut [u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let rest = &mut buf[at..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which is valid
        // and exclusively borrowed for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        at += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fills_large_buffers_with_something() {
        let mut a = vec![0u8; 1 << 20];
        super::fill(&mut a).unwrap();
        assert!(a.iter().filter(|&&b| b == 0).count() < 1 << 16);
    }
}
