//! mesh-cp on its own: node authentication and authorization, certificate signing, and the
//! node-scoped config stream, driven through the real gRPC API over TLS.

use std::time::Duration;

use mesh_api::v1::{self, resource::Kind, ConfigAck, ConfigUpdate, SignCertificateRequest};
use mesh_tests::{cp::NodeClient, ControlPlane};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, StreamExt as _};
use tonic::{Code, Streaming};

fn workload(name: &str, node: &str, addr: &str) -> String {
    format!(
        "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\nspec: {{node: {node}, netns: /run/netns/{name}, addresses: ['{addr}'], serviceAccount: {name}-sa}}\n"
    )
}

fn start(test: &str) -> ControlPlane {
    let a = workload("a", "n1", "10.0.0.1");
    let b = workload("b", "n2", "10.0.0.2");
    ControlPlane::start(
        &format!("mycel-t-cp-{test}"),
        &[("a.yaml", &a), ("b.yaml", &b)],
    )
    .expect("start mesh-cp")
}

fn csr(uri: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().der().to_vec()
}

async fn sign(
    client: &mut NodeClient,
    identity: &str,
    csr_uri: &str,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    client
        .sign_certificate(SignCertificateRequest {
            csr_der: csr(csr_uri),
            identity: identity.into(),
        })
        .await
        .map(|r| r.into_inner().cert_chain_der)
}

/// Opens the config stream; acks are sent through the returned sender.
async fn open_stream(
    client: &mut NodeClient,
) -> Result<(mpsc::Sender<ConfigAck>, Streaming<ConfigUpdate>), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    let updates = client
        .stream_config(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, updates))
}

async fn next(updates: &mut Streaming<ConfigUpdate>) -> Result<ConfigUpdate, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), updates.next())
        .await
        .expect("a config update within 10 s")
        .expect("the stream is open")
}

fn keys(update: &ConfigUpdate) -> Vec<&str> {
    update.upserts.iter().map(|r| r.key.as_str()).collect()
}

fn workload_of<'a>(update: &'a ConfigUpdate, key: &str) -> &'a v1::Workload {
    update
        .upserts
        .iter()
        .find_map(|r| match &r.kind {
            Some(Kind::Workload(w)) if r.key == key => Some(w),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {key} in {update:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_authenticate_with_tokens_and_get_certificates_only_for_their_workloads() {
    let cp = start("auth");
    let (token, token_id) = cp.create_token("n1").unwrap();
    let id_a = "spiffe://cluster.local/ns/default/sa/a-sa";
    let id_b = "spiffe://cluster.local/ns/default/sa/b-sa";

    // Unknown token, and a valid token presented by another node.
    let mut stranger = cp.client("n1", "0000.ffff").await.unwrap();
    let e = sign(&mut stranger, id_a, id_a).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(
        open_stream(&mut stranger).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut impostor = cp.client("n2", &token).await.unwrap();
    let e = sign(&mut impostor, id_b, id_b).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let mut n1 = cp.client("n1", &token).await.unwrap();
    let chain = sign(&mut n1, id_a, id_a).await.expect("a is placed on n1");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        format!("[URI({id_a:?})]")
    );
    assert!(!leaf.is_ca());

    // b runs on n2: n1's token cannot get its identity, nor sneak it into a CSR.
    let e = sign(&mut n1, id_b, id_b).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("not") || e.message().contains("no workload"),
        "{e:?}"
    );
    let e = sign(&mut n1, id_a, id_b).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = sign(
        &mut n1,
        "spiffe://other.domain/ns/default/sa/a-sa",
        "spiffe://other.domain/ns/default/sa/a-sa",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(cp.log().contains("certificate refused"));

    // Revocation cuts off an open stream and every later call.
    let (_acks, mut updates) = open_stream(&mut n1).await.unwrap();
    assert!(next(&mut updates).await.unwrap().snapshot);
    cp.revoke_token(&token_id).unwrap();
    let ended = next(&mut updates).await.unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    let e = sign(&mut n1, id_a, id_a).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_stream_is_node_scoped_incremental_and_keeps_the_last_good_config() {
    let cp = start("stream");
    let (token, _) = cp.create_token("n1").unwrap();
    let mut n1 = cp.client("n1", &token).await.unwrap();
    let (acks, mut updates) = open_stream(&mut n1).await.unwrap();

    let first = next(&mut updates).await.unwrap();
    assert!(first.snapshot);
    assert_eq!(
        keys(&first),
        [
            "mesh",
            "trust-bundle",
            "workload/default/a",
            "workload/default/b"
        ]
    );
    assert_eq!(
        workload_of(&first, "workload/default/a").netns,
        "/run/netns/a"
    );
    assert_eq!(
        workload_of(&first, "workload/default/b").netns,
        "",
        "another node's netns leaked"
    );
    acks.send(ConfigAck {
        version: first.version,
        error: String::new(),
        ..Default::default()
    })
    .await
    .unwrap();
    let acked = || {
        cp.status()
            .ok()
            .and_then(|s| s["nodes"]["n1"]["acked_version"].as_u64())
    };
    wait(|| acked() == Some(first.version)).await;

    // A broken file is reported and changes nothing.
    cp.write_config("c.yaml", "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: c}\nspec: {node: n1, netns: relative}\n").unwrap();
    wait(|| {
        cp.status()
            .ok()
            .and_then(|s| s["config"]["error"].as_str().map(str::to_owned))
            .is_some_and(|e| e.contains("c.yaml") && e.contains("spec.netns"))
    })
    .await;
    assert!(cp.log().contains("config rejected"));
    assert!(
        tokio::time::timeout(Duration::from_millis(700), updates.next())
            .await
            .is_err(),
        "a bad file changed the config"
    );

    // Fixed: only the new workload travels.
    cp.write_config("c.yaml", &workload("c", "n1", "10.0.0.3"))
        .unwrap();
    let added = next(&mut updates).await.unwrap();
    assert!(!added.snapshot);
    assert_eq!(added.version, first.version + 1);
    assert_eq!(keys(&added), ["workload/default/c"]);
    assert!(added.removals.is_empty());
    wait(|| {
        cp.status()
            .ok()
            .is_some_and(|s| s["config"]["error"].is_null())
    })
    .await;

    cp.remove_config("c.yaml").unwrap();
    let removed = next(&mut updates).await.unwrap();
    assert!(removed.upserts.is_empty());
    assert_eq!(removed.removals, ["workload/default/c"]);
}

/// Opens the config stream on demand, resuming from `(epoch, version)` if given, with
/// `first` as the first message (what the node watches).
async fn open_on_demand(
    client: &mut NodeClient,
    resume: Option<(u64, u64)>,
    first: ConfigAck,
) -> (mpsc::Sender<ConfigAck>, Streaming<ConfigUpdate>) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.expect("the first message is queued");
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    mesh_api::metadata::set_on_demand(&mut request);
    if let Some((epoch, version)) = resume {
        mesh_api::metadata::set_resume(&mut request, epoch, version);
    }
    let updates = client
        .stream_config(request)
        .await
        .expect("an on-demand stream opens")
        .into_inner();
    (tx, updates)
}

fn watch(keys: &[&str], addresses: &[[u8; 4]]) -> ConfigAck {
    ConfigAck {
        watch: keys.iter().map(|k| k.to_string()).collect(),
        watch_addresses: addresses.iter().map(|a| a.to_vec()).collect(),
        ..Default::default()
    }
}

fn sorted_keys(update: &ConfigUpdate) -> Vec<&str> {
    let mut k = keys(update);
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_on_demand_holds_its_own_workloads_and_those_it_watches() {
    let cp = start("demand");
    let (token, _) = cp.create_token("n1").unwrap();
    let mut n1 = cp.client("n1", &token).await.unwrap();
    let (acks, mut updates) = open_on_demand(&mut n1, None, watch(&[], &[])).await;

    // Its own workload and no other.
    let first = next(&mut updates).await.unwrap();
    assert!(first.snapshot);
    assert_eq!(
        sorted_keys(&first),
        ["mesh", "trust-bundle", "workload/default/a"]
    );
    let ack = |u: &ConfigUpdate| ConfigAck {
        version: u.version,
        ..Default::default()
    };
    acks.send(ack(&first)).await.unwrap();

    // By key: b is sent without its netns; a key no workload has is sent as removed.
    acks.send(watch(&["workload/default/b", "workload/default/nope"], &[]))
        .await
        .unwrap();
    let got = next(&mut updates).await.unwrap();
    assert!(!got.snapshot);
    assert_eq!(
        got.version, first.version,
        "answers come at the version held"
    );
    assert_eq!(keys(&got), ["workload/default/b"]);
    assert_eq!(workload_of(&got, "workload/default/b").netns, "");
    assert_eq!(got.removals, ["workload/default/nope"]);
    acks.send(ack(&got)).await.unwrap();

    // By address: one no workload has is answered absent.
    acks.send(watch(&[], &[[10, 0, 0, 9]])).await.unwrap();
    let got = next(&mut updates).await.unwrap();
    assert!(got.upserts.is_empty() && got.removals.is_empty());
    assert_eq!(got.absent, [vec![10, 0, 0, 9]]);
    acks.send(ack(&got)).await.unwrap();

    // A workload that takes the watched address is sent; one nobody watches is not.
    let c_and_d = format!(
        "{}---\n{}",
        workload("c", "n3", "10.0.0.9"),
        workload("d", "n3", "10.0.0.4")
    );
    cp.write_config("cd.yaml", &c_and_d).unwrap();
    let got = next(&mut updates).await.unwrap();
    assert_eq!(keys(&got), ["workload/default/c"]);
    acks.send(ack(&got)).await.unwrap();
    let (epoch, held) = (got.epoch, got.version);
    wait(|| {
        cp.status()
            .ok()
            .and_then(|s| s["nodes"]["n1"]["watches"].as_u64())
            == Some(4)
    })
    .await;

    // A node that resumes names its watches and gets what changed of them only: b moved
    // and d changed while it was away.
    drop((acks, updates));
    cp.write_config("b.yaml", &workload("b", "n2", "10.0.0.22"))
        .unwrap();
    wait(|| cp.version().is_ok_and(|v| v > held)).await;
    cp.write_config(
        "cd.yaml",
        &format!(
            "{}---\n{}",
            workload("c", "n3", "10.0.0.9"),
            workload("d", "n3", "10.0.0.44")
        ),
    )
    .unwrap();
    wait(|| cp.version().is_ok_and(|v| v >= held + 2)).await;
    let named = watch(
        &["workload/default/b", "workload/default/c"],
        &[[10, 0, 0, 9]],
    );
    let (acks, mut updates) = open_on_demand(&mut n1, Some((epoch, held)), named.clone()).await;
    let got = next(&mut updates).await.unwrap();
    assert!(!got.snapshot, "resumed, not sent everything again");
    assert_eq!(keys(&got), ["workload/default/b"]);
    assert_eq!(
        workload_of(&got, "workload/default/b").addresses,
        [vec![10, 0, 0, 22]]
    );

    acks.send(ack(&got)).await.unwrap();

    // Released, b is no longer sent: after a change to it and then to c, the next message
    // is c's.
    acks.send(ConfigAck {
        unwatch: vec!["workload/default/b".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let watches = || {
        cp.status()
            .ok()
            .and_then(|s| s["nodes"]["n1"]["watches"].as_u64())
    };
    wait(|| watches() == Some(2)).await;
    cp.write_config("b.yaml", &workload("b", "n2", "10.0.0.23"))
        .unwrap();
    wait(|| cp.version().is_ok_and(|v| v > got.version)).await;
    cp.write_config("cd.yaml", &workload("c", "n4", "10.0.0.9"))
        .unwrap();
    let next_one = next(&mut updates).await.unwrap();
    assert_eq!(keys(&next_one), ["workload/default/c"]);
    assert!(next_one.removals.is_empty(), "{next_one:?}");

    // A node that starts afresh naming its watches has them answered in its snapshot: the
    // workloads it watches, a key no workload has as removed, the address no workload has.
    let (_fresh_acks, mut fresh) = open_on_demand(
        &mut n1,
        None,
        watch(
            &["workload/default/b", "workload/default/gone"],
            &[[10, 9, 9, 9]],
        ),
    )
    .await;
    let snapshot = next(&mut fresh).await.unwrap();
    assert!(snapshot.snapshot);
    assert!(keys(&snapshot).contains(&"workload/default/b"));
    assert!(!keys(&snapshot).contains(&"workload/default/c"));
    assert_eq!(snapshot.removals, ["workload/default/gone"]);
    assert_eq!(snapshot.absent, [vec![10, 9, 9, 9]]);
    drop(fresh);

    // A watch that is not of a workload ends the stream with the reason.
    acks.send(watch(&["service/default/x"], &[])).await.unwrap();
    let refused = next(&mut updates).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("not a workload key"),
        "{refused:?}"
    );

    // A stream that did not ask for workloads on demand gets them all, and may not watch.
    let (acks, mut updates) = open_stream(&mut n1).await.unwrap();
    let all = next(&mut updates).await.unwrap();
    assert!(keys(&all).contains(&"workload/default/b"));
    acks.send(watch(&["workload/default/b"], &[]))
        .await
        .unwrap();
    let refused = next(&mut updates).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // An on-demand value this control plane does not know is refused, not ignored.
    let (_tx, rx) = mpsc::channel::<ConfigAck>(1);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert(mesh_api::metadata::ON_DEMAND, "services".parse().unwrap());
    let e = n1.stream_config(request).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let metrics = mesh_tests::mesh::http_get(cp.metrics, "/metrics").unwrap();
    assert!(
        metrics.contains("mycel_cp_on_demand_lookups_total{answer=\"absent\"} 4")
            && metrics.contains("mycel_cp_on_demand_lookups_total{answer=\"refused\"} 2"),
        "{metrics}"
    );
}

#[test]
fn the_config_version_grows_across_restarts() {
    let mut cp = start("version");
    let first = cp.version().unwrap();
    cp.write_config("c.yaml", &workload("c", "n1", "10.0.0.3"))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cp.version().unwrap() == first {
        assert!(
            std::time::Instant::now() < deadline,
            "the change was not taken"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = cp.version().unwrap();
    cp.pause().unwrap();
    cp.resume().unwrap();
    let after = cp.version().unwrap();
    // Before, every run started again at 1.
    assert!(after > before, "{after} after {before}");
    let metrics = mesh_tests::mesh::http_get(cp.metrics, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!("mycel_cp_config_version {after}")),
        "{metrics}"
    );
}

#[test]
fn an_invalid_config_dir_at_start_is_a_one_line_error() {
    let dir = std::env::temp_dir().join(format!("mycel-t-cp-badstart-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("config/x.yaml"), "kind: [unclosed\n").unwrap();
    let out = std::process::Command::new(mesh_tests::mesh::sibling_bin("mesh-cp", "MESH_CP_BIN"))
        .args([
            "serve",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("mesh-cp: error:") && last.contains("x.yaml"),
        "{stderr}"
    );
}

async fn wait(mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within 10 s");
}

/// Regression (issue 19): anyone reaching the port could make mesh-cp check tokens without
/// end, and hold any number of config streams. Failed attempts from one address now come in
/// a burst, then one every two seconds; streams per address are capped; join tokens expire
/// and `token list` says when.
#[tokio::test(flavor = "multi_thread")]
async fn strangers_are_throttled_streams_capped_and_join_tokens_expire() {
    let cp = start("flood");
    let (token, _) = cp.create_token("n1").unwrap();
    let mut codes = Vec::new();
    for i in 0..16 {
        let mut stranger = cp.client("n1", &format!("{i:04x}.ffff")).await.unwrap();
        codes.push(
            sign(
                &mut stranger,
                "spiffe://x/ns/a/sa/b",
                "spiffe://x/ns/a/sa/b",
            )
            .await
            .unwrap_err()
            .code(),
        );
    }
    let unauthenticated = codes
        .iter()
        .filter(|c| **c == Code::Unauthenticated)
        .count();
    let throttled = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    // Ten at once, then one every two seconds (a slow machine may have earned one back).
    assert!(
        (10..=12).contains(&unauthenticated) && unauthenticated + throttled == 16,
        "{codes:?}"
    );
    // A valid token is taken from the same address all the same (nodes behind one NAT).
    let mut n1 = cp.client("n1", &token).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(open_stream(&mut n1).await.expect("a node's streams"));
    }
    let e = open_stream(&mut n1).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "a fifth stream: {e:?}");
    assert!(e.message().contains("config streams open"), "{e:?}");
    drop(held);
    let metrics = mesh_tests::mesh::http_get(cp.metrics, "/metrics").unwrap();
    for (reason, at_least) in [
        ("throttled", 4),
        ("too_many_streams", 1),
        ("unauthenticated", 10),
    ] {
        let line = format!("mycel_cp_node_requests_refused_total{{reason=\"{reason}\"}}");
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(value >= f64::from(at_least), "{reason}: {value}\n{metrics}");
    }

    // Expiry: a token issued for one second stops working; `token list` shows when.
    let out = std::process::Command::new(mesh_tests::mesh::sibling_bin("mesh-cp", "MESH_CP_BIN"))
        .args([
            "token",
            "create",
            "--node",
            "n2",
            "--ttl",
            "1s",
            "--data-dir",
        ])
        .arg(&cp.data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let short = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut n2 = cp.client("n2", &short).await.unwrap();
    let e = open_stream(&mut n2).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");
    let list = std::process::Command::new(mesh_tests::mesh::sibling_bin("mesh-cp", "MESH_CP_BIN"))
        .args(["token", "list", "--data-dir"])
        .arg(&cp.data_dir)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.lines().next().unwrap_or("").contains("EXPIRES"),
        "{list}"
    );
    assert_eq!(list.lines().count(), 3, "{list}");
    let bad = std::process::Command::new(mesh_tests::mesh::sibling_bin("mesh-cp", "MESH_CP_BIN"))
        .args([
            "token",
            "create",
            "--node",
            "n3",
            "--ttl",
            "soon",
            "--data-dir",
        ])
        .arg(&cp.data_dir)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a duration"),
        "{bad:?}"
    );
}

/// Nodes that open their config stream and never read it, as many as mesh-cp has places for
/// snapshots in progress (32), cannot keep another node from syncing: a part not taken within
/// 30 s ends its stream and frees its place. Before, a stream blocked on a full HTTP/2 window
/// kept its place for as long as it stayed connected, and the next node never got a snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_that_stop_reading_cannot_hold_up_the_others() {
    const PLACES: usize = 32;
    // A snapshot of about 2.5 MB: more than every buffer between mesh-cp and a node that
    // does not read (its HTTP/2 windows, mesh-cp's send buffer, the stream's queue).
    let yaml: String = (0..20_000u32)
        .map(|i| {
            format!(
                "---\n{}",
                workload(
                    &format!("w{i}"),
                    "elsewhere",
                    &format!("172.16.{}.{}", i >> 8, i & 0xff)
                )
            )
        })
        .collect();
    let cp = ControlPlane::start_slow(
        "mycel-t-cp-stalled",
        &[("w.yaml", &yaml)],
        Duration::from_secs(60),
    )
    .expect("start mesh-cp");
    let names: Vec<String> = (0..=PLACES).map(|i| format!("node-{i}")).collect();
    let tokens = cp.create_tokens(&names).expect("tokens");
    let mut stalled = Vec::new();
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(cp.ca_cert()).expect("ca"));
    for (node, token) in &tokens[..PLACES] {
        // HTTP/2 windows of 64 KiB, not hyper's 2 MiB: the node takes almost nothing.
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", cp.grpc))
            .expect("uri")
            .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(ca.clone()))
            .expect("tls")
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .expect("connect");
        let creds = mesh_api::Credentials::new(node, token).expect("credentials");
        let mut client =
            mesh_api::v1::node_service_client::NodeServiceClient::with_interceptor(channel, creds);
        let (acks, updates) = open_stream(&mut client).await.expect("stream");
        // Held open, never read.
        stalled.push((client, acks, updates));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (node, token) = &tokens[PLACES];
    let mut client = cp.client(node, token).await.expect("client");
    let (_acks, mut updates) = open_stream(&mut client).await.expect("stream");
    let first = tokio::time::timeout(Duration::from_secs(90), updates.next())
        .await
        .expect("a snapshot within 90 s, once the stalled streams lose their places")
        .expect("the stream is open")
        .expect("no error");
    assert!(first.snapshot, "{:?}", first.version);
    let log = cp.log();
    assert!(
        log.contains("node stopped reading its config stream"),
        "the stalled streams were closed for it: {log}"
    );
    drop(stalled);
}
