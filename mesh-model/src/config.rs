//! A whole set of documents into one consistent [`Config`].
//!
//! A configuration is accepted whole or not at all: the first error, naming its file, document
//! and field, rejects the set, and the caller keeps whatever it had before.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    authz::Selection,
    documents::{parse_whole, Documents},
    object_key::ObjectKey,
    policy::AccessPolicy,
    resource::{MeshConfig, Resource, Service, Workload},
    traffic::{ServiceRoute, TrafficPolicy},
};

/// Objects of one kind by `namespace/name`. A persistent map: a config made from another by
/// a few changes shares everything else with it, so making it, comparing the two
/// ([`imbl::OrdMap::diff`] skips what they share) and dropping the old one cost as much as the
/// change, not the mesh. A namespace's objects are one range of it.
pub type Objects<T> = imbl::OrdMap<ObjectKey, T>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub mesh: MeshConfig,
    pub workloads: Objects<Workload>,
    pub services: Objects<Service>,
    pub policies: Objects<AccessPolicy>,
    pub traffic_policies: Objects<TrafficPolicy>,
    pub routes: Objects<ServiceRoute>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: document {doc}: {message}")]
    Invalid {
        file: PathBuf,
        doc: usize,
        message: String,
    },
}

impl ConfigError {
    /// The file the error is about.
    pub fn file(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. } => path,
            ConfigError::Invalid { file, .. } => file,
        }
    }
}

/// The objects of `namespace`, in key order: one range of the map, found in O(log n).
pub fn in_namespace<'a, T>(
    objects: &'a Objects<T>,
    namespace: &'a str,
) -> impl Iterator<Item = &'a T> + 'a
where
    T: Clone,
{
    objects
        .range(ObjectKey::new(namespace, "")..)
        .take_while(move |(k, _)| k.namespace == namespace)
        .map(|(_, v)| v)
}

impl Config {
    /// Workloads placed on `node`.
    pub fn workloads_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.values().filter(move |w| w.node == node)
    }

    /// The workloads of `namespace`, in key order.
    pub fn workloads_in<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        in_namespace(&self.workloads, namespace)
    }

    /// The service's endpoints, in key order: those it lists, or else the workloads whose
    /// labels include all of its selector. Either way only workloads of its own namespace: a
    /// Service cannot send its clients into another namespace, and a workload change then
    /// concerns only the services of its namespace.
    pub fn endpoints<'a>(
        &'a self,
        service: &'a Service,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        let namespace = service.key.namespace.as_str();
        let listed = service.endpoints.as_ref().map(|listed| {
            listed
                .iter()
                .filter(move |k| k.namespace == namespace)
                .filter_map(|k| self.workloads.get(k))
        });
        let selected = match service.endpoints {
            Some(_) => None,
            None => Some(self.workloads_in(namespace).filter(|w| service.selects(w))),
        };
        listed
            .into_iter()
            .flatten()
            .chain(selected.into_iter().flatten())
    }

    /// Workloads the policy applies to, in key order: those of its namespace (of every
    /// namespace, for a policy in the root namespace) that carry all of its selector's labels.
    pub fn selected_by<'a>(
        &'a self,
        policy: &'a AccessPolicy,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        let mesh_wide = policy.key.namespace == self.mesh.root_namespace;
        let all = mesh_wide.then(|| self.workloads.values());
        let own = (!mesh_wide).then(|| self.workloads_in(&policy.key.namespace));
        all.into_iter()
            .flatten()
            .chain(own.into_iter().flatten())
            .filter(|w| policy.selects(w))
    }

    /// Why `route` cannot join this config's routes: another already routes the same Service
    /// and port. Universal mode rejects the set; Kubernetes leaves the later one out.
    pub fn route_clash(&self, route: &ServiceRoute) -> Option<String> {
        let other = in_namespace(&self.routes, &route.key.namespace)
            .find(|o| o.service == route.service && o.port == route.port)?;
        let port = route
            .port
            .map_or("every port".to_owned(), |p| format!("port {p}"));
        Some(format!(
            "spec.service: {} ({port}) is already routed by ServiceRoute {}",
            route.routed(),
            other.key
        ))
    }

    /// Every policy with the keys of the workloads it selects, for [`crate::authz`].
    pub fn selections(&self) -> Vec<Selection> {
        self.policies
            .values()
            .map(|p| (p.clone(), self.selection(p)))
            .collect()
    }

    /// The keys of the workloads `policy` selects, in key order.
    pub fn selection(&self, policy: &AccessPolicy) -> Vec<ObjectKey> {
        self.selected_by(policy).map(|w| w.key.clone()).collect()
    }
}

/// The YAML files a config directory holds: `*.yaml` and `*.yml`, not hidden, not recursive,
/// in name order so that errors are reported the same way every time.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The `(file, contents)` of every YAML file of `dir`, ready for [`parse`]; callers that watch
/// the directory compare these to see whether anything changed.
pub fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, ConfigError> {
    read_files(config_files(dir)?)
}

/// The contents of `files`. One removed after it was listed is left out, as it would have been
/// had the directory been listed a moment later: a removal is not an error.
fn read_files(files: Vec<PathBuf>) -> Result<Vec<(PathBuf, String)>, ConfigError> {
    let mut texts = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => texts.push((file, text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ConfigError::Read { path: file, source }),
        }
    }
    Ok(texts)
}

/// Reads and validates every YAML file of `dir`.
pub fn load_dir(dir: &Path) -> Result<Config, ConfigError> {
    parse(&read_dir(dir)?)
}

/// Reads and validates one file.
pub fn load_file(file: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    parse(&[(file.to_path_buf(), text)])
}

/// Validates `(file name, contents)` pairs as one configuration.
pub fn parse(files: &[(PathBuf, String)]) -> Result<Config, ConfigError> {
    let mut builder = Builder::default();
    for (file, text) in files {
        builder.add_file(file, parse_whole(file, text)?)?;
    }
    Ok(builder.config)
}

/// [`parse`] for a config dir read again and again, at a cost that grows with what changed.
///
/// A mesh of 100,000 workloads is tens of MB of YAML, and one change usually touches one
/// small file. A file whose text is unchanged is not parsed again; and the next config is
/// made from the last accepted one by taking out the documents of the files that changed or
/// went and putting in those of the files that changed or came. What the config shares with
/// the last one is then shared in memory ([`Objects`]), which is what lets the control plane
/// compare the two by what changed.
///
/// The checks across documents (a key defined twice, an address, netns or route used
/// twice, a second MeshConfig) are between pairs, so checking what comes in against what
/// stays finds a clash exactly when checking the whole set would. When it finds one, or a
/// file does not parse, the whole set is put together again in file order for the error, so
/// that the error is the one [`parse`] reports.
#[derive(Debug, Default)]
pub struct Parser {
    /// Every file present at the last call that parsed alone, with its text.
    parsed: HashMap<PathBuf, Arc<Documents>>,
    /// The files the last accepted config was built from.
    accepted: HashMap<PathBuf, Arc<Documents>>,
    /// The last accepted config, with the indexes its checks use.
    state: Builder,
}

impl Parser {
    pub fn parse(&mut self, files: &[(PathBuf, String)]) -> Result<Config, ConfigError> {
        let present: HashSet<&PathBuf> = files.iter().map(|(p, _)| p).collect();
        self.parsed.retain(|path, _| present.contains(path));
        let mut now: HashMap<PathBuf, Arc<Documents>> = HashMap::with_capacity(files.len());
        for (file, text) in files {
            match self.parsed_file(file, text) {
                Ok(parsed) => now.insert(file.clone(), parsed),
                Err(_) => return self.rebuild(files),
            };
        }
        let mut next = self.state.clone();
        // What goes and what comes. A file that changed keeps its documents that did not:
        // they stay in the config as they were, shared with the last one.
        let mut going: Vec<&Resource> = Vec::new();
        let mut coming: Vec<&Resource> = Vec::new();
        for (file, old) in &self.accepted {
            match now.get(file) {
                Some(new) if Arc::ptr_eq(old, new) => {}
                Some(new) => {
                    going.extend(old.not_in(new));
                    coming.extend(new.not_in(old));
                }
                None => going.extend(old.docs().map(|(_, r)| r)),
            }
        }
        for (file, _) in files {
            if let Some(new) = now.get(file).filter(|_| !self.accepted.contains_key(file)) {
                coming.extend(new.docs().map(|(_, r)| r));
            }
        }
        for resource in going {
            next.remove(resource);
        }
        for resource in coming {
            if next.add(resource.clone()).is_err() {
                return self.rebuild(files);
            }
        }
        self.state = next;
        self.accepted = now;
        Ok(self.state.config.clone())
    }

    /// `file`'s documents: as parsed before if its text is the same, and parsed again only
    /// where it changed if it is not.
    fn parsed_file(&mut self, file: &Path, text: &str) -> Result<Arc<Documents>, ConfigError> {
        let last = self.parsed.get(file);
        if let Some(parsed) = last.filter(|p| p.text == text) {
            return Ok(parsed.clone());
        }
        let parsed = Arc::new(Documents::parse(file, text, last.map(|l| l.as_ref()))?);
        self.parsed.insert(file.to_path_buf(), parsed.clone());
        Ok(parsed)
    }

    /// The whole set put together in file order, as [`parse`] does: its first error, or (if
    /// there is none after all) the config, accepted.
    fn rebuild(&mut self, files: &[(PathBuf, String)]) -> Result<Config, ConfigError> {
        let mut builder = Builder::default();
        let mut now = HashMap::with_capacity(files.len());
        for (file, text) in files {
            let parsed = self.parsed_file(file, text)?;
            builder.add_file(file, parsed.docs().map(|(n, r)| (n, r.clone())))?;
            now.insert(file.clone(), parsed);
        }
        self.state = builder;
        self.accepted = now;
        Ok(self.state.config.clone())
    }
}

/// A config being put together, with what its checks across documents look up. Persistent
/// maps all, so that a copy to change costs nothing until it is changed.
#[derive(Debug, Clone, Default)]
struct Builder {
    config: Config,
    mesh_seen: bool,
    /// Every address in use, and by what, so a clash names both sides.
    addresses: imbl::HashMap<IpAddr, String>,
    /// Every (node, netns) in use, and by which workload: looked up, not searched, since a
    /// mesh holds up to 100,000 workloads.
    netns: imbl::HashMap<(String, PathBuf), ObjectKey>,
}

impl Builder {
    /// Adds one file's documents in order: the first that does not fit is the error, with
    /// its file and document number.
    fn add_file(
        &mut self,
        file: &Path,
        docs: impl IntoIterator<Item = (usize, Resource)>,
    ) -> Result<(), ConfigError> {
        for (doc, resource) in docs {
            self.add(resource).map_err(|message| ConfigError::Invalid {
                file: file.to_path_buf(),
                doc,
                message,
            })?;
        }
        Ok(())
    }

    fn add(&mut self, resource: Resource) -> Result<(), String> {
        match resource {
            Resource::MeshConfig(m) => {
                if self.mesh_seen {
                    return Err("a second MeshConfig; there can be only one".into());
                }
                self.mesh_seen = true;
                self.config.mesh = m;
            }
            Resource::Workload(w) => {
                if self.config.workloads.contains_key(&w.key) {
                    return Err(format!("Workload {} is defined twice", w.key));
                }
                let place = (w.node.clone(), w.netns.clone());
                if let Some(other) = self.netns.get(&place) {
                    return Err(format!(
                        "spec.netns: {} on node {} is already used by workload {other}",
                        w.netns.display(),
                        w.node,
                    ));
                }
                self.claim(
                    &w.addresses,
                    "spec.addresses",
                    &format!("workload {}", w.key),
                )?;
                self.netns.insert(place, w.key.clone());
                self.config.workloads.insert(w.key.clone(), w);
            }
            Resource::AccessPolicy(p) => {
                if self.config.policies.contains_key(&p.key) {
                    return Err(format!("AccessPolicy {} is defined twice", p.key));
                }
                self.config.policies.insert(p.key.clone(), p);
            }
            Resource::TrafficPolicy(p) => {
                if self.config.traffic_policies.contains_key(&p.key) {
                    return Err(format!("TrafficPolicy {} is defined twice", p.key));
                }
                self.config.traffic_policies.insert(p.key.clone(), p);
            }
            Resource::ServiceRoute(r) => {
                if self.config.routes.contains_key(&r.key) {
                    return Err(format!("ServiceRoute {} is defined twice", r.key));
                }
                if let Some(clash) = self.config.route_clash(&r) {
                    return Err(clash);
                }
                self.config.routes.insert(r.key.clone(), r);
            }
            Resource::Service(s) => {
                if self.config.services.contains_key(&s.key) {
                    return Err(format!("Service {} is defined twice", s.key));
                }
                self.claim(&s.vips, "spec.vips", &format!("service {}", s.key))?;
                self.config.services.insert(s.key.clone(), s);
            }
        }
        Ok(())
    }

    /// Takes out a resource [`Builder::add`] put in, with what it claimed.
    fn remove(&mut self, resource: &Resource) {
        match resource {
            Resource::MeshConfig(_) => {
                self.mesh_seen = false;
                self.config.mesh = MeshConfig::default();
            }
            Resource::Workload(w) => {
                self.config.workloads.remove(&w.key);
                self.netns.remove(&(w.node.clone(), w.netns.clone()));
                self.release(&w.addresses);
            }
            Resource::AccessPolicy(p) => {
                self.config.policies.remove(&p.key);
            }
            Resource::TrafficPolicy(p) => {
                self.config.traffic_policies.remove(&p.key);
            }
            Resource::ServiceRoute(r) => {
                self.config.routes.remove(&r.key);
            }
            Resource::Service(s) => {
                self.config.services.remove(&s.key);
                self.release(&s.vips);
            }
        }
    }

    fn claim(&mut self, ips: &[IpAddr], field: &str, owner: &str) -> Result<(), String> {
        for (i, ip) in ips.iter().enumerate() {
            if let Some(other) = self.addresses.get(ip) {
                return Err(format!("{field}[{i}]: {ip} is already used by {other}"));
            }
        }
        for ip in ips {
            self.addresses.insert(*ip, owner.to_owned());
        }
        Ok(())
    }

    fn release(&mut self, ips: &[IpAddr]) {
        for ip in ips {
            self.addresses.remove(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: mesh-cp rejected the whole config ("cannot read case.yaml: No such file")
    /// when a file was removed between the directory's listing and its reading.
    #[test]
    fn a_file_removed_after_the_listing_is_left_out() {
        let dir = std::env::temp_dir().join(format!("mycel-model-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kept = dir.join("a.yaml");
        std::fs::write(&kept, "x: 1\n").unwrap();
        let read = read_files(vec![kept.clone(), dir.join("removed.yaml")]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read.unwrap(), vec![(kept, "x: 1\n".to_owned())]);
    }

    fn files(docs: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        docs.iter()
            .map(|(f, t)| (PathBuf::from(f), t.to_string()))
            .collect()
    }

    fn workload(name: &str, node: &str, addr: &str, app: &str) -> String {
        format!("apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec: {{node: {node}, netns: /run/netns/{name}, addresses: ['{addr}']}}\n")
    }

    const SERVICE: &str = "apiVersion: mycel.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: web}}\n";

    #[test]
    fn builds_a_config_across_files() {
        let a = format!(
            "{}---\n{}---\n",
            workload("w1", "n1", "10.0.0.1", "web"),
            workload("w2", "n2", "10.0.0.2", "web")
        );
        let c = parse(&files(&[
            ("a.yaml", &a),
            ("b.yaml", &workload("db", "n1", "10.0.0.3", "db")),
            ("c.yaml", SERVICE),
        ]))
        .unwrap();
        assert_eq!(c.workloads.len(), 3);
        assert_eq!(c.workloads_on("n1").count(), 2);
        let web = &c.services[&ObjectKey::new("default", "web")];
        let eps: Vec<_> = c.endpoints(web).map(|w| w.key.name.as_str()).collect();
        assert_eq!(eps, ["w1", "w2"]);
        assert_eq!(c.mesh, MeshConfig::default());
    }

    fn err(docs: &[(&str, &str)]) -> String {
        let e = parse(&files(docs)).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn the_parser_reads_again_only_what_changed_and_agrees_with_parse() {
        let mut parser = Parser::default();
        let w1 = workload("w1", "n1", "10.0.0.1", "web");
        let w2 = workload("w2", "n2", "10.0.0.2", "web");
        let steps = [
            files(&[("a.yaml", &w1), ("c.yaml", SERVICE)]),
            files(&[("a.yaml", &w1), ("b.yaml", &w2), ("c.yaml", SERVICE)]),
            files(&[("b.yaml", &w2), ("c.yaml", SERVICE)]),
            // b now clashes with a's address: refused as parse refuses it.
            files(&[
                ("a.yaml", &w1),
                ("b.yaml", &w2.replace("10.0.0.2", "10.0.0.1")),
            ]),
            files(&[("a.yaml", "kind: Nonsense\n")]),
            files(&[("a.yaml", &w1)]),
        ];
        for step in &steps {
            let cached = parser.parse(step).map_err(|e| e.to_string());
            let plain = parse(step).map_err(|e| e.to_string());
            assert_eq!(cached, plain, "{step:?}");
        }
        assert_eq!(parser.parsed.len(), 1, "files gone are forgotten");
    }

    /// Random sets of files drawn from documents that clash in every way the checks know:
    /// the parser, which takes out and puts in only what changed, agrees with `parse` on every
    /// set, config or error.
    #[test]
    fn the_parser_agrees_with_parse_on_random_changes() {
        let head = "apiVersion: mycel.dev/v1alpha1\n";
        let mut pool = Vec::new();
        for i in 0..6 {
            // Names, addresses and netns repeat across these, so some sets clash.
            pool.push(workload(
                &format!("w{}", i % 4),
                &format!("n{}", i % 2),
                &format!("10.0.0.{}", i % 5),
                "web",
            ));
        }
        pool.push(workload("x", "n1", "10.0.0.9", "db").replace("/run/netns/x", "/run/netns/w1"));
        pool.push(SERVICE.to_owned());
        pool.push(
            SERVICE
                .replace("10.96.0.1", "10.0.0.1")
                .replace("name: web", "name: web2"),
        );
        pool.push(format!("{head}kind: AccessPolicy\nmetadata: {{name: p}}\nspec: {{selector: {{matchLabels: {{app: web}}}}, action: Deny, rules: [{{ports: [80]}}]}}\n"));
        pool.push(format!(
            "{head}kind: MeshConfig\nmetadata: {{name: m}}\nspec: {{trustDomain: a.example}}\n"
        ));
        pool.push(format!(
            "{head}kind: MeshConfig\nmetadata: {{name: m}}\nspec: {{trustDomain: b.example}}\n"
        ));
        pool.push(format!("{head}kind: ServiceRoute\nmetadata: {{name: r1}}\nspec: {{service: web, backends: [{{service: web, weight: 1}}]}}\n"));
        pool.push(format!("{head}kind: ServiceRoute\nmetadata: {{name: r2}}\nspec: {{service: web, backends: [{{service: web, weight: 2}}]}}\n"));
        pool.push(format!(
            "{head}kind: TrafficPolicy\nmetadata: {{name: tp}}\n"
        ));
        pool.push("kind: [unclosed\n".to_owned());

        let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15u64);
        let mut next = move || rng.u64(..);
        let mut parser = Parser::default();
        let (mut oks, mut errs) = (0, 0);
        for _ in 0..600 {
            let mut step = Vec::new();
            for f in 0..(next() % 4) {
                let docs: Vec<&str> = (0..(next() % 4))
                    .map(|_| pool[(next() % pool.len() as u64) as usize].as_str())
                    .collect();
                step.push((PathBuf::from(format!("f{f}.yaml")), docs.join("---\n")));
            }
            let cached = parser.parse(&step).map_err(|e| e.to_string());
            let plain = parse(&step).map_err(|e| e.to_string());
            assert_eq!(cached, plain, "{step:?}");
            if plain.is_ok() {
                oks += 1
            } else {
                errs += 1
            }
        }
        assert!(oks > 100 && errs > 100, "{oks} accepted, {errs} refused");
    }

    /// Regression: a file that repeats one of its documents shares that piece twice with its
    /// last text, and was taken to have changed nothing.
    #[test]
    fn a_document_repeated_in_its_file_is_refused() {
        let mut parser = Parser::default();
        let w1 = format!("---\n{}", workload("w1", "n1", "10.0.0.1", "web"));
        parser.parse(&files(&[("a.yaml", &w1)])).unwrap();
        let twice = format!("{w1}{w1}");
        let e = parser.parse(&files(&[("a.yaml", &twice)])).unwrap_err();
        assert!(e.to_string().contains("defined twice"), "{e}");
    }

    /// What a change does not touch is shared with the last config, not copied: the control
    /// plane's work per change rests on it.
    #[test]
    fn a_change_shares_what_it_does_not_touch() {
        let mut parser = Parser::default();
        let w = |i: usize| {
            workload(
                &format!("w{i}"),
                "n1",
                &format!("10.0.{}.{}", i / 200, i % 200),
                "web",
            )
        };
        let many: String = (0..500).map(w).collect::<Vec<_>>().join("---\n");
        let first = parser
            .parse(&files(&[("a.yaml", &many), ("b.yaml", SERVICE)]))
            .unwrap();
        let second = parser
            .parse(&files(&[
                ("a.yaml", &many),
                ("b.yaml", &SERVICE.replace("80", "81")),
            ]))
            .unwrap();
        assert!(first.workloads.ptr_eq(&second.workloads));
        assert_eq!(second.services.diff(&first.services).count(), 1);
        let more = format!("{many}---\n{}", w(500));
        let third = parser
            .parse(&files(&[("a.yaml", &more), ("b.yaml", SERVICE)]))
            .unwrap();
        let changed: Vec<_> = second.workloads.diff(&third.workloads).collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
    }

    #[test]
    fn two_workloads_in_one_netns_of_a_node_are_refused() {
        let a = workload("w1", "n1", "10.0.0.1", "web");
        let b = "apiVersion: mycel.dev/v1alpha1\nkind: Workload\nmetadata: {name: w2}\nspec: {node: n1, netns: /run/netns/w1, addresses: ['10.0.0.2']}\n";
        let e = err(&[("a.yaml", &a), ("b.yaml", b)]);
        assert_eq!(
            e,
            "b.yaml: document 1: spec.netns: /run/netns/w1 on node n1 is already used by workload default/w1"
        );
        // The same path on another node is another netns.
        let c = b.replace("node: n1", "node: n2");
        assert!(parse(&files(&[("a.yaml", &a), ("c.yaml", &c)])).is_ok());
    }

    #[test]
    fn cross_document_errors_name_file_and_document() {
        let w1 = workload("w1", "n1", "10.0.0.1", "web");
        let e = err(&[("a.yaml", &w1), ("b.yaml", &w1)]);
        assert!(
            e.starts_with("b.yaml: document 1:") && e.contains("twice"),
            "{e}"
        );

        let clash = workload("w2", "n2", "10.0.0.1", "web");
        let e = err(&[("a.yaml", &format!("{w1}---\n{clash}"))]);
        assert!(
            e.starts_with("a.yaml: document 2: spec.addresses[0]")
                && e.contains("workload default/w1"),
            "{e}"
        );

        let same_netns = w1
            .replace("name: w1", "name: w9")
            .replace("10.0.0.1", "10.0.0.9");
        let same_netns = same_netns.replace("/run/netns/w9", "/run/netns/w1");
        let e = err(&[("a.yaml", &format!("{w1}---\n{same_netns}"))]);
        assert!(e.contains("spec.netns"), "{e}");

        let vip_clash = SERVICE.replace("10.96.0.1", "10.0.0.1");
        let e = err(&[("a.yaml", &w1), ("s.yaml", &vip_clash)]);
        assert!(e.starts_with("s.yaml: document 1: spec.vips[0]"), "{e}");

        let mesh = "apiVersion: mycel.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: m}\n";
        let e = err(&[("m.yaml", &format!("{mesh}---\n{mesh}"))]);
        assert!(e.contains("second MeshConfig"), "{e}");

        let e = err(&[("x.yaml", "kind: [unclosed\n")]);
        assert!(e.starts_with("x.yaml: document 1:"), "{e}");
    }

    #[test]
    fn loads_only_visible_yaml_files_of_a_directory() {
        let dir = std::env::temp_dir().join(format!("mesh-model-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), workload("w1", "n1", "10.0.0.1", "web")).unwrap();
        std::fs::write(dir.join("b.yml"), SERVICE).unwrap();
        std::fs::write(dir.join(".a.yaml.swp"), "garbage: [").unwrap();
        std::fs::write(dir.join("notes.txt"), "garbage: [").unwrap();
        let c = load_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let c = c.unwrap();
        assert_eq!((c.workloads.len(), c.services.len()), (1, 1));
    }
}

#[cfg(test)]
mod traffic_tests {
    use super::*;

    fn parse_one(text: &str) -> Result<Config, String> {
        parse(&[(PathBuf::from("t.yaml"), text.to_owned())]).map_err(|e| e.to_string())
    }

    const HEAD: &str = "apiVersion: mycel.dev/v1alpha1\n";

    #[test]
    fn traffic_kinds_load_and_routes_do_not_clash() {
        let policy = format!("{HEAD}kind: TrafficPolicy\nmetadata: {{name: tp, namespace: shop}}\nspec: {{services: [payment], connect: {{timeout: 500ms}}, loadBalancer: LeastConnections}}\n");
        let route = |name: &str| {
            format!("{HEAD}kind: ServiceRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{service: payment, backends: [{{service: payment, weight: 90}}, {{service: payment-v2, weight: 10}}]}}\n")
        };
        let c = parse_one(&format!("{policy}---\n{}", route("canary"))).unwrap();
        let tp = &c.traffic_policies[&ObjectKey::new("shop", "tp")];
        assert_eq!(
            tp.connect.map(|c| c.timeout),
            Some(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            c.routes[&ObjectKey::new("shop", "canary")].backends.len(),
            2
        );

        let e = parse_one(&format!("{}---\n{}", route("a"), route("b"))).unwrap_err();
        assert!(
            e.starts_with("t.yaml: document 2: spec.service: shop/payment (every port) is already routed by ServiceRoute shop/a"),
            "{e}"
        );
        let e = parse_one(&format!(
            "{HEAD}kind: TrafficPolicy\nmetadata: {{name: tp}}\nspec: {{outlierDetection: {{consecutiveFailures: -1}}}}\n"
        ))
        .unwrap_err();
        assert!(
            e.starts_with("t.yaml: document 1: spec.outlierDetection.consecutiveFailures:"),
            "{e}"
        );
        let e = parse_one(&format!(
            "{HEAD}kind: ServiceRoute\nmetadata: {{name: r}}\n"
        ))
        .unwrap_err();
        assert!(e.contains("spec: missing"), "{e}");
        // A TrafficPolicy without a spec is valid: it sets nothing.
        assert!(parse_one(&format!(
            "{HEAD}kind: TrafficPolicy\nmetadata: {{name: tp}}\n"
        ))
        .is_ok());
    }
}
