//! Who a calling node is. Universal mode: a join token from `mesh-cp token create`, issued to
//! one node. Kubernetes: the node daemon's service-account token for the audience `mycel-cp`,
//! checked with a TokenReview; the token is bound to the daemon's pod, and the node is that
//! pod's `spec.nodeName` (so a token taken from one node's daemon never speaks for another).
//!
//! Anyone who reaches the gRPC port can present a token, so what a stranger can make this
//! cost is bounded: a service-account token must look right before the API server is asked
//! (a JWT for our audience, of the daemon's service account, not expired: checked locally,
//! without its signature, which the TokenReview then checks); each address gets a few
//! TokenReviews and failed join tokens, then one every two seconds (`peer_limits.rs`); the
//! answers kept are bounded in number.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine as _;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{
    api::PostParams,
    runtime::reflector::{ObjectRef, Store},
    Api, Client,
};
use sha2::{Digest, Sha256};

use crate::{
    peer_limits::PeerLimits,
    tokens::{TokenStore, Verified},
};

/// The audience the node daemon's projected token is issued for (see deploy/).
pub const AUDIENCE: &str = "mycel-cp";
/// How long a TokenReview's answer is reused: open streams re-check every few seconds.
const REVIEW_TTL: Duration = Duration::from_secs(60);
/// TokenReview answers kept at most (one per token a node presents; a node has one).
const REVIEWS_KEPT: usize = 4096;
/// The longest bearer token read; Kubernetes' are about 1 KiB.
const MAX_TOKEN: usize = 16 * 1024;
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// The pod a valid service-account token is bound to.
#[derive(Debug, Clone)]
struct BoundPod {
    namespace: String,
    name: String,
    uid: String,
}

/// What a TokenReview said of a token, and when (answers are reused for [`REVIEW_TTL`]).
type Reviews = HashMap<[u8; 32], (Instant, Result<BoundPod, AuthError>)>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a credential of this mesh.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid credential, but not for the node it claims to be.
    #[error("{0}")]
    PermissionDenied(String),
    /// Cannot tell right now.
    #[error("{0}")]
    Unavailable(String),
    /// This address has made too many attempts; it may try again shortly.
    #[error("{0}")]
    Throttled(String),
}

impl AuthError {
    /// The bounded label the metrics give it.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Unauthenticated(_) => "unauthenticated",
            AuthError::PermissionDenied(_) => "permission_denied",
            AuthError::Unavailable(_) => "unavailable",
            AuthError::Throttled(_) => "throttled",
        }
    }
}

enum Method {
    JoinTokens(TokenStore),
    Kubernetes(Arc<TokenReviewer>),
}

pub struct NodeAuth {
    method: Method,
    /// What each address may still try, and how many streams it holds.
    pub peers: Arc<PeerLimits>,
}

impl NodeAuth {
    pub fn join_tokens(store: TokenStore) -> Self {
        Self {
            method: Method::JoinTokens(store),
            peers: Arc::default(),
        }
    }

    pub fn kubernetes(reviewer: Arc<TokenReviewer>) -> Self {
        Self {
            method: Method::Kubernetes(reviewer),
            peers: Arc::default(),
        }
    }

    /// The node `token` speaks for, if it is `claimed`; `peer` is the caller's address,
    /// which the attempts that cost or fail are counted against.
    pub async fn verify(
        &self,
        token: &str,
        claimed: &str,
        peer: Option<IpAddr>,
    ) -> Result<String, AuthError> {
        if token.len() > MAX_TOKEN {
            return Err(AuthError::Unauthenticated(format!(
                "the token is over {MAX_TOKEN} bytes"
            )));
        }
        match &self.method {
            Method::JoinTokens(store) => {
                // Checking a join token costs a hash: a valid one is always taken (nodes
                // behind one NAT with a broken neighbour still join), and a failure costs the
                // address an attempt; out of them, its failures are only counted, not logged.
                let verdict = join_token(store, token, claimed);
                if matches!(
                    verdict,
                    Err(AuthError::Unauthenticated(_) | AuthError::PermissionDenied(_))
                ) && peer.is_some_and(|p| !self.peers.attempt(p))
                {
                    return Err(throttled());
                }
                verdict
            }
            Method::Kubernetes(reviewer) => {
                reviewer.verify(token, claimed, peer, &self.peers).await
            }
        }
    }
}

fn throttled() -> AuthError {
    AuthError::Throttled(
        "too many authentication attempts from this address; try again in a few seconds".into(),
    )
}

fn join_token(store: &TokenStore, token: &str, claimed: &str) -> Result<String, AuthError> {
    match store.verify(token) {
        Ok(Verified::Valid(node)) if node == claimed => Ok(node),
        Ok(Verified::Valid(node)) => Err(AuthError::PermissionDenied(format!(
            "this join token was issued to node {node}, not {claimed}"
        ))),
        Ok(Verified::Expired { node, at }) => Err(AuthError::Unauthenticated(format!(
            "the join token of node {node} expired at {} (unix seconds); issue a new one with `mesh-cp token create`",
            at
        ))),
        Ok(Verified::Unknown) => Err(AuthError::Unauthenticated(
            "unknown or revoked join token".into(),
        )),
        Err(e) => {
            tracing::error!(error = %e, "cannot check join tokens");
            Err(AuthError::Unavailable(
                "the control plane cannot read its token store".into(),
            ))
        }
    }
}

/// Checks node daemons' service-account tokens with the API server.
pub struct TokenReviewer {
    client: Client,
    /// `system:serviceaccount:<namespace>:<name>` of the node daemon.
    username: String,
    /// Every pod, from the control plane's watch: the node a token's pod runs on.
    pods: Store<Pod>,
    /// By the SHA-256 of the token.
    reviewed: Mutex<Reviews>,
}

impl TokenReviewer {
    /// `service_account` is the node daemon's, `namespace/name`.
    pub fn new(client: Client, service_account: (&str, &str), pods: Store<Pod>) -> Self {
        let (ns, name) = service_account;
        Self {
            client,
            username: format!("system:serviceaccount:{ns}:{name}"),
            pods,
            reviewed: Mutex::default(),
        }
    }

    pub async fn verify(
        &self,
        token: &str,
        claimed: &str,
        peer: Option<IpAddr>,
        peers: &PeerLimits,
    ) -> Result<String, AuthError> {
        let BoundPod {
            namespace: ns,
            name: pod_name,
            uid: pod_uid,
        } = self.review(token, peer, peers).await?;
        let pod = self
            .pods
            .get(&ObjectRef::new(&pod_name).within(&ns))
            .ok_or_else(|| {
                AuthError::PermissionDenied(format!(
                    "the token's pod {ns}/{pod_name} does not exist (any more)"
                ))
            })?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(AuthError::PermissionDenied(format!(
                "the token's pod {ns}/{pod_name} was replaced"
            )));
        }
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if node != claimed {
            return Err(AuthError::PermissionDenied(format!(
                "the token's pod {ns}/{pod_name} runs on node {node:?}, not {claimed}"
            )));
        }
        Ok(node)
    }

    /// The pod a valid token is bound to, from the API server (or a recent answer).
    async fn review(
        &self,
        token: &str,
        peer: Option<IpAddr>,
        peers: &PeerLimits,
    ) -> Result<BoundPod, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((at, answer)) = self.lock().get(&digest) {
            if at.elapsed() < REVIEW_TTL {
                return answer.clone();
            }
        }
        // Only what could be the daemon's token reaches the API server, and only so often
        // from one address and from all of them; a token that does not look right costs an
        // attempt too (and, once they are out, no log line).
        let first_look = looks_right(token, &self.username, std::time::SystemTime::now());
        if peer.is_some_and(|p| !peers.attempt(p)) {
            return Err(throttled());
        }
        first_look?;
        if !peers.review() {
            return Err(AuthError::Unavailable(
                "too many token checks with the Kubernetes API right now; try again shortly".into(),
            ));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let status = match api.create(&PostParams::default(), &review).await {
            Ok(r) => r.status.unwrap_or_default(),
            Err(e) => {
                // Not cached: the next call asks again.
                tracing::warn!(error = %e, "TokenReview failed");
                return Err(AuthError::Unavailable(format!(
                    "cannot check the token with the Kubernetes API: {e}"
                )));
            }
        };
        let answer = self.judge(&status);
        let mut cache = self.lock();
        cache.retain(|_, (at, _)| at.elapsed() < REVIEW_TTL);
        if cache.len() >= REVIEWS_KEPT {
            // Keep the newest: drop the oldest tenth.
            let mut ages: Vec<Instant> = cache.values().map(|(at, _)| *at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 10];
            cache.retain(|_, (at, _)| *at > cut);
        }
        cache.insert(digest, (Instant::now(), answer.clone()));
        answer
    }

    /// What a TokenReview's status says of the token.
    fn judge(&self, status: &TokenReviewStatus) -> Result<BoundPod, AuthError> {
        if status.authenticated != Some(true) {
            let why = status
                .error
                .clone()
                .unwrap_or_else(|| "not authenticated".into());
            return Err(AuthError::Unauthenticated(format!(
                "the Kubernetes API refused the token: {why}"
            )));
        }
        if !status.audiences.iter().flatten().any(|a| a == AUDIENCE) {
            return Err(AuthError::Unauthenticated(format!(
                "the token is not for the audience {AUDIENCE}"
            )));
        }
        let user = status.user.clone().unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            return Err(AuthError::PermissionDenied(format!(
                "{username} is not the node daemon's service account ({})",
                self.username
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(AuthError::Unauthenticated(
                "the token is not bound to a pod (use a projected service-account token)".into(),
            ));
        };
        let namespace = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split(':').next())
            .unwrap_or_default()
            .to_owned();
        Ok(BoundPod {
            namespace,
            name: pod,
            uid,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reviews> {
        self.reviewed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What can be told of a projected service-account token without the API server: it is
/// a JWT for [`AUDIENCE`], of the node daemon's service account, and not expired. Its
/// signature is not checked here; the TokenReview does that.
pub fn looks_right(
    token: &str,
    username: &str,
    now: std::time::SystemTime,
) -> Result<(), AuthError> {
    let not_jwt = || {
        AuthError::Unauthenticated(
            "not a Kubernetes service-account token (a JWT of three base64url parts)".into(),
        )
    };
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_jwt());
    };
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| not_jwt())?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).map_err(|_| not_jwt())?;
    let audiences: Vec<&str> = match &claims["aud"] {
        serde_json::Value::String(a) => vec![a.as_str()],
        serde_json::Value::Array(list) => list.iter().filter_map(|a| a.as_str()).collect(),
        _ => Vec::new(),
    };
    if !audiences.contains(&AUDIENCE) {
        return Err(AuthError::Unauthenticated(format!(
            "the token is not for the audience {AUDIENCE} (its audiences: {audiences:?})"
        )));
    }
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match claims["exp"].as_u64() {
        Some(exp) if exp > now => {}
        Some(exp) => {
            return Err(AuthError::Unauthenticated(format!(
                "the token expired at {exp} (unix seconds)"
            )))
        }
        None => return Err(not_jwt()),
    }
    if let Some(sub) = claims["sub"].as_str() {
        if sub != username {
            return Err(AuthError::PermissionDenied(format!(
                "{sub} is not the node daemon's service account ({username})"
            )));
        }
    }
    Ok(())
}
