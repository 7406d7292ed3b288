//! The migration stream's protection: a handshake in which both sides prove they hold the
//! migration's token, then every frame sealed with AES-256-GCM.
//!
//! ```text
//! source                                        target
//! MAGIC, nonce_s (32 random bytes)   →
//!                                    ← MAGIC, nonce_t
//! proof_s = HMAC(k_sp, transcript)   →          (checked before anything else is read)
//!                                    ← ACCEPTED, proof_t = HMAC(k_tp, transcript)
//!                                      | REFUSED (and the connection closes)
//! sealed frames both ways ...
//! ```
//!
//! The keys come from HKDF-SHA256 with the token as input keying material and both nonces as
//! salt, so every connection has fresh keys: `k_sp`, `k_tp` (the proofs) and one AEAD key per
//! direction. The transcript is `MAGIC ‖ nonce_s ‖ nonce_t`. The source proves first: a peer
//! that connects to a listening target learns nothing about the token.
//!
//! A sealed frame is the clear header (tag, little-endian `u64` length of the plaintext),
//! then the ciphertext and the 16-byte GCM tag; the header is the AEAD's associated data, so
//! it cannot be changed either. The nonce is the frame's number in its direction (a counter
//! from 0; each direction has its own key), so a frame replayed, reordered, dropped or from
//! another connection fails to open. The header is checked against the kind's size limit
//! ([`Tag::max_len`]) before the body is read; a body is opened before any of it is used.

use std::io::{Read, Write};

use ring::{aead, hkdf, hmac};

use super::protocol::{self, FrameRead, FrameWrite, ProtocolError, Tag};
use super::Stream;

/// First bytes of each side's greeting (the last byte is the handshake's version).
pub const MAGIC: &[u8; 16] = b"vessel-mig-auth\x01";
/// The shortest token accepted (a generated one is 64 hex digits: 256 bits).
pub const TOKEN_MIN_LEN: usize = 16;
const NONCE_LEN: usize = 32;
const PROOF_LEN: usize = 32;
const GCM_TAG_LEN: usize = 16;
const ACCEPTED: u8 = 0;
const REFUSED: u8 = 1;

/// Errors of the handshake and of opening sealed frames.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("connection during the authentication handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the peer did not start the authenticated migration handshake (an older Vessel, or \
         another program)"
    )]
    NotVessel,
    #[error("the target refused the migration token (wrong token)")]
    Refused,
    #[error("the source does not hold this migration's token (wrong token)")]
    WrongToken,
    #[error("the target could not prove it holds the migration token (wrong token or target)")]
    TargetUnproven,
    #[error(
        "{0} frame {1} failed authentication: tampered with, replayed, reordered or not from \
         the peer"
    )]
    Tampered(&'static str, u64),
    #[error("this side's half of the stream was handed to another thread")]
    HandedOver,
    #[error("the migration token must be at least {TOKEN_MIN_LEN} characters")]
    ShortToken,
    #[error("the system's random number generator failed")]
    Random,
    #[error("key derivation failed")]
    Kdf,
}

/// Which end of the connection this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Target,
}

/// A fresh random token: 256 bits as 64 hex digits.
pub fn new_token() -> Result<String, AuthError> {
    let mut b = [0u8; 32];
    jail::random::fill(&mut b).map_err(|_| AuthError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Checks a token given by a user.
pub fn check_token(token: &str) -> Result<(), AuthError> {
    if token.len() < TOKEN_MIN_LEN {
        return Err(AuthError::ShortToken);
    }
    Ok(())
}

/// An output length for HKDF.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// What a handshake yields: one AEAD key for each direction.
pub struct Keys {
    send: aead::LessSafeKey,
    recv: aead::LessSafeKey,
}

/// Derives the keys of one connection; returns (this side's proof, the peer's expected
/// proof key, the AEAD keys).
fn derive(
    token: &str,
    transcript: &[u8],
    nonce_s: &[u8],
    nonce_t: &[u8],
    role: Role,
) -> Result<([u8; PROOF_LEN], hmac::Key, Keys), AuthError> {
    let mut salt = Vec::with_capacity(2 * NONCE_LEN);
    salt.extend_from_slice(nonce_s);
    salt.extend_from_slice(nonce_t);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(token.as_bytes());
    let okm = |label: &[u8]| -> Result<[u8; 32], AuthError> {
        let info = [label];
        let mut out = [0u8; 32];
        prk.expand(&info, Len(32))
            .and_then(|o| o.fill(&mut out))
            .map_err(|_| AuthError::Kdf)?;
        Ok(out)
    };
    let aead_key = |label: &[u8]| -> Result<aead::LessSafeKey, AuthError> {
        let k =
            aead::UnboundKey::new(&aead::AES_256_GCM, &okm(label)?).map_err(|_| AuthError::Kdf)?;
        Ok(aead::LessSafeKey::new(k))
    };
    let s_proof = hmac::Key::new(hmac::HMAC_SHA256, &okm(b"vessel-migration source proof")?);
    let t_proof = hmac::Key::new(hmac::HMAC_SHA256, &okm(b"vessel-migration target proof")?);
    let s2t = aead_key(b"vessel-migration source to target")?;
    let t2s = aead_key(b"vessel-migration target to source")?;
    let (mine, theirs, keys) = match role {
        Role::Source => (
            s_proof,
            t_proof,
            Keys {
                send: s2t,
                recv: t2s,
            },
        ),
        Role::Target => (
            t_proof,
            s_proof,
            Keys {
                send: t2s,
                recv: s2t,
            },
        ),
    };
    let mut proof = [0u8; PROOF_LEN];
    proof.copy_from_slice(hmac::sign(&mine, transcript).as_ref());
    Ok((proof, theirs, keys))
}

fn greeting() -> Result<([u8; NONCE_LEN], Vec<u8>), AuthError> {
    let mut nonce = [0u8; NONCE_LEN];
    jail::random::fill(&mut nonce).map_err(|_| AuthError::Random)?;
    let mut msg = MAGIC.to_vec();
    msg.extend_from_slice(&nonce);
    Ok((nonce, msg))
}

/// Reads the peer's greeting: its nonce, or [`AuthError::NotVessel`] (checked on the magic
/// before the nonce is waited for).
fn read_greeting(s: &mut impl Read) -> Result<[u8; NONCE_LEN], AuthError> {
    let mut magic = [0u8; MAGIC.len()];
    s.read_exact(&mut magic).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => AuthError::NotVessel,
        _ => AuthError::Io(e),
    })?;
    if &magic != MAGIC {
        return Err(AuthError::NotVessel);
    }
    let mut nonce = [0u8; NONCE_LEN];
    s.read_exact(&mut nonce)?;
    Ok(nonce)
}

fn transcript(nonce_s: &[u8], nonce_t: &[u8]) -> Vec<u8> {
    let mut t = MAGIC.to_vec();
    t.extend_from_slice(nonce_s);
    t.extend_from_slice(nonce_t);
    t
}

/// The source's half of the handshake.
pub fn handshake_source(s: &mut (impl Read + Write), token: &str) -> Result<Keys, AuthError> {
    let (nonce_s, hello) = greeting()?;
    s.write_all(&hello)?;
    let nonce_t = read_greeting(s)?;
    let t = transcript(&nonce_s, &nonce_t);
    let (proof, theirs, keys) = derive(token, &t, &nonce_s, &nonce_t, Role::Source)?;
    s.write_all(&proof)?;
    let mut status = [0u8; 1];
    s.read_exact(&mut status).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            AuthError::Refused
        }
        _ => AuthError::Io(e),
    })?;
    if status[0] != ACCEPTED {
        return Err(AuthError::Refused);
    }
    let mut proof_t = [0u8; PROOF_LEN];
    s.read_exact(&mut proof_t)?;
    hmac::verify(&theirs, &t, &proof_t).map_err(|_| AuthError::TargetUnproven)?;
    Ok(keys)
}

/// The target's half of the handshake: nothing but the greeting and the proof is read
/// before the source has proven it holds `token`.
pub fn handshake_target(s: &mut (impl Read + Write), token: &str) -> Result<Keys, AuthError> {
    let nonce_s = match read_greeting(s) {
        Ok(n) => n,
        Err(AuthError::NotVessel) => {
            // An older source reads this as the error frame of its own protocol.
            let msg = b"this target accepts authenticated migrations only (a migration token)";
            let mut frame = vec![Tag::Error as u8];
            frame.extend_from_slice(&(msg.len() as u64).to_le_bytes());
            frame.extend_from_slice(msg);
            let _ = s.write_all(&frame);
            return Err(AuthError::NotVessel);
        }
        Err(e) => return Err(e),
    };
    let (nonce_t, hello) = greeting()?;
    s.write_all(&hello)?;
    let t = transcript(&nonce_s, &nonce_t);
    let (proof, theirs, keys) = derive(token, &t, &nonce_s, &nonce_t, Role::Target)?;
    let mut proof_s = [0u8; PROOF_LEN];
    s.read_exact(&mut proof_s)?;
    if hmac::verify(&theirs, &t, &proof_s).is_err() {
        let _ = s.write_all(&[REFUSED]);
        return Err(AuthError::WrongToken);
    }
    let mut msg = vec![ACCEPTED];
    msg.extend_from_slice(&proof);
    s.write_all(&msg)?;
    Ok(keys)
}

/// The 96-bit GCM nonce of frame `n`.
fn nonce(n: u64) -> aead::Nonce {
    let mut b = [0u8; aead::NONCE_LEN];
    b[4..].copy_from_slice(&n.to_be_bytes());
    aead::Nonce::assume_unique_for_key(b)
}

/// Seals and writes frames: one direction of a connection.
pub struct FrameWriter<W> {
    inner: W,
    key: Option<aead::LessSafeKey>,
    /// The next frame's number.
    counter: u64,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W, key: aead::LessSafeKey) -> Self {
        FrameWriter {
            inner,
            key: Some(key),
            counter: 0,
            buf: Vec::new(),
        }
    }
}

impl<W: Write> FrameWrite for FrameWriter<W> {
    fn write_frame(&mut self, tag: Tag, parts: &[&[u8]]) -> Result<(), ProtocolError> {
        let key = self.key.as_ref().ok_or(AuthError::HandedOver)?;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut head = [0u8; 9];
        head[0] = tag as u8;
        head[1..].copy_from_slice(&(len as u64).to_le_bytes());
        self.buf.clear();
        self.buf.reserve(head.len() + len + GCM_TAG_LEN);
        self.buf.extend_from_slice(&head);
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        let n = self.counter;
        self.counter = n
            .checked_add(1)
            .ok_or_else(|| ProtocolError::Bad("the frame counter ran out".to_string()))?;
        let t = key
            .seal_in_place_separate_tag(nonce(n), aead::Aad::from(head), &mut self.buf[9..])
            .map_err(|_| ProtocolError::Bad("sealing a frame failed".to_string()))?;
        self.buf.extend_from_slice(t.as_ref());
        self.inner.write_all(&self.buf)?;
        Ok(())
    }
}

/// Reads and opens frames: the other direction.
pub struct FrameReader<R> {
    inner: R,
    key: Option<aead::LessSafeKey>,
    /// The next frame's number.
    counter: u64,
    /// Who sent the frames (for messages).
    from: &'static str,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, key: aead::LessSafeKey, from: &'static str) -> Self {
        FrameReader {
            inner,
            key: Some(key),
            counter: 0,
            from,
        }
    }
}

impl<R: Read> FrameRead for FrameReader<R> {
    fn read_frame(&mut self, buf: &mut Vec<u8>) -> Result<Tag, ProtocolError> {
        let key = self.key.as_ref().ok_or(AuthError::HandedOver)?;
        let mut head = [0u8; 9];
        self.inner.read_exact(&mut head)?;
        let (tag, len) = protocol::parse_head(&head)?;
        protocol::read_body(&mut self.inner, len + GCM_TAG_LEN as u64, buf)?;
        let n = self.counter;
        let plain = key
            .open_in_place(nonce(n), aead::Aad::from(head), buf)
            .map_err(|_| AuthError::Tampered(self.from, n))?
            .len();
        buf.truncate(plain);
        self.counter += 1;
        protocol::remote_errors(tag, buf)
    }
}

/// An authenticated connection: both directions, sealed.
pub struct Channel {
    pub reader: FrameReader<Stream>,
    pub writer: FrameWriter<Stream>,
}

impl Channel {
    /// Runs the handshake on `stream` as `role`, within [`HANDSHAKE_TIMEOUT`]; the stream
    /// keeps [`super::IO_TIMEOUT`] after it.
    pub fn handshake(mut stream: Stream, token: &str, role: Role) -> Result<Channel, AuthError> {
        stream.set_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let keys = match role {
            Role::Source => handshake_source(&mut stream, token)?,
            Role::Target => handshake_target(&mut stream, token)?,
        };
        stream.set_timeout(Some(super::IO_TIMEOUT))?;
        let peer = match role {
            Role::Source => "the target's",
            Role::Target => "the source's",
        };
        Ok(Channel {
            reader: FrameReader::new(stream.try_clone()?, keys.recv, peer),
            writer: FrameWriter::new(stream, keys.send),
        })
    }

    /// The connection itself (timeouts, the cancel switch, polling).
    pub fn stream(&self) -> &Stream {
        &self.writer.inner
    }

    pub fn set_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.writer.inner.set_timeout(t)
    }

    /// Moves the reading half out (to another thread); this channel can only write after it.
    pub fn take_reader(&mut self) -> std::io::Result<FrameReader<Stream>> {
        Ok(FrameReader {
            inner: self.reader.inner.try_clone()?,
            key: self.reader.key.take(),
            counter: self.reader.counter,
            from: self.reader.from,
        })
    }
}

impl FrameRead for Channel {
    fn read_frame(&mut self, buf: &mut Vec<u8>) -> Result<Tag, ProtocolError> {
        self.reader.read_frame(buf)
    }
}

impl FrameWrite for Channel {
    fn write_frame(&mut self, tag: Tag, parts: &[&[u8]]) -> Result<(), ProtocolError> {
        self.writer.write_frame(tag, parts)
    }
}

/// Two ends of a sealed connection over a socket pair: (source's, target's) (tests).
#[cfg(test)]
pub fn pair() -> (Channel, Channel) {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    const TOKEN: &str = "a test token, long enough";
    let target =
        std::thread::spawn(move || Channel::handshake(Stream::Unix(b), TOKEN, Role::Target));
    let source = Channel::handshake(Stream::Unix(a), TOKEN, Role::Source).expect("handshake");
    (source, target.join().expect("target").expect("handshake"))
}

/// How long the handshake may take: a peer that connects and says nothing holds the
/// listener that long at most.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    /// Both halves of a handshake over a socket pair: (source's result, target's).
    fn handshake(
        source_token: &str,
        target_token: &str,
    ) -> (Result<Keys, AuthError>, Result<Keys, AuthError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = target_token.to_string();
        let target = std::thread::spawn(move || handshake_target(&mut b, &t));
        let s = handshake_source(&mut a, source_token);
        drop(a);
        (s, target.join().unwrap())
    }

    /// A connected pair's keys: (source's, target's).
    fn keys() -> (Keys, Keys) {
        let (s, t) = handshake(TOKEN, TOKEN);
        (s.unwrap(), t.unwrap())
    }

    /// The source's frames, sealed, and the target's keys to open them.
    fn sealed(frames: &[(Tag, &[u8])]) -> (Vec<u8>, Keys) {
        let (s, t) = keys();
        let mut w = FrameWriter::new(Vec::new(), s.send);
        for (tag, body) in frames {
            w.write_frame(*tag, &[body]).unwrap();
        }
        (w.inner, t)
    }

    fn reader(wire: &[u8], keys: Keys) -> FrameReader<&[u8]> {
        FrameReader::new(wire, keys.recv, "the source's")
    }

    const FRAMES: &[(Tag, &[u8])] = &[
        (Tag::Hello, b"{\"hello\": 1}"),
        (Tag::Pages, &[7u8; 4096 + 12]),
        (Tag::Ready, b""),
        (Tag::Error, b"disk busy"),
    ];

    #[test]
    fn frames_round_trip() {
        let (wire, t) = sealed(FRAMES);
        // The bodies do not cross in clear.
        assert!(!wire.windows(9).any(|w| w == b"disk busy"));
        let mut r = reader(&wire, t);
        let mut buf = Vec::new();
        for (tag, body) in &FRAMES[..3] {
            assert_eq!(r.read_frame(&mut buf).unwrap(), *tag);
            assert_eq!(&buf[..], *body);
        }
        let e = r.read_frame(&mut buf).unwrap_err();
        assert!(e.to_string().contains("disk busy"), "{e}");
        // The end of the stream.
        assert!(r.read_frame(&mut buf).is_err());
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let (wire, _) = sealed(FRAMES);
        let first = 9 + FRAMES[0].1.len() + GCM_TAG_LEN;
        // Every byte of the first two frames: header, body, GCM tag.
        let second = first + 9 + FRAMES[1].1.len() + GCM_TAG_LEN;
        for at in (0..second)
            .step_by(7)
            .chain([0, 1, 8, 9, first - 1, first + 100])
        {
            let (wire, t) = sealed(FRAMES);
            let mut bad = wire.clone();
            bad[at] ^= 0x10;
            let mut r = reader(&bad, t);
            let mut buf = Vec::new();
            let results: Vec<_> = (0..2).map(|_| r.read_frame(&mut buf)).collect();
            assert!(
                results.iter().any(|r| r.is_err()),
                "a flip at byte {at} went through"
            );
            // What was opened before the flip is intact; nothing after it is returned.
            if at >= first {
                assert_eq!(results[0].as_ref().unwrap(), &Tag::Hello);
            }
        }
        assert!(wire.len() > second);
    }

    /// Seals [`FRAMES`], lets `edit` rearrange them (given each frame's bytes), and reads
    /// `n` frames back: each a tag's name or an error.
    fn rearranged(edit: impl Fn(&[&[u8]]) -> Vec<u8>, n: usize) -> Vec<String> {
        let (wire, t) = sealed(FRAMES);
        let mut frames = Vec::new();
        let mut at = 0;
        for (_, body) in FRAMES {
            let end = at + 9 + body.len() + GCM_TAG_LEN;
            frames.push(&wire[at..end]);
            at = end;
        }
        let wire = edit(&frames);
        let mut r = reader(&wire, t);
        let mut buf = Vec::new();
        (0..n)
            .map(|_| match r.read_frame(&mut buf) {
                Ok(t) => format!("{t:?}"),
                Err(e) => e.to_string(),
            })
            .collect()
    }

    #[test]
    fn replayed_reordered_dropped_and_truncated_frames_are_refused() {
        let tampered = |s: &String| s.contains("failed authentication");
        // Replayed: the first frame twice.
        let r = rearranged(|f| [f[0], f[0], f[1]].concat(), 2);
        assert_eq!(r[0], "Hello");
        assert!(tampered(&r[1]), "{r:?}");
        // Reordered.
        let r = rearranged(|f| [f[1], f[0]].concat(), 1);
        assert!(tampered(&r[0]), "{r:?}");
        // One dropped.
        let r = rearranged(|f| [f[0], f[2]].concat(), 2);
        assert_eq!(r[0], "Hello");
        assert!(tampered(&r[1]), "{r:?}");
        // Cut inside a frame's body, or inside its GCM tag: never opened.
        let r = rearranged(|f| [f[0], &f[1][..100]].concat(), 2);
        assert!(r[1].contains("connection"), "{r:?}");
        let r = rearranged(|f| [f[0], &f[1][..f[1].len() - 1]].concat(), 2);
        assert!(r[1].contains("connection"), "{r:?}");
        // A frame's own direction cannot be reflected back: the source's key does not
        // open what the source sent.
        let (s, t) = keys();
        let mut w = FrameWriter::new(Vec::new(), t.send);
        w.write_frame(Tag::Ready, &[]).unwrap();
        let mut r = FrameReader::new(&w.inner[..], t.recv, "the target's");
        assert!(r.read_frame(&mut Vec::new()).is_err());
        let mut r = FrameReader::new(&w.inner[..], s.recv, "the target's");
        assert_eq!(r.read_frame(&mut Vec::new()).unwrap(), Tag::Ready);
    }

    #[test]
    fn size_limits_hold_before_anything_is_read() {
        let (_, t) = keys();
        let mut long = vec![Tag::Ready as u8];
        long.extend_from_slice(&(Tag::Ready.max_len() + 1).to_le_bytes());
        let e = reader(&long, t).read_frame(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("at most 64"), "{e}");
    }

    #[test]
    fn a_plain_peer_is_refused_and_told_why() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let target = std::thread::spawn(move || handshake_target(&mut b, TOKEN));
        // An unauthenticated source: its first frame straight away.
        let mut plain = vec![Tag::Hello as u8];
        plain.extend_from_slice(&40u64.to_le_bytes());
        plain.extend_from_slice(&[b'{'; 40]);
        a.write_all(&plain).unwrap();
        assert!(matches!(target.join().unwrap(), Err(AuthError::NotVessel)));
        let e = protocol::read_plain_frame(&mut a, &mut Vec::new()).unwrap_err();
        assert!(
            e.to_string().contains("authenticated migrations only"),
            "{e}"
        );
        // A source facing something that is not a Vessel target.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let other = std::thread::spawn(move || {
            let mut x = [0u8; 48];
            b.read_exact(&mut x).unwrap();
            b.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n........................")
                .unwrap();
        });
        let e = handshake_source(&mut a, TOKEN).err().unwrap();
        assert!(matches!(e, AuthError::NotVessel), "{e}");
        other.join().unwrap();
    }

    #[test]
    fn tokens() {
        let t = new_token().unwrap();
        assert_eq!(t.len(), 64);
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(t, new_token().unwrap());
        assert!(check_token(&t).is_ok());
        assert!(matches!(check_token("short"), Err(AuthError::ShortToken)));
    }
}

/// The cost of sealing: `cargo test --release -p vmm seal_throughput -- --ignored --nocapture`.
#[cfg(test)]
mod bench {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore]
    fn seal_throughput() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        const TOKEN: &str = "a bench token, long enough";
        let target = std::thread::spawn(move || handshake_target(&mut b, TOKEN).unwrap());
        let s = handshake_source(&mut a, TOKEN).unwrap();
        let t = target.join().unwrap();
        // 128 frames of 256 pages (what pre-copy sends), sealed then opened.
        let frames = 128;
        let body = vec![0x5au8; 12 + 256 * 4096];
        // Sealing into a sink (the socket's copy is not the sealing's cost), then the stream
        // to open, sealed with the same key from frame 0 on.
        let key = |k: &[u8]| {
            aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, k).unwrap())
        };
        let raw = [7u8; 32];
        let mut sink = FrameWriter::new(std::io::sink(), key(&raw));
        let began = Instant::now();
        for _ in 0..frames {
            sink.write_frame(Tag::Pages, &[&body]).unwrap();
        }
        let sealed = began.elapsed();
        let mut w = FrameWriter::new(Vec::with_capacity(frames * (body.len() + 64)), s.send);
        for _ in 0..frames {
            w.write_frame(Tag::Pages, &[&body]).unwrap();
        }
        let mut r = FrameReader::new(&w.inner[..], t.recv, "the source's");
        let mut buf = Vec::new();
        let began = Instant::now();
        for _ in 0..frames {
            assert_eq!(r.read_frame(&mut buf).unwrap(), Tag::Pages);
        }
        let opened = began.elapsed();
        let mib = (frames * body.len()) as f64 / f64::from(1 << 20);
        println!(
            "seal {:.0} MiB/s, open {:.0} MiB/s (one core, {mib:.0} MiB)",
            mib / sealed.as_secs_f64(),
            mib / opened.as_secs_f64()
        );
    }
}
