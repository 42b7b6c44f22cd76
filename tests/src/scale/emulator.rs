//! Many nodes in one process: each its own TLS gRPC config stream to a real mesh-cp, from its
//! own loopback address, authenticated with its own join token. An emulated node puts a
//! version's parts together (refusing parts out of order, as a real node does), counts the
//! resources without building them, and acknowledges; it holds no view and attaches nothing,
//! so that thousands fit in one process beside the control plane and the figures are the
//! control plane's, not the emulator's.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::{Buf, BufMut};
use mesh_api::{metadata, v1::ConfigAck, Credentials};
use prost::{
    encoding::{skip_field, DecodeContext, WireType},
    DecodeError,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    codegen::http::uri::PathAndQuery,
    service::interceptor::InterceptedService,
    transport::{Certificate, ClientTlsConfig, Endpoint},
};

/// A config update as an emulated node reads it: the version and flags decoded, the
/// resources counted and skipped. It is `ConfigUpdate` on the wire; decoding thousands of
/// nodes' worth of full resources would measure the emulator, not the control plane.
#[derive(Debug, Default, Clone)]
struct Counted {
    version: u64,
    snapshot: bool,
    upserts: usize,
    removals: usize,
    more: bool,
    epoch: u64,
    /// Addresses answered as no workload's.
    absent: usize,
    /// Bytes of the fields read.
    len: usize,
}

impl prost::Message for Counted {
    fn encode_raw(&self, _: &mut impl BufMut) {
        // Only ever received.
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        use prost::encoding::{bool, uint64};
        let before = buf.remaining();
        match tag {
            1 => uint64::merge(wire_type, &mut self.version, buf, ctx),
            2 => bool::merge(wire_type, &mut self.snapshot, buf, ctx),
            3 => {
                self.upserts += 1;
                skip_field(wire_type, tag, buf, ctx)
            }
            4 => {
                self.removals += 1;
                skip_field(wire_type, tag, buf, ctx)
            }
            5 => bool::merge(wire_type, &mut self.more, buf, ctx),
            6 => uint64::merge(wire_type, &mut self.epoch, buf, ctx),
            7 => {
                self.absent += 1;
                skip_field(wire_type, tag, buf, ctx)
            }
            _ => skip_field(wire_type, tag, buf, ctx),
        }?;
        self.len += before - buf.remaining();
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// What one emulated node has received.
#[derive(Debug, Default, Clone)]
pub struct Held {
    pub version: u64,
    pub epoch: Option<u64>,
    pub snapshots: u32,
    pub resumes: u32,
    pub updates: u32,
    /// Resources in the last snapshot.
    pub snapshot_resources: usize,
    /// Encoded bytes of every message received.
    pub bytes: u64,
    /// When each recent version was whole and acknowledged.
    pub arrivals: Vec<(u64, Instant)>,
    pub errors: u32,
    pub last_error: Option<String>,
    /// On demand: addresses its snapshot answered as no workload's.
    pub absent: usize,
}

/// Recent arrivals kept per node.
const ARRIVALS: usize = 64;

pub struct Node {
    pub name: String,
    token: String,
    address: IpAddr,
    /// What it asks for when it takes workloads on demand; `None`: it takes every workload.
    demand: Option<Demand>,
    pub held: Mutex<Held>,
}

/// What an emulated node that takes workloads on demand watches: as a real node would, the
/// endpoints of a Service its pods call, and a destination outside the mesh.
#[derive(Debug, Clone, Default)]
pub struct Demand {
    pub keys: Vec<String>,
    pub addresses: Vec<IpAddr>,
}

impl Demand {
    fn message(&self) -> ConfigAck {
        mesh_api::watch(self.keys.iter().cloned(), self.addresses.iter().copied())
    }
}

impl Node {
    pub fn held(&self) -> Held {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Held)) {
        f(&mut self.held.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// The emulated nodes and the tasks that run them.
pub struct Fleet {
    pub nodes: Vec<Arc<Node>>,
    /// Bumped to drop every stream at once (each node reconnects, resuming).
    generation: watch::Sender<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Node `i`'s own loopback address (127.10.0.1 and up): the control plane limits streams
/// per address, as it would for real nodes.
fn address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x7f0a_0001u32 + i as u32))
}

impl Fleet {
    /// Starts a stream for each `(node, token)` to `cp`, all at once; each node that has a
    /// [`Demand`] takes workloads on demand and asks for those.
    pub fn start(
        cp: SocketAddr,
        ca_pem: &[u8],
        tokens: Vec<(String, String)>,
        demands: Vec<Option<Demand>>,
    ) -> Self {
        let (generation, _) = watch::channel(0);
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        let mut demands = demands.into_iter();
        let nodes: Vec<Arc<Node>> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, (name, token))| {
                Arc::new(Node {
                    name,
                    token,
                    address: address(i),
                    demand: demands.next().flatten(),
                    held: Mutex::default(),
                })
            })
            .collect();
        let tasks = nodes
            .iter()
            .map(|node| tokio::spawn(run(node.clone(), cp, tls.clone(), generation.subscribe())))
            .collect();
        Self {
            nodes,
            generation,
            tasks,
        }
    }

    /// Drops every stream; each node reconnects on its own, naming the version it holds.
    pub fn drop_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Waits until `done` holds for every node; false at the timeout.
    pub async fn wait_all(&self, timeout: Duration, done: impl Fn(&Held) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.nodes.iter().all(|n| done(&n.held())) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Nodes for which `done` does not hold yet, with their state (for a failure message).
    pub fn lagging(&self, done: impl Fn(&Held) -> bool) -> Vec<(String, Held)> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.held()))
            .filter(|(_, h)| !done(h))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn run(
    node: Arc<Node>,
    cp: SocketAddr,
    tls: ClientTlsConfig,
    mut generation: watch::Receiver<u64>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        let outcome = tokio::select! {
            r = session(&node, cp, &tls) => r,
            // Dropped on purpose: reconnect at once, as a node whose stream broke does (after
            // its first backoff step).
            _ = generation.changed() => Ok(()),
        };
        if let Err(e) = outcome {
            node.update(|h| {
                h.errors += 1;
                h.last_error = Some(e);
            });
        } else {
            delay = Duration::from_millis(200);
        }
        // A real node's backoff: doubling to 10 s, with up to 25% jitter.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        tokio::time::sleep(delay + delay.mul_f64(f64::from(nanos % 1000) / 4000.0)).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn session(node: &Node, cp: SocketAddr, tls: &ClientTlsConfig) -> Result<(), String> {
    let channel = Endpoint::from_shared(format!("https://{cp}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls.clone())
        .map_err(|e| e.to_string())?
        .local_address(Some(node.address))
        .connect_timeout(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let creds = Credentials::new(&node.name, &node.token).map_err(|e| e.to_string())?;
    let mut grpc = tonic::client::Grpc::new(InterceptedService::new(channel, creds))
        .max_decoding_message_size(8 << 20);
    let (ack_tx, ack_rx) = mpsc::channel(4);
    let mut request = tonic::Request::new(ReceiverStream::new(ack_rx));
    let held = node.held();
    let resuming = held.epoch.filter(|_| held.version > 0);
    if let Some(epoch) = resuming {
        metadata::set_resume(&mut request, epoch, held.version);
    }
    if let Some(demand) = &node.demand {
        metadata::set_on_demand(&mut request);
        // An on-demand node names what it watches first, as a real one does: a resumed
        // stream is filtered by it, a snapshot answers it.
        let _ = ack_tx.send(demand.message()).await;
    }
    // Whether the next whole message answers the watches: a snapshot does.
    let mut asked = node.demand.is_some() && resuming.is_none();
    grpc.ready().await.map_err(|e| format!("connect: {e}"))?;
    let codec = tonic_prost::ProstCodec::<ConfigAck, Counted>::default();
    let path = PathAndQuery::from_static("/mycel.v1.NodeService/StreamConfig");
    let mut updates = grpc
        .streaming(request, path, codec)
        .await
        .map_err(|s| format!("stream: {}", s.message()))?
        .into_inner();
    // The version being put together from parts: its first part's flags, resources so far.
    let mut open: Option<Counted> = None;
    let mut first = true;
    loop {
        let part = match updates.message().await {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            Err(s) => return Err(format!("stream: {}", s.message())),
        };
        let len = part.len as u64;
        node.update(|h| h.bytes += len);
        let whole = match open.take() {
            None => part,
            Some(mut o) => {
                if part.version != o.version || part.snapshot {
                    return Err(format!(
                        "broken parts: version {} (snapshot {}) inside version {}",
                        part.version, part.snapshot, o.version
                    ));
                }
                o.upserts += part.upserts;
                o.removals += part.removals;
                o.absent += part.absent;
                o.more = part.more;
                o
            }
        };
        if whole.more {
            open = Some(whole);
            continue;
        }
        let (version, count) = (whole.version, whole.upserts);
        // The snapshot answers the watches: the address outside the mesh as absent.
        let answer = std::mem::take(&mut asked);
        node.update(|h| {
            if answer {
                h.absent += whole.absent;
            }
            if whole.snapshot {
                h.snapshots += 1;
                h.snapshot_resources = count;
            } else if first {
                h.resumes += 1;
            } else {
                h.updates += 1;
            }
            h.version = version;
            h.epoch = Some(whole.epoch);
            if h.arrivals.len() == ARRIVALS {
                h.arrivals.remove(0);
            }
            h.arrivals.push((version, Instant::now()));
        });
        first = false;
        let ack = ConfigAck {
            version,
            error: String::new(),
            ..Default::default()
        };
        if ack_tx.send(ack).await.is_err() {
            return Err("the ack stream closed".into());
        }
    }
}
