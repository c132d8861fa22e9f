//! TLS for `serve`: the rustls acceptor built from the config's PEM files (`tls_cert`,
//! `tls_key`), with start-up errors that name the file and say what is wrong with it.
//!
//! The crypto provider is named explicitly (ring, the one reqwest uses too) rather than taken
//! from the process default, so a second provider in the dependency graph cannot make
//! start-up ambiguous.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS {what} {path}: {message}")]
pub struct TlsError {
    /// `certificate` or `key`.
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it, for a person.
    pub message: String,
}

/// The acceptor for `cert` (a PEM certificate chain, leaf first) and `key` (its PEM private
/// key: PKCS#8, PKCS#1 or SEC1). Only HTTP/1.1 is offered by ALPN.
pub(crate) fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let cert_error = |message: String| TlsError { what: "certificate", path: cert.to_owned(), message };
    let key_error = |message: String| TlsError { what: "key", path: key.to_owned(), message };

    let cert_pem = std::fs::read(cert).map_err(|e| cert_error(format!("cannot read it: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(format!("not a valid PEM file ({e})")))?;
    if chain.is_empty() {
        return Err(cert_error(
            "holds no `-----BEGIN CERTIFICATE-----` block (expected a PEM certificate chain)".into(),
        ));
    }

    let key_pem = std::fs::read(key).map_err(|e| key_error(format!("cannot read it: {e}")))?;
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            key_error("holds no PEM private key (`-----BEGIN PRIVATE KEY-----`, RSA or EC)".into())
        }
        other => key_error(format!("not a valid PEM file ({other})")),
    })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_error(format!("no usable TLS protocol version ({e})")))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| key_error(format!("cannot be used with certificate {} ({e})", cert.display())))?;
    // The server speaks HTTP/1.1 only (its header read timeout is an HTTP/1 setting).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
