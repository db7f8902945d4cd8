//! rustls configurations: the server side offered to clients, the client side used to backends.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::{BackendSslMode, BackendTls, ClientTls};

/// TLS setup that failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A file held no usable certificate or key.
    #[error("{0}")]
    Pem(String),
    /// rustls rejected the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!("{}: no certificate", path.display())));
    }
    Ok(certs)
}

/// What clients' TLS is served with.
#[derive(Debug)]
pub struct ServerTls {
    /// The rustls configuration.
    pub config: Arc<rustls::ServerConfig>,
    /// The certificate's `tls-server-end-point` channel-binding data (see [`end_point`]).
    pub end_point: Option<Vec<u8>>,
}

/// The acceptor for clients' TLS (after an SSLRequest, or at once), if a certificate is configured.
pub fn server_config(cfg: &ClientTls) -> Result<Option<Arc<ServerTls>>, TlsError> {
    let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
        return Ok(None);
    };
    let (chain, key) = chain_and_key(cert, key)?;
    let end_point = end_point(chain[0].as_ref());
    if end_point.is_none() {
        tracing::warn!(
            cert = %cert.display(),
            "the certificate's signature names no hash function (Ed25519, RSA-PSS?): SCRAM channel binding cannot be offered, and clients with channel_binding=require will be refused"
        );
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match &cfg.client_ca {
        // Asked for, checked when presented; whether one is needed is the session's to say
        // (`tls.client_cert`, `client_auth = "cert"`), as PostgreSQL's `clientcert` is.
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs(ca)? {
                roots.add(cert)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Pem(format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    // As PostgreSQL 17: a client naming no protocol is served, one naming only others is not.
    config.alpn_protocols = vec![crate::handshake::ALPN_POSTGRESQL.to_vec()];
    Ok(Some(Arc::new(ServerTls {
        config: Arc::new(config),
        end_point,
    })))
}

/// The `tls-server-end-point` channel-binding data of a DER certificate (RFC 5929 section 4.1),
/// what SCRAM-SHA-256-PLUS binds a login to: the certificate's hash, by the hash function of
/// its signature algorithm (SHA-256 for MD5 and SHA-1). `None` for a signature that names no
/// hash function (Ed25519, RSASSA-PSS), which PostgreSQL cannot bind to either.
pub fn end_point(der: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Digest, Sha256, Sha384, Sha512};
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let hash = match cert.signature_algorithm.oid.to_string().as_str() {
        // md5WithRSAEncryption, sha1WithRSAEncryption, ecdsa-with-SHA1, and the SHA-256 ones.
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.10045.4.1"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.3.2" => Sha256::digest(der).to_vec(),
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Sha384::digest(der).to_vec(),
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Sha512::digest(der).to_vec(),
        _ => return None,
    };
    Some(hash)
}

/// The common name in the certificate a TLS client presented (which the handshake checked
/// against `tls.client_ca`): `None` when it presented none or is not on TLS, an error when
/// the certificate has no readable common name.
pub fn client_common_name(stream: &crate::stream::Stream) -> Option<Result<String, String>> {
    let crate::stream::Stream::ServerTls(tls) = stream else {
        return None;
    };
    let cert = tls.get_ref().1.peer_certificates()?.first()?;
    Some(common_name(cert.as_ref()))
}

/// The subject's common name (`CN`) in a DER certificate: the first, as PostgreSQL reads it
/// (OpenSSL's `X509_NAME_get_text_by_NID`).
fn common_name(der: &[u8]) -> Result<String, String> {
    use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, TeletexStringRef, Utf8StringRef};
    use x509_cert::der::{Decode, Tag, Tagged};
    const CN: x509_cert::der::oid::ObjectIdentifier =
        x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.4.3");
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| e.to_string())?;
    let value = cert
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == CN)
        .map(|atv| &atv.value)
        .ok_or("the certificate's subject has no common name")?;
    let text = match value.tag() {
        Tag::Utf8String => Utf8StringRef::try_from(value).map(|s| s.as_str().to_owned()),
        Tag::PrintableString => PrintableStringRef::try_from(value).map(|s| s.as_str().to_owned()),
        Tag::Ia5String => Ia5StringRef::try_from(value).map(|s| s.as_str().to_owned()),
        Tag::TeletexString => TeletexStringRef::try_from(value).map(|s| s.as_str().to_owned()),
        other => return Err(format!("the common name is a {other}, not a string")),
    };
    text.map_err(|e| e.to_string())
}

/// A certificate chain and its private key from PEM files.
fn chain_and_key(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = certs(cert)?;
    let pem = read_pem(key)?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Pem(format!("{}: {e}", key.display())))?
        .ok_or_else(|| TlsError::Pem(format!("{}: no private key", key.display())))?;
    Ok((chain, key))
}

/// The connector for backends, or none when `sslmode = disable`.
pub fn backend_config(cfg: &BackendTls) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let config = match cfg.sslmode {
        BackendSslMode::Disable => return Ok(None),
        BackendSslMode::VerifyFull => {
            let mut roots = rustls::RootCertStore::empty();
            let path = cfg.root_cert.as_deref().ok_or_else(|| {
                TlsError::Pem("verify-full needs backend_tls.root_cert".to_owned())
            })?;
            for cert in certs(path)? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots)
        }
        // libpq's `prefer`/`require` encrypt without checking who is on the other end.
        BackendSslMode::Prefer | BackendSslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider()))),
    };
    let config = match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            let (chain, key) = chain_and_key(cert, key)?;
            config.with_client_auth_cert(chain, key)?
        }
        _ => config.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

/// Server name for SNI and verify-full: the backend's host part.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|e| TlsError::Pem(format!("{host}: {e}")))
}

/// Certificate verifier for sslmode `prefer`/`require`: signatures are checked, identity is not.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate's DER with `subject` as its distinguished name.
    fn certificate(subject: rcgen::DistinguishedName) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = subject;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_end_point_hash_follows_the_signature() {
        use sha2::{Digest, Sha256, Sha384};
        let signed_with = |alg: &'static rcgen::SignatureAlgorithm| {
            let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let p256 = signed_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(end_point(&p256), Some(Sha256::digest(&p256).to_vec()));
        let p384 = signed_with(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(end_point(&p384), Some(Sha384::digest(&p384).to_vec()));
        // No hash in the signature: nothing to bind to, as in PostgreSQL.
        assert_eq!(end_point(&signed_with(&rcgen::PKCS_ED25519)), None);
        assert_eq!(end_point(b"not a certificate"), None);
    }

    #[test]
    fn the_common_name_is_read_from_the_subject() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "ACME");
        dn.push(rcgen::DnType::CommonName, "app_user");
        assert_eq!(common_name(&certificate(dn)).unwrap(), "app_user");
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::CommonName,
            rcgen::DnValue::PrintableString("reporting".try_into().unwrap()),
        );
        assert_eq!(common_name(&certificate(dn)).unwrap(), "reporting");
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "ACME");
        let e = common_name(&certificate(dn)).unwrap_err();
        assert!(e.contains("no common name"), "{e}");
        assert!(common_name(b"not a certificate").is_err());
    }
}
