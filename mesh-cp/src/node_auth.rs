//! Who a calling node is. Universal mode: a join token from `mesh-cp token create`, issued to
//! one node. Kubernetes: the node daemon's service-account token for the audience `mycel-cp`,
//! checked with a TokenReview; the token is bound to the daemon's pod, and the node is that
//! pod's `spec.nodeName` (so a token taken from one node's daemon never speaks for another).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

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

use crate::tokens::TokenStore;

/// The audience the node daemon's projected token is issued for (see deploy/).
pub const AUDIENCE: &str = "mycel-cp";
/// How long a TokenReview's answer is reused: open streams re-check every few seconds.
const REVIEW_TTL: Duration = Duration::from_secs(60);
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
}

pub enum NodeAuth {
    JoinTokens(TokenStore),
    Kubernetes(Arc<TokenReviewer>),
}

impl NodeAuth {
    /// The node `token` speaks for, if it is `claimed`.
    pub async fn verify(&self, token: &str, claimed: &str) -> Result<String, AuthError> {
        match self {
            NodeAuth::JoinTokens(store) => match store.verify(token) {
                Ok(Some(node)) if node == claimed => Ok(node),
                Ok(Some(node)) => Err(AuthError::PermissionDenied(format!(
                    "this join token was issued to node {node}, not {claimed}"
                ))),
                Ok(None) => Err(AuthError::Unauthenticated(
                    "unknown or revoked join token".into(),
                )),
                Err(e) => {
                    tracing::error!(error = %e, "cannot check join tokens");
                    Err(AuthError::Unavailable(
                        "the control plane cannot read its token store".into(),
                    ))
                }
            },
            NodeAuth::Kubernetes(reviewer) => reviewer.verify(token, claimed).await,
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

    pub async fn verify(&self, token: &str, claimed: &str) -> Result<String, AuthError> {
        let BoundPod {
            namespace: ns,
            name: pod_name,
            uid: pod_uid,
        } = self.review(token).await?;
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
    async fn review(&self, token: &str) -> Result<BoundPod, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((at, answer)) = self.lock().get(&digest) {
            if at.elapsed() < REVIEW_TTL {
                return answer.clone();
            }
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
