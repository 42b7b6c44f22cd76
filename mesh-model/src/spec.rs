//! The `spec` of `AccessPolicy` and `MeshConfig` exactly as operators write it: one set of types
//! is both the universal-mode YAML and, with the `crd` feature, the Kubernetes CRD schema
//! (kube-derive and schemars derive it here; `crd.rs` holds the rest, and `deploy/crds/` the
//! generated files). Values here are unvalidated; `policy.rs` and `resource.rs` turn them into
//! the validated model.

use std::{collections::BTreeMap, fmt};

#[cfg(feature = "crd")]
use kube::CustomResource;
#[cfg(feature = "crd")]
use schemars::JsonSchema;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Allow or deny connections to the selected workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    /// The variant's name, as written in YAML.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `Enforce` decides connections; `DryRun` is evaluated, logged and counted, never enforced.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize,
)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
pub enum Mode {
    #[default]
    Enforce,
    DryRun,
}

impl fmt::Display for Mode {
    /// The variant's name, as written in YAML.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// L4 authorization for the workloads it selects. Rules are ORed; the clauses of a rule are
/// ANDed; each list clause matches when any of its entries does, and its `not…` form when none
/// does.
// Clippy reads the repeated `printcolumn(type_ = …)` arguments of kube's attribute as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[cfg_attr(
    feature = "crd",
    derive(CustomResource, JsonSchema),
    kube(
        group = "mycel.dev",
        version = "v1alpha1",
        kind = "AccessPolicy",
        namespaced,
        shortname = "ap",
        doc = "L4 allow/deny rules for the workloads a selector picks",
        status = "AccessPolicyStatus",
        printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
        printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
        printcolumn(
            name = "Accepted",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
        ),
        printcolumn(
            name = "Selected",
            type_ = "integer",
            json_path = ".status.selectedWorkloads"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessPolicySpec {
    /// Destination workloads. Absent or empty: every workload of the policy's namespace (of the
    /// whole mesh when that is the mesh's root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    pub action: Action,
    #[serde(default)]
    pub mode: Mode,
    /// At least one; a connection matches the policy when it matches any rule.
    pub rules: Vec<RuleSpec>,
}

/// What the control plane made of an AccessPolicy (Kubernetes only; written by mesh-cp).
#[cfg(feature = "crd")]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicyStatus {
    /// The `metadata.generation` the status is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Workloads the policy selects while it is in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_workloads: Option<u64>,
    /// `Accepted`: `True` when in force, `False` with reason `Invalid` and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One rule: every clause present must match. A rule needs at least one clause.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// SPIFFE IDs of the client, exact or ending in `*` for a prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_source_identities: Option<Vec<String>>,
    /// Namespaces of the client's (verified) identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_source_namespaces: Option<Vec<String>>,
    /// Labels the client workload must all carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_source_labels: Option<BTreeMap<String, String>>,
    /// The client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_cidrs: Option<Vec<CidrSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_source_cidrs: Option<Vec<CidrSpec>>,
    /// Destination ports (on the workload, after any service port mapping): `8080` or
    /// `"9000-9100"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ports: Option<Vec<PortSpec>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrSpec {
    /// `10.0.0.0/8`, `fd00::/64`, or a single address.
    pub cidr: String,
    /// Blocks inside `cidr` that do not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// A port (`8080`) or an inclusive range (`"9000-9100"`), as written; validated later so that
/// the error can name the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    Number(u64),
    Text(String),
}

impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortSpec::Number(n) => s.serialize_u64(*n),
            PortSpec::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number or a \"first-last\" range")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortSpec, E> {
                u64::try_from(n)
                    .map(PortSpec::Number)
                    .map_err(|_| E::custom(format!("{n} is not a port")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortSpec, E> {
                Ok(PortSpec::Text(s.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Mesh-wide settings; at most one per mesh (cluster-scoped in Kubernetes).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(
    feature = "crd",
    derive(CustomResource, JsonSchema),
    kube(
        group = "mycel.dev",
        version = "v1alpha1",
        kind = "MeshConfig",
        root = "MeshConfigResource",
        doc = "Mesh-wide settings of Mycel: trust domain, certificate lifetime, default policy action"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigSpec {
    /// SPIFFE trust domain of workload identities [default: cluster.local].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// Lifetime of workload certificates, e.g. `24h`; nodes renew at half of it [default: 24h].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_ttl: Option<String>,
    /// What happens to a connection no enforced policy decides [default: Allow].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<Action>,
    /// Namespace whose AccessPolicies apply to the whole mesh [default: mycel-system].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_namespace: Option<String>,
    /// Plaintext (non-mesh) TCP to mesh workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSpec>,
    /// How node proxies carry connections between nodes: `tls` (TLS 1.3 over one TCP
    /// connection per application connection) or `quic` (one QUIC connection per pair of
    /// pods, one stream per application connection) [default: tls].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// How bytes cross the hop between an application and the node proxy inside its pod:
    /// `tcp` (loopback TCP) or `sockmap` (experimental: from socket to socket in the kernel;
    /// the kernel applies no backpressure there, so a fast sender can exhaust the node's TCP
    /// memory and then gets ENOMEM, and a blocking read that waits when its peer resets gets
    /// EAGAIN). A change applies to new connections [default: tcp].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_hop: Option<LocalHop>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSpec {
    /// `Strict`: plaintext connections to a mesh workload are dropped before they reach it.
    /// `Permissive`: they are accepted by the node proxy and subject to AccessPolicy, which
    /// knows only their source address [default: Permissive].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
    /// Workload ports that take plaintext untouched in either mode, e.g. for health checks
    /// from the node. The tunnel port (15008) is always open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext_ports: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
pub enum MtlsMode {
    Strict,
    #[default]
    Permissive,
}

impl fmt::Display for MtlsMode {
    /// The variant's name, as written in YAML.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The protocol of node-to-node tunnels. Every node accepts both; this picks what sources use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Tls,
    Quic,
}

impl fmt::Display for Transport {
    /// As written in YAML.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tls => "tls",
            Transport::Quic => "quic",
        })
    }
}

/// How bytes cross the pod-local hop (application ↔ node proxy, inside the pod's netns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum LocalHop {
    #[default]
    Tcp,
    Sockmap,
}

impl fmt::Display for LocalHop {
    /// As written in YAML.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LocalHop::Sockmap => "sockmap",
            LocalHop::Tcp => "tcp",
        })
    }
}

/// How the node proxy of a source connects to the Services it selects: timeouts, connect
/// attempts, endpoint choice, limits, outlier ejection, and a rate limit at the destination.
/// Each section left out keeps its default, or the value of a less specific policy that sets
/// it (see `traffic.rs`).
#[allow(clippy::duplicated_attributes)]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(
    feature = "crd",
    derive(CustomResource, JsonSchema),
    kube(
        group = "mycel.dev",
        version = "v1alpha1",
        kind = "TrafficPolicy",
        namespaced,
        shortname = "tp",
        doc = "Timeouts, connect retries, load balancing, limits and outlier ejection for connections to Services",
        status = "TrafficStatus",
        printcolumn(
            name = "Accepted",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
        ),
        printcolumn(name = "Services", type_ = "string", json_path = ".status.services"),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// Names of Services of the policy's namespace. Absent: every Service of the namespace
    /// (of the whole mesh when that is the mesh's root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<String>>,
    /// Service ports (the port clients connect to, not the target port). Absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
    /// Sources it applies to, written as AccessPolicy rules without ports: it applies when any
    /// entry matches the client. Absent: every source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<RuleSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectSpec>,
    /// Close a connection after this long with no byte either way, e.g. `1h` [default: never].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Close a connection this long after it was established [default: never].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<String>,
    /// How an endpoint is picked for a new connection [default: RoundRobin].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimitsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// New connections each endpoint of the selected Services accepts per interval, counted by
    /// the endpoint's node; the ones over it are refused [default: no limit].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Per-request settings, for Service ports that declare HTTP (`appProtocol`); other
    /// ports ignore them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectSpec {
    /// Time one attempt may take until the destination accepted the connection: TCP connect,
    /// tunnel handshake and the destination's answer [default: 10s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Attempts per connection, each on another endpoint when there is one [default: 3].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Wait before the second attempt, doubled for each one after [default: 0s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
pub enum LoadBalancer {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// Of two endpoints picked at random, the one with fewer open connections from this node;
    /// on a tie, the one that answered connects faster lately.
    LeastConnections,
}

impl fmt::Display for LoadBalancer {
    /// The variant's name, as written in YAML.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Limits per node proxy: each source node counts its own connections to the Service.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionLimitsSpec {
    /// Open connections to the Service from one node [default: no limit].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Connects in progress to the Service from one node [default: no limit].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_connects: Option<u32>,
}

/// Endpoints that keep failing connects are left out for a while.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    /// Connect failures in a row that eject an endpoint; 0 turns ejection off [default: 5].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// A streak of failures is forgotten after this long without one, and an endpoint's
    /// ejection count goes down by one for each such interval [default: 10s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// How long the first ejection lasts; each ejection in a row adds as much [default: 30s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// The longest an ejection lasts [default: 300s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<String>,
    /// Most endpoints of the Service out at once, rounded up to at least one when there are
    /// two or more; the last endpoint is never ejected [default: 50].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// When fewer than this percent of the endpoints are left, ejections are ignored and
    /// every endpoint takes connections again; 0 turns it off [default: 0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold_percent: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// New connections per interval and endpoint, also the burst.
    pub connections: u32,
    /// e.g. `1s`.
    pub interval: String,
}

/// Per-request settings for Service ports that declare HTTP (`appProtocol: http`, `h2c` or
/// `grpc`); other ports ignore them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSpec {
    /// Time from a request's arrival to its response's headers, retries included; when it
    /// passes, the mesh answers 504 [default: never].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetriesSpec>,
    /// Response status codes that count as an endpoint failure for outlierDetection, e.g.
    /// `[502, 503, 504]` [default: none].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_status_codes: Option<Vec<u16>>,
}

/// Which failed requests are tried again, on another endpoint when there is one.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetriesSpec {
    /// Tries after the first; 0 turns retries off [default: 2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Time one try may take until its response's headers [default: only the request
    /// timeout].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Failures retried: `connect-failure` (no connection to the endpoint, so the request
    /// never reached it), `reset` (the endpoint's connection ended before the response's
    /// headers: the request may have been processed), `unavailable` (gRPC status 14)
    /// [default: [connect-failure]].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<RetryOn>>,
    /// Response status codes retried, e.g. `[503]` [default: none].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on_status: Option<Vec<u16>>,
    /// A request is retried only if its body is at most this many bytes, kept until its
    /// response comes [default: 65536].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u32>,
    /// Retries per source node may add at most this percent to the requests of the last
    /// 10 s, so that retries cannot multiply an outage [default: 20].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_percent: Option<u32>,
    /// Retries per second allowed whatever the percent, so that a Service with little
    /// traffic can retry at all [default: 10].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
}

/// A failure that [`RetriesSpec::retry_on`] may retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    ConnectFailure,
    Reset,
    Unavailable,
}

impl fmt::Display for RetryOn {
    /// As written in YAML.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::Reset => "reset",
            RetryOn::Unavailable => "unavailable",
        })
    }
}

/// What a Service port speaks, as its `appProtocol` declares; a port without one is relayed
/// as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum AppProtocol {
    /// HTTP/1.1, or HTTP/2 with prior knowledge (a client that starts with its preface).
    Http,
    /// HTTP/2 without TLS, with prior knowledge.
    H2c,
    /// gRPC: HTTP/2 with prior knowledge; a `grpc-status` of 14 is `unavailable`.
    Grpc,
}

impl AppProtocol {
    /// From an `appProtocol` value; `None` for one the mesh relays as bytes.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "http" => Some(Self::Http),
            "h2c" | "kubernetes.io/h2c" => Some(Self::H2c),
            "grpc" => Some(Self::Grpc),
            _ => None,
        }
    }
}

impl fmt::Display for AppProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AppProtocol::Http => "http",
            AppProtocol::H2c => "h2c",
            AppProtocol::Grpc => "grpc",
        })
    }
}

/// A Service port's new connections split over backend Services by weight: a canary.
#[allow(clippy::duplicated_attributes)]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(
    feature = "crd",
    derive(CustomResource, JsonSchema),
    kube(
        group = "mycel.dev",
        version = "v1alpha1",
        kind = "ServiceRoute",
        namespaced,
        shortname = "sr",
        doc = "Splits the new connections to a Service port over backend Services by weight",
        status = "TrafficStatus",
        printcolumn(name = "Service", type_ = "string", json_path = ".spec.service"),
        printcolumn(
            name = "Accepted",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRouteSpec {
    /// The Service (of the route's namespace) whose clients are routed.
    pub service: String,
    /// The Service port routed. Absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Services of the route's namespace that take the connections, with their weights.
    pub backends: Vec<BackendSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd", derive(JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSpec {
    pub service: String,
    /// The backend Service's port [default: the routed port's number].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Relative share of new connections; 0 sends none.
    pub weight: u32,
}

/// What the control plane made of a TrafficPolicy or ServiceRoute (Kubernetes only).
#[cfg(feature = "crd")]
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Services it binds, `namespace/name`, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<String>,
    /// `Accepted`: `True` when in force, `False` with reason `Invalid` and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}
