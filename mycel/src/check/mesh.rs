//! `mycel check`: the running mesh, as mesh-cp sees it. mesh-cp ready; the files (or the
//! Kubernetes objects) in force, no policy rejected; every node connected, on the current
//! version, none rejecting it; certificates and the CA root far from expiry.

use std::time::{Duration, SystemTime};

use mesh_cp::client;

use super::{when, Finding};
use crate::{
    status::{self, Node, Status},
    table,
};

/// A certificate that expires sooner than this fails the check: an outage of the control
/// plane longer than that stops the node's tunnels, since nothing can renew it meanwhile.
pub const CERTIFICATE_MARGIN: Duration = Duration::from_secs(3600);

/// A CA root that expires sooner than this is a warning: rotating it takes planning.
pub const ROOT_MARGIN: Duration = Duration::from_secs(30 * 86_400);

pub fn check(cp: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    match client::get(cp, "/readyz") {
        Ok((200, _)) => findings.push(Finding::ok("mesh-cp", format!("ready at {cp}"))),
        Ok((code, body)) => {
            findings.push(Finding::fail(
                "mesh-cp",
                format!("{cp} is not ready ({code}): {}", body.trim()),
                "read mesh-cp's log: until it serves its gRPC API no node gets config or certificates",
            ));
            return findings;
        }
        Err(e) => {
            findings.push(Finding::fail(
                "mesh-cp",
                e.to_string(),
                "start mesh-cp, or point --cp (or MYCEL_CP) at its --http-listen address; it listens on loopback by default, so run mycel on its host",
            ));
            return findings;
        }
    }
    let s = match status::fetch(cp) {
        Ok(s) => s,
        Err(e) => {
            findings.push(Finding::fail(
                "mesh-cp",
                e.to_string(),
                "mycel and mesh-cp must be of one release",
            ));
            return findings;
        }
    };
    findings.push(config(&s));
    findings.extend(nodes(&s));
    findings.push(root(&s));
    findings
}

fn config(s: &Status) -> Finding {
    let c = &s.config;
    match &c.error {
        None => Finding::ok(
            "config",
            format!(
                "version {} in force: {} workloads, {} services, {} policies",
                c.version, s.workloads, s.services, s.policies
            ),
        ),
        Some(e) => {
            // The model's errors mostly name their file already: name it once.
            let file = c
                .error_file
                .as_deref()
                .filter(|f| !e.contains(f))
                .map(|f| format!(" in {f}"))
                .unwrap_or_default();
            Finding::fail(
                "config",
                format!("the files are rejected{file}: {e}"),
                format!(
                    "fix what the error names; until then version {} (the last good config) stays in force and nothing of the change reaches the nodes",
                    c.version
                ),
            )
        }
    }
}

fn nodes(s: &Status) -> Vec<Finding> {
    if s.nodes.is_empty() {
        return vec![Finding::warn(
            "nodes",
            "no node has connected and no workload is placed on one",
            "start mesh-node on each host with --cp, --token-file (mesh-cp token create) and --cp-ca (mesh-cp's ca.crt)",
        )];
    }
    s.nodes
        .iter()
        .flat_map(|(name, n)| {
            [
                connection(name, n, s.config.version),
                certificates(name, n, s.cert_ttl_seconds),
            ]
        })
        .flatten()
        .collect()
}

fn connection(name: &str, n: &Node, current: u64) -> Option<Finding> {
    let check = format!("node {name}");
    if n.streams == 0 {
        let since = n
            .disconnected_at
            .as_deref()
            .map(|t| format!(" since {t}"))
            .unwrap_or_default();
        let what = match n.connected_at {
            None => format!(
                "has never connected, and {} workloads are placed on it",
                n.workloads
            ),
            Some(_) => format!("is not connected{since}"),
        };
        return Some(Finding::fail(
            check,
            what,
            "start mesh-node there (or read why it stopped: its log, `journalctl -u mesh-node`); meanwhile its pods keep the config they had, get no changes, and their certificates are not renewed",
        ));
    }
    if let Some((v, why)) = &n.last_nack {
        if n.acked_version.is_none_or(|a| a < *v) {
            return Some(Finding::fail(
                check,
                format!("rejected config version {v}: {why}"),
                "read the node's log for the rejection; the node keeps the last version it applied",
            ));
        }
    }
    match n.acked_version {
        Some(v) if v == current => Some(Finding::ok(
            check,
            format!(
                "connected, on the current version; workloads placed: {}",
                n.workloads
            ),
        )),
        // A version is acknowledged within a second or so of its sending: a node that is
        // still behind after that is stuck, but a check run right after a change may see one
        // on its way.
        held => Some(Finding::warn(
            check,
            format!(
                "connected, holds version {}, not the current {current}",
                held.map_or("none".to_owned(), |v| v.to_string())
            ),
            "run the check again in a few seconds; if it stays behind, read the node's log",
        )),
    }
}

fn certificates(name: &str, n: &Node, ttl_seconds: u64) -> Option<Finding> {
    let check = format!("certificates on {name}");
    let expires = n.certificates_expire.as_deref()?;
    let Some(at) = table::parse_time(expires) else {
        return Some(Finding::fail(
            check,
            format!("expiry {expires:?} unreadable"),
            "mycel and mesh-cp must be of one release",
        ));
    };
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    let ttl = table::duration(Duration::from_secs(ttl_seconds));
    if left.is_zero() {
        return Some(Finding::fail(
            check,
            format!("a certificate expired at {}", when(at)),
            "the node does not renew: read its log (`certificate` lines) and mesh-cp's (`certificate refused`)",
        ));
    }
    if left < CERTIFICATE_MARGIN {
        return Some(Finding::fail(
            check,
            format!(
                "the first of {} expires {}, within {} (MeshConfig certTtl is {ttl})",
                n.certificates,
                when(at),
                table::duration(CERTIFICATE_MARGIN)
            ),
            "with certificates this short, a control-plane outage longer than their life stops the node's tunnels: raise MeshConfig certTtl (24h by default); if it is long already, the node is not renewing: read its log",
        ));
    }
    Some(Finding::ok(
        check,
        format!(
            "{} of {} workloads hold one; the first expires {}",
            n.certificates,
            n.workloads,
            when(at)
        ),
    ))
}

fn root(s: &Status) -> Finding {
    let Some(at) = s.ca_expires.as_deref().and_then(table::parse_time) else {
        return Finding::warn(
            "CA root",
            "mesh-cp did not say when its root expires",
            "mycel and mesh-cp must be of one release",
        );
    };
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    if left < ROOT_MARGIN {
        Finding::warn(
            "CA root",
            format!("expires {}", when(at)),
            "plan the root's rotation: nodes trust only the roots in the bundle mesh-cp sends",
        )
    } else {
        Finding::ok("CA root", format!("expires {}", when(at)))
    }
}
