//! A mesh-cp control plane run by a test: a config dir the test writes YAML into, a data dir
//! with the CA and tokens, loopback gRPC and status ports, and a thin gRPC client.

use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

pub use mesh_api::NodeClient;
use mesh_api::{v1::node_service_client::NodeServiceClient, Credentials};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::{
    daemon::Daemon,
    etcd::Etcd,
    mesh::{free_port, http_get, sibling_bin},
};

pub struct ControlPlane {
    daemon: Daemon,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The Prometheus endpoint (`/metrics`).
    pub metrics: SocketAddr,
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Kubernetes mode: the kubeconfig of the (fake) API server it reads the mesh from,
    /// instead of the config dir.
    kubeconfig: Option<PathBuf>,
    /// etcd mode: the store's endpoint and the CA files every replica shares, instead of the
    /// config dir.
    store: Option<Store>,
    /// How long it may take to become ready.
    ready: Duration,
}

/// Where an etcd-mode control plane keeps the mesh.
struct Store {
    /// `--etcd-endpoints`, and `--etcd-ca` and the client certificate for an etcd that
    /// serves TLS.
    args: Vec<std::ffi::OsString>,
    ca: StoreCa,
}

/// The `--etcd-*` arguments for `etcd`.
fn etcd_args(etcd: &Etcd) -> Vec<std::ffi::OsString> {
    let mut args = vec!["--etcd-endpoints".into(), etcd.endpoint().into()];
    if let Some(tls) = etcd.tls() {
        for (flag, path) in [
            ("--etcd-ca", &tls.ca),
            ("--etcd-cert", &tls.client_cert),
            ("--etcd-key", &tls.client_key),
        ] {
            args.push(flag.into());
            args.push(path.into());
        }
    }
    args
}

/// How the replicas share the CA.
enum StoreCa {
    /// Files every replica is given (`--ca-cert`, `--ca-key`).
    Files(PathBuf, PathBuf),
    /// Kept in etcd, its key sealed with this key file (`--ca-encryption-key`).
    Sealed(PathBuf),
}

/// How long mesh-cp may take to become ready, usually.
const READY: Duration = Duration::from_secs(20);

impl ControlPlane {
    /// Starts mesh-cp with `files` (name, YAML) in a fresh config dir under a scratch directory
    /// named after `prefix`, and waits for `/healthz`.
    pub fn start(prefix: &str, files: &[(&str, &str)]) -> io::Result<Self> {
        Self::launch(prefix, files, None, READY)
    }

    /// Starts `mesh-cp serve --etcd-endpoints` on the store at `endpoint`, with the CA of
    /// `ca` (a certificate and key every replica is given), and waits for `/healthz`.
    pub fn start_etcd(prefix: &str, etcd: &Etcd, ca: &(PathBuf, PathBuf)) -> io::Result<Self> {
        let (cert, key) = ca.clone();
        Self::launch_etcd(prefix, etcd, StoreCa::Files(cert, key))
    }

    /// [`ControlPlane::start_etcd`] with the CA kept in etcd, sealed with `sealing_key`
    /// (made by the elected leader if etcd has none).
    pub fn start_etcd_sealed(prefix: &str, etcd: &Etcd, sealing_key: &Path) -> io::Result<Self> {
        Self::launch_etcd(prefix, etcd, StoreCa::Sealed(sealing_key.to_path_buf()))
    }

    fn launch_etcd(prefix: &str, etcd: &Etcd, ca: StoreCa) -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-mesh-cp-{}", free_port()));
        fs::create_dir_all(&dir)?;
        let mut cp = Self::not_started(dir, None);
        cp.store = Some(Store {
            args: etcd_args(etcd),
            ca,
        });
        cp.daemon.replace(cp.spawn()?);
        cp.wait_healthy()?;
        Ok(cp)
    }

    /// `mesh-cp VERB -f FILE` (`apply` or `delete`) with `text` as the file, against this
    /// control plane's store: what it printed (standard output and error), or its error.
    pub fn store_cmd(&self, verb: &str, name: &str, text: &str) -> io::Result<(String, String)> {
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| io::Error::other("not in etcd mode"))?;
        let file = self.daemon.dir.join(name);
        fs::write(&file, text)?;
        let out = Command::new(sibling_bin("mesh-cp", "MESH_CP_BIN"))
            .arg(verb)
            .arg("-f")
            .arg(&file)
            .args(&store.args)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// [`ControlPlane::start`] for a config that takes long to load: `/healthz` is waited
    /// for up to `ready`.
    pub fn start_slow(prefix: &str, files: &[(&str, &str)], ready: Duration) -> io::Result<Self> {
        Self::launch(prefix, files, None, ready)
    }

    /// Starts `mesh-cp serve --kubernetes` against the API server of `kubeconfig` (namespace
    /// mycel-system, replica mycel-cp-0), and waits for `/healthz`.
    pub fn start_kubernetes(prefix: &str, kubeconfig: &Path) -> io::Result<Self> {
        Self::launch(prefix, &[], Some(kubeconfig.to_path_buf()), READY)
    }

    fn launch(
        prefix: &str,
        files: &[(&str, &str)],
        kubeconfig: Option<PathBuf>,
        ready: Duration,
    ) -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-mesh-cp-{}", free_port()));
        let mut cp = Self::not_started(dir, kubeconfig);
        fs::create_dir_all(&cp.config_dir)?;
        for (name, text) in files {
            fs::write(cp.config_dir.join(name), text)?;
        }
        cp.ready = ready;
        cp.daemon.replace(cp.spawn()?);
        cp.wait_healthy()?;
        Ok(cp)
    }

    fn not_started(dir: PathBuf, kubeconfig: Option<PathBuf>) -> Self {
        let config_dir = dir.join("config");
        let data_dir = dir.join("data");
        let log_file = dir.join("mesh-cp.log");
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self {
            daemon: Daemon::not_started("mesh-cp", dir, log_file),
            grpc,
            http,
            metrics,
            config_dir,
            data_dir,
            kubeconfig,
            store: None,
            ready: READY,
        }
    }

    fn spawn(&self) -> io::Result<std::process::Child> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon.log_file)?;
        let mut cmd = Command::new(sibling_bin("mesh-cp", "MESH_CP_BIN"));
        cmd.arg("serve");
        match (&self.kubeconfig, &self.store) {
            (Some(kubeconfig), _) => cmd
                .args(["--kubernetes", "--namespace", "mycel-system"])
                .args(["--pod-name", "mycel-cp-0"])
                .env("KUBECONFIG", kubeconfig),
            (None, Some(store)) => match &store.ca {
                StoreCa::Files(cert, key) => cmd
                    .args(&store.args)
                    .arg("--ca-cert")
                    .arg(cert)
                    .arg("--ca-key")
                    .arg(key),
                StoreCa::Sealed(key) => cmd.args(&store.args).arg("--ca-encryption-key").arg(key),
            },
            (None, None) => cmd.arg("--config-dir").arg(&self.config_dir),
        };
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--grpc-listen")
            .arg(self.grpc.to_string())
            .arg("--http-listen")
            .arg(self.http.to_string())
            .arg("--metrics-listen")
            .arg(self.metrics.to_string())
            .arg("--reload-interval")
            .arg("0.1")
            .env(
                "RUST_LOG",
                std::env::var("MESH_CP_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
    }

    fn wait_healthy(&mut self) -> io::Result<()> {
        let http = self.http;
        self.daemon
            .wait_until(self.ready, "mesh-cp /healthz", || {
                http_get(http, "/healthz").ok()
            })
            .map(drop)
    }

    /// Stops the process (SIGTERM); [`ControlPlane::resume`] starts it again on the same ports
    /// and data dir.
    pub fn pause(&mut self) -> io::Result<()> {
        self.daemon.stop_with(libc::SIGTERM).map(drop)
    }

    pub fn resume(&mut self) -> io::Result<()> {
        let child = self.spawn()?;
        self.daemon.replace(child);
        self.wait_healthy()
    }

    pub fn log_file(&self) -> &Path {
        &self.daemon.log_file
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        &mut self.daemon
    }

    /// Writes a config file atomically (a rename), as an operator's tooling should.
    pub fn write_config(&self, name: &str, text: &str) -> io::Result<()> {
        let tmp = self.config_dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(tmp, self.config_dir.join(name))
    }

    pub fn remove_config(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.config_dir.join(name))
    }

    pub fn ca_cert(&self) -> PathBuf {
        match &self.store {
            Some(Store {
                ca: StoreCa::Files(cert, _),
                ..
            }) => cert.clone(),
            // Written there by mesh-cp, from etcd, in etcd mode as in a single one's.
            _ => self.data_dir.join("ca.crt"),
        }
    }

    /// `GET /status` as JSON.
    pub fn status(&self) -> io::Result<serde_json::Value> {
        let body = http_get(self.http, "/status")?;
        serde_json::from_str(&body).map_err(io::Error::other)
    }

    /// The config version in force.
    pub fn version(&self) -> io::Result<u64> {
        self.status()?["config"]["version"]
            .as_u64()
            .ok_or_else(|| io::Error::other("no config version in /status"))
    }

    /// Writes a config file, waits until the control plane has accepted it (a new version) and
    /// `nodes` have acknowledged that version; returns it. Nodes whose slice did not change get
    /// no update, so name only those the change concerns.
    pub fn apply(&mut self, name: &str, text: &str, nodes: &[&str]) -> io::Result<u64> {
        let before = self.status()?;
        self.write_config(name, text)?;
        self.wait_version_after(&before, nodes)
    }

    /// Like [`ControlPlane::apply`], for removing a config file.
    pub fn unapply(&mut self, name: &str, nodes: &[&str]) -> io::Result<u64> {
        let before = self.status()?;
        self.remove_config(name)?;
        self.wait_version_after(&before, nodes)
    }

    fn wait_version_after(
        &mut self,
        before: &serde_json::Value,
        nodes: &[&str],
    ) -> io::Result<u64> {
        let old_version = before["config"]["version"].as_u64().unwrap_or(0);
        let old_error = before["config"]["error"].clone();
        let http = self.http;
        let status = move || -> Option<serde_json::Value> {
            serde_json::from_str(&http_get(http, "/status").ok()?).ok()
        };
        let version =
            self.daemon
                .wait_until(Duration::from_secs(20), "a new config version", || {
                    let s = status()?;
                    if let Some(v) = s["config"]["version"].as_u64().filter(|v| *v > old_version) {
                        return Some(Ok(v));
                    }
                    match s["config"]["error"].as_str() {
                        // A rejection of this change is an answer too; the caller wanted acceptance.
                        Some(e) if s["config"]["error"] != old_error => {
                            Some(Err(io::Error::other(format!("config rejected: {e}"))))
                        }
                        _ => None,
                    }
                })??;
        self.daemon
            .wait_until(Duration::from_secs(20), "nodes acknowledging it", || {
                let s = status()?;
                nodes
                    .iter()
                    .all(|n| s["nodes"][n]["acked_version"].as_u64() >= Some(version))
                    .then_some(())
            })?;
        Ok(version)
    }

    /// Writes a config file that the control plane must reject; returns its error message.
    pub fn apply_invalid(&mut self, name: &str, text: &str) -> io::Result<String> {
        let http = self.http;
        let old_error = self.status()?["config"]["error"].clone();
        self.write_config(name, text)?;
        self.daemon
            .wait_until(Duration::from_secs(20), "the config error", || {
                let s: serde_json::Value =
                    serde_json::from_str(&http_get(http, "/status").ok()?).ok()?;
                let error = &s["config"]["error"];
                (*error != old_error).then(|| error.as_str().map(str::to_owned))?
            })
    }

    /// `mesh-cp explain --output json`, offline on this control plane's config dir, or against
    /// the running control plane. `from` is a workload (`ns/name`) or a plaintext client's
    /// address.
    pub fn explain(
        &self,
        from: &str,
        to: &str,
        port: u16,
        offline: bool,
    ) -> io::Result<serde_json::Value> {
        let mut cmd = Command::new(sibling_bin("mesh-cp", "MESH_CP_BIN"));
        let from_flag = if from.parse::<std::net::IpAddr>().is_ok() {
            "--from-address"
        } else {
            "--from"
        };
        let port = port.to_string();
        cmd.args(["explain", from_flag, from, "--to", to, "--port", &port])
            .args(["--output", "json"]);
        if offline {
            cmd.arg("--config-dir").arg(&self.config_dir);
        } else {
            cmd.arg("--cp").arg(self.http.to_string());
        }
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "mesh-cp explain {from} {to} {port}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(io::Error::other)
    }

    /// `mesh-cp token create --node NODE`: the token, and its id.
    pub fn create_token(&self, node: &str) -> io::Result<(String, String)> {
        let out = self.token_cmd(&["create", "--node", node])?;
        let token = out.trim().to_owned();
        let id = token
            .split_once('.')
            .map(|(id, _)| id.to_owned())
            .ok_or_else(|| io::Error::other(format!("not a token: {token:?}")))?;
        Ok((token, id))
    }

    /// `mesh-cp token create --node A --node B …`: each node's token, in order, from one
    /// call (a fleet's tokens in one write of the token file).
    pub fn create_tokens(&self, nodes: &[String]) -> io::Result<Vec<(String, String)>> {
        let mut args = vec!["create"];
        for n in nodes {
            args.extend(["--node", n.as_str()]);
        }
        let out = self.token_cmd(&args)?;
        if let [node] = nodes {
            return Ok(vec![(node.clone(), out.trim().to_owned())]);
        }
        let made: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(n, t)| (n.to_owned(), t.to_owned()))
            .collect();
        if made.len() != nodes.len() {
            return Err(io::Error::other(format!(
                "{} tokens for {} nodes",
                made.len(),
                nodes.len()
            )));
        }
        Ok(made)
    }

    pub fn revoke_token(&self, id: &str) -> io::Result<()> {
        self.token_cmd(&["revoke", id]).map(drop)
    }

    /// Writes a token for `node` to a file (mode 0600) for `mesh-node --token-file`.
    pub fn token_file(&self, node: &str) -> io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt as _;
        let (token, _) = self.create_token(node)?;
        let path = self.daemon.dir.join(format!("{node}.token"));
        fs::write(&path, format!("{token}\n"))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    fn token_cmd(&self, args: &[&str]) -> io::Result<String> {
        let mut cmd = Command::new(sibling_bin("mesh-cp", "MESH_CP_BIN"));
        cmd.arg("token").args(args);
        match &self.store {
            Some(store) => cmd.args(&store.args),
            None => cmd.arg("--data-dir").arg(&self.data_dir),
        };
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "mesh-cp token {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A gRPC client that presents `token` as `node`.
    pub async fn client(&self, node: &str, token: &str) -> io::Result<NodeClient> {
        connect(self.grpc, &self.ca_cert(), node, token).await
    }
}

pub async fn connect(
    addr: SocketAddr,
    ca: &Path,
    node: &str,
    token: &str,
) -> io::Result<NodeClient> {
    let ca_pem = fs::read(ca)?;
    let channel = Channel::from_shared(format!("https://{addr}"))
        .map_err(io::Error::other)?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))
        .map_err(io::Error::other)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(io::Error::other)?;
    let creds = Credentials::new(node, token).map_err(io::Error::other)?;
    Ok(NodeServiceClient::with_interceptor(channel, creds))
}
