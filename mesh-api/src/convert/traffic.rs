//! Traffic policies and service routes on the wire. Decoding goes back through the model's
//! own validation (durations as milliseconds), so a node holds only values mesh-cp could have
//! accepted from an operator.

use std::time::Duration;

use mesh_model::{
    duration,
    policy::{Clause, PortRange, Rule},
    spec::{
        BackendSpec, ConnectSpec, ConnectionLimitsSpec, HttpSpec, LoadBalancer,
        OutlierDetectionSpec, RateLimitSpec, RetriesSpec, RetryOn, ServiceRouteSpec,
        TrafficPolicySpec,
    },
    traffic::{self, ServiceRoute, TrafficPolicy},
    ObjectKey,
};

use crate::v1;

/// What is wrong with a traffic policy or route as received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {key}: {reason}")]
pub struct TrafficError {
    pub kind: &'static str,
    pub key: ObjectKey,
    pub reason: String,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// As the model's validation reads it back.
fn text(ms: u64) -> String {
    duration::format(Duration::from_millis(ms))
}

impl From<&TrafficPolicy> for v1::TrafficPolicy {
    fn from(p: &TrafficPolicy) -> Self {
        v1::TrafficPolicy {
            namespace: p.key.namespace.clone(),
            name: p.key.name.clone(),
            services: p.services.clone(),
            ports: p.ports.iter().map(v1::PortRange::from).collect(),
            sources: p
                .sources
                .iter()
                .map(|r| v1::PolicyRule {
                    clauses: r.clauses.iter().map(v1::PolicyClause::from).collect(),
                })
                .collect(),
            connect: p.connect.map(|c| v1::ConnectSettings {
                timeout_ms: ms(c.timeout),
                max_attempts: c.max_attempts,
                backoff_ms: ms(c.backoff),
            }),
            idle_timeout: p.idle_timeout.map(|d| v1::Millis { ms: ms(d) }),
            max_connection_duration: p.max_connection_duration.map(|d| v1::Millis { ms: ms(d) }),
            load_balancer: match p.load_balancer {
                None => v1::LoadBalancer::Unspecified,
                Some(LoadBalancer::RoundRobin) => v1::LoadBalancer::RoundRobin,
                Some(LoadBalancer::LeastConnections) => v1::LoadBalancer::LeastConnections,
            }
            .into(),
            connection_limits: p.connection_limits.map(|l| v1::ConnectionLimits {
                max_connections: l.max_connections.unwrap_or(0),
                max_pending_connects: l.max_pending_connects.unwrap_or(0),
            }),
            outlier_detection: p.outlier_detection.map(|o| v1::OutlierDetection {
                consecutive_failures: o.consecutive_failures,
                interval_ms: ms(o.interval),
                base_ejection_time_ms: ms(o.base_ejection_time),
                max_ejection_time_ms: ms(o.max_ejection_time),
                max_ejection_percent: o.max_ejection_percent,
                panic_threshold_percent: o.panic_threshold_percent,
            }),
            rate_limit: p.rate_limit.map(|r| v1::RateLimit {
                connections: r.connections,
                interval_ms: ms(r.interval),
            }),
            http: p.http.as_ref().map(|h| v1::HttpSettings {
                request_timeout_ms: ms(h.request_timeout),
                retry_attempts: h.retries.attempts,
                per_try_timeout_ms: ms(h.retries.per_try_timeout),
                retry_on: h
                    .retries
                    .retry_on
                    .iter()
                    .map(|on| {
                        match on {
                            RetryOn::ConnectFailure => v1::RetryOn::ConnectFailure,
                            RetryOn::Reset => v1::RetryOn::Reset,
                            RetryOn::Unavailable => v1::RetryOn::Unavailable,
                        }
                        .into()
                    })
                    .collect(),
                retry_on_status: h
                    .retries
                    .retry_on_status
                    .iter()
                    .map(|c| (*c).into())
                    .collect(),
                max_body_bytes: h.retries.max_body_bytes,
                budget_percent: h.retries.budget_percent,
                min_retries_per_second: h.retries.min_retries_per_second,
                outlier_status_codes: h.outlier_status_codes.iter().map(|c| (*c).into()).collect(),
            }),
        }
    }
}

/// The HTTP section as the model's validation reads it; what could not be a value an
/// operator wrote is refused here.
fn http_spec(h: &v1::HttpSettings) -> Result<HttpSpec, String> {
    let codes = |field: &str, list: &[u32]| -> Result<Vec<u16>, String> {
        list.iter()
            .map(|c| u16::try_from(*c).map_err(|_| format!("{field}: {c} is not a status code")))
            .collect()
    };
    let retry_on = h
        .retry_on
        .iter()
        .map(|on| match v1::RetryOn::try_from(*on) {
            Ok(v1::RetryOn::ConnectFailure) => Ok(RetryOn::ConnectFailure),
            Ok(v1::RetryOn::Reset) => Ok(RetryOn::Reset),
            Ok(v1::RetryOn::Unavailable) => Ok(RetryOn::Unavailable),
            Ok(v1::RetryOn::Unspecified) | Err(_) => {
                Err(format!("http.retryOn: unknown condition {on}"))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(HttpSpec {
        request_timeout: (h.request_timeout_ms > 0).then(|| text(h.request_timeout_ms)),
        retries: Some(RetriesSpec {
            attempts: Some(h.retry_attempts),
            per_try_timeout: (h.per_try_timeout_ms > 0).then(|| text(h.per_try_timeout_ms)),
            retry_on: Some(retry_on),
            retry_on_status: Some(codes("http.retryOnStatus", &h.retry_on_status)?),
            max_body_bytes: Some(h.max_body_bytes),
            budget_percent: Some(h.budget_percent),
            min_retries_per_second: Some(h.min_retries_per_second),
        }),
        outlier_status_codes: Some(codes("http.outlierStatusCodes", &h.outlier_status_codes)?),
    })
}

impl TryFrom<&v1::TrafficPolicy> for TrafficPolicy {
    type Error = TrafficError;

    fn try_from(p: &v1::TrafficPolicy) -> Result<Self, TrafficError> {
        let key = ObjectKey::new(&p.namespace, &p.name);
        let error = |reason: String| TrafficError {
            kind: "traffic policy",
            key: key.clone(),
            reason,
        };
        let nonzero = |n: u32| (n > 0).then_some(n);
        let load_balancer = match v1::LoadBalancer::try_from(p.load_balancer) {
            Ok(v1::LoadBalancer::Unspecified) => None,
            Ok(v1::LoadBalancer::RoundRobin) => Some(LoadBalancer::RoundRobin),
            Ok(v1::LoadBalancer::LeastConnections) => Some(LoadBalancer::LeastConnections),
            Err(_) => return Err(error(format!("unknown load balancer {}", p.load_balancer))),
        };
        let spec = TrafficPolicySpec {
            services: (!p.services.is_empty()).then(|| p.services.clone()),
            ports: None,
            sources: None,
            connect: p.connect.as_ref().map(|c| ConnectSpec {
                timeout: Some(text(c.timeout_ms)),
                max_attempts: Some(c.max_attempts),
                backoff: Some(text(c.backoff_ms)),
            }),
            idle_timeout: p.idle_timeout.as_ref().map(|d| text(d.ms)),
            max_connection_duration: p.max_connection_duration.as_ref().map(|d| text(d.ms)),
            load_balancer,
            connection_limits: p.connection_limits.as_ref().map(|l| ConnectionLimitsSpec {
                max_connections: nonzero(l.max_connections),
                max_pending_connects: nonzero(l.max_pending_connects),
            }),
            outlier_detection: p.outlier_detection.as_ref().map(|o| OutlierDetectionSpec {
                consecutive_failures: Some(o.consecutive_failures),
                interval: Some(text(o.interval_ms)),
                base_ejection_time: Some(text(o.base_ejection_time_ms)),
                max_ejection_time: Some(text(o.max_ejection_time_ms)),
                max_ejection_percent: Some(o.max_ejection_percent),
                panic_threshold_percent: Some(o.panic_threshold_percent),
            }),
            rate_limit: p.rate_limit.as_ref().map(|r| RateLimitSpec {
                connections: r.connections,
                interval: text(r.interval_ms),
            }),
            http: p.http.as_ref().map(http_spec).transpose().map_err(error)?,
        };
        let mut policy = traffic::validate_policy(key.clone(), spec).map_err(error)?;
        policy.ports = p
            .ports
            .iter()
            .map(PortRange::try_from)
            .collect::<Result<_, _>>()
            .map_err(|e| error(format!("ports: {e}")))?;
        for (i, r) in p.sources.iter().enumerate() {
            let clauses = r
                .clauses
                .iter()
                .map(Clause::try_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| error(format!("source {i}: {e}")))?;
            if clauses.is_empty() {
                return Err(error(format!("source {i}: no clauses")));
            }
            if clauses
                .iter()
                .any(|c| matches!(c.matcher, mesh_model::policy::Matcher::Ports(_)))
            {
                return Err(error(format!(
                    "source {i}: a port clause (ports are the Service's)"
                )));
            }
            policy.sources.push(Rule { clauses });
        }
        Ok(policy)
    }
}

impl From<&ServiceRoute> for v1::ServiceRoute {
    fn from(r: &ServiceRoute) -> Self {
        v1::ServiceRoute {
            namespace: r.key.namespace.clone(),
            name: r.key.name.clone(),
            service: r.service.clone(),
            port: r.port.map_or(0, u32::from),
            backends: r
                .backends
                .iter()
                .map(|b| v1::RouteBackend {
                    service: b.service.clone(),
                    port: b.port.map_or(0, u32::from),
                    weight: b.weight,
                })
                .collect(),
        }
    }
}

impl TryFrom<&v1::ServiceRoute> for ServiceRoute {
    type Error = TrafficError;

    fn try_from(r: &v1::ServiceRoute) -> Result<Self, TrafficError> {
        let key = ObjectKey::new(&r.namespace, &r.name);
        let port = |p: u32| (p > 0).then_some(p);
        let spec = ServiceRouteSpec {
            service: r.service.clone(),
            port: port(r.port),
            backends: r
                .backends
                .iter()
                .map(|b| BackendSpec {
                    service: b.service.clone(),
                    port: port(b.port),
                    weight: b.weight,
                })
                .collect(),
        };
        traffic::validate_route(key.clone(), spec).map_err(|reason| TrafficError {
            kind: "route",
            key,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> TrafficPolicy {
        let spec: TrafficPolicySpec = serde_yaml::from_str(yaml).unwrap();
        traffic::validate_policy(ObjectKey::new("shop", "tp"), spec).unwrap()
    }

    #[test]
    fn traffic_policies_and_routes_round_trip() {
        for yaml in [
            "{}",
            "{services: [payment], ports: [80, '9000-9100'], sources: [{sourceNamespaces: [web]}, {sourceLabels: {a: b}}], connect: {timeout: 250ms, maxAttempts: 2, backoff: 10ms}, idleTimeout: 0s, maxConnectionDuration: 1h, loadBalancer: LeastConnections, connectionLimits: {maxPendingConnects: 5}, outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 2s}, rateLimit: {connections: 10, interval: 1s}}",
            "{loadBalancer: RoundRobin, connectionLimits: {maxConnections: 7}}",
            "{http: {}}",
            "{http: {requestTimeout: 15s, retries: {attempts: 3, perTryTimeout: 250ms, retryOn: [connect-failure, reset, unavailable], retryOnStatus: [502, 503], maxBodyBytes: 0, budgetPercent: 0, minRetriesPerSecond: 1}, outlierStatusCodes: [500, 503]}}",
        ] {
            let p = policy(yaml);
            let back = TrafficPolicy::try_from(&v1::TrafficPolicy::from(&p)).unwrap();
            assert_eq!(back, p, "{yaml}");
        }
        let spec: ServiceRouteSpec = serde_yaml::from_str(
            "{service: payment, port: 80, backends: [{service: payment, weight: 90}, {service: payment-v2, port: 8080, weight: 10}]}",
        )
        .unwrap();
        let r = traffic::validate_route(ObjectKey::new("shop", "r"), spec).unwrap();
        assert_eq!(
            ServiceRoute::try_from(&v1::ServiceRoute::from(&r)).unwrap(),
            r
        );
    }

    #[test]
    fn what_mesh_cp_could_not_send_is_refused() {
        let mut wire = v1::TrafficPolicy::from(&policy("{connect: {timeout: 1s}}"));
        wire.connect.as_mut().unwrap().max_attempts = 0;
        let e = TrafficPolicy::try_from(&wire).unwrap_err().to_string();
        assert!(
            e.contains("traffic policy shop/tp: spec.connect.maxAttempts"),
            "{e}"
        );
        let mut wire = v1::TrafficPolicy::from(&policy("{http: {}}"));
        let http = wire.http.as_mut().unwrap();
        http.retry_on.push(7);
        let e = TrafficPolicy::try_from(&wire).unwrap_err().to_string();
        assert!(e.contains("unknown condition 7"), "{e}");
        let http = wire.http.as_mut().unwrap();
        http.retry_on.clear();
        http.retry_on_status.push(70_000);
        let e = TrafficPolicy::try_from(&wire).unwrap_err().to_string();
        assert!(e.contains("70000 is not a status code"), "{e}");
        let http = wire.http.as_mut().unwrap();
        http.retry_on_status = vec![200];
        let e = TrafficPolicy::try_from(&wire).unwrap_err().to_string();
        assert!(e.contains("spec.http.retries.retryOnStatus[0]"), "{e}");
        let mut wire = v1::TrafficPolicy::from(&policy("{}"));
        wire.load_balancer = 9;
        assert!(TrafficPolicy::try_from(&wire).is_err());
        wire.load_balancer = 0;
        wire.sources.push(v1::PolicyRule { clauses: vec![] });
        assert!(TrafficPolicy::try_from(&wire).is_err());
        wire.sources = vec![v1::PolicyRule {
            clauses: vec![v1::PolicyClause {
                negated: true,
                matcher: Some(v1::policy_clause::Matcher::Ports(v1::PortRangeList {
                    ranges: vec![v1::PortRange { first: 1, last: 2 }],
                })),
            }],
        }];
        let e = TrafficPolicy::try_from(&wire).unwrap_err().to_string();
        assert!(e.contains("a port clause"), "{e}");
        wire.sources.clear();
        wire.ports.push(v1::PortRange { first: 9, last: 2 });
        assert!(TrafficPolicy::try_from(&wire).is_err());
        let route = v1::ServiceRoute {
            namespace: "shop".into(),
            name: "r".into(),
            service: "payment".into(),
            port: 0,
            backends: vec![v1::RouteBackend {
                service: "payment".into(),
                port: 0,
                weight: 0,
            }],
        };
        assert!(ServiceRoute::try_from(&route).is_err());
    }
}
