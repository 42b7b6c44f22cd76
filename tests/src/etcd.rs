//! A real etcd (Debian's `etcd-server`) for a test: one member on loopback, its data in the
//! test's own directory, stopped and removed when the handle drops.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{daemon::Daemon, mesh::free_port};

/// Where Debian installs it (`cargo xtask` installs the package).
const ETCD: &str = "/usr/bin/etcd";

pub struct Etcd {
    daemon: Daemon,
    pub client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` (etcd's metrics listener), which answers whatever the clients'
    /// port asks for.
    health_port: u16,
    data_dir: PathBuf,
    /// With TLS: the certificates, in the etcd's directory.
    tls: Option<TlsFiles>,
}

/// The files of an etcd that serves TLS and asks clients for certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA of the server's and the client's certificates.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Etcd {
    /// Starts etcd and waits until it answers `/health`.
    pub fn start(prefix: &str) -> io::Result<Self> {
        Self::launch(prefix, false)
    }

    /// [`Etcd::start`] serving TLS to clients, and asking them for a certificate
    /// (`--client-cert-auth`), from a CA of the test's own.
    pub fn start_tls(prefix: &str) -> io::Result<Self> {
        Self::launch(prefix, true)
    }

    fn launch(prefix: &str, tls: bool) -> io::Result<Self> {
        let client_port = free_port();
        let dir = std::env::temp_dir().join(format!("{prefix}-etcd-{client_port}"));
        fs::create_dir_all(&dir)?;
        let log_file = dir.join("etcd.log");
        let mut etcd = Self {
            daemon: Daemon::not_started("etcd", dir.clone(), log_file),
            client_port,
            peer_port: free_port(),
            health_port: free_port(),
            data_dir: dir.join("data"),
            tls: None,
        };
        if tls {
            etcd.tls = Some(tls_files(&dir)?);
        }
        etcd.resume()?;
        Ok(etcd)
    }

    pub fn log_file(&self) -> &std::path::Path {
        &self.daemon.log_file
    }

    /// `http://127.0.0.1:PORT` (or `https://`), for `--etcd-endpoints`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The certificates, when it serves TLS.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Kills etcd at once (SIGKILL), as a crash or a lost host would: its data stays for
    /// [`Etcd::resume`].
    pub fn kill(&mut self) -> io::Result<()> {
        self.daemon.stop_with(libc::SIGKILL).map(drop)
    }

    /// Starts etcd again on the same ports and data, and waits until it answers.
    pub fn resume(&mut self) -> io::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon.log_file)?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(ETCD);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", self.health_port),
            ])
            .args(["--log-level", "warn", "--logger", "zap"])
            .env_remove("ETCD_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot start {ETCD} ({e}): install the etcd-server package (cargo xtask test does)"),
                )
            })?;
        self.daemon.replace(child);
        let port = self.health_port;
        self.daemon
            .wait_until(Duration::from_secs(20), "etcd /health", || {
                health(port).then_some(())
            })
    }
}

impl Etcd {
    /// Deletes `key`, as an operator with etcd's own tools could (its JSON gateway; plain
    /// HTTP only).
    pub fn delete(&self, key: &str) -> io::Result<()> {
        use base64::Engine as _;
        let body = format!(
            "{{\"key\":\"{}\"}}",
            base64::engine::general_purpose::STANDARD.encode(key)
        );
        let mut s = TcpStream::connect(("127.0.0.1", self.client_port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "POST /v3/kv/deleterange HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "etcd refused the delete: {answer}"
            )))
        }
    }
}

/// Whether etcd on `port` says it is healthy.
fn health(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn tls_files(dir: &std::path::Path) -> io::Result<TlsFiles> {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    let now = time::OffsetDateTime::now_utc();
    let dated = |mut p: CertificateParams| {
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(1);
        p
    };
    let ca_key = KeyPair::generate().map_err(io::Error::other)?;
    let mut ca = dated(CertificateParams::new(Vec::<String>::new()).map_err(io::Error::other)?);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(io::Error::other)?;
    fs::write(&files.ca, ca_cert.pem())?;
    let issuer = Issuer::new(ca, ca_key);
    for (cert, key, purpose) in [
        (
            &files.server_cert,
            &files.server_key,
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        (
            &files.client_cert,
            &files.client_key,
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let pair = KeyPair::generate().map_err(io::Error::other)?;
        let mut params =
            dated(CertificateParams::new(Vec::<String>::new()).map_err(io::Error::other)?);
        params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        params.extended_key_usages = vec![purpose];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let signed = params.signed_by(&pair, &issuer).map_err(io::Error::other)?;
        fs::write(cert, signed.pem())?;
        fs::write(key, pair.serialize_pem())?;
    }
    Ok(files)
}

/// A root CA's certificate and key in files, as an operator gives every mesh-cp replica
/// (`--ca-cert`, `--ca-key`), or the key that seals the CA kept in etcd
/// (`--ca-encryption-key`); removed on drop.
pub struct SharedCa {
    dir: PathBuf,
}

impl SharedCa {
    /// (certificate, key)
    pub fn files(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("ca.crt"), self.dir.join("ca.key"))
    }

    /// The sealing key (64 hex digits) of [`sealing_key`].
    pub fn sealing_key(&self) -> PathBuf {
        self.dir.join("ca-encryption.key")
    }
}

/// A key to seal the CA that the replicas keep in etcd.
pub fn sealing_key(prefix: &str) -> io::Result<SharedCa> {
    use std::fmt::Write as _;
    let dir = std::env::temp_dir().join(format!("{prefix}-seal-{}", free_port()));
    fs::create_dir_all(&dir)?;
    let ca = SharedCa { dir };
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let hex = bytes.iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    });
    fs::write(ca.sealing_key(), hex)?;
    Ok(ca)
}

impl Drop for SharedCa {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A new root CA for the replicas of one test.
pub fn shared_ca(prefix: &str) -> io::Result<SharedCa> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let dir = std::env::temp_dir().join(format!("{prefix}-ca-{}", free_port()));
    fs::create_dir_all(&dir)?;
    let ca = SharedCa { dir };
    let key = KeyPair::generate().map_err(io::Error::other)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Mycel test root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(30);
    let cert = params.self_signed(&key).map_err(io::Error::other)?;
    let (cert_file, key_file) = ca.files();
    fs::write(cert_file, cert.pem())?;
    fs::write(key_file, key.serialize_pem())?;
    Ok(ca)
}
