//! `mycel check`: the running mesh, as mesh-cp sees it. mesh-cp ready; the files (or the
//! Kubernetes objects) in force, no policy rejected; every node with workloads connected,
//! holding the version in force, none rejecting it nor leaving a version unanswered;
//! certificates renewed and not too short-lived; the CA root far from expiry.

use std::time::{Duration, SystemTime};

use mesh_telemetry::client;

use super::{when, Finding};
use crate::{
    status::{self, Node, Status},
    table,
};

/// A certificate lifetime up to this fails the check: an outage of the control plane longer
/// than half of it (when the node renews) stops the node's tunnels.
pub const SHORT_TTL: Duration = Duration::from_secs(3600);

/// A version sent and not answered for longer than this fails the check: a node applies and
/// answers within a second or two.
pub const UNANSWERED: Duration = Duration::from_secs(30);

/// A CA root that expires sooner than this is a warning: rotating it takes planning.
pub const ROOT_MARGIN: Duration = Duration::from_secs(30 * 86_400);

pub fn check(cp: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    // Each replica's readiness; the nodes are checked across those that answer.
    let mut answered = false;
    for addr in status::addresses(cp) {
        match client::get(addr, "/readyz") {
            Ok((200, _)) => {
                answered = true;
                out.push(Finding::ok("mesh-cp", format!("ready at {addr}")));
            }
            Ok((code, body)) => {
                answered = true;
                out.push(Finding::fail(
                    "mesh-cp",
                    format!("{addr} is not ready ({code}): {}", body.trim()),
                    "read mesh-cp's log: until it serves its gRPC API no node gets config or certificates (with etcd: until etcd answers, it serves the last config it read)",
                ));
            }
            Err(e) => out.push(Finding::fail(
                "mesh-cp",
                e.to_string(),
                "start mesh-cp, or point --cp (or MYCEL_CP) at its --http-listen address; it listens on loopback by default, so run mycel on its host (in Kubernetes: kubectl -n mycel-system port-forward deploy/mycel-cp 15014)",
            )),
        }
    }
    if !answered {
        return out;
    }
    match status::fetch(cp) {
        Ok(s) => out.extend(findings(&s, SystemTime::now())),
        Err(e) => out.push(Finding::fail(
            "mesh-cp",
            e.to_string(),
            "mycel and mesh-cp must be of one release",
        )),
    }
    out
}

/// What mesh-cp's `/status` says is wrong, at `now`.
pub fn findings(s: &Status, now: SystemTime) -> Vec<Finding> {
    let mut out = vec![config(s)];
    if s.nodes.is_empty() {
        out.push(Finding::warn(
            "nodes",
            "no node has connected and no workload is placed on one",
            "start mesh-node on each host with --cp, --token-file (mesh-cp token create) and --cp-ca (mesh-cp's ca.crt)",
        ));
    }
    for (name, n) in &s.nodes {
        out.push(connection(name, n, s.config.version, now));
        out.extend(certificates(name, n, s, now));
    }
    out.push(root(s, now));
    out
}

fn config(s: &Status) -> Finding {
    let c = &s.config;
    let Some(e) = &c.error else {
        return Finding::ok(
            "config",
            format!(
                "version {} in force: {} workloads, {} services, {} policies",
                c.version, s.workloads, s.services, s.policies
            ),
        );
    };
    if s.config_source == "kubernetes" {
        return Finding::fail(
            "config",
            format!("version {} in force, without what mesh-cp left out: {e}", c.version),
            "fix the objects named (their status says why too: kubectl get accesspolicies -A); everything else applies meanwhile",
        );
    }
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

fn parse(t: &Option<String>) -> Option<SystemTime> {
    t.as_deref().and_then(table::parse_time)
}

fn older_than(t: &Option<String>, d: Duration, now: SystemTime) -> bool {
    parse(t).is_some_and(|t| now.duration_since(t).is_ok_and(|age| age > d))
}

fn connection(name: &str, n: &Node, current: u64, now: SystemTime) -> Finding {
    let check = format!("node {name}");
    if n.streams == 0 {
        if n.workloads == 0 {
            return Finding::ok(
                check,
                "not connected, and no workload is placed on it (it left the mesh)",
            );
        }
        let what = match &n.disconnected_at {
            None => format!(
                "has never connected, and {} workloads are placed on it",
                n.workloads
            ),
            Some(t) => format!("is not connected since {t}"),
        };
        return Finding::fail(
            check,
            what,
            "start mesh-node there (or read why it stopped: its log, `journalctl -u mesh-node`); meanwhile its pods keep the config they had, get no changes, and their certificates are not renewed",
        );
    }
    if let Some((v, why)) = &n.last_nack {
        if n.synced_version.is_none_or(|s| s < *v) {
            return Finding::fail(
                check,
                format!("rejected config version {v}: {why}"),
                "read the node's log for the rejection; the node keeps the last version it applied",
            );
        }
    }
    if older_than(&n.unanswered_since, UNANSWERED, now) {
        return Finding::fail(
            check,
            format!(
                "a version sent at {} is not acknowledged (it holds {})",
                n.unanswered_since.as_deref().unwrap_or_default(),
                n.synced_version
                    .map_or("nothing yet".to_owned(), |v| format!("version {v}"))
            ),
            "the node is stuck applying it: read its log, and its /readyz on the admin port",
        );
    }
    if n.synced_version == Some(current) {
        return Finding::ok(
            check,
            format!(
                "connected, holds the version in force; workloads placed: {}",
                n.workloads
            ),
        );
    }
    Finding::warn(
        check,
        format!(
            "connected, catching up: holds {}, the version in force is {current}",
            n.synced_version
                .map_or("nothing yet".to_owned(), |v| format!("version {v}"))
        ),
        "run the check again in a few seconds; a version is answered within a second or two",
    )
}

fn certificates(name: &str, n: &Node, s: &Status, now: SystemTime) -> Option<Finding> {
    let check = format!("certificates on {name}");
    let ttl = Duration::from_secs(s.cert_ttl_seconds);
    let ttl_text = table::duration(ttl);
    // Renewal is due at half a certificate's life; some slack for the renewal itself.
    let slack = (ttl / 20).max(Duration::from_secs(120));
    let due = (ttl / 2).saturating_sub(slack);
    let known_since = parse(&Some(s.started_at.clone()));
    let all_known =
        known_since.is_some_and(|t| now.duration_since(t).is_ok_and(|up| up > ttl / 2 + slack));
    let Some(expires) = n.certificates_expire.as_deref() else {
        // Certificates issued before mesh-cp started are not known to it; renewals bring them.
        return (n.streams > 0 && n.workloads > 0 && all_known).then(|| {
            Finding::fail(
                check,
                format!("none issued to its {} workloads since mesh-cp started", n.workloads),
                "read the node's log (`certificate` lines) and mesh-cp's (`certificate refused`); mycel_cp_certificates_refused_total says why mesh-cp refused",
            )
        });
    };
    let Some(at) = table::parse_time(expires) else {
        return Some(Finding::fail(
            check,
            format!("expiry {expires:?} unreadable"),
            "mycel and mesh-cp must be of one release",
        ));
    };
    let Ok(left) = at.duration_since(now) else {
        return Some(Finding::fail(
            check,
            format!("a certificate expired at {}", when(at)),
            "the node does not renew: read its log (`certificate` lines) and mesh-cp's (`certificate refused`)",
        ));
    };
    if ttl <= SHORT_TTL {
        return Some(Finding::fail(
            check,
            format!(
                "the first of {} expires {}: MeshConfig certTtl is {ttl_text}, within {}",
                n.certificates,
                when(at),
                table::duration(SHORT_TTL)
            ),
            "with certificates this short, a control-plane outage longer than half their life stops the node's tunnels: raise MeshConfig certTtl (24h by default)",
        ));
    }
    if left < due {
        return Some(Finding::fail(
            check,
            format!(
                "the first of {} expires {}, past its renewal (due at half of certTtl {ttl_text})",
                n.certificates,
                when(at)
            ),
            "the node is not renewing: read its log (`certificate` lines) and mesh-cp's (`certificate refused`)",
        ));
    }
    if n.streams > 0 && n.certificates < n.workloads && all_known {
        return Some(Finding::warn(
            check,
            format!(
                "{} of {} workloads hold one; the first expires {}",
                n.certificates,
                n.workloads,
                when(at)
            ),
            "a workload without a certificate cannot take part in the mesh: read the node's log for its enrolment",
        ));
    }
    Some(Finding::ok(
        check,
        format!(
            "{} of {} workloads hold one issued since mesh-cp started; the first expires {}",
            n.certificates,
            n.workloads,
            when(at)
        ),
    ))
}

fn root(s: &Status, now: SystemTime) -> Finding {
    let Some(at) = parse(&s.ca_expires) else {
        return Finding::warn(
            "CA root",
            "mesh-cp did not say when its root expires",
            "mycel and mesh-cp must be of one release",
        );
    };
    let left = at.duration_since(now).unwrap_or_default();
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
