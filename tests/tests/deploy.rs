//! The Kubernetes manifests under `deploy/`, checked offline: what `kubectl kustomize` renders
//! passes `kubernetes-validate --strict` (a broken copy does not); every example custom
//! resource validates against the generated CRD schema and is accepted by mesh-cp's model,
//! and the deliberately broken ones are refused by both; the scrape annotations point at the
//! ports the daemons serve `/metrics` on.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// `kubectl kustomize DIR`, as YAML text.
fn kustomize(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// `kubernetes-validate --strict` on `yaml`: Ok, or what it printed.
fn kubernetes_validate(yaml: &str) -> Result<(), String> {
    let mut child = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 -m kubernetes_validate (cargo xtask test installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write manifests");
    let out = child.wait_with_output().expect("kubernetes-validate");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(said)
    }
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_install_manifests_render_and_validate_strictly() {
    for dir in ["", "examples/shop"] {
        let yaml = kustomize(&deploy(dir));
        if let Err(said) = kubernetes_validate(&yaml) {
            panic!("deploy/{dir}: kubernetes-validate --strict:\n{said}");
        }
    }
    // The check can fail: an unknown field in the Deployment is caught.
    let yaml = kustomize(&deploy(""));
    let broken = yaml.replacen("  replicas: 2\n", "  replicas: 2\n  replicaz: 2\n", 1);
    assert_ne!(broken, yaml, "the Deployment has replicas: 2");
    let said = kubernetes_validate(&broken).expect_err("an unknown field passed");
    assert!(said.contains("replicaz"), "{said}");
}

/// The schema of `kind` in the CRDs under `deploy/crds/`, as JSON Schema.
fn crd_schema(kind: &str) -> Value {
    let dir = std::fs::read_dir(deploy("crds")).expect("deploy/crds");
    for entry in dir {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("CRD file");
        for crd in documents(&text) {
            if crd["spec"]["names"]["kind"] == kind {
                return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
            }
        }
    }
    panic!("no CRD for {kind}")
}

/// The API server refuses fields a structural schema does not list (kubectl's default strict
/// field validation) unless the schema preserves unknown fields: in JSON Schema terms, every
/// object with `properties` has `additionalProperties: false`.
fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let preserves =
                map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if map.contains_key("properties")
                && !preserves
                && !map.contains_key("additionalProperties")
            {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(strict);
        }
        Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}

/// Every error the schema finds in `doc`, as lines.
fn schema_errors(doc: &Value) -> Vec<String> {
    let kind = doc["kind"].as_str().expect("kind");
    let mut schema = crd_schema(kind);
    // Every object has these; a CRD's schema need not list them.
    for (field, ty) in [
        ("apiVersion", "string"),
        ("kind", "string"),
        ("metadata", "object"),
    ] {
        schema["properties"][field] = serde_json::json!({ "type": ty });
    }
    strict(&mut schema);
    let validator = jsonschema::validator_for(&schema).expect("a valid JSON Schema");
    validator
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// What mesh-cp's model says of `doc` (the same parser reads the config dir).
fn model_accepts(doc: &Value) -> Result<(), String> {
    let yaml = serde_yaml::to_string(doc).expect("YAML");
    mesh_model::parse(&[(PathBuf::from("example.yaml"), yaml)])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn example_resources_validate_against_the_crds_and_broken_ones_do_not() {
    let docs = documents(&kustomize(&deploy("examples/shop")));
    let custom: Vec<_> = docs
        .iter()
        .filter(|d| {
            d["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("mycel.dev/"))
        })
        .collect();
    assert_eq!(
        custom.len(),
        5,
        "a MeshConfig, three AccessPolicies and a TrafficPolicy"
    );
    for doc in custom {
        let name = &doc["metadata"]["name"];
        let errors = schema_errors(doc);
        assert!(errors.is_empty(), "{name}: {errors:#?}");
        model_accepts(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    let broken_dir = deploy("examples/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&broken_dir)
        .expect("examples/invalid")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        for doc in documents(&text) {
            let errors = schema_errors(&doc);
            assert!(
                !errors.is_empty(),
                "{} passed the CRD schema",
                file.display()
            );
            assert!(
                model_accepts(&doc).is_err(),
                "{} passed mesh-cp's model",
                file.display()
            );
        }
    }
}

/// Prometheus finds both daemons by their pod annotations, on the ports they serve, and the
/// shipped Kubernetes scrape config keeps exactly their pods, under the dashboard's jobs.
#[test]
fn scrape_annotations_point_at_the_metrics_ports() {
    let docs = documents(&kustomize(&deploy("")));
    let scrape = std::fs::read_to_string(deploy("grafana/prometheus-scrape-kubernetes.yml"))
        .expect("scrape config");
    let scrape = documents(&scrape).remove(0);
    for (kind, name, port, job) in [
        ("DaemonSet", "mycel-node", 15020, "mycel-node"),
        ("Deployment", "mycel-cp", 15016, "mycel-cp"),
    ] {
        let template = &find(&docs, kind, name)["spec"]["template"];
        let app = &template["metadata"]["labels"]["app.kubernetes.io/name"];
        let job = scrape["scrape_configs"]
            .as_array()
            .expect("scrape_configs")
            .iter()
            .find(|j| j["job_name"] == job)
            .unwrap_or_else(|| panic!("no job {job}"));
        let keeps_app = job["relabel_configs"]
            .as_array()
            .expect("relabel_configs")
            .iter()
            .any(|r| {
                r["action"] == "keep"
                    && r["source_labels"][0] == "__meta_kubernetes_pod_label_app_kubernetes_io_name"
                    && r["regex"] == *app
            });
        assert!(keeps_app, "{job}: does not keep pods labelled {app}");
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{name}");
        assert_eq!(
            annotations["prometheus.io/port"],
            port.to_string(),
            "{name}"
        );
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{name}");
        let container = &template["spec"]["containers"][0];
        if kind == "DaemonSet" {
            // On the host's network a container port is a host port, which would keep the
            // upgrade's second pod off the node.
            assert!(
                container["ports"].is_null(),
                "{name}: {}",
                container["ports"]
            );
        } else {
            let ports: Vec<_> = container["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .map(|p| p["containerPort"].as_u64())
                .collect();
            assert!(ports.contains(&Some(port)), "{name}: {ports:?}");
        }
        let args = args_of(container);
        let listen = format!("--metrics-listen=0.0.0.0:{port}");
        assert!(args.contains(&listen.as_str()), "{name}: {args:?}");
    }
}

/// The node daemon upgrades by handoff (issue 21): the new pod starts beside the old one
/// (surge, nothing unavailable), the old one has the grace to drain, and the capture is pinned
/// in the host's bpffs, mounted from the host.
#[test]
fn the_node_daemon_upgrades_beside_the_old_one_and_pins_on_the_host() {
    let docs = documents(&kustomize(&deploy("")));
    let ds = find(&docs, "DaemonSet", "mycel-node");
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"], 1, "{rolling}");
    assert_eq!(rolling["maxUnavailable"], 0, "{rolling}");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args = args_of(container);
    let drain: f64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--drain-timeout="))
        .expect("--drain-timeout")
        .parse()
        .expect("seconds");
    let grace = pod["terminationGracePeriodSeconds"]
        .as_f64()
        .expect("grace");
    assert!(
        grace > drain,
        "grace {grace} s must cover the drain {drain} s"
    );
    assert!(args.contains(&"--bpffs=/sys/fs/bpf"), "{args:?}");
    let (_, volume) = mount_at(pod, container, "/sys/fs/bpf");
    assert_eq!(volume["hostPath"]["path"], "/sys/fs/bpf", "{volume}");
}

/// A container's /proc/sys is read-only; the pods' return routing writes three sysctls in each
/// pod's netns, so `--net-sysctl-dir` must name a writable mount of the host's /proc/sys/net
/// (and of nothing more: kernel.* there would be a way out of the container).
#[test]
fn the_node_daemon_writes_pod_sysctls_through_a_writable_mount() {
    let docs = documents(&kustomize(&deploy("")));
    let pod = &find(&docs, "DaemonSet", "mycel-node")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let dir = args_of(container)
        .into_iter()
        .find_map(|a| a.strip_prefix("--net-sysctl-dir="))
        .expect("--net-sysctl-dir");
    let (mount, volume) = mount_at(pod, container, dir);
    assert_ne!(mount["readOnly"], true, "{mount}");
    assert_eq!(volume["hostPath"]["path"], "/proc/sys/net", "{volume}");
}

/// A container's arguments.
fn args_of(container: &Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

/// The container's volume mount at `path`, and the pod's volume it mounts.
fn mount_at<'a>(pod: &'a Value, container: &'a Value, path: &str) -> (&'a Value, &'a Value) {
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("no mount at {path}"));
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("its volume");
    (mount, volume)
}

/// A container's arguments are flags its binary has, with values it accepts: `--help` after
/// them exits 0 only if everything before it parses. And the check can fail: an unknown flag.
fn assert_arguments_parse(binary: (&str, &str), container: &Value) {
    let args = args_of(container);
    let bin = mesh_tests::mesh::sibling_bin(binary.0, binary.1);
    let run = |extra: &[&str]| {
        Command::new(&bin)
            .args(&args)
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("{} (cargo xtask test builds it): {e}", binary.0))
    };
    let out = run(&["--help"]);
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        binary.0,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!run(&["--no-such-flag", "--help"]).status.success());
}

#[test]
fn the_containers_arguments_parse() {
    let docs = documents(&kustomize(&deploy("")));
    let cp = &find(&docs, "Deployment", "mycel-cp")["spec"]["template"]["spec"];
    assert_arguments_parse(("mesh-cp", "MESH_CP_BIN"), &cp["containers"][0]);
    let node = &find(&docs, "DaemonSet", "mycel-node")["spec"]["template"]["spec"];
    assert_arguments_parse(("mesh-node", "MESH_NODE_BIN"), &node["containers"][0]);
    assert_arguments_parse(("mesh-node", "MESH_NODE_BIN"), &node["initContainers"][0]);
}
