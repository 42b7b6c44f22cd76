//! The `/debug/*` endpoints: what this node holds, as JSON, for an operator asking "what does
//! this node think the mesh is?" and "which certificate is it presenting?".

use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use super::{Parts, Status};
use crate::access_log::rfc3339;

/// `/debug/config`: the control plane's config as this node holds it, and where it stands.
pub fn config(parts: &Parts, status: &Status) -> String {
    let view = parts.view.borrow().clone();
    let ip = |b: &[u8]| mesh_api::ip_from_bytes(b).map(|ip: IpAddr| ip.to_string());
    let workloads: Vec<Value> = view
        .workloads
        .iter()
        .map(|(key, w)| {
            json!({
                "key": key,
                "node": w.node,
                // Enrolled here: in Kubernetes the control plane sends no netns, the node
                // finds it.
                "on_this_node": parts.proxy.local.get(key).is_some(),
                "netns": w.netns,
                "identity": w.identity,
                "addresses": w.addresses.iter().filter_map(|a| ip(a)).collect::<Vec<_>>(),
                "labels": w.labels,
            })
        })
        .collect();
    let services: Vec<Value> = view
        .services
        .iter()
        .map(|(key, s)| {
            json!({
                "key": key,
                "vips": s.vips.iter().filter_map(|a| ip(a)).collect::<Vec<_>>(),
                "ports": s.ports.iter().map(|p| json!({"port": p.port, "target_port": p.target_port, "app_protocol": p.protocol().map(|a| a.to_string())})).collect::<Vec<_>>(),
                "endpoints": s.endpoints,
            })
        })
        .collect();
    let policies: Vec<Value> = view
        .policies
        .iter()
        .map(|(key, (policy, selected))| {
            json!({ "key": key, "policy": policy, "selects": selected })
        })
        .collect();
    let fast_deny: serde_json::Map<String, Value> = view
        .fast_deny
        .iter()
        .map(|(workload, entries)| {
            let entries: Vec<String> = entries
                .iter()
                .map(|(ip, port)| match port {
                    0 => format!("{ip}:*"),
                    p => format!("{ip}:{p}"),
                })
                .collect();
            (workload.to_string(), json!(entries))
        })
        .collect();
    let body = json!({
        "mode": if status.connected_mode { "control-plane" } else { "offline" },
        "version": view.version,
        "applied": status.config_applied,
        "errors": status.config_errors,
        "control_plane_connected": status.cp_connected,
        "updated_at": status.config_updated_at.map(rfc3339),
        "enrolled_workloads": status.enrolled,
        "mesh": {
            "trust_domain": view.mesh.trust_domain,
            "cert_ttl_seconds": view.mesh.cert_ttl_seconds,
            "default_action": view.mesh_policy.default_action.to_string(),
            "mtls": format!("{:?}", view.mesh_policy.mtls),
            "plaintext_ports": view.mesh_policy.plaintext_ports,
            "transport": format!("{:?}", view.mesh_policy.transport).to_lowercase(),
        },
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "fast_deny": fast_deny,
    });
    pretty(&body)
}

/// `/debug/certs`: each workload certificate held, with its chain, and the trust roots.
pub fn certs(parts: &Parts) -> String {
    let svids: Vec<Value> = parts
        .svids
        .all()
        .iter()
        .map(|svid| {
            let chain: Vec<Value> = svid.certified.cert.iter().map(|c| describe(c)).collect();
            json!({
                "identity": svid.identity,
                "serial": svid.serial,
                "not_after": rfc3339(svid.not_after),
                "not_after_unix": unix(svid.not_after),
                "renew_at": rfc3339(svid.renew_at),
                "chain": chain,
            })
        })
        .collect();
    let view = parts.view.borrow().clone();
    let roots: Vec<Value> = view.trust_roots.iter().map(|der| describe(der)).collect();
    pretty(&json!({ "certificates": svids, "trust_roots": roots }))
}

/// `/debug/connections`: the connections open to this node's pods, as admitted by policy.
pub fn connections(parts: &Parts) -> String {
    let open: Vec<Value> = parts
        .proxy
        .authz
        .open_connections()
        .into_iter()
        .map(|r| {
            json!({
                "id": r.connection_id,
                "destination": r.destination.to_string(),
                "destination_address": r.destination_addr.to_string(),
                "source_address": r.source_addr.to_string(),
                "source_identity": r.source_identity.map(|id| id.to_string()),
            })
        })
        .collect();
    pretty(&json!({ "inbound": open }))
}

/// Subject, issuer, serial and validity of one DER certificate.
fn describe(der: &[u8]) -> Value {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => {
            let validity = cert.validity();
            json!({
                "subject": cert.subject().to_string(),
                "issuer": cert.issuer().to_string(),
                "serial": cert.raw_serial_as_string(),
                "not_before": validity.not_before.to_rfc2822().unwrap_or_default(),
                "not_after": validity.not_after.to_rfc2822().unwrap_or_default(),
                "not_after_unix": validity.not_after.timestamp(),
            })
        }
        Err(e) => json!({ "error": format!("cannot parse: {e}") }),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("\"{e}\""));
    s.push('\n');
    s
}
