//! The sandbox's scenario on two nodes, for the tests of what an operator sees (`mycel`, the
//! dashboard): order and analytics on n1, payment on n2 with a server on [`PORT`], and
//! analytics denied payment by the AccessPolicy default/block-analytics.

use crate::{
    app::Server,
    mesh::{mesh_config_yaml, workloads_yaml},
    ControlPlane, MeshNode, NodeSpec, Topology,
};

/// Where payment's server listens.
pub const PORT: u16 = 8080;
/// The SPIFFE IDs' prefix in the default namespace.
pub const TD: &str = "spiffe://cluster.local/ns/default/sa";

/// default/block-analytics: Deny to payment from analytics, and from each of `more`
/// identities (names of service accounts) as a rule of its own.
pub fn block_analytics(more: &[&str]) -> String {
    let rules: Vec<String> = std::iter::once("analytics")
        .chain(more.iter().copied())
        .map(|sa| format!("{{ sourceIdentities: ['{TD}/{sa}'] }}"))
        .collect();
    format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{ name: block-analytics, namespace: default }}\nspec:\n  selector: {{ matchLabels: {{ app: payment }} }}\n  action: Deny\n  rules: [{}]\n",
        rules.join(", ")
    )
}

/// The mesh, running; dropped daemons first, the topology last.
pub struct Demo {
    pub n1: MeshNode,
    pub n2: MeshNode,
    pub cp: ControlPlane,
    pub server: Server,
    pub topo: Topology,
}

impl Demo {
    /// Starts it, mesh-cp's scratch directory named after `test`, and waits until both nodes
    /// have enrolled their workloads with certificates.
    pub fn start(test: &str) -> Self {
        let mut topo = Topology::new(&[
            NodeSpec::new("n1", &["order", "analytics"]),
            NodeSpec::new("n2", &["payment"]),
        ])
        .expect("topology");
        let server = Server::start(topo.pod("payment"), PORT).expect("server");
        let pods = ["order", "analytics", "payment"].map(|p| topo.pod(p));
        let cp = ControlPlane::start(
            &format!("{}-{test}", topo.prefix),
            &[
                ("workloads.yaml", &workloads_yaml(&pods)),
                ("mesh.yaml", &mesh_config_yaml("tls", "")),
                ("block-analytics.yaml", &block_analytics(&[])),
            ],
        )
        .expect("mesh-cp");
        let n1 = MeshNode::join(&mut topo, "n1", &cp, 2).expect("mesh-node n1");
        let n2 = MeshNode::join(&mut topo, "n2", &cp, 1).expect("mesh-node n2");
        Self {
            n1,
            n2,
            cp,
            server,
            topo,
        }
    }
}
