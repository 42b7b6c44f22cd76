//! `mycel status`: what mesh-cp's `/status` says, for people: the config in force, then one
//! line per node. `-o json` prints the same figures as mesh-cp sent them.

use std::collections::BTreeMap;

use mesh_telemetry::client::{self, ClientError};
use serde::{Deserialize, Serialize};

use crate::table;

/// mesh-cp's `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub config: ConfigStatus,
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
    pub trust_domain: String,
    pub cert_ttl_seconds: u64,
    pub ca_expires: Option<String>,
    /// When mesh-cp started: it knows only the certificates it issued since.
    pub started_at: String,
    /// `directory`, `etcd` or `kubernetes`.
    pub config_source: String,
    pub default_action: serde_json::Value,
    pub mtls: serde_json::Value,
    pub transport: serde_json::Value,
    pub nodes: BTreeMap<String, Node>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub version: u64,
    pub error: Option<String>,
    pub error_file: Option<String>,
    pub checked_at: String,
}

/// One node, as mesh-cp sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Config streams open now; 0 is a node that is away (or never came).
    pub streams: u32,
    pub acked_version: Option<u64>,
    pub acked_at: Option<String>,
    /// The version it holds all of (later versions may have had nothing for it).
    pub synced_version: Option<u64>,
    /// Since when a version sent to it has waited for its answer.
    pub unanswered_since: Option<String>,
    /// The last version it rejected, and why.
    pub last_nack: Option<(u64, String)>,
    pub connected_at: Option<String>,
    pub disconnected_at: Option<String>,
    /// Workloads the config places on it.
    pub workloads: usize,
    /// How many of them hold a certificate mesh-cp issued, and when the first of those expires.
    pub certificates: usize,
    pub certificates_expire: Option<String>,
    pub certificates_issued: u64,
    pub certificates_refused: u64,
    pub watches: usize,
    /// Its metrics endpoint, as mesh-cp scrapes it.
    pub metrics: Option<String>,
}

/// mesh-cp's `/status`; with several addresses (comma-separated: replicas that serve one
/// mesh from etcd), one status in which each node is as the replica it streams from sees
/// it. Replicas that do not answer are left out while one does (`mycel check` says which).
pub fn fetch(cp: &str) -> Result<Status, ClientError> {
    let mut merged: Option<Status> = None;
    let mut failed = None;
    for addr in addresses(cp) {
        match client::get_json::<Status>(addr, "/status") {
            Ok(s) => match &mut merged {
                None => merged = Some(s),
                Some(m) => merge(m, s),
            },
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    match (merged, failed) {
        (Some(s), _) => Ok(s),
        (None, Some(e)) => Err(e),
        // No address at all: asked as given, for the error that names it.
        (None, None) => client::get_json(cp, "/status"),
    }
}

/// The addresses `--cp` names.
pub fn addresses(cp: &str) -> impl Iterator<Item = &str> {
    cp.split(',').map(str::trim).filter(|a| !a.is_empty())
}

/// Adds what `other` (another replica) knows of nodes to `into`: a node streaming from one of
/// them is as that one sees it; one streaming from neither is as the one it answered last.
fn merge(into: &mut Status, other: Status) {
    // The later config, when the replicas are at different versions.
    if other.config.version > into.config.version {
        into.config = other.config.clone();
    }
    for (name, node) in other.nodes {
        match into.nodes.get(&name) {
            Some(held) if held.streams > 0 => {}
            Some(held) if node.streams == 0 && held.acked_at >= node.acked_at => {}
            _ => {
                into.nodes.insert(name, node);
            }
        }
    }
}

pub fn render(s: &Status) -> String {
    let c = &s.config;
    let mut out = format!(
        "config version {} ({}), {} workloads, {} services, {} policies, trust domain {}, certificates for {}\n",
        c.version,
        match &c.error {
            None if s.config_source == "etcd" => "etcd's objects are in force".to_owned(),
            None => "the files are in force".to_owned(),
            Some(e) => format!("NOT the files on disk: {e}"),
        },
        s.workloads,
        s.services,
        s.policies,
        s.trust_domain,
        table::duration(std::time::Duration::from_secs(s.cert_ttl_seconds)),
    );
    if s.nodes.is_empty() {
        out.push_str("no nodes: none has connected and no workload is placed on one\n");
        return out;
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = s
        .nodes
        .iter()
        .map(|(name, n)| {
            vec![
                name.clone(),
                connection(n),
                version(n, c.version),
                n.workloads.to_string(),
                certificates(n),
            ]
        })
        .collect();
    out + &table::render(
        &["NODE", "CONNECTED", "CONFIG", "WORKLOADS", "CERTIFICATES"],
        &rows,
    )
}

fn ago(t: &Option<String>) -> String {
    t.as_deref()
        .and_then(table::parse_time)
        .map(table::from_now)
        .unwrap_or_else(|| "-".into())
}

fn connection(n: &Node) -> String {
    match (n.streams, &n.disconnected_at) {
        (0, None) => "never".into(),
        (0, t) => format!("no, since {}", ago(t)),
        (1, _) => format!("yes, {}", ago(&n.connected_at)),
        (k, _) => format!("yes ({k} streams), {}", ago(&n.connected_at)),
    }
}

fn version(n: &Node, current: u64) -> String {
    let acked = match n.acked_version {
        None => "nothing acked".to_owned(),
        Some(_) => format!("acked {}", ago(&n.acked_at)),
    };
    let held = match n.synced_version {
        Some(v) if v == current => format!("current, {acked}"),
        Some(v) => format!("{v} (behind), {acked}"),
        None => acked,
    };
    let held = match &n.unanswered_since {
        Some(t) => format!("{held}; waiting since {}", ago(&Some(t.clone()))),
        None => held,
    };
    match &n.last_nack {
        Some((v, why)) if n.synced_version.is_none_or(|a| a < *v) => {
            format!("{held}; rejected {v}: {why}")
        }
        _ => held,
    }
}

fn certificates(n: &Node) -> String {
    match (&n.certificates_expire, n.certificates) {
        (None, 0) if n.workloads == 0 => "-".into(),
        (None, _) => "none issued".into(),
        (Some(t), k) => format!(
            "{k}/{}, first expires {}",
            n.workloads,
            table::parse_time(t)
                .map(table::from_now)
                .unwrap_or_else(|| t.clone())
        ),
    }
}
