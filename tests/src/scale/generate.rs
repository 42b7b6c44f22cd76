//! The mesh a scale run serves: nodes, workloads spread over them, services selecting them
//! and access policies, as YAML for mesh-cp's config dir, with what the run needs to know
//! about it (which nodes a change concerns).

use std::fmt::Write as _;

/// The shape of the generated mesh.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Shape {
    pub nodes: usize,
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
    pub namespaces: usize,
}

impl Shape {
    /// A mesh of `nodes` and `workloads` with the proportions: one service per 10
    /// workloads, one policy per 40, in namespaces of about 400 workloads. `namespaces`
    /// divides `services` so that a service's selector finds its workloads in its namespace.
    pub fn new(nodes: usize, workloads: usize) -> Self {
        let services = (workloads / 10).max(1);
        let mut namespaces = (workloads / 400).clamp(1, services);
        while !services.is_multiple_of(namespaces) {
            namespaces -= 1;
        }
        Self {
            nodes: nodes.max(1),
            workloads: workloads.max(1),
            services,
            policies: (workloads / 40).clamp(1, services),
            namespaces,
        }
    }

    pub fn node(&self, i: usize) -> String {
        format!("node-{i}")
    }

    /// Where workload `i` runs: evenly, and a service's workloads on different nodes.
    pub fn node_of(&self, i: usize) -> usize {
        (i + i / self.services) % self.nodes
    }

    fn namespace(&self, i: usize) -> String {
        format!("ns-{}", i % self.namespaces)
    }

    /// Workload `i`'s key on the config stream.
    pub fn workload_key(&self, i: usize) -> String {
        mesh_api::keys::workload(&self.namespace(i), &format!("w-{i}"))
    }

    /// What node `n` watches when it takes workloads on demand, named in its first message:
    /// the endpoints of a Service (the next one after its own number), and an address
    /// outside the mesh.
    pub fn demand(&self, n: usize) -> super::emulator::Demand {
        let service = (n + 1) % self.services;
        super::emulator::Demand {
            keys: self
                .members(service)
                .map(|w| self.workload_key(w))
                .collect(),
            addresses: vec![std::net::IpAddr::from([10, 200, (n >> 8) as u8, n as u8])],
        }
    }

    /// The workloads of service `s` (and those policy `s` selects).
    pub fn members(&self, s: usize) -> impl Iterator<Item = usize> + '_ {
        (s..self.workloads).step_by(self.services)
    }

    /// Nodes where policy `p` selects a workload: the nodes a change to it concerns.
    pub fn policy_nodes(&self, p: usize) -> std::collections::BTreeSet<usize> {
        self.members(p).map(|w| self.node_of(w)).collect()
    }

    pub fn workload(&self, i: usize) -> String {
        let ip = 0x0a01_0000u32 + i as u32;
        format!(
            "---\napiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w-{i}, namespace: {ns}, labels: {{app: svc-{s}}}}}\nspec: {{node: {node}, netns: /run/netns/w-{i}, addresses: ['{ip}'], serviceAccount: sa-{s}}}\n",
            ns = self.namespace(i),
            s = i % self.services,
            node = self.node(self.node_of(i)),
            ip = std::net::Ipv4Addr::from(ip),
        )
    }

    fn service(&self, s: usize) -> String {
        let vip = std::net::Ipv4Addr::from(0x6440_0000u32 + s as u32);
        format!(
            "---\napiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: {ns}}}\nspec: {{vips: ['{vip}'], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: svc-{s}}}}}\n",
            ns = self.namespace(s),
        )
    }

    /// Policy `p`: its service's workloads take port `port` from the next service's.
    pub fn policy(&self, p: usize, port: u16) -> String {
        format!(
            "---\napiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: pol-{p}, namespace: {ns}}}\nspec: {{selector: {{matchLabels: {{app: svc-{p}}}}}, action: Allow, rules: [{{sourceLabels: {{app: svc-{next}}}, ports: [{port}]}}]}}\n",
            ns = self.namespace(p),
            next = (p + 1) % self.services,
        )
    }

    /// The config dir's files: workloads, services and policies.
    pub fn files(&self) -> Vec<(String, String)> {
        let mut workloads = String::with_capacity(self.workloads * 260);
        for i in 0..self.workloads {
            workloads.push_str(&self.workload(i));
        }
        let mut services = String::new();
        for s in 0..self.services {
            services.push_str(&self.service(s));
        }
        let mut policies = String::new();
        for p in 0..self.policies {
            let _ = write!(policies, "{}", self.policy(p, 8080));
        }
        vec![
            ("workloads.yaml".into(), workloads),
            ("services.yaml".into(), services),
            ("policies.yaml".into(), policies),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_find_their_workloads_in_their_namespace() {
        for (nodes, workloads) in [(100, 2_000), (1_000, 20_000), (5_000, 100_000), (3, 7)] {
            let s = Shape::new(nodes, workloads);
            assert_eq!(s.services % s.namespaces, 0, "{s:?}");
            // Workload i is in namespace i % ns and has app svc-(i % services): the service
            // of that name is in namespace (i % services) % ns, the same.
            for i in [0, 1, workloads / 2, workloads - 1] {
                assert_eq!(i % s.namespaces, (i % s.services) % s.namespaces);
            }
        }
        let s = Shape::new(100, 2_000);
        assert_eq!(s.members(3).count(), 10);
        assert_eq!(s.policy_nodes(3).len(), 10);
    }
}
