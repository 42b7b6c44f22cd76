//! The daemon's end of the plugin's socket: one request line, one reply line per connection.

use std::{
    future::Future,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use super::protocol::{self, PodRef, Reply, Request};
use crate::handoff::gate::{Gate, Phase};

/// What answers the plugin's requests: in the daemon, this node's pods
/// (`kubernetes::Pods`). The socket's side knows the protocol, not who decides.
pub trait Pods: Send + Sync + 'static {
    /// ADD: answer once the pod is captured, or known not to be in the mesh.
    fn add(
        &self,
        pod: &PodRef,
        container_id: &str,
        netns: &Path,
    ) -> impl Future<Output = Reply> + Send;
    /// DEL: the pod's sandbox is going away.
    fn del(&self, pod: &PodRef, container_id: &str) -> Reply;
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --cni-socket {path}: {source}")]
pub struct BindError {
    path: PathBuf,
    source: std::io::Error,
}

/// Listens on `path`, replacing a socket a previous daemon left; only root may connect (the
/// runtime runs the plugin as root).
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let err = |source| BindError {
        path: path.to_path_buf(),
        source,
    };
    crate::socket::clear_unix_path(path).map_err(err)?;
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// The listener a daemon that handed over passed on, if it listens on `path`.
pub fn adopt(listener: std::os::unix::net::UnixListener, path: &Path) -> Option<UnixListener> {
    let same = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .is_some_and(|p| p == path);
    if !same {
        return None;
    }
    listener.set_nonblocking(true).ok()?;
    UnixListener::from_std(listener).ok()
}

/// Answers the plugin until the daemon is taken over. While a new daemon starts up on this
/// one's sockets (and this one applies nothing), it leaves the requests to the new one.
pub async fn serve(listener: UnixListener, pods: Arc<impl Pods>, gate: Gate) {
    loop {
        let accepted = tokio::select! {
            () = gate.left_running() => {
                gate.resumed().await;
                if matches!(gate.phase(), Phase::TakenOver | Phase::Stopping) {
                    return;
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, pods.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "CNI socket: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, pods: Arc<impl Pods>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // One short request line, soon; anything longer or slower is not the plugin.
    let mut reader = BufReader::new(read.take(protocol::MAX_REQUEST));
    let read = reader.read_line(&mut line);
    let read = match tokio::time::timeout(protocol::REQUEST_TIMEOUT, read).await {
        Ok(read) => read.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no request line within {:?}",
            protocol::REQUEST_TIMEOUT
        )),
    };
    let reply = match read.and_then(|_| protocol::parse_request(&line)) {
        Ok(Request::Add {
            pod,
            container_id,
            netns,
        }) => pods.add(&pod, &container_id, &netns).await,
        Ok(Request::Del { pod, container_id }) => pods.del(&pod, &container_id),
        Err(message) => {
            tracing::warn!(error = %message, "CNI socket: unreadable request");
            Reply::Error { message }
        }
    };
    if let Reply::Error { message } = &reply {
        tracing::warn!(error = %message, "CNI ADD refused; the runtime will retry the pod");
    }
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}
