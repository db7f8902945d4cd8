//! A throwaway certificate authority and TLS client setups for tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A CA and one server certificate for `localhost` and 127.0.0.1, written as PEM files.
pub struct TestCa {
    /// CA certificate.
    pub ca_cert: PathBuf,
    /// Server certificate (signed by the CA).
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TestCa {
    /// Makes the CA and server certificate in a fresh temporary directory.
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "understudy-ca-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("CA dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "understudy test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &issuer).expect("server cert");

        let write = |name: &str, pem: &str| {
            let p = dir.join(name);
            std::fs::write(&p, pem).expect("write PEM");
            p
        };
        Self {
            ca_cert: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &cert.pem()),
            server_key: write("server.key", &key.serialize_pem()),
            ca_pem: ca.pem(),
            issuer,
            _dir: TempDir(dir),
        }
    }

    /// tokio-postgres TLS connector trusting only this CA (verify-full semantics).
    pub fn connector(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        tokio_postgres_rustls::MakeRustlsConnect::new(self.client_config())
    }

    /// rustls client configuration trusting only this CA.
    pub fn client_config(&self) -> rustls::ClientConfig {
        self.trusting().with_no_client_auth()
    }

    /// A rustls client configuration trusting only this CA, before its client certificate.
    fn trusting(
        &self,
    ) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(self.ca_pem.as_bytes()) {
            roots.add(cert).expect("CA cert");
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
    }

    /// A client certificate signed by this CA with common name `cn`, and its key (mode 0600,
    /// as libpq wants it), as PEM files.
    pub fn client_cert(&self, cn: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("client key");
        let cert = params.signed_by(&key, &self.issuer).expect("client cert");
        let dir = &self._dir.0;
        let (cert_path, key_path) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
        std::fs::write(&cert_path, cert.pem()).expect("write client cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write client key");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
            .expect("client key mode");
        (cert_path, key_path)
    }

    /// rustls client configuration trusting only this CA and presenting `cert` with `key`.
    pub fn client_config_with_cert(&self, cert: &Path, key: &Path) -> rustls::ClientConfig {
        let chain = rustls_pemfile_certs(&std::fs::read(cert).expect("client cert"));
        let key = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::PrivateKeyDer::from_pem_file(key).expect("client key PEM")
        };
        self.trusting()
            .with_client_auth_cert(chain, key)
            .expect("client certificate")
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        &self._dir.0
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM certificates")
}
