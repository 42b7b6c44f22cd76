//! The TLS listener in front of the gRPC service.
//!
//! TLS is terminated here rather than by tonic so that the serving certificate can be renewed
//! in place (the CA issues it with a short life) and failed handshakes are logged with the peer.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use mesh_api::server::node_service_server::NodeServiceServer;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::{grpc::NodeApi, state::Shared};

const SERVER_CERT_TTL: Duration = Duration::from_secs(7 * 86_400);
const SERVER_CERT_RENEW: Duration = Duration::from_secs(86_400);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Hands out the current serving certificate; renewed by a background task.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn issue(shared: &Shared, names: &[String]) -> anyhow::Result<Arc<CertifiedKey>> {
    let (chain, key, issued) = shared
        .ca
        .server_cert(names, SERVER_CERT_TTL)
        .context("cannot issue the control plane's serving certificate")?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)
        .context("cannot load the control plane's serving certificate")?;
    tracing::info!(serial = issued.serial, not_after = %issued.expires(), names = ?names, "serving certificate issued");
    Ok(Arc::new(certified))
}

/// Names the serving certificate carries: the operator's `--server-name`s, or by default
/// `localhost`, `mesh-cp`, this host's name and every address of this host's interfaces.
pub fn default_server_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "mesh-cp".to_owned()];
    if let Ok(h) = nix::unistd::gethostname() {
        if let Some(h) = h.to_str() {
            names.push(h.to_owned());
        }
    }
    let mut ips: Vec<IpAddr> = vec![
        IpAddr::from([127, 0, 0, 1]),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ];
    if !listen.ip().is_unspecified() {
        ips.push(listen.ip());
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let ip = a.address.and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            });
            if let Some(ip) = ip {
                // Link-local addresses need a zone to be dialled; no client will name them.
                let link_local =
                    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
                if !link_local {
                    ips.push(ip);
                }
            }
        }
    }
    ips.sort();
    ips.dedup();
    names.extend(ips.iter().map(IpAddr::to_string));
    names.dedup();
    names
}

/// Serves the node API on `listener` until `shared.stopping` is set, then closes its
/// connections in order.
pub async fn serve_grpc(
    listener: TcpListener,
    shared: Arc<Shared>,
    names: Vec<String>,
) -> anyhow::Result<()> {
    let current = Arc::new(CurrentCert(RwLock::new(issue(&shared, &names)?)));
    {
        let (current, shared, names) = (current.clone(), shared.clone(), names.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SERVER_CERT_RENEW).await;
                match issue(&shared, &names) {
                    Ok(c) => *current.0.write().unwrap_or_else(|p| p.into_inner()) = c,
                    Err(e) => tracing::error!("cannot renew the serving certificate: {e:#}"),
                }
            }
        });
    }
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 is not supported by the crypto provider")?
            .with_no_client_auth()
            .with_cert_resolver(current);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
    let accepting = shared.clone();
    tokio::spawn(async move {
        let shared = accepting;
        let mut stopping = shared.stopping.subscribe();
        loop {
            // Once stopping, no new connection: a node that reconnects at once would only be
            // cut again; it reaches the next process instead.
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stopping.wait_for(|s| *s) => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Before any work for it: a place among the handshakes in progress.
            let Some(slot) = shared.auth.peers.handshake(peer.ip().to_canonical()) else {
                shared.metrics.node_refused("throttled");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, conn_tx) = (acceptor.clone(), conn_tx.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(slot);
                match handshake {
                    Ok(Ok(tls)) => {
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });

    shared
        .serving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut stopping = shared.stopping.subscribe();
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(NodeServiceServer::new(NodeApi::new(shared)))
        // Once stopping, connections get a GOAWAY, their streams end (each with the
        // shutdown status) and TLS closes with close_notify.
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
            let _ = stopping.wait_for(|s| *s).await;
        })
        .await
        .context("the gRPC server stopped")
}
