//! The mesh's CA in Kubernetes: a Secret every replica loads, created once by the leader, and
//! the trust bundle (the root certificate only) in a ConfigMap the node daemons mount to check
//! the control plane's serving certificate.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ByteString,
};
use kube::{api::PostParams, Api, Client};
use tokio::sync::watch;

use crate::ca::{Ca, CaError};

pub const SECRET: &str = "mycel-ca";
pub const BUNDLE: &str = "mycel-trust-bundle";
const CERT_KEY: &str = "ca.crt";
const KEY_KEY: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("Secret {0}: {1}")]
    Bad(String, CaError),
    #[error("Secret {0} has no {1}")]
    Missing(String, &'static str),
}

/// The CA from the Secret `namespace/mycel-ca`. Without one, the leader makes a root and
/// creates the Secret; the other replicas wait for it. A Secret that does not hold a usable CA
/// is an error: replacing it would cut every workload certificate in the mesh from its root.
pub async fn load(
    client: &Client,
    namespace: &str,
    mut leader: watch::Receiver<bool>,
    retry: Duration,
) -> Result<Ca, CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = format!("{namespace}/{SECRET}");
    loop {
        match api.get_opt(SECRET).await {
            Ok(Some(secret)) => return from_secret(&name, &secret),
            Ok(None) if *leader.borrow_and_update() => {
                let (ca, cert_pem, key_pem) =
                    Ca::generate().map_err(|e| CaSecretError::Bad(name.clone(), e))?;
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(SECRET.to_owned()),
                        ..ObjectMeta::default()
                    },
                    type_: Some("Opaque".into()),
                    data: Some(BTreeMap::from([
                        (CERT_KEY.to_owned(), ByteString(cert_pem.into_bytes())),
                        (KEY_KEY.to_owned(), ByteString(key_pem.into_bytes())),
                    ])),
                    ..Secret::default()
                };
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => {
                        tracing::info!(secret = %name, "created the mesh's root CA");
                        return Ok(ca);
                    }
                    // Another replica was first: use its CA.
                    Err(kube::Error::Api(s)) if s.code == 409 => continue,
                    Err(e) => {
                        tracing::warn!(secret = %name, error = %e, "cannot create the CA Secret; trying again")
                    }
                }
            }
            Ok(None) => {
                tracing::info!(secret = %name, "waiting for the leader to create the CA Secret")
            }
            Err(e) => {
                tracing::warn!(secret = %name, error = %e, "cannot read the CA Secret; trying again")
            }
        }
        tokio::select! {
            _ = leader.changed() => {}
            () = tokio::time::sleep(retry) => {}
        }
    }
}

fn from_secret(name: &str, secret: &Secret) -> Result<Ca, CaSecretError> {
    let field = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| CaSecretError::Missing(name.to_owned(), key))
    };
    Ca::from_pem(&field(CERT_KEY)?, &field(KEY_KEY)?, name)
        .map_err(|e| CaSecretError::Bad(name.to_owned(), e))
}

/// While this replica leads, keeps the ConfigMap `namespace/mycel-trust-bundle` holding the
/// root certificate (PEM, key `ca.crt`).
pub async fn keep_bundle(
    client: Client,
    namespace: String,
    root_pem: String,
    mut leader: watch::Receiver<bool>,
    every: Duration,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    loop {
        if *leader.borrow_and_update() {
            if let Err(e) = ensure_bundle(&api, &root_pem).await {
                tracing::warn!(configmap = %format!("{namespace}/{BUNDLE}"), error = %e, "cannot write the trust bundle; trying again");
            }
        }
        tokio::select! {
            _ = leader.changed() => {}
            () = tokio::time::sleep(every) => {}
        }
    }
}

async fn ensure_bundle(api: &Api<ConfigMap>, root_pem: &str) -> Result<(), kube::Error> {
    let data = BTreeMap::from([(CERT_KEY.to_owned(), root_pem.to_owned())]);
    match api.get_opt(BUNDLE).await? {
        Some(cm) if cm.data.as_ref() == Some(&data) => Ok(()),
        Some(mut cm) => {
            cm.data = Some(data);
            api.replace(BUNDLE, &PostParams::default(), &cm).await?;
            tracing::info!("trust bundle updated");
            Ok(())
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(BUNDLE.to_owned()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            api.create(&PostParams::default(), &cm).await?;
            tracing::info!("trust bundle published");
            Ok(())
        }
    }
}
