//! L4 authorization end to end: two nodes following one control plane, AccessPolicies written
//! into its config dir while traffic runs. Every verdict the data path reaches (in the source
//! node's kernel, or at the destination node) is compared with `mesh-cp explain`, offline
//! (config dir) and against the running control plane. The tests that cross nodes run on both
//! transports (`tls::` and `quic::`).

use std::{fs, path::PathBuf, time::Duration};

use mesh_api::v1::tunnel_response::Status;
use mesh_tests::{
    app::{self, Server},
    mesh::{mesh_config_yaml, workloads_yaml},
    tunnel::dial_as,
    ControlPlane, MeshNode, NodeSpec, Topology,
};

const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
const T: Duration = Duration::from_secs(30);
const TD: &str = "spiffe://cluster.local/ns/default/sa";
/// The pod that is not in the mesh.
const OUTSIDE: &str = "outside";

/// n1 runs `order` and `analytics`; n2 runs `payment` and `inventory`, and `outside`, which is
/// not in the mesh. The mesh pods serve PORT; payment also serves OTHER_PORT and logs each
/// connection it accepts on PORT.
struct Shop {
    cp: ControlPlane,
    n1: MeshNode,
    n2: MeshNode,
    payment_log: PathBuf,
    _servers: Vec<Server>,
    /// Last, so it is dropped last: the daemons stop cleanly (releasing their cgroup
    /// claims) before the topology's teardown kills whatever runs in its cgroups.
    topo: Topology,
}

mesh_tests::on_both_transports!(
    order_pays_analytics_is_blocked_and_a_bad_policy_changes_nothing,
    each_matcher_negations_precedence_defaults_and_dry_run,
    a_policy_change_closes_the_open_connections_it_denies,
);

fn shop(test: &str, transport: &str) -> Shop {
    let mut topo = Topology::new(&[
        NodeSpec::new("n1", &["order", "analytics"]),
        NodeSpec::new("n2", &["payment", "inventory", OUTSIDE]),
    ])
    .expect("topology");
    let payment_log = std::env::temp_dir().join(format!("{}-payment-accepts", topo.prefix));
    fs::write(&payment_log, "").expect("accept log");
    let servers = vec![
        Server::start_logging(topo.pod("payment"), PORT, &payment_log).expect("payment"),
        Server::start(topo.pod("payment"), OTHER_PORT).expect("payment other port"),
        Server::start(topo.pod("inventory"), PORT).expect("inventory"),
        Server::start(topo.pod("analytics"), PORT).expect("analytics"),
    ];
    let pods = ["order", "analytics", "payment", "inventory"].map(|p| topo.pod(p));
    let cp = ControlPlane::start(
        &format!("{}-{test}-{transport}", topo.prefix),
        &[
            ("workloads.yaml", &workloads_yaml(&pods)),
            ("mesh.yaml", &mesh_config_yaml(transport, "")),
        ],
    )
    .expect("mesh-cp");
    let n1 = MeshNode::join(&mut topo, "n1", &cp, 2).expect("mesh-node n1");
    let n2 = MeshNode::join(&mut topo, "n2", &cp, 2).expect("mesh-node n2");
    Shop {
        topo,
        cp,
        n1,
        n2,
        payment_log,
        _servers: servers,
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        // Servers first: they append to the accept log.
        self._servers.clear();
        let _ = fs::remove_file(&self.payment_log);
    }
}

impl Shop {
    /// Every tunnel n1 opened went over `transport`.
    fn assert_transport(&self, transport: &str) {
        let (tunnels, quic) = (self.n1.stat("tunnels_out"), self.n1.stat("tunnels_quic"));
        assert!(tunnels >= 1, "no tunnel was opened");
        let expected = if transport == "quic" { tunnels } else { 0 };
        assert_eq!(quic, expected, "{tunnels} tunnels, {quic} over QUIC");
    }

    /// One "ping" connection from `from` to `to`:`port` (pod IPv4); true when it got "pong".
    fn connects(&self, from: &str, to: &str, port: u16) -> bool {
        let ip = self.topo.pod(to).ipv4.to_string();
        let out = app::run(
            self.topo.pod(from),
            &["loop", &ip, &port.to_string(), "1"],
            T,
        );
        out["failures"] == 0
    }

    /// `connects`, checked against `expected` and against both forms of `mesh-cp explain`.
    fn expect(&self, case: &str, from: &str, to: &str, port: u16, expected: bool) {
        self.expect_explained(case, from, to, port, expected, &[true, false]);
    }

    /// `connects`, checked against `expected` and against `mesh-cp explain` (offline, online,
    /// or both). A client outside the mesh is explained by its address.
    fn expect_explained(
        &self,
        case: &str,
        from: &str,
        to: &str,
        port: u16,
        expected: bool,
        offline_modes: &[bool],
    ) {
        let got = self.connects(from, to, port);
        assert_eq!(
            got,
            expected,
            "{case}: {from} -> {to}:{port} {}\nn1 log:\n{}\nn2 log:\n{}",
            if got { "was allowed" } else { "was denied" },
            self.n1.log(),
            self.n2.log()
        );
        let subject = if from == OUTSIDE {
            self.topo.pod(from).ipv4.to_string()
        } else {
            format!("default/{from}")
        };
        for &offline in offline_modes {
            let e = self
                .cp
                .explain(&subject, &format!("default/{to}"), port, offline)
                .expect("mesh-cp explain");
            assert_eq!(
                e["verdicts"][0]["allowed"], expected,
                "{case}: explain (offline: {offline}) disagrees with the data path: {e:#}"
            );
        }
    }

    /// A plaintext connection from `outside` (not in the mesh) to payment, checked like
    /// [`Shop::expect`]. Refused ones are SYNs dropped (STRICT: the client waits out its
    /// timeout) or resets (a PERMISSIVE deny).
    fn expect_plaintext(&self, case: &str, port: u16, expected: bool) {
        let seen = self.accepted_by_payment();
        self.expect_explained(case, OUTSIDE, "payment", port, expected, &[true, false]);
        if !expected && port == PORT {
            assert_eq!(
                self.accepted_by_payment(),
                seen,
                "{case}: payment saw the connection"
            );
        }
    }

    fn accepted_by_payment(&self) -> usize {
        fs::read_to_string(&self.payment_log)
            .expect("accept log")
            .lines()
            .count()
    }
}

fn policy(name: &str, app: &str, action: &str, mode: &str, rules: &str) -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  selector: {{ matchLabels: {{ app: {app} }} }}\n  action: {action}\n  mode: {mode}\n  rules: {rules}\n"
    )
}

const BLOCK_ANALYTICS: &str = "block-analytics";

fn block_analytics() -> String {
    policy(
        BLOCK_ANALYTICS,
        "payment",
        "Deny",
        "Enforce",
        &format!("[{{ sourceIdentities: ['{TD}/analytics'] }}]"),
    )
}

fn order_pays_analytics_is_blocked_and_a_bad_policy_changes_nothing(transport: &str) {
    let mut s = shop("seeds", transport);
    s.cp.apply("block-analytics.yaml", &block_analytics(), &["n2"])
        .expect("policy applied");

    s.expect("seeds", "order", "payment", PORT, true);
    s.expect("seeds", "order", "inventory", PORT, true);
    s.n1.assert_local_hop();
    s.n2.assert_local_hop();

    // analytics' connect fails at once, in its own node's kernel: nothing reaches n2 or payment.
    let seen = s.accepted_by_payment();
    let refused_at_n2 = s.n2.stat("tunnels_in_refused");
    let payment = s.topo.pod("payment");
    for ip in [payment.ipv4.to_string(), payment.ipv6.to_string()] {
        let probe = app::run(s.topo.pod("analytics"), &["probe", &ip, "8080"], T);
        assert_eq!(probe["outcome"], "eperm", "analytics -> {ip}: {probe}");
    }
    assert_eq!(s.n1.stat("ebpf_fast_denied"), 2);
    assert!(s.n1.stat("fast_deny_entries") >= 2);
    assert_eq!(
        s.accepted_by_payment(),
        seen,
        "payment's application saw a denied connection"
    );
    assert_eq!(s.n2.stat("tunnels_in_refused"), refused_at_n2);
    s.expect("seeds", "analytics", "payment", PORT, false);
    assert_eq!(s.accepted_by_payment(), seen);

    // The destination stays authoritative: a client that skips its node's kernel check (here a
    // raw tunnel with analytics' certificate) is refused by n2, which logs policy and rule.
    let out = dial_as(
        &s.cp.data_dir,
        s.topo.pod("analytics"),
        payment,
        PORT,
        &format!("{TD}/analytics"),
    )
    .expect("dial");
    let response = out.response.expect("an answer");
    assert_eq!(response.status(), Status::Denied, "{response:?}");
    assert!(
        response.reason.contains("default/block-analytics"),
        "{response:?}"
    );
    assert_eq!(s.accepted_by_payment(), seen);
    let log = s.n2.log();
    let line = log
        .lines()
        .find(|l| l.contains("connection denied"))
        .unwrap_or_else(|| panic!("no deny logged on n2:\n{log}"));
    for field in [
        "policy=default/block-analytics",
        "rule=0",
        &format!("source_identity={TD}/analytics"),
        "destination=default/payment",
        "port=8080",
    ] {
        assert!(line.contains(field), "{field} missing from {line:?}");
    }
    let counter = "policy_decisions{policy=\"default/block-analytics\",rule=\"0\",action=\"Deny\",mode=\"Enforce\"}";
    assert_eq!(s.n2.stat(counter), 1);

    // A bad policy is refused whole, naming file and field, and the last good set stays.
    let bad = policy(
        "broken",
        "payment",
        "Allow",
        "Enforce",
        "[{ sourceCidrs: [{ cidr: '10.0.0.0/33' }] }]",
    );
    let error = s.cp.apply_invalid("broken.yaml", &bad).expect("rejected");
    assert!(
        error.contains("broken.yaml") && error.contains("spec.rules[0].sourceCidrs[0].cidr"),
        "{error}"
    );
    let also_bad = policy(
        "l7",
        "payment",
        "Allow",
        "Enforce",
        "[{ ports: [80], methods: [GET] }]",
    );
    let error =
        s.cp.apply_invalid("broken.yaml", &also_bad)
            .expect("rejected");
    assert!(error.contains("spec.rules[0].methods: L7"), "{error}");
    // The running control plane (and the data path) keep the last good set; offline explain
    // reads the files as they are and refuses the broken set with the same error.
    s.expect_explained(
        "after a bad policy",
        "analytics",
        "payment",
        PORT,
        false,
        &[false],
    );
    s.expect_explained(
        "after a bad policy",
        "order",
        "payment",
        PORT,
        true,
        &[false],
    );
    let offline =
        s.cp.explain("default/order", "default/payment", PORT, true)
            .expect_err("offline explain of an invalid dir");
    assert!(
        offline.to_string().contains("spec.rules[0].methods"),
        "{offline}"
    );
    s.cp.remove_config("broken.yaml").expect("remove");

    // Removing the policy takes its kernel entries away with it.
    s.cp.unapply("block-analytics.yaml", &["n1", "n2"])
        .expect("policy removed");
    assert_eq!(s.n1.stat("fast_deny_entries"), 0);
    s.expect("policy removed", "analytics", "payment", PORT, true);
    s.assert_transport(transport);
}

fn each_matcher_negations_precedence_defaults_and_dry_run(transport: &str) {
    let mut s = shop("matchers", transport);
    let order_v4 = s.topo.pod("order").ipv4;
    // (name, the one rule, port, order allowed, analytics allowed), as an Allow policy on payment.
    let cases: Vec<(&str, String, u16, bool, bool)> = vec![
        ("identity", format!("{{ sourceIdentities: ['{TD}/order'] }}"), PORT, true, false),
        ("not identity", format!("{{ notSourceIdentities: ['{TD}/order'] }}"), PORT, false, true),
        ("identity prefix", format!("{{ sourceIdentities: ['{TD}/ord*'] }}"), PORT, true, false),
        ("not identity prefix", format!("{{ notSourceIdentities: ['{TD}/ord*'] }}"), PORT, false, true),
        ("namespace", "{ sourceNamespaces: [default] }".into(), PORT, true, true),
        ("not namespace", "{ notSourceNamespaces: [default] }".into(), PORT, false, false),
        ("labels", "{ sourceLabels: { app: order } }".into(), PORT, true, false),
        ("not labels", "{ notSourceLabels: { app: order } }".into(), PORT, false, true),
        ("cidr", format!("{{ sourceCidrs: [{{ cidr: '{order_v4}/32' }}] }}"), PORT, true, false),
        ("not cidr", format!("{{ notSourceCidrs: [{{ cidr: '{order_v4}/32' }}] }}"), PORT, false, true),
        ("cidr except", format!("{{ sourceCidrs: [{{ cidr: 0.0.0.0/0, except: ['{order_v4}/32'] }}] }}"), PORT, false, true),
        ("port", "{ ports: [8080] }".into(), PORT, true, true),
        ("port, other port", "{ ports: [8080] }".into(), OTHER_PORT, false, false),
        ("not port", "{ notPorts: [8080] }".into(), OTHER_PORT, true, true),
        ("port range", "{ ports: ['9000-9100'] }".into(), OTHER_PORT, true, true),
        ("not port range", "{ notPorts: ['9000-9100'] }".into(), OTHER_PORT, false, false),
        ("clauses are ANDed", format!("{{ sourceNamespaces: [default], notSourceIdentities: ['{TD}/analytics'], ports: [8080] }}"), PORT, true, false),
    ];
    for (i, (name, rule, port, order, analytics)) in cases.iter().enumerate() {
        // A new name each time, so that every case is a config change.
        let p = policy(
            &format!("case-{i}"),
            "payment",
            "Allow",
            "Enforce",
            &format!("[{rule}]"),
        );
        s.cp.apply("case.yaml", &p, &["n2"]).expect(name);
        s.expect(name, "order", "payment", *port, *order);
        s.expect(name, "analytics", "payment", *port, *analytics);
    }
    s.cp.unapply("case.yaml", &["n2"]).expect("removed");

    // Deny beats allow: both match analytics; the Deny decides.
    let allow_all = policy(
        "allow-shop",
        "payment",
        "Allow",
        "Enforce",
        "[{ sourceNamespaces: [default] }]",
    );
    s.cp.apply("allow.yaml", &allow_all, &["n2"])
        .expect("allow");
    s.cp.apply("deny.yaml", &block_analytics(), &["n2"])
        .expect("deny");
    s.expect("deny beats allow", "order", "payment", PORT, true);
    s.expect("deny beats allow", "analytics", "payment", PORT, false);
    let e =
        s.cp.explain("default/analytics", "default/payment", PORT, true)
            .expect("explain");
    assert_eq!(
        e["verdicts"][0]["policy"], "default/block-analytics",
        "{e:#}"
    );
    s.cp.unapply("allow.yaml", &["n2"]).expect("removed");
    s.cp.unapply("deny.yaml", &["n2"]).expect("removed");

    // Same node: n1 delivers order -> analytics itself and applies analytics' policies. The
    // rule denies every port but one: too many ports to refuse in the kernel, so it is the
    // same-node delivery's own check that denies.
    s.expect("same node, no policy", "order", "analytics", PORT, true);
    let same = policy(
        "no-order",
        "analytics",
        "Deny",
        "Enforce",
        &format!("[{{ sourceIdentities: ['{TD}/order'], notPorts: [9] }}]"),
    );
    s.cp.apply("same.yaml", &same, &["n1"])
        .expect("same-node policy");
    s.expect("same node, denied", "order", "analytics", PORT, false);
    assert!(
        s.n1.log().contains("policy=default/no-order"),
        "{}",
        s.n1.log()
    );
    s.cp.unapply("same.yaml", &["n1"]).expect("removed");

    // Default deny: nothing gets through without an Allow; an Allow opens exactly its match.
    let mesh = |action: &str| mesh_config_yaml(transport, &format!("defaultAction: {action}"));
    s.cp.apply("mesh.yaml", &mesh("Deny"), &["n1", "n2"])
        .expect("default deny");
    s.expect("default deny", "order", "inventory", PORT, false);
    s.expect("default deny", "order", "analytics", PORT, false);
    let inventory = policy(
        "inventory-from-order",
        "inventory",
        "Allow",
        "Enforce",
        "[{ sourceLabels: { app: order } }]",
    );
    s.cp.apply("inventory.yaml", &inventory, &["n2"])
        .expect("allow inventory");
    s.expect("default deny + allow", "order", "inventory", PORT, true);
    s.expect(
        "default deny + allow",
        "analytics",
        "inventory",
        PORT,
        false,
    );
    s.cp.apply("mesh.yaml", &mesh("Allow"), &["n1", "n2"])
        .expect("default allow");
    s.expect("default allow", "order", "analytics", PORT, true);
    s.cp.unapply("inventory.yaml", &["n2"]).expect("removed");

    // DryRun: logged and counted, never enforced.
    let dry = policy(
        "dry-block",
        "payment",
        "Deny",
        "DryRun",
        &format!("[{{ sourceIdentities: ['{TD}/analytics'] }}]"),
    );
    s.cp.apply("dry.yaml", &dry, &["n2"]).expect("dry run");
    s.expect("dry run", "analytics", "payment", PORT, true);
    let e =
        s.cp.explain("default/analytics", "default/payment", PORT, false)
            .expect("explain");
    assert_eq!(
        e["verdicts"][0]["dry_run"][0], "policy default/dry-block rule 0 (Deny)",
        "{e:#}"
    );
    let log = s.n2.log();
    assert!(
        log.lines().any(|l| l.contains("dry-run policy matched") && l.contains("policy=default/dry-block")),
        "{log}"
    );
    let counter =
        "policy_decisions{policy=\"default/dry-block\",rule=\"0\",action=\"Deny\",mode=\"DryRun\"}";
    assert!(s.n2.stat(counter) >= 1);
    s.assert_transport(transport);
}

fn a_policy_change_closes_the_open_connections_it_denies(transport: &str) {
    let mut s = shop("close", transport);
    let payment = s.topo.pod("payment").ipv4.to_string();
    let inventory = s.topo.pod("inventory").ipv4.to_string();
    // Two connections held open: one the new policy denies, one it does not.
    let denied =
        app::start(s.topo.pod("order"), &["linger", &payment, "8080", "8"]).expect("linger");
    let kept =
        app::start(s.topo.pod("order"), &["linger", &inventory, "8080", "8"]).expect("linger");
    s.n2.wait_for(T, |st| st["policy_open_connections"] == 2)
        .expect("both connections open");
    let deny_order = policy(
        "no-order",
        "payment",
        "Deny",
        "Enforce",
        &format!("[{{ sourceIdentities: ['{TD}/order'] }}]"),
    );
    let written = std::time::Instant::now();
    s.cp.apply("deny.yaml", &deny_order, &["n2"])
        .expect("policy");
    s.n2.wait_log(T, "open connection closed")
        .expect("the closing is logged");
    // A figure for the record, not an assertion: these machines are shared and noisy. It
    // includes mesh-cp's reload interval (0.1 s here) and 50 ms polling of the log.
    eprintln!(
        "policy file written -> open connection closed: {:?}",
        written.elapsed()
    );
    let denied = app::finish(denied, T);
    let kept = app::finish(kept, T);
    assert!(
        !denied["error"].is_null(),
        "the denied connection stayed open: {denied}"
    );
    assert!(kept["error"].is_null() && kept["failed"] == 0, "{kept}");
    assert!(
        kept["rounds"].as_u64() > denied["rounds"].as_u64(),
        "denied {denied}, kept {kept}"
    );
    assert_eq!(s.n2.stat("policy_closed_open_connections"), 1);
    s.expect("after the change", "order", "payment", PORT, false);
    s.assert_transport(transport);
}

#[test]
fn plaintext_from_outside_the_mesh_is_policed_when_permissive_and_dropped_when_strict() {
    let mut s = shop("plaintext", "tls");
    let outside = s.topo.pod(OUTSIDE).ipv4;
    let mesh = |spec: &str| mesh_config_yaml("tls", spec);

    // PERMISSIVE (the default): the inbound program hands the SYN to n2's proxy, and with no
    // policy the default allows it.
    s.expect_plaintext("permissive, no policy", PORT, true);
    assert!(s.n2.stat("ebpf_inbound_steered") >= 1);
    assert!(s.n2.stat("plaintext_in") >= 1);

    // CIDR rules apply to it: denied by its address...
    let deny = policy(
        "no-outside",
        "payment",
        "Deny",
        "Enforce",
        &format!("[{{ sourceCidrs: [{{ cidr: '{outside}/32' }}] }}]"),
    );
    s.cp.apply("cidr.yaml", &deny, &["n2"])
        .expect("deny by CIDR");
    s.expect_plaintext("permissive, denied by CIDR", PORT, false);
    assert!(s.n2.stat("plaintext_denied") >= 1);
    let log = s.n2.log();
    assert!(
        log.lines().any(|l| l.contains("connection denied")
            && l.contains("policy=default/no-outside")
            && l.contains("source_identity=none (plaintext)")),
        "{log}"
    );
    // ...allowed by an Allow that names its network; identity rules cannot match plaintext.
    let allow = policy(
        "only-outside-net",
        "payment",
        "Allow",
        "Enforce",
        &format!("[{{ sourceCidrs: [{{ cidr: '{outside}/32' }}] }}, {{ sourceIdentities: ['{TD}/order'] }}]"),
    );
    s.cp.apply("cidr.yaml", &allow, &["n2"])
        .expect("allow by CIDR");
    s.expect_plaintext("permissive, allowed by CIDR", PORT, true);
    s.expect(
        "permissive, allowed by identity",
        "order",
        "payment",
        PORT,
        true,
    );
    s.expect("permissive, neither", "analytics", "payment", PORT, false);
    s.cp.unapply("cidr.yaml", &["n2"]).expect("removed");

    // STRICT: plaintext never reaches the pod (the SYN is dropped), whatever policy says;
    // mesh traffic still flows through the tunnel port; an explicit plaintext port is open.
    s.cp.apply(
        "mesh.yaml",
        &mesh("mtls: { mode: Strict, plaintextPorts: [9090] }"),
        &["n1", "n2"],
    )
    .expect("strict");
    let dropped = s.n2.stat("ebpf_inbound_dropped");
    s.expect_plaintext("strict", PORT, false);
    assert!(s.n2.stat("ebpf_inbound_dropped") > dropped);
    s.expect("strict, through the mesh", "order", "payment", PORT, true);
    s.expect_plaintext("strict, open port", OTHER_PORT, true);

    // Back to PERMISSIVE: plaintext is policed again instead of dropped.
    s.cp.apply(
        "mesh.yaml",
        &mesh("mtls: { mode: Permissive }"),
        &["n1", "n2"],
    )
    .expect("permissive");
    s.expect_plaintext("permissive again", PORT, true);
}
