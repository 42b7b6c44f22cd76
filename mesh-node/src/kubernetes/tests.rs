//! `Pods` against the fake API server: what the CNI socket answers and which pods, with which
//! netns, the enroll loop is asked to capture. The loop itself is played by the test.

use std::{fs, path::PathBuf, time::Duration};

use mesh_kube::fake::FakeApi;
use serde_json::{json, Value};

use super::*;
use crate::cni::server::Pods as _;

fn namespace(name: &str, mesh: Option<&str>) -> Value {
    let labels = mesh.map_or(json!({}), |m| json!({ "mycel.dev/mesh": m }));
    json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name, "labels": labels } })
}

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": ns, "uid": format!("u-{name}") },
            "spec": { "nodeName": node, "serviceAccountName": "default", "containers": [] },
            "status": { "phase": "Running" } })
}

fn pod_ref(ns: &str, name: &str) -> PodRef {
    PodRef {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("u-{name}"),
    }
}

/// A fake /proc with one process of pod `u-early`, removed on drop.
struct FakeProc(PathBuf);

impl FakeProc {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-node-pods-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("42")).unwrap();
        fs::write(dir.join("42/cgroup"), "0::/kubepods/podu-early/c1\n").unwrap();
        Self(dir)
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Answers the enroll loop's requests as a loop that enrolls everything desired would.
fn play_enroll_loop(mut local: Local) -> Arc<Pods> {
    let pods = local.pods.clone();
    let answering = pods.clone();
    tokio::spawn(async move {
        while let Some(r) = local.requests.recv().await {
            let enrolled = answering.desired().contains_key(&r.pod);
            let _ = r.done.send(Ok(enrolled));
        }
    });
    pods
}

fn ids(desired: &BTreeMap<WorkloadId, Workload>) -> Vec<String> {
    desired
        .values()
        .map(|w| format!("{} {}", w.id, w.netns.display()))
        .collect()
}

#[tokio::test]
async fn the_socket_answers_by_membership_and_the_loop_gets_each_pods_netns() {
    let api = FakeApi::default();
    let proc = FakeProc::new();
    api.apply("namespaces", namespace("web", None));
    api.apply("pods", pod("shop", "early", "n1"));
    api.apply("pods", pod("web", "site", "n1"));
    api.apply("pods", pod("shop", "elsewhere", "n2"));
    let retry = Retry::new(Duration::from_millis(20), Duration::from_millis(200));
    let metrics = PodMetrics::new().unwrap();
    let local = Pods::start(api.client(), "n1", proc.0.clone(), retry, metrics);
    let pods = play_enroll_loop(local);

    // A pod whose namespace the watch has not seen yet waits for it, then is judged by it.
    let add = {
        let pods = pods.clone();
        tokio::spawn(async move {
            let netns = Path::new("/var/run/netns/cni-1");
            pods.add(&pod_ref("shop", "new"), "c-new", netns).await
        })
    };
    api.apply("pods", pod("shop", "new", "n1"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!add.is_finished(), "judged before its namespace was seen");
    api.apply("namespaces", namespace("shop", Some("enabled")));
    let reply = tokio::time::timeout(Duration::from_secs(5), add)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        reply,
        Reply::Enrolled {
            workload: "shop/new".into()
        }
    );

    // Outside the mesh: the pod starts uncaptured.
    let reply = pods
        .add(&pod_ref("web", "site"), "c-site", Path::new("/run/netns/x"))
        .await;
    assert_eq!(reply, Reply::NotInMesh);

    // The loop captures the CNI-reported pod and the one found in /proc (the elsewhere pod is
    // another node's); a path the runtime gives as /proc/PID is read through the host's /proc.
    assert_eq!(
        ids(&pods.desired()),
        [
            format!("shop/early {}", proc.0.join("42/ns/net").display()),
            "shop/new /var/run/netns/cni-1".to_owned(),
        ]
    );
    assert_eq!(
        pods.host_path(Path::new("/proc/7/ns/net")),
        proc.0.join("7/ns/net")
    );

    // DEL of another sandbox changes nothing; DEL of its own releases the pod; a pod
    // deleted from the API leaves too.
    pods.del(&pod_ref("shop", "new"), "c-older");
    assert_eq!(pods.desired().len(), 2);
    assert_eq!(pods.del(&pod_ref("shop", "new"), "c-new"), Reply::Removed);
    assert_eq!(ids(&pods.desired()).len(), 1);
    api.delete("pods", "shop", "early");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !pods.desired().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            ids(&pods.desired())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Only this node's pods are watched.
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods?") && r.contains("spec.nodeName%3Dn1")),
        "{requests:?}"
    );
}
