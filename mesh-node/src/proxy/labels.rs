//! A connection's workload pair, as the metrics and the access log name it, from the
//! directory's peers: the metrics take label values, not the proxy's types.

use super::directory::Peer;
use crate::metrics::Pair;

/// The application `peer` is a replica of, for the labels.
pub fn workload_of(peer: &Peer) -> &str {
    mesh_model::application(&peer.labels, &peer.key.name)
}

/// Fills a [`Pair`]'s source or destination from a peer.
pub trait PairOf: Sized {
    fn with_source(self, peer: &Peer) -> Self;
    fn with_destination(self, peer: &Peer) -> Self;
}

impl PairOf for Pair {
    fn with_source(mut self, peer: &Peer) -> Self {
        self.source_workload = workload_of(peer).to_owned();
        self.source_pod.clone_from(&peer.key.name);
        self.source_namespace.clone_from(&peer.key.namespace);
        self.source_identity.clone_from(&peer.identity_uri);
        self
    }

    fn with_destination(mut self, peer: &Peer) -> Self {
        self.destination_workload = workload_of(peer).to_owned();
        self.destination_pod.clone_from(&peer.key.name);
        self.destination_namespace.clone_from(&peer.key.namespace);
        self.destination_identity.clone_from(&peer.identity_uri);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus::Registry;

    use super::*;
    use crate::{
        access_log::AccessLog,
        metrics::{ConnectionMetrics, Details, Reporter},
        workloads::WorkloadId,
    };

    fn peer(name: &str, labels: &[(&str, &str)]) -> Peer {
        let identity = mesh_model::SpiffeId::new("cluster.local", "ns", "sa");
        Peer {
            key: WorkloadId {
                namespace: "ns".into(),
                name: name.into(),
            },
            identity_uri: identity.to_string(),
            identity,
            addresses: Vec::new(),
            node: "n1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// Replicas of one application share its series; pods are labels only when asked for.
    #[test]
    fn workloads_are_applications_and_pods_are_labels_only_on_request() {
        let web1 = peer("web-1", &[("app", "web")]);
        let web2 = peer(
            "web-2",
            &[("app", "web"), ("app.kubernetes.io/name", "shop")],
        );
        let db = peer("db-0", &[("tier", "data")]);
        let a = Pair::default().with_source(&web1).with_destination(&db);
        assert_eq!(
            (a.source_workload.as_str(), a.source_pod.as_str()),
            ("web", "web-1")
        );
        assert_eq!(
            (a.destination_workload.as_str(), a.destination_pod.as_str()),
            ("db-0", "db-0"),
            "no application label: the object's name"
        );
        let b = Pair::default().with_source(&web2);
        assert_eq!(b.source_workload, "shop", "app.kubernetes.io/name first");

        let names = |pods: bool| {
            let registry = Registry::new();
            let m =
                ConnectionMetrics::register(&registry, Arc::new(AccessLog::off()), pods).unwrap();
            let one = Pair::default().with_source(&web1).with_destination(&db);
            let two = Pair::default()
                .with_source(&peer("web-2", &[("app", "web")]))
                .with_destination(&db);
            drop(m.opened(Reporter::Source, &one, Details::default()));
            drop(m.opened(Reporter::Source, &two, Details::default()));
            let families = registry.gather();
            let opened = families
                .iter()
                .find(|f| f.name() == "mycel_tcp_connections_opened_total")
                .expect("opened family");
            let series: Vec<Vec<String>> = opened
                .get_metric()
                .iter()
                .map(|m| m.get_label().iter().map(|l| l.name().to_owned()).collect())
                .collect();
            series
        };
        let plain = names(false);
        assert_eq!(plain.len(), 1, "two replicas of web, one series: {plain:?}");
        assert!(!plain[0].iter().any(|l| l.ends_with("_pod")), "{plain:?}");
        let with_pods = names(true);
        assert_eq!(with_pods.len(), 2, "a series per pod: {with_pods:?}");
        for labels in &with_pods {
            assert!(labels.contains(&"source_pod".to_owned()), "{labels:?}");
            assert!(labels.contains(&"destination_pod".to_owned()), "{labels:?}");
        }
    }
}
