//! Universal mode on several hosts: the mesh's config kept in etcd (`--etcd-endpoints`).
//!
//! Each object (a MeshConfig, Workload, Service, AccessPolicy, TrafficPolicy or ServiceRoute)
//! is one key, `PREFIX/config/objects/KIND/NAMESPACE/NAME` (the MeshConfig:
//! `PREFIX/config/objects/MeshConfig`), its value the object's YAML. `mesh-cp apply` and
//! `mesh-cp delete` write them (`apply.rs`), checked as the config dir is, in one transaction
//! that also rewrites `PREFIX/config/written`: every replica sees a change whole or not at
//! all. Replicas read and watch `PREFIX/config/` (`source.rs`).
//!
//! The config version is the store's revision of the last change under `PREFIX/config/`
//! (`config/written` is rewritten by every apply and delete, so a delete counts too): one
//! version names one config on every replica, whether it followed the changes or read them
//! at start, and it never goes back, whichever replica restarts. `PREFIX/epoch` (made once,
//! random) tells this store's versions from any other's, so that a node resumes from its
//! version on another replica but never across stores. A node that holds a later version
//! than a replica has read is refused by that replica (it moves to another), so that a
//! lagging replica never takes it back. Objects changed in etcd by hand, not by apply or
//! delete, are applied but warned of: a delete by hand would not move the version of a
//! replica that reads the store afterwards.
//!
//! Join tokens are kept there too (`tokens.rs`), so that a node authenticates to any replica;
//! and, unless each replica is given it as files, the CA (`ca.rs`, its key sealed), made once
//! by the leader the replicas elect with an etcd lease (`leader.rs`).

pub mod apply;
pub mod ca;
mod follow;
pub mod leader;
mod objects;
pub mod source;
pub mod tokens;

use std::path::PathBuf;

use mesh_etcd::{ops, pb::TxnRequest, Client};
use mesh_model::ObjectKey;

pub use objects::{read_inputs, Object};

/// The kinds of object the store keeps, as documents name them.
pub const KINDS: [&str; 6] = [
    "MeshConfig",
    "Workload",
    "Service",
    "AccessPolicy",
    "TrafficPolicy",
    "ServiceRoute",
];

/// The objects `mesh-cp delete` names: a kind (any case), then NAMESPACE/NAME (or NAME, in
/// `default`) for each; the MeshConfig alone.
pub fn named(words: &[String]) -> Result<Vec<(&'static str, Option<ObjectKey>)>, String> {
    let Some((kind, names)) = words.split_first() else {
        return Err("name a kind and its objects: KIND NAMESPACE/NAME ...".into());
    };
    let Some(kind) = KINDS.iter().find(|k| k.eq_ignore_ascii_case(kind)) else {
        return Err(format!("{kind:?} is not one of {}", KINDS.join(", ")));
    };
    if *kind == "MeshConfig" {
        if !names.is_empty() {
            return Err("a mesh has one MeshConfig: name no object after it".into());
        }
        return Ok(vec![(kind, None)]);
    }
    if names.is_empty() {
        return Err(format!(
            "name the {kind} objects to delete: NAMESPACE/NAME ..."
        ));
    }
    names
        .iter()
        .map(|n| {
            let (namespace, name) = n.split_once('/').unwrap_or(("default", n));
            for part in [namespace, name] {
                if !mesh_model::is_dns_label(part) {
                    return Err(format!(
                        "{n:?}: {part:?} is not a name (a DNS label: a-z, 0-9, '-', at most 63)"
                    ));
                }
            }
            Ok((*kind, Some(ObjectKey::new(namespace, name))))
        })
        .collect()
}

/// Where Mycel's keys start unless `--etcd-prefix` says otherwise.
pub const DEFAULT_PREFIX: &str = "/mycel";

/// How to reach etcd: the flags of `serve`, `apply` and `delete`.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd's client URLs, comma-separated (http://HOST:PORT or https://HOST:PORT). The mesh's
    /// config, and its version, are kept there, so that several mesh-cp replicas serve one
    /// mesh.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub etcd_endpoints: Vec<String>,
    /// Where Mycel's keys start in etcd: several meshes may share one etcd, each under its
    /// own prefix.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// The CA certificate (PEM) that signed etcd's serving certificates: for https endpoints.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd, if it asks for one (--client-cert-auth).
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Etcd(#[from] mesh_etcd::Error),
    #[error("--etcd-prefix {0:?}: {1}")]
    Prefix(String, &'static str),
    #[error("{key} in etcd: {reason}")]
    Corrupt { key: String, reason: String },
}

/// The keys of one mesh in etcd.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Result<Self, StoreError> {
        let bad = |why| Err(StoreError::Prefix(prefix.to_owned(), why));
        if !prefix.starts_with('/') {
            return bad("it must start with '/'");
        }
        if prefix.len() > 1 && prefix.ends_with('/') {
            return bad("it must not end with '/'");
        }
        if prefix.len() > 128 || !prefix.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("it must be at most 128 printable ASCII characters");
        }
        Ok(Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
        })
    }

    /// Everything a replica watches: the objects and the write marker.
    pub fn config(&self) -> String {
        format!("{}/config/", self.prefix)
    }

    pub fn objects(&self) -> String {
        format!("{}/config/objects/", self.prefix)
    }

    /// Rewritten by every apply and delete: what a transaction compares against so that two
    /// writers never both build on the same state.
    pub fn written(&self) -> String {
        format!("{}/config/written", self.prefix)
    }

    pub fn epoch(&self) -> String {
        format!("{}/epoch", self.prefix)
    }

    /// The replica that leads, attached to its lease.
    pub fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// The CA, when the replicas keep it in etcd (its private key sealed).
    pub fn ca(&self) -> String {
        format!("{}/ca", self.prefix)
    }

    /// Join tokens, one key per token id, each holding its record (JSON, the secret hashed).
    pub fn tokens(&self) -> String {
        format!("{}/tokens/", self.prefix)
    }

    /// The key of an object of `kind`: the MeshConfig has none of its own (one per mesh).
    pub fn object(&self, kind: &str, key: Option<&ObjectKey>) -> String {
        match key {
            Some(k) => format!("{}{kind}/{}/{}", self.objects(), k.namespace, k.name),
            None => format!("{}{kind}", self.objects()),
        }
    }

    /// The object a key names, as `KIND NAMESPACE/NAME` (or `KIND`), for messages.
    pub fn describe(&self, key: &str) -> String {
        let rest = key.strip_prefix(&self.objects()).unwrap_or(key);
        match rest.split_once('/') {
            Some((kind, name)) => format!("{kind} {name}"),
            None => rest.to_owned(),
        }
    }
}

/// A mesh's config in etcd.
#[derive(Clone)]
pub struct Store {
    pub client: Client,
    pub layout: Layout,
}

impl Store {
    pub fn new(args: &EtcdArgs) -> Result<Self, StoreError> {
        let mut options = mesh_etcd::Options::new(args.etcd_endpoints.clone());
        options.tls = args.etcd_ca.as_ref().map(|ca| mesh_etcd::Tls {
            ca: ca.clone(),
            cert: args.etcd_cert.clone(),
            key: args.etcd_key.clone(),
        });
        if options.tls.is_none() && args.etcd_cert.is_some() {
            return Err(mesh_etcd::Error::Endpoint(
                "--etcd-cert needs --etcd-ca, the CA of etcd's certificates".into(),
            )
            .into());
        }
        Ok(Self {
            client: Client::new(&options)?,
            layout: Layout::new(&args.etcd_prefix)?,
        })
    }

    /// [`Store::epoch`], waiting (and saying so) while etcd does not answer.
    pub async fn epoch_when_answered(&self) -> Result<u64, StoreError> {
        when_answered(|| self.epoch()).await
    }

    /// This store's epoch: made (random) by the first replica that asks, read by the rest.
    pub async fn epoch(&self) -> Result<u64, StoreError> {
        let key = self.layout.epoch();
        let mine = crate::state::random_epoch();
        // Put only if absent; either way, read it back in the same transaction.
        let request = TxnRequest {
            compare: vec![ops::absent(key.as_bytes())],
            success: vec![ops::put(key.as_bytes(), mine.to_string().into_bytes(), 0)],
            failure: vec![],
        };
        if self.client.txn(request).await?.succeeded {
            return Ok(mine);
        }
        let (kv, _) = self.client.get(key.as_bytes()).await?;
        let value = kv.map(|kv| kv.value).unwrap_or_default();
        std::str::from_utf8(&value)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| StoreError::Corrupt {
                key,
                reason: "not a number: remove it, and nodes take a full copy of the config once"
                    .into(),
            })
    }
}

/// What `call` gives once etcd answers it: tried again (1 s, doubling to 10 s, saying so
/// each time) while etcd cannot be reached; any other error at once.
pub async fn when_answered<T, F>(mut call: impl FnMut() -> F) -> Result<T, StoreError>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut wait = follow::RETRY_FIRST;
    loop {
        match call().await {
            Err(StoreError::Etcd(e)) if e.is_unavailable() => {
                tracing::warn!(error = %e, "waiting for etcd to answer before serving");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(follow::RETRY_MOST);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_object_under_the_prefix() {
        let l = Layout::new("/mycel").unwrap();
        let key = ObjectKey::new("shop", "no-client");
        assert_eq!(
            l.object("AccessPolicy", Some(&key)),
            "/mycel/config/objects/AccessPolicy/shop/no-client"
        );
        assert_eq!(
            l.object("MeshConfig", None),
            "/mycel/config/objects/MeshConfig"
        );
        assert_eq!(
            l.describe("/mycel/config/objects/AccessPolicy/shop/no-client"),
            "AccessPolicy shop/no-client"
        );
        assert!(l.written().starts_with(&l.config()));
        assert!(l.objects().starts_with(&l.config()));
        assert!(!l.epoch().starts_with(&l.config()));
        for bad in ["mycel", "/mycel/", "/my cel", ""] {
            assert!(Layout::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Layout::new("/").unwrap().objects(), "/config/objects/");
    }

    #[test]
    fn delete_names_a_kind_then_its_objects() {
        let words = |w: &[&str]| named(&w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            words(&["accesspolicy", "shop/a", "b"]).unwrap(),
            [
                ("AccessPolicy", Some(ObjectKey::new("shop", "a"))),
                ("AccessPolicy", Some(ObjectKey::new("default", "b")))
            ]
        );
        assert_eq!(words(&["MeshConfig"]).unwrap(), [("MeshConfig", None)]);
        for (bad, says) in [
            (&["Pod", "a"][..], "not one of"),
            (&["Workload"], "name the Workload"),
            (&["MeshConfig", "x"], "one MeshConfig"),
            (&["Service", "shop/Bad_Name"], "not a name"),
            (&[], "name a kind"),
        ] {
            let err = words(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }
}
