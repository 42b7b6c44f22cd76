//! The mesh's certificate authority: one root key that signs workload SVIDs and the control
//! plane's own serving certificate.
//!
//! The root is created on first start in the data dir (`ca.crt`, and `ca.key` with mode 0600),
//! or supplied by the operator. Workload keys never come here: nodes send CSRs, and what goes
//! into a workload certificate is decided here, not copied from the request.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_model::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Certificates start this far in the past so that nodes whose clock runs a little behind
/// accept them at once.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{path} exists but {missing} does not; restore it or remove both to start a new CA")]
    HalfPresent { path: PathBuf, missing: PathBuf },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Why a CSR was not signed; shown to the node.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR cannot be parsed or its signature does not verify")]
    Unreadable,
    #[error("the CSR must carry exactly one SAN, the URI {expected}; it carries {found}")]
    WrongSans { expected: String, found: String },
    #[error("cannot sign: {0}")]
    Sign(rcgen::Error),
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
}

/// A freshly issued leaf certificate.
pub struct Issued {
    pub der: CertificateDer<'static>,
    pub serial: String,
    pub not_after: OffsetDateTime,
}

impl Issued {
    /// When it expires, in RFC 3339, as logs print times.
    pub fn expires(&self) -> String {
        self.not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }
}

impl Ca {
    /// Loads the CA from `cert` and `key`. When neither file exists and `create` is set, makes a
    /// new root and writes both.
    pub fn load_or_create(cert: &Path, key: &Path, create: bool) -> Result<Self, CaError> {
        match (cert.exists(), key.exists()) {
            (true, true) => Self::load(cert, key),
            (false, false) if create => Self::create(cert, key),
            (true, false) => Err(CaError::HalfPresent {
                path: cert.into(),
                missing: key.into(),
            }),
            (false, true) => Err(CaError::HalfPresent {
                path: key.into(),
                missing: cert.into(),
            }),
            (false, false) => Err(CaError::Read {
                path: cert.into(),
                source: std::io::ErrorKind::NotFound.into(),
            }),
        }
    }

    fn load(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Read {
                path: path.into(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        Self::parse(&cert_pem, cert, &key_pem, key)
    }

    /// The CA from PEM text held elsewhere (a Kubernetes Secret named `origin`).
    pub fn from_pem(cert_pem: &str, key_pem: &str, origin: &str) -> Result<Self, CaError> {
        let at = |what: &str| PathBuf::from(format!("{origin} ({what})"));
        Self::parse(cert_pem, &at("ca.crt"), key_pem, &at("ca.key"))
    }

    /// `cert` and `key` name where the PEM texts came from, for errors.
    fn parse(cert_pem: &str, cert: &Path, key_pem: &str, key: &Path) -> Result<Self, CaError> {
        let key_pair = KeyPair::from_pem(key_pem).map_err(|e| CaError::BadFile {
            path: key.into(),
            reason: format!("not a PEM private key rcgen can sign with: {e}"),
        })?;
        let root_der = first_pem_cert(cert_pem).ok_or_else(|| CaError::BadFile {
            path: cert.into(),
            reason: "no PEM CERTIFICATE block".into(),
        })?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&root_der).map_err(|e| CaError::BadFile {
                path: cert.into(),
                reason: format!("not an X.509 certificate: {e}"),
            })?;
        if !parsed.is_ca() {
            return Err(CaError::BadFile {
                path: cert.into(),
                reason: "not a CA certificate (basicConstraints CA:TRUE is missing)".into(),
            });
        }
        if parsed.public_key().raw
            != rcgen::PublicKeyData::subject_public_key_info(&key_pair).as_slice()
        {
            return Err(CaError::BadFile {
                path: key.into(),
                reason: format!("this key does not belong to {}", cert.display()),
            });
        }
        let issuer =
            Issuer::from_ca_cert_der(&root_der, key_pair).map_err(|e| CaError::BadFile {
                path: cert.into(),
                reason: e.to_string(),
            })?;
        Ok(Self { issuer, root_der })
    }

    fn create(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let (ca, cert_pem, key_pem) = Self::generate()?;
        // The key first, created 0600 from the start; a crash between the two writes leaves a
        // key without a certificate, which `load_or_create` reports instead of overwriting.
        write_new(key, key_pem.as_bytes(), 0o600)?;
        write_new(cert, cert_pem.as_bytes(), 0o644)?;
        tracing::info!(cert = %cert.display(), key = %key.display(), "created a new root CA");
        Ok(ca)
    }

    /// A new root: the CA, its certificate and its private key (PEM), for the caller to keep.
    pub fn generate() -> Result<(Self, String, String), CaError> {
        let key_pair = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Mycel");
        dn.push(DnType::CommonName, "Mycel root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key_pair)?;
        let (cert_pem, key_pem) = (root.pem(), key_pair.serialize_pem());
        let ca = Self {
            issuer: Issuer::new(params, key_pair),
            root_der: root.der().clone(),
        };
        Ok((ca, cert_pem, key_pem))
    }

    /// The root certificate as PEM: the trust bundle nodes verify the control plane with.
    pub fn root_pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.root_der.to_vec()))
    }

    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// When the root expires.
    pub fn root_not_after(&self) -> Option<std::time::SystemTime> {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.root_der).ok()?;
        let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
    }

    /// Signs an SVID for `identity` with the key of `csr_der`, valid for `ttl`.
    pub fn sign_workload(
        &self,
        csr_der: &[u8],
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Issued, CsrError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into())
            .map_err(|_| CsrError::Unreadable)?;
        let uri = identity.to_string();
        let sans_ok = matches!(csr.params.subject_alt_names.as_slice(),
            [SanType::URI(u)] if u.as_str() == uri);
        if !sans_ok {
            return Err(CsrError::WrongSans {
                expected: uri,
                found: format!("{:?}", csr.params.subject_alt_names),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params, &csr.public_key, ttl)
            .map_err(CsrError::Sign)
    }

    /// A serving certificate for the control plane's gRPC endpoint, with a new key.
    pub fn server_cert(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, Issued), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "mesh-cp");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued = self.issue(params, &key, ttl)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((
            vec![issued.der.clone(), self.root_der.clone()],
            key_der,
            issued,
        ))
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
    ) -> Result<Issued, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ttl;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            der: cert.der().clone(),
            serial: serial_hex,
            not_after: params.not_after,
        })
    }
}

/// 16 random bytes with the top bit clear, so the DER INTEGER is positive and 16 bytes long.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the kernel's random source is available");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn first_pem_cert(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
}

/// Creates `path` (failing if it exists) with `mode`, writes `data` and syncs it.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let werr = |source| CaError::Write {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(werr)?;
    f.write_all(data).map_err(werr)?;
    f.sync_all().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mesh-cp-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn csr_for(uris: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn creates_once_then_reloads_the_same_root() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tmp("create");
        let (c, k) = (d.join("ca.crt"), d.join("ca.key"));
        let first = Ca::load_or_create(&c, &k, true).unwrap();
        let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Ca::load_or_create(&c, &k, true).unwrap();
        assert_eq!(first.root_der(), again.root_der());
        std::fs::remove_file(&k).unwrap();
        let e = Ca::load_or_create(&c, &k, true).err().unwrap().to_string();
        assert!(e.contains("does not"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rejects_a_key_of_another_ca() {
        let (a, b) = (tmp("a"), tmp("b"));
        Ca::load_or_create(&a.join("ca.crt"), &a.join("ca.key"), true).unwrap();
        Ca::load_or_create(&b.join("ca.crt"), &b.join("ca.key"), true).unwrap();
        let e = Ca::load_or_create(&a.join("ca.crt"), &b.join("ca.key"), false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not belong"), "{e}");
        std::fs::remove_dir_all(&a).unwrap();
        std::fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn signs_only_csrs_for_exactly_the_identity() {
        let d = tmp("sign");
        let ca = Ca::load_or_create(&d.join("ca.crt"), &d.join("ca.key"), true).unwrap();
        let id = SpiffeId::new("td", "shop", "web");
        let ttl = Duration::from_secs(3600);
        let issued = ca
            .sign_workload(&csr_for(&["spiffe://td/ns/shop/sa/web"]), &id, ttl)
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.der).unwrap();
        assert!(!cert.is_ca());
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime as u64, 3600 + CLOCK_SKEW.as_secs());
        for bad in [
            vec!["spiffe://td/ns/shop/sa/db"],
            vec!["spiffe://td/ns/shop/sa/web", "spiffe://td/ns/shop/sa/db"],
            vec![],
        ] {
            assert!(
                ca.sign_workload(&csr_for(&bad), &id, ttl).is_err(),
                "{bad:?}"
            );
        }
        assert!(matches!(
            ca.sign_workload(b"junk", &id, ttl),
            Err(CsrError::Unreadable)
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
