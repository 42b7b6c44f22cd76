//! The CNI plugin: the `mesh-node` binary, installed as `mycel-cni` and chained after the
//! cluster's network plugin. The runtime runs it once the pod's network is up and before any
//! of its containers start. It tells the node daemon which netns the pod has and waits until
//! the daemon has captured the pod (or says it is not in the mesh); only then does the pod go
//! on. It keeps no state and never changes the network it was handed.
//!
//! It fails closed: when the daemon cannot be reached or cannot capture a pod, ADD fails and
//! the kubelet retries the sandbox later, so a pod never runs uncaptured because the daemon
//! was restarting. Namespaces in `excludeNamespaces` (by default the cluster's own and
//! Mycel's) skip the daemon, so they can start while it cannot.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{json, Value};

use super::protocol::{PodRef, Reply, Request, ANSWER_TIMEOUT};

/// The versions of the CNI spec whose ADD/DEL/CHECK this plugin follows.
const VERSIONS: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.2.0"];

/// A CNI error: what the runtime logs, with the spec's code.
#[derive(Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
}

impl CniError {
    // Codes from the CNI spec.
    const INVALID_ENV: u32 = 4;
    const DECODE: u32 = 6;
    const INVALID_CONFIG: u32 = 7;
    const TRY_AGAIN_LATER: u32 = 11;

    fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }
}

/// What the runtime passes in the environment.
#[derive(Debug, Default, Clone)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    /// `CNI_ARGS`, `KEY=VALUE` pairs separated by `;`.
    pub args: String,
}

impl Invocation {
    pub fn from_env() -> Self {
        let var = |k| std::env::var(k).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }

    fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .filter(|v| !v.is_empty())
    }

    /// The Kubernetes pod, when the runtime is the kubelet's.
    fn pod(&self) -> Option<PodRef> {
        Some(PodRef {
            namespace: self.arg("K8S_POD_NAMESPACE")?.to_owned(),
            name: self.arg("K8S_POD_NAME")?.to_owned(),
            uid: self.arg("K8S_POD_UID").unwrap_or_default().to_owned(),
        })
    }
}

/// The plugin's entry in the chain.
struct Config {
    cni_version: String,
    socket: PathBuf,
    exclude: Vec<String>,
    prev_result: Option<Value>,
}

fn parse_config(text: &str) -> Result<Config, CniError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| CniError::new(CniError::DECODE, format!("network configuration: {e}")))?;
    let socket = v["socket"].as_str().ok_or_else(|| {
        CniError::new(
            CniError::INVALID_CONFIG,
            "the mycel-cni entry has no `socket` (run `mesh-node install-cni`)",
        )
    })?;
    Ok(Config {
        cni_version: v["cniVersion"].as_str().unwrap_or("1.0.0").to_owned(),
        socket: PathBuf::from(socket),
        exclude: v["excludeNamespaces"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        prev_result: v.get("prevResult").filter(|p| !p.is_null()).cloned(),
    })
}

/// Runs one command; `Ok(Some(json))` is what goes to stdout.
pub fn run(inv: &Invocation, stdin: &str) -> Result<Option<Value>, CniError> {
    match inv.command.as_str() {
        "VERSION" => Ok(Some(json!({
            "cniVersion": "1.0.0",
            "supportedVersions": VERSIONS,
        }))),
        "ADD" => add(inv, &parse_config(stdin)?).map(Some),
        "DEL" => {
            // Teardown must succeed even when the daemon is away: the daemon also drops pods
            // that leave the API, so telling it is only the fast path.
            if let (Ok(config), Some(pod)) = (parse_config(stdin), inv.pod()) {
                let request = Request::Del {
                    pod,
                    container_id: inv.container_id.clone(),
                };
                let _ = ask(&config.socket, &request, Duration::from_secs(5));
            }
            Ok(None)
        }
        "CHECK" => {
            chained(&parse_config(stdin)?)?;
            Ok(None)
        }
        // Nothing of its own to collect or to be ready for: the daemon reports its own state.
        "GC" | "STATUS" => Ok(None),
        other => Err(CniError::new(
            CniError::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
        )),
    }
}

fn chained(config: &Config) -> Result<&Value, CniError> {
    config.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            CniError::INVALID_CONFIG,
            "mycel-cni must be chained after the network plugin (no prevResult)",
        )
    })
}

fn add(inv: &Invocation, config: &Config) -> Result<Value, CniError> {
    let mut result = chained(config)?.clone();
    result["cniVersion"] = config.cni_version.clone().into();
    // Not a Kubernetes pod, or one of the namespaces that must start without the daemon.
    let Some(pod) = inv.pod() else {
        return Ok(result);
    };
    if config.exclude.contains(&pod.namespace) {
        return Ok(result);
    }
    if inv.netns.is_empty() {
        return Err(CniError::new(CniError::INVALID_ENV, "CNI_NETNS is empty"));
    }
    let who = format!("{}/{}", pod.namespace, pod.name);
    let request = Request::Add {
        pod,
        container_id: inv.container_id.clone(),
        netns: PathBuf::from(&inv.netns),
    };
    match ask(&config.socket, &request, ANSWER_TIMEOUT) {
        Ok(Reply::Enrolled { .. } | Reply::NotInMesh) => Ok(result),
        Ok(Reply::Error { message }) => Err(CniError::new(
            CniError::TRY_AGAIN_LATER,
            format!("mycel: pod {who} cannot be captured yet: {message}"),
        )),
        Ok(other) => Err(CniError::new(
            CniError::TRY_AGAIN_LATER,
            format!("mycel: unexpected answer from the node daemon: {other:?}"),
        )),
        Err(e) => Err(CniError::new(
            CniError::TRY_AGAIN_LATER,
            format!(
                "mycel: the node daemon does not answer on {}: {e}; pods in the mesh start once it does",
                config.socket.display()
            ),
        )),
    }
}

/// Sends one request and reads the one-line reply.
pub fn ask(socket: &Path, request: &Request, timeout: Duration) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    // A bounded read: the daemon's answer is one short line.
    BufReader::new(stream.take(64 * 1024)).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without an answer",
        ));
    }
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

/// The plugin's whole life: read the environment and stdin, run, print, exit.
pub fn main() -> ! {
    let inv = Invocation::from_env();
    let mut stdin = String::new();
    let read = std::io::stdin().read_to_string(&mut stdin);
    let outcome = match read {
        Ok(_) => run(&inv, &stdin),
        Err(e) => Err(CniError::new(
            CniError::DECODE,
            format!("cannot read the network configuration: {e}"),
        )),
    };
    let (out, code) = match outcome {
        Ok(Some(v)) => (Some(v), 0),
        Ok(None) => (None, 0),
        Err(e) => {
            let version = serde_json::from_str::<Value>(&stdin)
                .ok()
                .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "1.0.0".into());
            let error = json!({ "cniVersion": version, "code": e.code, "msg": e.msg });
            (Some(error), 1)
        }
    };
    if let Some(v) = out {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{v}");
        let _ = stdout.flush();
    }
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(command: &str, args: &str) -> Invocation {
        Invocation {
            command: command.into(),
            container_id: "c1".into(),
            netns: "/run/netns/cni-1".into(),
            args: args.into(),
        }
    }

    const POD_ARGS: &str =
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=order-1;K8S_POD_UID=u-1";

    #[test]
    fn version_and_unknown_commands() {
        let v = run(&inv("VERSION", ""), "").unwrap().unwrap();
        assert!(v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")));
        let e = run(&inv("FROB", ""), "{}").unwrap_err();
        assert_eq!(e.code, CniError::INVALID_ENV);
    }

    #[test]
    fn add_passes_the_previous_result_on_when_the_daemon_is_not_asked() {
        let conf = r#"{"cniVersion":"1.0.0","name":"k8s","type":"mycel-cni","socket":"/nonexistent/cni.sock",
            "excludeNamespaces":["kube-system"],"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"}]}}"#;
        // Not a Kubernetes pod, or an excluded namespace: the daemon is not consulted.
        let out = run(&inv("ADD", "IgnoreUnknown=1"), conf).unwrap().unwrap();
        assert_eq!(out["ips"][0]["address"], "10.1.0.2/24");
        let system = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns;K8S_POD_UID=u";
        assert!(run(&inv("ADD", system), conf).unwrap().is_some());
        // A pod of another namespace while the daemon is away: fail, try again later.
        let e = run(&inv("ADD", POD_ARGS), conf).unwrap_err();
        assert_eq!(e.code, CniError::TRY_AGAIN_LATER);
        assert!(e.msg.contains("/nonexistent/cni.sock"), "{}", e.msg);
        // DEL succeeds regardless.
        assert_eq!(run(&inv("DEL", POD_ARGS), conf), Ok(None));
    }

    #[test]
    fn bad_configurations_are_named() {
        let e = run(&inv("ADD", POD_ARGS), "{not json").unwrap_err();
        assert_eq!(e.code, CniError::DECODE);
        let e = run(
            &inv("ADD", POD_ARGS),
            r#"{"cniVersion":"1.0.0","socket":"/s"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, CniError::INVALID_CONFIG);
        assert!(e.msg.contains("chained"), "{}", e.msg);
        let e = run(&inv("ADD", POD_ARGS), r#"{"prevResult":{}}"#).unwrap_err();
        assert!(e.msg.contains("socket"), "{}", e.msg);
    }
}
