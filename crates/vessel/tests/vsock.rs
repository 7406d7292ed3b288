//! virtio-vsock on the direct test host: the bundled guest's driver connects to a host Unix
//! socket through Vessel's device and gets its payload echoed.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use common::*;

/// Echo every connection on `listener` (one at a time) until the test ends; returns what was
/// received by the first connection.
fn echo_server(listener: UnixListener) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return Vec::new();
        };
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return all,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).is_err() {
                        return all;
                    }
                }
            }
        }
    })
}

#[test]
fn guest_echo_through_a_host_unix_socket() {
    let dir = TempDir::new("echo");
    let port = 1234;
    let listener = UnixListener::bind(dir.file(&format!("v.sock_{port}"))).unwrap();
    let server = echo_server(listener);
    let spec = format!("cid=3,socket={}", dir.file("v.sock").display());
    let cmdline = format!("vsock={port}");
    let o = vessel(&["run", "--vsock", &spec, "--cmdline", &cmdline]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains("virtio-vsock mmio@0xd0000000 cid 3: echo ok"),
        "{out}"
    );
    assert_eq!(
        server.join().unwrap(),
        b"vessel virtio-vsock echo 0123456789"
    );
    // The device's listening socket is removed when the VM ends.
    assert!(!dir.file("v.sock").exists());
}

#[test]
fn a_refused_connection_fails_the_guest_test_cleanly() {
    let dir = TempDir::new("refused");
    let spec = format!("cid=7,socket={}", dir.file("v.sock").display());
    let o = vessel(&["run", "--vsock", &spec, "--cmdline", "vsock=4321"]);
    assert_code(&o, 5);
    let out = stdout(&o);
    assert!(
        out.contains("FAIL: virtio-vsock mmio@0xd0000000: connection refused (RST)"),
        "{out}"
    );
}

#[test]
fn the_guest_reads_its_cid_without_a_port() {
    let dir = TempDir::new("ready");
    let spec = format!("cid=42,socket={}", dir.file("v.sock").display());
    let o = vessel(&["run", "--vsock", &spec, "--rng"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains("virtio-vsock mmio@0xd0001000 cid 42: ready (no vsock=PORT given)"),
        "{out}"
    );
}

#[test]
fn bad_vsock_options_are_one_line_errors() {
    for spec in [
        "cid=2,socket=/tmp/x",
        "cid=3",
        "socket=/tmp/x",
        "cid=3,socket=/tmp/x,y=1",
    ] {
        let o = vessel(&["run", "--vsock", spec]);
        assert_code(&o, 2);
        let err = stderr(&o);
        assert!(err.contains("invalid --vsock"), "{spec}: {err}");
    }
    // The socket path is a regular file: refused, and the file is left alone.
    let dir = TempDir::new("notsock");
    std::fs::write(dir.file("v.sock"), b"data").unwrap();
    let spec = format!("cid=3,socket={}", dir.file("v.sock").display());
    let o = vessel(&["run", "--vsock", &spec]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("not a socket"), "{}", stderr(&o));
    assert_eq!(std::fs::read(dir.file("v.sock")).unwrap(), b"data");
}
