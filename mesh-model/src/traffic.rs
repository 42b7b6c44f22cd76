//! Validated `TrafficPolicy` and `ServiceRoute`, and what applies to one connection.
//!
//! A source's node proxy asks, for a new connection to a Service port: which route splits it
//! ([`route_for`]), and then, for the backend Service picked, which settings apply
//! ([`candidates`], [`resolve`]). Several policies may apply; each section (`connect`,
//! `idleTimeout`, …) is taken whole from the most specific policy that sets it, and fields the
//! section leaves out take their defaults. Most specific first:
//!
//! 1. a policy of the Service's own namespace before one of the mesh's root namespace;
//! 2. one that names Services before one that takes every Service of its namespace;
//! 3. one narrowed to ports before one that is not;
//! 4. one narrowed to sources before one that is not;
//! 5. then by `namespace/name`.
//!
//! mesh-cp's explain and the node proxy both answer with these functions, so what explain
//! shows is what the node does.

use std::{collections::BTreeSet, fmt, time::Duration};

use serde::Serialize;

use crate::{
    authz::{self, Source},
    duration,
    object_key::ObjectKey,
    policy::{self, PortRange, Rule},
    spec::{
        ConnectSpec, ConnectionLimitsSpec, HttpSpec, LoadBalancer, OutlierDetectionSpec,
        RateLimitSpec, RetriesSpec, RetryOn, ServiceRouteSpec, TrafficPolicySpec,
    },
    validate::check_label,
};

/// A validated TrafficPolicy. A section that is `None` is left to less specific policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrafficPolicy {
    pub key: ObjectKey,
    /// Service names of the policy's namespace; empty: every Service of the namespace (of the
    /// mesh, for the root namespace).
    pub services: Vec<String>,
    /// Service ports; empty: every port.
    pub ports: Vec<PortRange>,
    /// Source rules, any of which must match; empty: every source.
    pub sources: Vec<Rule>,
    pub connect: Option<Connect>,
    /// Zero: never.
    pub idle_timeout: Option<Duration>,
    /// Zero: never.
    pub max_connection_duration: Option<Duration>,
    pub load_balancer: Option<LoadBalancer>,
    pub connection_limits: Option<ConnectionLimits>,
    pub outlier_detection: Option<OutlierDetection>,
    pub rate_limit: Option<RateLimit>,
    /// Boxed: most policies have none, and it is the largest section.
    pub http: Option<Box<Http>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Connect {
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff: Duration,
}

impl Default for Connect {
    /// What the proxy did before connect settings existed: 10 s, three endpoints, no wait.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_attempts: 3,
            backoff: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionLimits {
    /// `None`: no limit.
    pub max_connections: Option<u32>,
    pub max_pending_connects: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// 0: never eject.
    pub consecutive_failures: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// 0: off.
    pub panic_threshold_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            panic_threshold_percent: 0,
        }
    }
}

impl OutlierDetection {
    /// How many of `endpoints` may be ejected at once: the percentage rounded up, at least one
    /// when there are two or more, never all of them.
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        if endpoints < 2 || self.consecutive_failures == 0 || self.max_ejection_percent == 0 {
            return 0;
        }
        let pct = self.max_ejection_percent as usize;
        (endpoints * pct).div_ceil(100).clamp(1, endpoints - 1)
    }

    /// Whether ejections are ignored because too few endpoints are left: fewer than the panic
    /// threshold's percent of them.
    pub fn panics(&self, left: usize, endpoints: usize) -> bool {
        self.panic_threshold_percent > 0
            && left * 100 < endpoints * self.panic_threshold_percent as usize
    }

    /// How long the `times`-th ejection in a row lasts (`times` from 1).
    pub fn ejection_time(&self, times: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(times.max(1))
            .min(self.max_ejection_time)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    pub connections: u32,
    pub interval: Duration,
}

/// Per-request settings of a Service port that declares HTTP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Http {
    /// To the response's headers, retries included. Zero: never.
    pub request_timeout: Duration,
    pub retries: Retries,
    /// Response status codes that count as an endpoint failure for outlier detection.
    pub outlier_status_codes: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retries {
    /// Tries after the first.
    pub attempts: u32,
    /// Zero: only the request timeout bounds a try.
    pub per_try_timeout: Duration,
    /// Sorted, each once.
    pub retry_on: Vec<RetryOn>,
    /// Sorted, each once.
    pub retry_on_status: Vec<u16>,
    pub max_body_bytes: u32,
    pub budget_percent: u32,
    pub min_retries_per_second: u32,
}

impl Default for Retries {
    /// Only what is always safe to try again: a request that never reached an endpoint. Two
    /// retries make three tries, as the connect attempts of a port relayed as bytes.
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: Duration::ZERO,
            retry_on: vec![RetryOn::ConnectFailure],
            retry_on_status: Vec::new(),
            max_body_bytes: 64 * 1024,
            budget_percent: 20,
            min_retries_per_second: 10,
        }
    }
}

impl TrafficPolicy {
    /// Whether it selects `service`: one of its namespace it names (or every one, when it
    /// names none), or any Service when it is a mesh-wide policy of the root namespace that
    /// names none.
    pub fn binds(&self, root_namespace: &str, service: &ObjectKey) -> bool {
        if self.services.is_empty() {
            self.key.namespace == service.namespace || self.key.namespace == root_namespace
        } else {
            self.key.namespace == service.namespace && self.services.contains(&service.name)
        }
    }

    /// Whether it concerns `port` of `service` (its sources aside).
    pub fn applies_to(&self, root_namespace: &str, service: &ObjectKey, port: u16) -> bool {
        self.binds(root_namespace, service)
            && (self.ports.is_empty() || self.ports.iter().any(|r| r.contains(port)))
    }

    /// Whether its sources take `src`.
    pub fn takes_source(&self, src: &Source<'_>) -> bool {
        self.sources.is_empty() || self.sources.iter().any(|r| authz::rule_matches(r, 0, src))
    }

    /// Orders policies that apply to one Service, most specific first (module docs).
    fn specificity(&self, service: &ObjectKey) -> impl Ord {
        (
            std::cmp::Reverse((
                self.key.namespace == service.namespace,
                !self.services.is_empty(),
                !self.ports.is_empty(),
                !self.sources.is_empty(),
            )),
            self.key.clone(),
        )
    }
}

/// The policies of `all` that apply to `port` of `service`, most specific first; their
/// sources are left to [`resolve`].
pub fn candidates<'a>(
    all: impl IntoIterator<Item = &'a TrafficPolicy>,
    root_namespace: &str,
    service: &ObjectKey,
    port: u16,
) -> Vec<&'a TrafficPolicy> {
    let mut out: Vec<&TrafficPolicy> = all
        .into_iter()
        .filter(|p| p.applies_to(root_namespace, service, port))
        .collect();
    out.sort_by_cached_key(|p| p.specificity(service));
    out
}

/// A value and the policy it came from; `None`: the default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Setting<T> {
    pub value: T,
    pub from: Option<ObjectKey>,
}

impl<T: fmt::Debug> fmt::Display for Setting<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.from {
            Some(key) => write!(f, "{:?} (from {key})", self.value),
            None => write!(f, "{:?} (default)", self.value),
        }
    }
}

/// Every setting that applies to one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Effective {
    pub connect: Setting<Connect>,
    /// Zero: never.
    pub idle_timeout: Setting<Duration>,
    /// Zero: never.
    pub max_connection_duration: Setting<Duration>,
    pub load_balancer: Setting<LoadBalancer>,
    pub connection_limits: Setting<ConnectionLimits>,
    pub outlier_detection: Setting<OutlierDetection>,
    pub rate_limit: Setting<Option<RateLimit>>,
    /// Only for Service ports that declare HTTP.
    pub http: Setting<Http>,
}

impl Effective {
    /// Each section as operators write it, its value in words, and the policy it came from
    /// (`None`: the default), for explain and the docs.
    pub fn sections(&self) -> Vec<(&'static str, String, Option<&ObjectKey>)> {
        let never = |d: Duration| {
            if d.is_zero() {
                "never".to_owned()
            } else {
                duration::format(d)
            }
        };
        let limit = |n: Option<u32>| n.map_or("no limit".to_owned(), |n| n.to_string());
        let c = &self.connect.value;
        let l = &self.connection_limits.value;
        let o = &self.outlier_detection.value;
        vec![
            (
                "connect",
                format!(
                    "timeout {}, maxAttempts {}, backoff {}",
                    duration::format(c.timeout),
                    c.max_attempts,
                    duration::format(c.backoff)
                ),
                self.connect.from.as_ref(),
            ),
            (
                "idleTimeout",
                never(self.idle_timeout.value),
                self.idle_timeout.from.as_ref(),
            ),
            (
                "maxConnectionDuration",
                never(self.max_connection_duration.value),
                self.max_connection_duration.from.as_ref(),
            ),
            (
                "loadBalancer",
                self.load_balancer.value.to_string(),
                self.load_balancer.from.as_ref(),
            ),
            (
                "connectionLimits",
                format!(
                    "maxConnections {}, maxPendingConnects {} (per source node)",
                    limit(l.max_connections),
                    limit(l.max_pending_connects)
                ),
                self.connection_limits.from.as_ref(),
            ),
            (
                "outlierDetection",
                format!(
                    "consecutiveFailures {}, interval {}, baseEjectionTime {}, maxEjectionTime {}, maxEjectionPercent {}, panicThresholdPercent {}",
                    o.consecutive_failures,
                    duration::format(o.interval),
                    duration::format(o.base_ejection_time),
                    duration::format(o.max_ejection_time),
                    o.max_ejection_percent,
                    o.panic_threshold_percent
                ),
                self.outlier_detection.from.as_ref(),
            ),
            (
                "rateLimit",
                self.rate_limit.value.map_or("no limit".to_owned(), |r| {
                    format!(
                        "{} connections per {} per endpoint",
                        r.connections,
                        duration::format(r.interval)
                    )
                }),
                self.rate_limit.from.as_ref(),
            ),
            ("http", self.http.value.to_string(), self.http.from.as_ref()),
        ]
    }
}

impl fmt::Display for Http {
    /// In the words of the YAML, for explain.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |items: Vec<String>| {
            if items.is_empty() {
                "none".to_owned()
            } else {
                items.join(" ")
            }
        };
        let r = &self.retries;
        let timeout = |d: Duration, none: &str| {
            if d.is_zero() {
                none.to_owned()
            } else {
                duration::format(d)
            }
        };
        write!(
            f,
            "requestTimeout {}, retries: attempts {}, perTryTimeout {}, retryOn {}, retryOnStatus {}, maxBodyBytes {}, budget {} % or {}/s; outlierStatusCodes {} (HTTP ports only)",
            timeout(self.request_timeout, "never"),
            r.attempts,
            timeout(r.per_try_timeout, "none"),
            list(r.retry_on.iter().map(ToString::to_string).collect()),
            list(r.retry_on_status.iter().map(ToString::to_string).collect()),
            r.max_body_bytes,
            r.budget_percent,
            r.min_retries_per_second,
            list(self.outlier_status_codes.iter().map(ToString::to_string).collect()),
        )
    }
}

/// The settings for a connection from `src`, given the [`candidates`] of its Service port in
/// order.
pub fn resolve<'a>(
    candidates: impl IntoIterator<Item = &'a TrafficPolicy>,
    src: &Source<'_>,
) -> Effective {
    let taken: Vec<&TrafficPolicy> = candidates
        .into_iter()
        .filter(|p| p.takes_source(src))
        .collect();
    fn pick<T>(
        taken: &[&TrafficPolicy],
        field: impl Fn(&TrafficPolicy) -> Option<T>,
        default: T,
    ) -> Setting<T> {
        taken
            .iter()
            .find_map(|p| {
                field(p).map(|value| Setting {
                    value,
                    from: Some(p.key.clone()),
                })
            })
            .unwrap_or(Setting {
                value: default,
                from: None,
            })
    }
    Effective {
        connect: pick(&taken, |p| p.connect, Connect::default()),
        idle_timeout: pick(&taken, |p| p.idle_timeout, Duration::ZERO),
        max_connection_duration: pick(&taken, |p| p.max_connection_duration, Duration::ZERO),
        load_balancer: pick(&taken, |p| p.load_balancer, LoadBalancer::default()),
        connection_limits: pick(&taken, |p| p.connection_limits, ConnectionLimits::default()),
        outlier_detection: pick(&taken, |p| p.outlier_detection, OutlierDetection::default()),
        rate_limit: pick(&taken, |p| p.rate_limit.map(Some), None),
        http: pick(&taken, |p| p.http.as_deref().cloned(), Http::default()),
    }
}

/// A validated ServiceRoute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceRoute {
    pub key: ObjectKey,
    /// A Service of the route's namespace.
    pub service: String,
    /// `None`: every port.
    pub port: Option<u16>,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    /// A Service of the route's namespace.
    pub service: String,
    /// `None`: the routed port's number.
    pub port: Option<u16>,
    pub weight: u32,
}

impl Backend {
    /// The backend Service's port for a connection to `routed_port`.
    pub fn port_for(&self, routed_port: u16) -> u16 {
        self.port.unwrap_or(routed_port)
    }
}

impl ServiceRoute {
    /// The Service it routes.
    pub fn routed(&self) -> ObjectKey {
        ObjectKey::new(&self.key.namespace, &self.service)
    }

    pub fn backend_key(&self, backend: &Backend) -> ObjectKey {
        ObjectKey::new(&self.key.namespace, &backend.service)
    }
}

/// The route of `port` of `service`: one for that port before one for every port, then by
/// `namespace/name`.
pub fn route_for<'a>(
    all: impl IntoIterator<Item = &'a ServiceRoute>,
    service: &ObjectKey,
    port: u16,
) -> Option<&'a ServiceRoute> {
    all.into_iter()
        .filter(|r| {
            r.key.namespace == service.namespace
                && r.service == service.name
                && r.port.is_none_or(|p| p == port)
        })
        .min_by_key(|r| (r.port.is_none(), r.key.clone()))
}

/// Most backends one route may have: each is a lookup on every new connection.
pub const MAX_BACKENDS: usize = 16;
/// Largest weight; weights are relative, so this is precision enough.
pub const MAX_WEIGHT: u32 = 10_000;

fn parse_duration(
    field: &str,
    text: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, String> {
    let d = duration::parse(text).map_err(|e| format!("{field}: {e}"))?;
    if d < min || d > max {
        return Err(format!(
            "{field}: {text} is outside {} to {}",
            duration::format(min),
            duration::format(max)
        ));
    }
    Ok(d)
}

/// A timeout that may also be `0s`, for never.
fn parse_timeout(field: &str, text: &str) -> Result<Duration, String> {
    let d = duration::parse(text).map_err(|e| format!("{field}: {e}"))?;
    if d.is_zero() {
        return Ok(d);
    }
    parse_duration(
        field,
        text,
        Duration::from_secs(1),
        Duration::from_secs(30 * 86_400),
    )
    .map_err(|e| format!("{e} (or 0s for never)"))
}

fn bounded(field: &str, n: u32, min: u32, max: u32) -> Result<u32, String> {
    if n < min || n > max {
        return Err(format!("{field}: {n} is outside {min} to {max}"));
    }
    Ok(n)
}

fn port(field: &str, n: u32) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{field}: {n} is not a port (1-65535)"))
}

/// Validates a spec into a policy named `key`; the error names the field.
pub fn validate_policy(key: ObjectKey, spec: TrafficPolicySpec) -> Result<TrafficPolicy, String> {
    let empty = |field: &str| {
        format!("{field}: an empty list; remove the field to take every one, or name some")
    };
    if spec.services.as_ref().is_some_and(Vec::is_empty) {
        return Err(empty("spec.services"));
    }
    if spec.sources.as_ref().is_some_and(Vec::is_empty) {
        return Err(empty("spec.sources"));
    }
    let mut services = Vec::new();
    for (i, s) in spec.services.unwrap_or_default().into_iter().enumerate() {
        check_label(&format!("spec.services[{i}]"), &s)?;
        if services.contains(&s) {
            return Err(format!("spec.services[{i}]: {s} is listed twice"));
        }
        services.push(s);
    }
    let ports = spec
        .ports
        .map(|list| policy::port_ranges(list).map_err(|e| format!("spec.ports{e}")))
        .transpose()?
        .unwrap_or_default();
    let mut sources = Vec::new();
    for (i, r) in spec.sources.unwrap_or_default().into_iter().enumerate() {
        let at = format!("spec.sources[{i}]");
        if r.ports.is_some() || r.not_ports.is_some() {
            return Err(format!(
                "{at}: ports are the destination Service's; write them in spec.ports"
            ));
        }
        sources.push(policy::rule(&at, r)?);
    }
    let connect = spec.connect.map(connect).transpose()?;
    let idle_timeout = spec
        .idle_timeout
        .map(|t| parse_timeout("spec.idleTimeout", &t))
        .transpose()?;
    let max_connection_duration = spec
        .max_connection_duration
        .map(|t| parse_timeout("spec.maxConnectionDuration", &t))
        .transpose()?;
    let connection_limits = spec.connection_limits.map(connection_limits).transpose()?;
    let outlier_detection = spec.outlier_detection.map(outlier_detection).transpose()?;
    let rate_limit = spec.rate_limit.map(rate_limit).transpose()?;
    let http = spec.http.map(http).transpose()?.map(Box::new);
    Ok(TrafficPolicy {
        key,
        services,
        ports,
        sources,
        connect,
        idle_timeout,
        max_connection_duration,
        load_balancer: spec.load_balancer,
        connection_limits,
        outlier_detection,
        rate_limit,
        http,
    })
}

fn connect(c: ConnectSpec) -> Result<Connect, String> {
    let mut out = Connect::default();
    if let Some(t) = c.timeout {
        // Under 10 ms no tunnel handshake can finish.
        out.timeout = parse_duration(
            "spec.connect.timeout",
            &t,
            Duration::from_millis(10),
            Duration::from_secs(300),
        )?;
    }
    if let Some(n) = c.max_attempts {
        out.max_attempts = bounded("spec.connect.maxAttempts", n, 1, 10)?;
    }
    if let Some(b) = c.backoff {
        out.backoff = parse_duration(
            "spec.connect.backoff",
            &b,
            Duration::ZERO,
            Duration::from_secs(10),
        )?;
    }
    Ok(out)
}

fn connection_limits(c: ConnectionLimitsSpec) -> Result<ConnectionLimits, String> {
    let limit =
        |field: &str, n: Option<u32>| n.map(|n| bounded(field, n, 1, 1_000_000)).transpose();
    Ok(ConnectionLimits {
        max_connections: limit("spec.connectionLimits.maxConnections", c.max_connections)?,
        max_pending_connects: limit(
            "spec.connectionLimits.maxPendingConnects",
            c.max_pending_connects,
        )?,
    })
}

fn outlier_detection(o: OutlierDetectionSpec) -> Result<OutlierDetection, String> {
    let mut out = OutlierDetection::default();
    let at = "spec.outlierDetection";
    if let Some(n) = o.consecutive_failures {
        out.consecutive_failures = bounded(&format!("{at}.consecutiveFailures"), n, 0, 1000)?;
    }
    let time = |field: &str, text: Option<String>, default: Duration| {
        text.map(|t| {
            parse_duration(
                &format!("{at}.{field}"),
                &t,
                Duration::from_millis(100),
                Duration::from_secs(86_400),
            )
        })
        .unwrap_or(Ok(default))
    };
    out.interval = time("interval", o.interval, out.interval)?;
    out.base_ejection_time = time(
        "baseEjectionTime",
        o.base_ejection_time,
        out.base_ejection_time,
    )?;
    out.max_ejection_time = time(
        "maxEjectionTime",
        o.max_ejection_time,
        out.max_ejection_time,
    )?;
    if out.max_ejection_time < out.base_ejection_time {
        return Err(format!(
            "{at}.maxEjectionTime: {} is shorter than baseEjectionTime ({})",
            duration::format(out.max_ejection_time),
            duration::format(out.base_ejection_time)
        ));
    }
    if let Some(n) = o.max_ejection_percent {
        out.max_ejection_percent = bounded(&format!("{at}.maxEjectionPercent"), n, 0, 100)?;
    }
    if let Some(n) = o.panic_threshold_percent {
        out.panic_threshold_percent = bounded(&format!("{at}.panicThresholdPercent"), n, 0, 100)?;
    }
    Ok(out)
}

fn rate_limit(r: RateLimitSpec) -> Result<RateLimit, String> {
    Ok(RateLimit {
        connections: bounded("spec.rateLimit.connections", r.connections, 1, 1_000_000)?,
        interval: parse_duration(
            "spec.rateLimit.interval",
            &r.interval,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?,
    })
}

fn http(h: HttpSpec) -> Result<Http, String> {
    let at = "spec.http";
    let mut out = Http::default();
    if let Some(t) = h.request_timeout {
        out.request_timeout = parse_duration(
            &format!("{at}.requestTimeout"),
            &t,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        )?;
    }
    if let Some(r) = h.retries {
        out.retries = retries(r, out.request_timeout)?;
    }
    if let Some(codes) = h.outlier_status_codes {
        out.outlier_status_codes = status_codes(&format!("{at}.outlierStatusCodes"), codes)?;
    }
    Ok(out)
}

fn retries(r: RetriesSpec, request_timeout: Duration) -> Result<Retries, String> {
    let at = "spec.http.retries";
    let mut out = Retries::default();
    if let Some(n) = r.attempts {
        out.attempts = bounded(&format!("{at}.attempts"), n, 0, 10)?;
    }
    if let Some(t) = r.per_try_timeout {
        let field = format!("{at}.perTryTimeout");
        out.per_try_timeout = parse_duration(
            &field,
            &t,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        )?;
        if !request_timeout.is_zero() && out.per_try_timeout > request_timeout {
            return Err(format!(
                "{field}: {} is longer than spec.http.requestTimeout ({}), so no retry could start",
                duration::format(out.per_try_timeout),
                duration::format(request_timeout)
            ));
        }
    }
    if let Some(list) = r.retry_on {
        let mut seen = Vec::new();
        for (i, on) in list.into_iter().enumerate() {
            if seen.contains(&on) {
                return Err(format!("{at}.retryOn[{i}]: {on} is listed twice"));
            }
            seen.push(on);
        }
        seen.sort();
        out.retry_on = seen;
    }
    if let Some(codes) = r.retry_on_status {
        out.retry_on_status = status_codes(&format!("{at}.retryOnStatus"), codes)?;
    }
    if let Some(n) = r.max_body_bytes {
        out.max_body_bytes = bounded(&format!("{at}.maxBodyBytes"), n, 0, 16 * 1024 * 1024)?;
    }
    if let Some(n) = r.budget_percent {
        out.budget_percent = bounded(&format!("{at}.budgetPercent"), n, 0, 100)?;
    }
    if let Some(n) = r.min_retries_per_second {
        out.min_retries_per_second = bounded(&format!("{at}.minRetriesPerSecond"), n, 0, 10_000)?;
    }
    Ok(out)
}

/// Response status codes an operator lists: each an error status (400-599), once; sorted.
fn status_codes(field: &str, codes: Vec<u16>) -> Result<Vec<u16>, String> {
    let mut out: Vec<u16> = Vec::with_capacity(codes.len());
    for (i, code) in codes.into_iter().enumerate() {
        if !(400..=599).contains(&code) {
            return Err(format!(
                "{field}[{i}]: {code} is not an error status (400-599)"
            ));
        }
        if out.contains(&code) {
            return Err(format!("{field}[{i}]: {code} is listed twice"));
        }
        out.push(code);
    }
    out.sort_unstable();
    Ok(out)
}

/// Validates a spec into a route named `key`; the error names the field.
pub fn validate_route(key: ObjectKey, spec: ServiceRouteSpec) -> Result<ServiceRoute, String> {
    check_label("spec.service", &spec.service)?;
    let routed_port = spec.port.map(|p| port("spec.port", p)).transpose()?;
    if spec.backends.is_empty() {
        return Err("spec.backends: at least one backend is required".into());
    }
    if spec.backends.len() > MAX_BACKENDS {
        return Err(format!(
            "spec.backends: {} backends; at most {MAX_BACKENDS}",
            spec.backends.len()
        ));
    }
    let mut seen = BTreeSet::new();
    let mut backends = Vec::new();
    for (i, b) in spec.backends.into_iter().enumerate() {
        let at = format!("spec.backends[{i}]");
        check_label(&format!("{at}.service"), &b.service)?;
        let port = b.port.map(|p| port(&format!("{at}.port"), p)).transpose()?;
        let weight = bounded(&format!("{at}.weight"), b.weight, 0, MAX_WEIGHT)?;
        if !seen.insert((b.service.clone(), port)) {
            return Err(format!("{at}: {} is listed twice", b.service));
        }
        backends.push(Backend {
            service: b.service,
            port,
            weight,
        });
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err("spec.backends: every weight is 0; at least one must be above 0".into());
    }
    Ok(ServiceRoute {
        key,
        service: spec.service,
        port: routed_port,
        backends,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::authz::SourceWorkload;

    fn policy(ns: &str, name: &str, yaml: &str) -> TrafficPolicy {
        let spec: TrafficPolicySpec = serde_yaml::from_str(yaml).unwrap();
        validate_policy(ObjectKey::new(ns, name), spec).unwrap()
    }

    fn source<'a>(labels: &'a BTreeMap<String, String>) -> Source<'a> {
        Source {
            address: "10.0.0.1".parse().unwrap(),
            workload: Some(SourceWorkload {
                identity: "spiffe://cluster.local/ns/shop/sa/web",
                namespace: "shop",
                labels,
            }),
        }
    }

    #[test]
    fn sections_come_from_the_most_specific_policy_that_sets_them() {
        let all = [
            policy("mycel-system", "mesh-wide", "{connect: {timeout: 5s}, idleTimeout: 1h}"),
            policy("shop", "ns-wide", "{loadBalancer: LeastConnections, connect: {maxAttempts: 2}}"),
            policy("shop", "payment", "{services: [payment], connect: {timeout: 2s}}"),
            policy("shop", "payment-8080", "{services: [payment], ports: [8080], connectionLimits: {maxConnections: 10}}"),
            policy("shop", "canary-only", "{services: [payment], sources: [{sourceLabels: {track: canary}}], idleTimeout: 5m}"),
            policy("other", "elsewhere", "{connect: {timeout: 1s}}"),
        ];
        let payment = ObjectKey::new("shop", "payment");
        let c = candidates(&all, "mycel-system", &payment, 8080);
        let names: Vec<_> = c.iter().map(|p| p.key.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "payment-8080",
                "canary-only",
                "payment",
                "ns-wide",
                "mesh-wide"
            ]
        );

        let labels = BTreeMap::new();
        let e = resolve(c.iter().copied(), &source(&labels));
        assert_eq!(e.connect.value.timeout, Duration::from_secs(2));
        // The section is taken whole: maxAttempts is the default, not ns-wide's 2.
        assert_eq!(e.connect.value.max_attempts, 3);
        assert_eq!(e.connect.from, Some(ObjectKey::new("shop", "payment")));
        assert_eq!(e.connection_limits.value.max_connections, Some(10));
        assert_eq!(e.load_balancer.value, LoadBalancer::LeastConnections);
        // The canary-only policy does not take this source; the mesh-wide one does.
        assert_eq!(e.idle_timeout.value, Duration::from_secs(3600));
        assert_eq!(e.outlier_detection.from, None);
        assert_eq!(e.rate_limit.value, None);

        let canary = BTreeMap::from([("track".to_owned(), "canary".to_owned())]);
        let e = resolve(c.iter().copied(), &source(&canary));
        assert_eq!(e.idle_timeout.value, Duration::from_secs(300));

        // Another port: the port-narrowed policy drops out.
        let c = candidates(&all, "mycel-system", &payment, 9090);
        assert!(c.iter().all(|p| p.key.name != "payment-8080"));
        // A Service of another namespace sees only its own and the mesh-wide ones.
        let c = candidates(&all, "mycel-system", &ObjectKey::new("other", "x"), 80);
        let names: Vec<_> = c.iter().map(|p| p.key.name.as_str()).collect();
        assert_eq!(names, ["elsewhere", "mesh-wide"]);
    }

    #[test]
    fn ejection_rounds_up_and_never_takes_the_last() {
        let o = OutlierDetection {
            max_ejection_percent: 10,
            ..OutlierDetection::default()
        };
        // Istio's trap: 10 % of four replicas is zero ejections there, one here.
        assert_eq!(o.max_ejected(4), 1);
        assert_eq!(o.max_ejected(1), 0);
        assert_eq!(o.max_ejected(2), 1);
        assert_eq!(o.max_ejected(30), 3);
        let all = OutlierDetection {
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        };
        assert_eq!(all.max_ejected(3), 2);
        assert_eq!(o.ejection_time(1), Duration::from_secs(30));
        assert_eq!(o.ejection_time(3), Duration::from_secs(90));
        assert_eq!(o.ejection_time(100), Duration::from_secs(300));
        let panicky = OutlierDetection {
            panic_threshold_percent: 50,
            ..OutlierDetection::default()
        };
        assert!(panicky.panics(1, 3));
        assert!(!panicky.panics(2, 3));
        assert!(!o.panics(0, 3));
    }

    #[test]
    fn routes_prefer_the_port_they_name() {
        let route = |name: &str, yaml: &str| {
            let spec: ServiceRouteSpec = serde_yaml::from_str(yaml).unwrap();
            validate_route(ObjectKey::new("shop", name), spec).unwrap()
        };
        let all = [
            route(
                "a-all",
                "{service: payment, backends: [{service: payment, weight: 1}]}",
            ),
            route(
                "b-80",
                "{service: payment, port: 80, backends: [{service: payment-v2, weight: 1}]}",
            ),
        ];
        let payment = ObjectKey::new("shop", "payment");
        assert_eq!(route_for(&all, &payment, 80).unwrap().key.name, "b-80");
        assert_eq!(route_for(&all, &payment, 81).unwrap().key.name, "a-all");
        assert!(route_for(&all, &ObjectKey::new("other", "payment"), 80).is_none());
    }

    #[test]
    fn the_http_section_fills_its_defaults_and_is_taken_whole() {
        let p = policy(
            "shop",
            "http",
            "{http: {requestTimeout: 15s, retries: {retryOn: [reset, connect-failure], retryOnStatus: [504, 503]}, outlierStatusCodes: [503]}}",
        );
        let h = p.http.clone().unwrap();
        assert_eq!(h.request_timeout, Duration::from_secs(15));
        assert_eq!(
            h.retries.retry_on,
            [RetryOn::ConnectFailure, RetryOn::Reset],
            "sorted"
        );
        assert_eq!(h.retries.retry_on_status, [503, 504]);
        // What the section leaves out takes its default.
        assert_eq!(h.retries.attempts, 2);
        assert_eq!(h.retries.max_body_bytes, 65536);
        assert_eq!(h.retries.budget_percent, 20);
        assert_eq!(h.outlier_status_codes, [503]);
        // Unknown fields and conditions are refused by the parser.
        assert!(
            serde_yaml::from_str::<TrafficPolicySpec>("{http: {retries: {retryOn: [5xx]}}}")
                .is_err()
        );
        assert!(serde_yaml::from_str::<TrafficPolicySpec>("{http: {timeout: 1s}}").is_err());
        let labels = BTreeMap::new();
        let e = resolve([&p], &source(&labels));
        assert_eq!(e.http.from, Some(ObjectKey::new("shop", "http")));
        let text = e.sections().last().unwrap().1.clone();
        assert!(
            text.contains("requestTimeout 15s") && text.contains("retryOn connect-failure reset"),
            "{text}"
        );
        // No policy: only connect failures are retried, and nothing times out.
        let d = resolve(Vec::<&TrafficPolicy>::new(), &source(&labels));
        assert_eq!(d.http.value, Http::default());
        assert_eq!(d.http.value.retries.retry_on, [RetryOn::ConnectFailure]);
        assert!(d.http.value.request_timeout.is_zero());
    }

    #[test]
    fn errors_name_the_field() {
        let p = |yaml: &str| {
            let spec: TrafficPolicySpec = serde_yaml::from_str(yaml).unwrap();
            validate_policy(ObjectKey::new("shop", "p"), spec).unwrap_err()
        };
        for (yaml, needle) in [
            ("{services: [Payment]}", "spec.services[0]"),
            ("{services: [a, a]}", "spec.services[1]"),
            ("{ports: [0]}", "spec.ports[0]"),
            ("{sources: [{ports: [80]}]}", "spec.sources[0]: ports"),
            ("{sources: [{}]}", "spec.sources[0]: an empty rule"),
            (
                "{sources: [{sourceCidrs: [{cidr: 10.0.0.1/8}]}]}",
                "spec.sources[0].sourceCidrs[0].cidr",
            ),
            ("{connect: {timeout: 0s}}", "spec.connect.timeout"),
            ("{connect: {timeout: 5ms}}", "spec.connect.timeout"),
            ("{services: []}", "spec.services: an empty list"),
            ("{sources: []}", "spec.sources: an empty list"),
            ("{connect: {timeout: soon}}", "spec.connect.timeout"),
            ("{connect: {maxAttempts: 0}}", "spec.connect.maxAttempts"),
            ("{connect: {backoff: 1m}}", "spec.connect.backoff"),
            ("{idleTimeout: 10ms}", "spec.idleTimeout"),
            ("{maxConnectionDuration: 40d}", "spec.maxConnectionDuration"),
            (
                "{connectionLimits: {maxConnections: 0}}",
                "spec.connectionLimits.maxConnections",
            ),
            (
                "{connectionLimits: {maxPendingConnects: 2000000}}",
                "spec.connectionLimits.maxPendingConnects",
            ),
            (
                "{outlierDetection: {maxEjectionPercent: 101}}",
                "spec.outlierDetection.maxEjectionPercent",
            ),
            (
                "{outlierDetection: {baseEjectionTime: 1m, maxEjectionTime: 30s}}",
                "spec.outlierDetection.maxEjectionTime",
            ),
            (
                "{outlierDetection: {interval: 1ms}}",
                "spec.outlierDetection.interval",
            ),
            (
                "{rateLimit: {connections: 0, interval: 1s}}",
                "spec.rateLimit.connections",
            ),
            (
                "{rateLimit: {connections: 5, interval: 2h}}",
                "spec.rateLimit.interval",
            ),
            ("{http: {requestTimeout: 2h}}", "spec.http.requestTimeout"),
            (
                "{http: {retries: {attempts: 11}}}",
                "spec.http.retries.attempts",
            ),
            (
                "{http: {requestTimeout: 1s, retries: {perTryTimeout: 2s}}}",
                "spec.http.retries.perTryTimeout: 2s is longer than spec.http.requestTimeout",
            ),
            (
                "{http: {retries: {retryOn: [reset, reset]}}}",
                "spec.http.retries.retryOn[1]: reset is listed twice",
            ),
            (
                "{http: {retries: {retryOnStatus: [200]}}}",
                "spec.http.retries.retryOnStatus[0]: 200 is not an error status",
            ),
            (
                "{http: {retries: {retryOnStatus: [503, 503]}}}",
                "spec.http.retries.retryOnStatus[1]",
            ),
            (
                "{http: {retries: {maxBodyBytes: 20000000}}}",
                "spec.http.retries.maxBodyBytes",
            ),
            (
                "{http: {retries: {budgetPercent: 101}}}",
                "spec.http.retries.budgetPercent",
            ),
            (
                "{http: {outlierStatusCodes: [600]}}",
                "spec.http.outlierStatusCodes[0]",
            ),
        ] {
            let e = p(yaml);
            assert!(e.contains(needle), "{yaml}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let r = |yaml: &str| {
            let spec: ServiceRouteSpec = serde_yaml::from_str(yaml).unwrap();
            validate_route(ObjectKey::new("shop", "r"), spec).unwrap_err()
        };
        for (yaml, needle) in [
            (
                "{service: P, backends: [{service: a, weight: 1}]}",
                "spec.service",
            ),
            (
                "{service: p, port: 70000, backends: [{service: a, weight: 1}]}",
                "spec.port",
            ),
            ("{service: p, backends: []}", "spec.backends: at least one"),
            (
                "{service: p, backends: [{service: a, weight: 0}]}",
                "every weight is 0",
            ),
            (
                "{service: p, backends: [{service: a, weight: 10001}]}",
                "spec.backends[0].weight",
            ),
            (
                "{service: p, backends: [{service: a, weight: 1}, {service: a, weight: 2}]}",
                "spec.backends[1]",
            ),
            (
                "{service: p, backends: [{service: a, port: 0, weight: 1}]}",
                "spec.backends[0].port",
            ),
        ] {
            let e = r(yaml);
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }
}
