//! A stand-in for the Kubernetes API server behind kube's mock service (`tower-test`): the
//! only stand-in the tests use. It keeps objects by resource with resource versions, answers
//! lists, streams watch events from a version on, writes status subresources by merge patch,
//! and can be told to expire old versions (a watch from before gets `410 Gone`) or to go
//! away (every request gets 503 and open watches end).
//!
//! Only what the daemons' requests need: cluster-wide list and watch of each kind (with a
//! `spec.nodeName` field selector), GET, create, replace, `PATCH …/status`, and TokenReviews
//! of the tokens a test issued. [`FakeApi::client`] answers in-process through kube's mock
//! service; [`FakeApi::serve`] answers plain HTTP on a loopback listener, for daemons run as
//! processes (point them at it with [`FakeApi::kubeconfig`]).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use kube::client::Body;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

pub type FakeBody = UnsyncBoxBody<Bytes, Infallible>;
type EventSender = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

#[derive(Default)]
struct State {
    rv: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change: (version, resource, event type, object).
    events: Vec<(u64, String, &'static str, Value)>,
    /// Watches from a version below this get `410 Gone`.
    expired_below: u64,
    down: bool,
    watches: Vec<Watcher>,
    /// "METHOD path?query" of every request, in order.
    requests: Vec<String>,
    /// Tokens the API server would accept: token → (audience, user info).
    tokens: BTreeMap<String, (String, Value)>,
}

struct Watcher {
    resource: String,
    filter: Selector,
    events: EventSender,
}

/// A field selector of the one form the daemons use, `spec.nodeName=NAME`; any other
/// selects everything.
struct Selector(Option<String>);

impl Selector {
    fn parse(query_value: Option<String>) -> Self {
        let decoded = query_value.map(|v| v.replace("%3D", "=").replace("%3d", "="));
        Self(decoded.and_then(|v| v.strip_prefix("spec.nodeName=").map(str::to_owned)))
    }

    fn matches(&self, object: &Value) -> bool {
        self.0
            .as_deref()
            .is_none_or(|node| object["spec"]["nodeName"].as_str() == Some(node))
    }
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// What a request path names: a resource (plural), maybe a namespace and an object name,
/// maybe the status subresource.
struct Target {
    resource: String,
    namespace: String,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Target {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/GROUP/VERSION/...
    let skip = if parts.first() == Some(&"api") { 2 } else { 3 };
    let rest = &parts[skip.min(parts.len())..];
    let (namespace, rest) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => ((*ns).to_owned(), more),
        _ => (String::new(), rest),
    };
    let target = |name: Option<&str>, status| Target {
        resource: rest.first().copied().unwrap_or_default().to_owned(),
        namespace: namespace.clone(),
        name: name.map(str::to_owned),
        status,
    };
    match rest {
        [_, name, "status"] => target(Some(name), true),
        [_, name] => target(Some(name), false),
        _ => target(None, false),
    }
}

fn full(status: StatusCode, body: Value) -> Response<FakeBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .unwrap_or_default()
}

fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "code": code, "reason": reason, "message": message })
}

fn line(kind: &str, object: &Value) -> Result<Frame<Bytes>, Infallible> {
    let mut text = json!({ "type": kind, "object": object }).to_string();
    text.push('\n');
    Ok(Frame::data(Bytes::from(text)))
}

impl FakeApi {
    /// A kube client whose requests this fake answers, on the runtime it is called from.
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<FakeBody>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let api = api.clone();
                tokio::spawn(async move { send.send_response(api.answer(request).await) });
            }
        });
        kube::Client::new(service, "default")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates or replaces `object` (it names its resource's kind and metadata); the spec
    /// changing bumps `metadata.generation`, as the API server does.
    pub fn apply(&self, resource: &str, object: Value) {
        self.lock().store(resource, object);
    }

    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let mut s = self.lock();
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        if let Some(mut object) = s.objects.remove(&key) {
            s.rv += 1;
            let rv = s.rv;
            object["metadata"]["resourceVersion"] = rv.to_string().into();
            s.emit(rv, resource, "DELETED", object);
        }
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        self.lock().objects.get(&key).cloned()
    }

    /// Ends every open watch; watches from before now get `410 Gone`, so watchers list again.
    pub fn expire(&self) {
        let mut s = self.lock();
        s.expired_below = s.rv + 1;
        s.watches.clear();
    }

    /// Takes the API away (503 to everything, open watches end) or brings it back.
    pub fn set_down(&self, down: bool) {
        let mut s = self.lock();
        s.down = down;
        if down {
            s.watches.clear();
        }
    }

    /// A service-account token for `audience`, of `username`, bound to a pod (name, uid).
    /// A token shaped as a projected service-account token (a JWT) of `username` for
    /// `audience`, expiring `ttl_secs` from now (negative: already expired); `nonce` tells
    /// tokens apart. The signature is not real: this API answers TokenReviews by the token's
    /// text (see [`FakeApi::issue_token`]).
    pub fn jwt(audience: &str, username: &str, ttl_secs: i64, nonce: &str) -> String {
        use base64::Engine as _;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let part = |v: Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        format!(
            "{}.{}.{}",
            part(serde_json::json!({ "alg": "RS256", "kid": "fake" })),
            part(serde_json::json!({
                "aud": [audience], "sub": username, "exp": now + ttl_secs,
                "iat": now, "jti": nonce, "iss": "https://kubernetes.default.svc",
            })),
            part(serde_json::json!("not a signature")),
        )
    }

    pub fn issue_token(&self, token: &str, audience: &str, username: &str, pod: (&str, &str)) {
        let user = json!({ "username": username, "extra": {
            "authentication.kubernetes.io/pod-name": [pod.0],
            "authentication.kubernetes.io/pod-uid": [pod.1] } });
        self.lock()
            .tokens
            .insert(token.to_owned(), (audience.to_owned(), user));
    }

    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    async fn answer(&self, request: Request<Body>) -> Response<FakeBody> {
        let (parts, body) = request.into_parts();
        let body = body.collect_bytes().await.unwrap_or_default();
        self.respond(&parts, &body)
    }

    /// Answers plain HTTP/1.1 on `listener` (a loopback port) until the returned task is
    /// aborted or the runtime ends.
    pub fn serve(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let api = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let api = api.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let api = api.clone();
                            async move {
                                let (parts, body) = request.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                Ok::<_, Infallible>(api.respond(&parts, &body))
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(stream);
                    // A client that goes away mid-watch ends its connection; nothing to report.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        })
    }

    /// A kubeconfig that points kube's `Client::try_default` (through `KUBECONFIG`) at the
    /// fake served on `addr`.
    pub fn kubeconfig(addr: std::net::SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake\n"
        )
    }

    fn respond(&self, parts: &http::request::Parts, body: &Bytes) -> Response<FakeBody> {
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let mut s = self.lock();
        s.requests.push(format!("{} {path}?{query}", parts.method));
        if s.down {
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                failure(503, "ServiceUnavailable", "the fake API is down"),
            );
        }
        let Target {
            resource,
            namespace,
            name,
            status,
        } = parse_path(&path);
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .map(str::to_owned)
        };
        match (parts.method.as_str(), name) {
            ("GET", None) if param("watch").as_deref() == Some("true") => {
                let from: u64 = param("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (tx, rx) = mpsc::unbounded_channel();
                if from < s.expired_below {
                    let gone = failure(410, "Expired", "too old resource version");
                    let _ = tx.send(line("ERROR", &gone));
                } else {
                    let filter = Selector::parse(param("fieldSelector"));
                    for (rv, r, kind, object) in &s.events {
                        if *rv > from && *r == resource && filter.matches(object) {
                            let _ = tx.send(line(kind, object));
                        }
                    }
                    s.watches.push(Watcher {
                        resource,
                        filter,
                        events: tx,
                    });
                }
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(UnboundedReceiverStream::new(rx)).boxed_unsync())
                    .unwrap_or_default()
            }
            ("GET", None) => {
                let filter = Selector::parse(param("fieldSelector"));
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((r, _, _), o)| *r == resource && filter.matches(o))
                    .map(|(_, o)| o.clone())
                    .collect();
                full(
                    StatusCode::OK,
                    json!({ "kind": "List", "apiVersion": "v1",
                            "metadata": { "resourceVersion": s.rv.to_string() }, "items": items }),
                )
            }
            ("POST", None) if resource == "tokenreviews" => {
                let review: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let token = review["spec"]["token"].as_str().unwrap_or("");
                let wanted: Vec<&str> = review["spec"]["audiences"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                // As the API server: a token is valid only for the audiences it was issued for.
                let status = match s.tokens.get(token) {
                    Some((audience, user)) if wanted.contains(&audience.as_str()) => {
                        json!({ "authenticated": true, "user": user, "audiences": [audience] })
                    }
                    Some(_) => json!({ "authenticated": false,
                                       "error": "token audiences are invalid for the target audiences" }),
                    None => json!({ "authenticated": false, "error": "invalid bearer token" }),
                };
                let mut answer = review.clone();
                answer["status"] = status;
                full(StatusCode::CREATED, answer)
            }
            ("PATCH", Some(name)) if status => {
                let key = (resource.clone(), namespace, name);
                let Some(mut object) = s.objects.get(&key).cloned() else {
                    return full(
                        StatusCode::NOT_FOUND,
                        failure(404, "NotFound", "no such object"),
                    );
                };
                let patch: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                merge(&mut object["status"], &patch["status"]);
                full(StatusCode::OK, s.store(&resource, object))
            }
            ("GET", Some(name)) => match s.objects.get(&(resource, namespace, name)) {
                Some(object) => full(StatusCode::OK, object.clone()),
                None => full(
                    StatusCode::NOT_FOUND,
                    failure(404, "NotFound", "no such object"),
                ),
            },
            ("POST", None) => {
                let mut object: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
                if s.objects
                    .contains_key(&(resource.clone(), namespace.clone(), name))
                {
                    return full(
                        StatusCode::CONFLICT,
                        failure(409, "AlreadyExists", "already exists"),
                    );
                }
                object["metadata"]["namespace"] = namespace.into();
                full(StatusCode::CREATED, s.store(&resource, object))
            }
            ("PUT", Some(name)) => {
                let mut object: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let key = (resource.clone(), namespace.clone(), name);
                let current = s
                    .objects
                    .get(&key)
                    .map(|o| o["metadata"]["resourceVersion"].clone());
                // Optimistic concurrency, as the API server: the version read must still be it.
                if current != Some(object["metadata"]["resourceVersion"].clone()) {
                    return full(
                        StatusCode::CONFLICT,
                        failure(409, "Conflict", "the object has been modified"),
                    );
                }
                object["metadata"]["namespace"] = namespace.into();
                full(StatusCode::OK, s.store(&resource, object))
            }
            _ => full(
                StatusCode::NOT_FOUND,
                failure(
                    404,
                    "NotFound",
                    &format!("the fake API does not serve {path}"),
                ),
            ),
        }
    }
}

impl State {
    /// Creates or replaces `object` with the next resource version, and tells the watches.
    /// Returns it as stored.
    fn store(&mut self, resource: &str, mut object: Value) -> Value {
        self.rv += 1;
        let rv = self.rv;
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        let key = (resource.to_owned(), ns, name.clone());
        let uid = match self.objects.get(&key) {
            Some(old) => old["metadata"]["uid"].clone(),
            None => object["metadata"]["uid"].clone(),
        };
        let uid = uid
            .as_str()
            .map_or_else(|| format!("uid-{name}"), str::to_owned);
        let (kind, generation) = match self.objects.get(&key) {
            Some(old) => {
                let bump = old.get("spec") != object.get("spec");
                let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                // Writes of the whole object keep what the status subresource holds.
                if let Some(status) = old.get("status").filter(|_| object.get("status").is_none()) {
                    object["status"] = status.clone();
                }
                ("MODIFIED", if bump { g + 1 } else { g })
            }
            None => ("ADDED", 1),
        };
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        object["metadata"]["generation"] = generation.into();
        object["metadata"]["uid"] = uid.into();
        self.objects.insert(key, object.clone());
        self.emit(rv, resource, kind, object.clone());
        object
    }

    fn emit(&mut self, rv: u64, resource: &str, kind: &'static str, object: Value) {
        self.watches.retain(|w| {
            w.resource != resource
                || !w.filter.matches(&object)
                || w.events.send(line(kind, &object)).is_ok()
        });
        self.events.push((rv, resource.to_owned(), kind, object));
    }
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in fields {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}
