//! A Kubernetes cluster as the daemons see it, for the Kubernetes-mode tests: the fake API
//! server (`mesh_kube::fake`, the one stand-in the codebase allows) on a loopback port, a
//! kubeconfig pointing at it, and the CNI plugin run the way a container runtime runs it.

use std::{
    fs, io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

pub use mesh_kube::fake::FakeApi;
use serde_json::{json, Value};

use crate::{
    mesh::{free_port, mesh_node_bin},
    topology::{run_with_timeout, Pod},
};

/// The audience and service account mesh-cp accepts node tokens for (its defaults).
const AUDIENCE: &str = "mycel-cp";
const NODE_SA: &str = "system:serviceaccount:mycel-system:mycel-node";

pub struct FakeCluster {
    pub api: FakeApi,
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    /// Serves the API; the server stops when the cluster is dropped.
    _runtime: tokio::runtime::Runtime,
}

impl FakeCluster {
    /// Serves an empty fake API on a loopback port; scratch files go under a directory named
    /// after `prefix`.
    pub fn start(prefix: &str) -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-kube-{}", free_port()));
        fs::create_dir_all(&dir)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let api = FakeApi::default();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        {
            let _in_runtime = runtime.enter();
            api.serve(listener);
        }
        let kubeconfig = dir.join("kubeconfig");
        fs::write(&kubeconfig, FakeApi::kubeconfig(addr))?;
        Ok(Self {
            api,
            addr,
            kubeconfig,
            dir,
            _runtime: runtime,
        })
    }

    /// Stores `object` under `resource` (plural, e.g. `pods`), as `kubectl apply` would.
    pub fn apply(&self, resource: &str, object: Value) {
        self.api.apply(resource, object);
    }

    /// The node daemon's pod on `node` and a service-account token bound to it, written to a
    /// file for `--token-file`.
    pub fn node_token(&self, node: &str) -> io::Result<PathBuf> {
        let name = format!("mycel-node-{node}");
        let uid = format!("uid-{name}");
        self.apply(
            "pods",
            json!({ "apiVersion": "v1", "kind": "Pod",
                    "metadata": { "name": name, "namespace": "mycel-system", "uid": uid },
                    "spec": { "nodeName": node, "hostNetwork": true,
                              "serviceAccountName": "mycel-node", "containers": [] },
                    "status": { "phase": "Running" } }),
        );
        let nonce = format!("{node}-{}", free_port());
        let token = mesh_kube::fake::FakeApi::jwt(AUDIENCE, NODE_SA, 3600, &nonce);
        self.api
            .issue_token(&token, AUDIENCE, NODE_SA, (&name, &uid));
        let path = self.dir.join(format!("{node}.token"));
        fs::write(&path, &token)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    /// Waits for the control plane's trust bundle ConfigMap; writes its root for `--cp-ca`.
    pub fn trust_bundle(&self, timeout: Duration) -> io::Result<PathBuf> {
        let deadline = Instant::now() + timeout;
        loop {
            let bundle = self
                .api
                .get("configmaps", "mycel-system", "mycel-trust-bundle");
            if let Some(pem) = bundle.as_ref().and_then(|b| b["data"]["ca.crt"].as_str()) {
                let path = self.dir.join("ca.crt");
                fs::write(&path, pem)?;
                return Ok(path);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(
                    "mesh-cp wrote no mycel-trust-bundle ConfigMap",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`run_cni`] with this cluster's scratch directory.
    pub fn cni(
        &self,
        command: &str,
        socket: &Path,
        pod: &Pod,
        k8s_pod: (&str, &str, &str),
    ) -> io::Result<Output> {
        run_cni(&self.dir, command, socket, pod, k8s_pod)
    }
}

/// Runs the CNI plugin (mesh-node as `dir/mycel-cni`) with `command` for `pod`, the
/// Kubernetes pod (namespace, name, uid), chained after a network plugin that gave the pod
/// its IPv4 address, talking to the daemon on `socket`.
pub fn run_cni(
    dir: &Path,
    command: &str,
    socket: &Path,
    pod: &Pod,
    (namespace, name, uid): (&str, &str, &str),
) -> io::Result<Output> {
    let plugin = dir.join("mycel-cni");
    if !plugin.exists() {
        // Two threads may race to make it; either link will do.
        match std::os::unix::fs::symlink(mesh_node_bin(), &plugin) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    let config = json!({
        "cniVersion": "1.0.0", "name": "test-net", "type": "mycel-cni",
        "socket": socket, "excludeNamespaces": ["kube-system"],
        "prevResult": { "cniVersion": "1.0.0",
                        "ips": [{ "address": format!("{}/24", pod.ipv4) }] },
    });
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}"
    );
    let mut child = Command::new(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{name}"))
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        io::Write::write_all(&mut stdin, config.to_string().as_bytes())?;
    }
    run_with_timeout(child, Duration::from_secs(60))
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
