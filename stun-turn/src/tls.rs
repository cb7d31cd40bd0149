//! TLS for the stream transport (RFC 8656 §3.1, `turns:`): a rustls
//! acceptor built from PEM files. Connections then carry the same framing
//! as TCP.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::config::{ConfigError, TlsSettings};

/// A TLS acceptor for the configured certificate and key.
pub(crate) fn acceptor(tls: &TlsSettings) -> Result<TlsAcceptor, ConfigError> {
    let err = |what: &str, e: &dyn std::fmt::Display| ConfigError::Tls(format!("{what}: {e}"));
    let certs = CertificateDer::pem_file_iter(&tls.cert_file)
        .map_err(|e| err(&tls.cert_file.display().to_string(), &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&tls.cert_file.display().to_string(), &e))?;
    if certs.is_empty() {
        return Err(ConfigError::Tls(format!(
            "{}: no certificate",
            tls.cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| err(&tls.key_file.display().to_string(), &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("protocol versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| err("certificate and key", &e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
