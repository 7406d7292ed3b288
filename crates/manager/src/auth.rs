//! Who may do what on the daemon's TCP listener: bearer tokens with a role (admin, read-only),
//! and TLS with the daemon's certificate (given, or made once and kept in STATE/tls).
//!
//! The Unix socket needs no token: it is the daemon's user's alone (mode 0600), as Docker's
//! and Incus's local sockets are. Over TCP every request carries `Authorization: Bearer
//! SECRET`; the daemon keeps only each secret's SHA-256. A read-only token may GET and
//! nothing else; tokens themselves are managed by admins only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::types::ApiError;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::store::{now_s, Role, Store, Token};
use crate::vms::Manager;

/// Errors of tokens and certificates.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no randomness for a secret: {0}")]
    Random(std::io::Error),
    #[error("{path}: {why}")]
    Tls { path: String, why: String },
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub name: String,
    pub role: Role,
}

/// A new token: its secret is shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenCreated {
    pub name: String,
    pub role: Role,
    /// `Authorization: Bearer SECRET`.
    pub secret: String,
}

/// The SHA-256 of a secret, hex.
pub fn hash(secret: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Makes a token: 256 random bits, `vsl_` and 64 hex digits.
pub fn create(store: &dyn Store, req: TokenCreate) -> Result<TokenCreated, crate::vms::Error> {
    crate::layout::check_name(&req.name).map_err(crate::vms::Error::BadRequest)?;
    let mut b = [0u8; 32];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| crate::vms::Error::Failed(AuthError::Random(e.into()).to_string()))?;
    let secret: String = std::iter::once("vsl_".to_string())
        .chain(b.iter().map(|x| format!("{x:02x}")))
        .collect();
    store.add_token(&Token {
        name: req.name.clone(),
        role: req.role,
        hash: hash(&secret),
        created: now_s(),
    })?;
    Ok(TokenCreated {
        name: req.name,
        role: req.role,
        secret,
    })
}

fn refuse(status: u16, message: &str) -> Response {
    let status =
        axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::UNAUTHORIZED);
    let mut r = (status, axum::Json(ApiError::new(status.as_u16(), message))).into_response();
    if status == axum::http::StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// The role of the bearer token `secret`, if it is one of the daemon's.
fn role_of(store: &dyn Store, secret: &str) -> Option<Role> {
    let h = hash(secret);
    store
        .tokens()
        .ok()?
        .into_iter()
        .find(|t| t.hash == h)
        .map(|t| t.role)
}

/// The TCP listener's gate: a known token, and for a read-only one a GET that is not about
/// tokens.
pub async fn require_token(State(m): State<Arc<Manager>>, req: Request, next: Next) -> Response {
    let secret = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok()?.strip_prefix("Bearer "))
        .map(|s| s.trim().to_string());
    let role = match secret {
        None => None,
        // The store is synchronous (SQLite).
        Some(s) => match tokio::task::spawn_blocking(move || role_of(m.store(), &s)).await {
            Ok(r) => r,
            Err(_) => return refuse(500, "internal error checking the token"),
        },
    };
    match role {
        None => refuse(401, "a valid token is needed: Authorization: Bearer SECRET"),
        Some(Role::ReadOnly)
            if req.method() != Method::GET || req.uri().path().starts_with("/api/v1/tokens") =>
        {
            refuse(403, "this token is read-only")
        }
        Some(_) => next.run(req).await,
    }
}

/// The daemon's TLS certificate and key: the given files, else STATE/tls/daemon.{crt,key},
/// made (self-signed, for localhost, this host's name and its addresses) the first time.
pub fn certificate(
    state: &Path,
    given: Option<(PathBuf, PathBuf)>,
) -> Result<(PathBuf, PathBuf), AuthError> {
    if let Some(g) = given {
        return Ok(g);
    }
    let dir = state.join("tls");
    let (crt, key) = (dir.join("daemon.crt"), dir.join("daemon.key"));
    if crt.exists() && key.exists() {
        return Ok((crt, key));
    }
    let bad = |why: String| AuthError::Tls {
        path: dir.display().to_string(),
        why,
    };
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let names = vec![
        "localhost".to_string(),
        host,
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let cert = rcgen::generate_simple_self_signed(names).map_err(|e| bad(e.to_string()))?;
    std::fs::create_dir_all(&dir).map_err(|e| bad(e.to_string()))?;
    use std::os::unix::fs::OpenOptionsExt;
    let write = |path: &Path, text: String, mode: u32| {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| bad(format!("{}: {e}", path.display())))
    };
    write(&key, cert.signing_key.serialize_pem(), 0o600)?;
    write(&crt, cert.cert.pem(), 0o644)?;
    Ok((crt, key))
}

/// rustls on ring, the project's one cryptography library (the migration stream's AES-GCM
/// and HKDF are ring's too): no second one (aws-lc) to build. rustls marks ring's provider
/// deprecated for lacking post-quantum key exchange; TLS 1.3 with X25519 it has.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS acceptor for the certificate and key in PEM files.
pub fn acceptor(crt: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, AuthError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |p: &Path, why: String| AuthError::Tls {
        path: p.display().to_string(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(crt)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(crt, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(crt, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(crt, e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A TLS connector that trusts the certificates in `ca` (PEM).
pub fn connector(ca: &Path) -> Result<tokio_rustls::TlsConnector, AuthError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |why: String| AuthError::Tls {
        path: ca.display().to_string(),
        why,
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
        roots
            .add(c.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Serves `router` over TLS on `listener` until `stop` resolves.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accepting a TCP connection: {e}");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            // A handshake that does not finish within 10 s is dropped.
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                _ => return,
            };
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
