//! The adapter against the fake API (kube's mock service): the first list, watch events, a
//! watch that expires (`410 Gone`) and is listed again, and an API outage. Each time the
//! published model must end up right, and the slice a node's stream is sent must change by
//! exactly what changed.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_model::{authz::PolicyIndex, Config, ObjectKey};
use serde_json::{json, Value};
use tokio::sync::watch as channel;

use mesh_kube::fake::FakeApi;

use super::{
    ca_secret, follow, leader,
    leader::Timing,
    translate::Translated,
    watch::{ApiHealth, Retry},
    Cluster, Options, Source, LEASE,
};
use crate::{
    metrics::CpMetrics,
    node_auth::{AuthError, NodeAuth, TokenReviewer, AUDIENCE},
    slice,
    state::{Published, Shared},
};

const T: Duration = Duration::from_secs(10);

/// A replica named `identity`, with retries and leases short enough for tests.
fn options(identity: &str) -> Options {
    Options {
        namespace: "mycel-system".into(),
        identity: identity.into(),
        node_service_account: ("mycel-system".into(), "mycel-node".into()),
        retry: Retry::new(Duration::from_millis(20), Duration::from_millis(200)),
        timing: Timing {
            lease: Duration::from_secs(1),
            renew: Duration::from_millis(100),
        },
    }
}

fn namespace(name: &str, mesh: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": name, "labels": { "mycel.dev/mesh": mesh } } })
}

fn pod(name: &str, node: &str, ip: &str, app: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "shop", "labels": { "app": app } },
            "spec": { "nodeName": node, "serviceAccountName": app,
                      "containers": [{ "name": "app", "image": "app" }] },
            "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] } })
}

fn policy(name: &str, spec: Value) -> Value {
    json!({ "apiVersion": "mycel.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": { "name": name, "namespace": "shop" }, "spec": spec })
}

fn deny_analytics() -> Value {
    policy(
        "no-analytics",
        json!({ "selector": { "matchLabels": { "app": "payment" } }, "action": "Deny",
                "rules": [{ "sourceIdentities": ["spiffe://cluster.local/ns/shop/sa/analytics"] }] }),
    )
}

/// Service `name` of shop at `vip`, port 80 to 8080 of its one ready pod `pod` at `ip`, and
/// its EndpointSlice.
fn mesh_service(name: &str, vip: &str, pod: &str, ip: &str) -> [Value; 2] {
    [
        json!({ "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": name, "namespace": "shop" },
                "spec": { "clusterIPs": [vip], "selector": { "app": name },
                          "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] } }),
        json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": { "name": format!("{name}-x"), "namespace": "shop",
                              "labels": { "kubernetes.io/service-name": name } },
                "addressType": "IPv4",
                "endpoints": [{ "addresses": [ip], "conditions": { "ready": true },
                                "targetRef": { "kind": "Pod", "namespace": "shop", "name": pod } }],
                "ports": [{ "name": "http", "port": 8080 }] }),
    ]
}

/// The fake API with namespace shop in the mesh and its Service payment, whose one pod is
/// payment-1 on n2.
fn shop_with_payment() -> FakeApi {
    let api = FakeApi::default();
    api.apply("namespaces", namespace("shop", "enabled"));
    api.apply("pods", pod("payment-1", "n2", "10.1.2.2", "payment"));
    apply_service(
        &api,
        mesh_service("payment", "10.96.0.10", "payment-1", "10.1.2.2"),
    );
    api
}

fn apply_service(api: &FakeApi, [svc, eps]: [Value; 2]) {
    api.apply("services", svc);
    api.apply("endpointslices", eps);
}

/// A replica that has listed `api` and won the election, following it.
struct Following {
    /// The first list's model.
    first: Translated,
    published: channel::Receiver<Published>,
    shared: Arc<Shared>,
    health: Arc<ApiHealth>,
}

async fn follow_cluster(api: &FakeApi) -> Following {
    let (cluster, ca, auth) =
        tokio::time::timeout(T, Cluster::start(api.client(), &options("cp-0")))
            .await
            .expect("the first list and the CA")
            .expect("the CA");
    let first = cluster.first.clone();
    let (publish, published) = channel::channel(Published::new(1, first.config.clone()));
    let shared = Arc::new(Shared::new(
        published.clone(),
        auth,
        ca,
        CpMetrics::new().expect("metrics"),
    ));
    let health = cluster.source.health.clone();
    tokio::spawn(follow(cluster, publish, shared.clone()));
    Following {
        first,
        published,
        shared,
        health,
    }
}

fn keys(c: &Config) -> Vec<String> {
    c.workloads.keys().map(ToString::to_string).collect()
}

/// Waits until the published config satisfies `done`; returns it.
async fn published_until(
    rx: &mut channel::Receiver<Published>,
    what: &str,
    done: impl Fn(&Published) -> bool,
) -> Published {
    let deadline = Instant::now() + T;
    loop {
        let p = rx.borrow_and_update().clone();
        if done(&p) {
            return p;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            tokio::time::timeout(left, rx.changed()).await.is_ok(),
            "{what}: not published within {T:?}; in force: {:?}",
            keys(&p.config)
        );
    }
}

async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + T;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {T:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What node `node`'s stream is sent between two versions: (upserted keys, removed keys).
fn node_update(old: &Published, new: &Published, node: &str) -> (Vec<String>, Vec<String>) {
    let slice = |p: &Published| {
        let index = PolicyIndex::new(p.config.mesh.default_action, p.config.selections());
        slice::node_slice(&p.config, &index, &[], node)
    };
    let (upserts, removals) = slice::diff(&slice(old), &slice(new));
    (upserts.into_iter().map(|r| r.key).collect(), removals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_gone_and_outage_keep_the_model_right() {
    let api = shop_with_payment();
    api.apply("pods", pod("order-1", "n1", "10.1.1.2", "order"));
    api.apply("accesspolicies", deny_analytics());

    // The first complete list, the election won, the CA created.
    let Following {
        first,
        mut published,
        shared,
        health,
    } = follow_cluster(&api).await;
    assert_eq!(keys(&first.config), ["shop/order-1", "shop/payment-1"]);
    let svc = &first.config.services[&ObjectKey::new("shop", "payment")];
    let eps: Vec<_> = first
        .config
        .endpoints(svc)
        .map(|w| w.key.to_string())
        .collect();
    assert_eq!(eps, ["shop/payment-1"]);
    assert_eq!(first.config.policies.len(), 1);
    let v1 = published.borrow_and_update().clone();

    // The policy's status says it is in force and what it selects.
    eventually("the policy's status", || {
        api.get("accesspolicies", "shop", "no-analytics")
            .is_some_and(|p| {
                p["status"]["conditions"][0]["status"] == "True"
                    && p["status"]["selectedWorkloads"] == 1
            })
    })
    .await;

    // Watch: a new pod on n1 is one upsert for n1's stream.
    api.apply("pods", pod("analytics-1", "n1", "10.1.1.3", "analytics"));
    let v2 = published_until(&mut published, "analytics-1 added", |p| {
        p.config
            .workloads
            .contains_key(&ObjectKey::new("shop", "analytics-1"))
    })
    .await;
    assert_eq!(v2.version, v1.version + 1);
    // n1 gets the workload and its fast-deny set (payment denies analytics); n2 the peer.
    assert_eq!(
        node_update(&v1, &v2, "n1"),
        (
            vec![
                "fast-deny/shop/analytics-1".into(),
                "workload/shop/analytics-1".into()
            ],
            vec![]
        )
    );
    assert_eq!(
        node_update(&v1, &v2, "n2"),
        (vec!["workload/shop/analytics-1".into()], vec![])
    );

    // A bad policy is left out, says why in its status and on /status; the others stay.
    api.apply(
        "accesspolicies",
        policy("broken", json!({ "action": "Deny", "rules": [] })),
    );
    eventually("the broken policy's status", || {
        api.get("accesspolicies", "shop", "broken")
            .is_some_and(|p| p["status"]["conditions"][0]["reason"] == "Invalid")
    })
    .await;
    assert!(!published
        .borrow()
        .config
        .policies
        .contains_key(&ObjectKey::new("shop", "broken")));
    let status = shared.config_status();
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("shop/broken")),
        "{status:?}"
    );
    api.delete("accesspolicies", "shop", "broken");

    // 410 Gone: every watch must list again; a deletion made meanwhile is seen.
    let before = api.requests().len();
    api.expire();
    api.delete("pods", "shop", "order-1");
    let v3 = published_until(&mut published, "order-1 deleted after relist", |p| {
        !p.config
            .workloads
            .contains_key(&ObjectKey::new("shop", "order-1"))
    })
    .await;
    let after: Vec<String> = api.requests()[before..].to_vec();
    let relisted = |path: &str| {
        after
            .iter()
            .any(|r| r.starts_with(&format!("GET {path}?")) && !r.contains("watch=true"))
    };
    for path in [
        "/api/v1/pods",
        "/api/v1/namespaces",
        "/apis/mycel.dev/v1alpha1/accesspolicies",
        "/apis/mycel.dev/v1alpha1/trafficpolicies",
        "/apis/mycel.dev/v1alpha1/serviceroutes",
    ] {
        assert!(relisted(path), "{path} not listed again: {after:#?}");
    }
    assert_eq!(
        node_update(&v2, &v3, "n1"),
        (vec![], vec!["workload/shop/order-1".into()])
    );

    // An outage: the mesh keeps its last state; changes made meanwhile arrive after it.
    api.set_down(true);
    eventually("the watchers notice the outage", || {
        health.last_error().is_some()
    })
    .await;
    api.apply("pods", pod("order-2", "n1", "10.1.1.4", "order"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        published.borrow().version,
        v3.version,
        "nothing changes while the API is away"
    );
    api.set_down(false);
    let v4 = published_until(&mut published, "order-2 after the outage", |p| {
        p.config
            .workloads
            .contains_key(&ObjectKey::new("shop", "order-2"))
    })
    .await;
    assert_eq!(
        keys(&v4.config),
        ["shop/analytics-1", "shop/order-2", "shop/payment-1"]
    );
    eventually("the watchers recover", || health.last_error().is_none()).await;
    assert_eq!(
        node_update(&v3, &v4, "n1"),
        (vec!["workload/shop/order-2".into()], vec![])
    );
    assert_eq!(
        node_update(&v3, &v4, "n2"),
        (vec!["workload/shop/order-2".into()], vec![])
    );
}

fn traffic_policy(name: &str, spec: Value) -> Value {
    json!({ "apiVersion": "mycel.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": { "name": name, "namespace": "shop" }, "spec": spec })
}

/// The `Accepted` condition and `services` of a TrafficPolicy or ServiceRoute's status, once
/// it says something.
fn traffic_status(api: &FakeApi, resource: &str, name: &str) -> Option<(Value, Value)> {
    let status = api.get(resource, "shop", name)?["status"].clone();
    let accepted = status["conditions"][0].clone();
    (!accepted.is_null()).then(|| (accepted, status["services"].clone()))
}

/// TrafficPolicies and ServiceRoutes in a cluster: in the published config, and each says in
/// its status whether it is in force and which Services it binds. A bad policy is left out
/// alone and says why, naming the field, while a good one beside it stays; deleting either
/// takes it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_policies_and_routes_are_served_and_say_what_they_bind() {
    let api = shop_with_payment();
    api.apply("pods", pod("payment-v2-1", "n2", "10.1.2.3", "payment-v2"));
    apply_service(
        &api,
        mesh_service("payment-v2", "10.96.0.11", "payment-v2-1", "10.1.2.3"),
    );
    api.apply(
        "trafficpolicies",
        traffic_policy(
            "payment-timeouts",
            json!({ "services": ["payment"], "connect": { "timeout": "250ms", "maxAttempts": 2 } }),
        ),
    );
    api.apply(
        "serviceroutes",
        json!({ "apiVersion": "mycel.dev/v1alpha1", "kind": "ServiceRoute",
                "metadata": { "name": "canary", "namespace": "shop" },
                "spec": { "service": "payment", "backends": [
                    { "service": "payment", "weight": 90 },
                    { "service": "payment-v2", "weight": 10 }] } }),
    );

    let Following {
        first,
        mut published,
        shared,
        ..
    } = follow_cluster(&api).await;
    let (good, canary) = (
        ObjectKey::new("shop", "payment-timeouts"),
        ObjectKey::new("shop", "canary"),
    );
    let connect = first.config.traffic_policies[&good].connect;
    assert_eq!(connect.map(|c| c.max_attempts), Some(2));
    let backends: Vec<_> = first.config.routes[&canary]
        .backends
        .iter()
        .map(|b| (b.service.as_str(), b.weight))
        .collect();
    assert_eq!(backends, [("payment", 90), ("payment-v2", 10)]);
    assert!(first.problems.is_empty(), "{:?}", first.problems);

    let accepted = |resource: &'static str, name: &'static str, services: &'static str| {
        let api = api.clone();
        move || {
            traffic_status(&api, resource, name).is_some_and(|(accepted, bound)| {
                accepted["status"] == "True"
                    && accepted["observedGeneration"] == 1
                    && bound == services
            })
        }
    };
    eventually(
        "the policy's status",
        accepted("trafficpolicies", "payment-timeouts", "shop/payment"),
    )
    .await;
    eventually(
        "the route's status",
        accepted("serviceroutes", "canary", "shop/payment,shop/payment-v2"),
    )
    .await;

    // A bad policy is left out with the field it gets wrong; the good one stays in force.
    api.apply(
        "trafficpolicies",
        traffic_policy("bad", json!({ "connect": { "maxAttempts": 0 } })),
    );
    eventually("the bad policy's status", || {
        traffic_status(&api, "trafficpolicies", "bad").is_some_and(|(accepted, bound)| {
            accepted["status"] == "False"
                && accepted["reason"] == "Invalid"
                && accepted["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("spec.connect.maxAttempts: "))
                && bound.is_null()
        })
    })
    .await;
    let status = shared.config_status();
    assert!(
        status.error.as_deref().is_some_and(
            |e| e.contains("TrafficPolicy shop/bad left out: spec.connect.maxAttempts")
        ),
        "{status:?}"
    );
    let config = published.borrow().config.clone();
    let in_force: Vec<_> = config
        .traffic_policies
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(in_force, ["shop/payment-timeouts"]);
    assert!(config.routes.contains_key(&canary));
    assert!(accepted(
        "trafficpolicies",
        "payment-timeouts",
        "shop/payment"
    )());

    // Deleted, the bad one's reason goes; deleted, the good ones go from the mesh.
    api.delete("trafficpolicies", "shop", "bad");
    eventually("the bad policy's reason gone", || {
        shared.config_status().error.is_none()
    })
    .await;
    api.delete("trafficpolicies", "shop", "payment-timeouts");
    api.delete("serviceroutes", "shop", "canary");
    published_until(&mut published, "the policy and the route deleted", |p| {
        p.config.traffic_policies.is_empty() && p.config.routes.is_empty()
    })
    .await;
}

fn daemon_pod(name: &str, node: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "mycel-system" },
            "spec": { "nodeName": node, "serviceAccountName": "mycel-node", "hostNetwork": true,
                      "containers": [{ "name": "mesh-node", "image": "mesh-node" }] },
            "status": { "phase": "Running", "podIPs": [{ "ip": "192.168.0.1" }] } })
}

/// TokenReview: the node daemon's token, for mesh-cp's audience, speaks for the node its pod
/// runs on and no other; other tokens are refused with the reason; an unreachable API is
/// "unavailable", not a verdict, and answers are reused for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_authenticates_nodes_and_authorizes_them_by_their_pods_node() {
    const SA: &str = "system:serviceaccount:mycel-system:mycel-node";
    let jwt = |aud: &str, user: &str, nonce: &str| FakeApi::jwt(aud, user, 3600, nonce);
    let (tok_a, tok_b) = (jwt(AUDIENCE, SA, "a"), jwt(AUDIENCE, SA, "b"));
    let other_audience = jwt("vault", SA, "c");
    let app = jwt(AUDIENCE, "system:serviceaccount:shop:order", "d");
    let (stale, unknown) = (jwt(AUDIENCE, SA, "e"), jwt(AUDIENCE, SA, "never-issued"));
    let api = FakeApi::default();
    api.apply("pods", daemon_pod("mycel-node-a", "n1"));
    api.apply("pods", daemon_pod("mycel-node-b", "n2"));
    api.issue_token(&tok_a, AUDIENCE, SA, ("mycel-node-a", "uid-mycel-node-a"));
    api.issue_token(
        &other_audience,
        "vault",
        SA,
        ("mycel-node-a", "uid-mycel-node-a"),
    );
    api.issue_token(
        &app,
        AUDIENCE,
        "system:serviceaccount:shop:order",
        ("order-1", "uid-order-1"),
    );
    api.issue_token(
        &stale,
        AUDIENCE,
        SA,
        ("mycel-node-b", "uid-of-an-older-pod"),
    );
    let retry = Retry::new(Duration::from_millis(20), Duration::from_millis(200));
    let source = tokio::time::timeout(T, Source::start(api.client(), retry))
        .await
        .expect("the first list");
    let auth = NodeAuth::kubernetes(Arc::new(TokenReviewer::new(
        api.client(),
        ("mycel-system", "mycel-node"),
        source.pods(),
    )));
    let reviews = || {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews"))
            .count()
    };
    // Each caller its own address: the throttle is tested on its own below.
    let mut next_peer = 0u32;
    let mut peer = || {
        next_peer += 1;
        Some(IpAddr::from(std::net::Ipv4Addr::from(
            0x0a00_0000 + next_peer,
        )))
    };

    assert_eq!(auth.verify(&tok_a, "n1", peer()).await, Ok("n1".to_owned()));
    // Each refusal: (token, node claimed, permission denied (a genuine token the node may not
    // use) rather than unauthenticated, what the reason names, whether the API was asked).
    let expired = FakeApi::jwt(AUDIENCE, SA, -10, "old");
    for (token, node, denied, reason, asks_api) in [
        (tok_a.as_str(), "n2", true, "runs on node \"n1\"", false),
        (
            &other_audience,
            "n1",
            false,
            "not for the audience mycel-cp",
            false,
        ),
        (
            "forged",
            "n1",
            false,
            "not a Kubernetes service-account token",
            false,
        ),
        (&app, "n1", true, "not the node daemon", false),
        (&expired, "n1", false, "expired", false),
        (&unknown, "n1", false, "invalid bearer token", true),
        (&stale, "n2", true, "replaced", true),
    ] {
        let before = reviews();
        match auth.verify(token, node, peer()).await {
            Err(AuthError::PermissionDenied(m)) if denied => assert!(m.contains(reason), "{m}"),
            Err(AuthError::Unauthenticated(m)) if !denied => assert!(m.contains(reason), "{m}"),
            other => panic!("{token} as {node}: {other:?}"),
        }
        assert_eq!(
            reviews() - before,
            usize::from(asks_api),
            "{reason}: TokenReviews"
        );
    }

    // Answers are reused: asking again does not ask the API server again.
    let before = reviews();
    assert_eq!(auth.verify(&tok_a, "n1", peer()).await, Ok("n1".to_owned()));
    assert_eq!(reviews(), before);

    // Regression (issue 19): each new token cost a TokenReview, from any address, without
    // end. One address now gets a burst, then is throttled without asking the API.
    let flooder = peer();
    let before = reviews();
    let mut throttled = 0;
    for i in 0..30 {
        let token = jwt(AUDIENCE, SA, &format!("flood-{i}"));
        match auth.verify(&token, "n1", flooder).await {
            Err(AuthError::Throttled(_)) => throttled += 1,
            Err(AuthError::Unauthenticated(_)) => {}
            other => panic!("flood token {i}: {other:?}"),
        }
    }
    let asked = reviews() - before;
    assert_eq!(
        asked,
        crate::peer_limits::ATTEMPT_BURST as usize,
        "TokenReviews for the flood"
    );
    assert_eq!(throttled, 30 - asked);
    // A node at another address is not held up by it.
    assert_eq!(auth.verify(&tok_a, "n1", peer()).await, Ok("n1".to_owned()));

    // The API away: a new token cannot be checked, and that is not remembered.
    api.issue_token(&tok_b, AUDIENCE, SA, ("mycel-node-b", "uid-mycel-node-b"));
    api.set_down(true);
    assert!(matches!(
        auth.verify(&tok_b, "n2", peer()).await,
        Err(AuthError::Unavailable(_))
    ));
    api.set_down(false);
    assert_eq!(auth.verify(&tok_b, "n2", peer()).await, Ok("n2".to_owned()));

    // The daemon's pod deleted: its token speaks for no node (once the watch has seen it).
    api.delete("pods", "mycel-system", "mycel-node-a");
    eventually("the pod's deletion is seen", || {
        source
            .pods()
            .state()
            .iter()
            .all(|p| p.metadata.name.as_deref() != Some("mycel-node-a"))
    })
    .await;
    match auth.verify(&tok_a, "n1", peer()).await {
        Err(AuthError::PermissionDenied(m)) => assert!(m.contains("does not exist"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// Two replicas: one leads at a time; the leader creates the CA Secret once and both load the
/// same root; the trust bundle holds it; when the leader stops, the other takes over; a
/// replica started later loads the same CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_elect_one_leader_and_share_one_ca() {
    let api = FakeApi::default();
    // Leases long enough that a busy test machine does not pass leadership around by itself.
    let timing = Timing {
        lease: Duration::from_secs(2),
        renew: Duration::from_millis(100),
    };
    let ns = "mycel-system";
    let replica = |name: &str| {
        let (tx, rx) = channel::channel(false);
        let task = tokio::spawn(leader::run(
            api.client(),
            ns.into(),
            LEASE.into(),
            name.into(),
            timing,
            tx,
        ));
        (task, rx)
    };
    let (task_a, lead_a) = replica("cp-a");
    let (task_b, lead_b) = replica("cp-b");
    let retry = Duration::from_millis(50);
    let (ca_a, ca_b) = tokio::time::timeout(
        T,
        futures::future::join(
            ca_secret::load(&api.client(), ns, lead_a.clone(), retry),
            ca_secret::load(&api.client(), ns, lead_b.clone(), retry),
        ),
    )
    .await
    .expect("both replicas load a CA");
    let (ca_a, ca_b) = (ca_a.expect("CA a"), ca_b.expect("CA b"));
    assert_eq!(ca_a.root_der(), ca_b.root_der(), "one CA for the mesh");
    // The Secret holds that root (a replica that lost a race to create it read the winner's).
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(
        api.get("secrets", ns, ca_secret::SECRET)
            .expect("the Secret"),
    )
    .expect("a Secret");
    let field =
        |k: &str| String::from_utf8_lossy(&secret.data.as_ref().expect("data")[k].0).into_owned();
    let stored = crate::ca::Ca::from_pem(&field("ca.crt"), &field("ca.key"), "the Secret")
        .expect("a CA in the Secret");
    assert_eq!(stored.root_der(), ca_a.root_der());
    assert!(*lead_a.borrow() != *lead_b.borrow(), "exactly one leader");

    for lead in [&lead_a, &lead_b] {
        tokio::spawn(ca_secret::keep_bundle(
            api.client(),
            ns.into(),
            ca_a.root_pem(),
            lead.clone(),
            Duration::from_millis(100),
        ));
    }
    eventually("the trust bundle", || {
        api.get("configmaps", ns, ca_secret::BUNDLE)
            .is_some_and(|cm| cm["data"]["ca.crt"] == ca_a.root_pem().as_str())
    })
    .await;

    // The leader goes away; the other takes the Lease once it runs out.
    let (gone, successor, name) = if *lead_a.borrow() {
        (task_a, lead_b, "cp-b")
    } else {
        (task_b, lead_a, "cp-a")
    };
    gone.abort();
    eventually("the other replica leads", || *successor.borrow()).await;
    let lease = api.get("leases", ns, LEASE).expect("the Lease");
    assert_eq!(lease["spec"]["holderIdentity"], name, "{lease}");
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");

    // A replica started later, not leading, loads the same CA.
    let (_, not_leading) = channel::channel(false);
    let later = ca_secret::load(&api.client(), ns, not_leading, retry)
        .await
        .expect("the CA from the Secret");
    assert_eq!(later.root_der(), ca_a.root_der());
}
