//! mesh-cp: Mycel's control plane. The CA and the source of truth: it reads the mesh's
//! configuration, signs workload certificates, and streams each node its slice of the config.

use mesh_cp::{
    ca, explain, first_version, kubernetes, metrics, node_auth, server, source, state, status,
    store, tokens,
};

use mesh_daemon::cli::{seconds, Binary, HOUR};
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context as _};
use clap::{Subcommand, ValueEnum};

const BINARY: Binary = Binary {
    name: "mesh-cp",
    version: env!("CARGO_PKG_VERSION"),
    about: "Mycel control plane: CA, config source, and the gRPC API that node daemons stream from",
};

type Cli = mesh_daemon::cli::Cli<Command>;

#[derive(Subcommand)]
enum Command {
    /// Serve nodes from a directory of YAML documents (universal mode), or from the
    /// Kubernetes API (--kubernetes).
    ///
    /// The directory is re-read when it changes. A change is applied only if the whole
    /// directory is valid; otherwise the error is logged and shown on /status, and the last
    /// good config stays in force. At start, an invalid directory is an error.
    ///
    /// With --kubernetes, pods join the mesh by the label mycel.dev/mesh=enabled on their
    /// namespace or on themselves, and AccessPolicies and the MeshConfig are custom
    /// resources. One invalid AccessPolicy is left out and says why in its status; the
    /// others stay in force. Nodes are served once every kind has been listed.
    Serve(Box<ServeArgs>),
    /// Write objects (MeshConfig, Workload, Service, AccessPolicy, TrafficPolicy,
    /// ServiceRoute) to the mesh's config: new ones are created, existing ones replaced.
    ///
    /// With --etcd-endpoints, the store's objects with these applied are checked as a config
    /// dir is, and written in one transaction: every replica sees the whole change or none
    /// of it. With --config-dir, they go into the directory's applied.yaml, replaced whole
    /// (objects that hand-written files define are left to them). A bad object is refused
    /// with its file, document and field, and nothing is written. Prints each object's
    /// outcome (created, configured, unchanged), and the config version written (etcd).
    Apply(ApplyArgs),
    /// Remove objects from the mesh's config: those a file defines (-f), or those named
    /// (KIND NAMESPACE/NAME, or MeshConfig).
    ///
    /// Checked and written as `apply` is: if the config without them is invalid (a route
    /// left without its Service), nothing is removed.
    Delete(DeleteArgs),
    /// Manage the join tokens nodes authenticate with (universal mode).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show whether a connection from one workload to another would be allowed, and which
    /// policy and rule decide it: the same evaluation the destination node runs.
    ///
    /// Reads a config dir (offline), or asks a running control plane (--cp, its HTTP status
    /// address; the default). The first line is the verdict: ALLOW or DENY.
    Explain(ExplainArgs),
}

#[derive(clap::Args)]
struct ExplainArgs {
    #[command(flatten)]
    question: explain::Question,
    /// Evaluate this config dir instead of asking a control plane.
    #[arg(long, conflicts_with = "cp")]
    config_dir: Option<PathBuf>,
    /// HTTP status address (host:port) of a running control plane: its --http-listen.
    #[arg(long, default_value = "127.0.0.1:15014")]
    cp: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

#[derive(clap::Args)]
struct ApplyArgs {
    /// A YAML file of objects, or a directory of them (*.yaml, *.yml); repeat for several.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    target: ApplyTarget,
}

/// Where `apply` and `delete` write: a config dir, or etcd.
#[derive(clap::Args)]
struct ApplyTarget {
    /// The config dir of a single control plane (its --config-dir): written into its
    /// applied.yaml.
    #[arg(
        long,
        required_unless_present = "etcd_endpoints",
        conflicts_with = "etcd_endpoints"
    )]
    config_dir: Option<PathBuf>,
    #[command(flatten)]
    etcd: store::EtcdArgs,
}

#[derive(clap::Args)]
struct DeleteArgs {
    /// The objects this file (or directory) defines.
    #[arg(short = 'f', long = "filename", conflicts_with = "objects")]
    files: Vec<PathBuf>,
    /// KIND NAMESPACE/NAME [NAMESPACE/NAME ...], or MeshConfig.
    #[arg(required_unless_present = "files")]
    objects: Vec<String>,
    #[command(flatten)]
    target: ApplyTarget,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Directory of MeshConfig, Workload, Service and AccessPolicy documents (*.yaml, *.yml).
    #[arg(
        long,
        required_unless_present_any = ["kubernetes", "etcd_endpoints"],
        conflicts_with_all = ["kubernetes", "etcd_endpoints"]
    )]
    config_dir: Option<PathBuf>,
    /// Read the mesh from etcd instead (--etcd-endpoints; write it with `mesh-cp apply`), so
    /// that several replicas serve it. Give every replica the same CA (--ca-cert, --ca-key).
    #[command(flatten)]
    etcd: store::EtcdArgs,
    /// Read the mesh from the Kubernetes API (in-cluster credentials, or the kubeconfig).
    /// Nodes then authenticate with their service-account token (audience mycel-cp), checked
    /// with a TokenReview, instead of join tokens.
    #[arg(long, conflicts_with = "etcd_endpoints")]
    kubernetes: bool,
    /// With --kubernetes: the node daemon's service account, NAMESPACE/NAME; only its tokens
    /// are accepted from nodes.
    #[arg(long, default_value = "mycel-system/mycel-node")]
    node_service_account: String,
    /// With --kubernetes: the control plane's namespace, where its CA Secret (mycel-ca), trust
    /// bundle ConfigMap (mycel-trust-bundle) and leader Lease (mycel-cp-leader) live.
    #[arg(long, env = "POD_NAMESPACE", default_value = "mycel-system")]
    namespace: String,
    /// With --kubernetes or --etcd-endpoints: this replica's name in the leader election
    /// [default: the host name; with etcd, followed by the process id].
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Directory for the CA (ca.crt, ca.key) and join tokens; created if missing.
    #[arg(long)]
    data_dir: PathBuf,
    /// Address of the gRPC API (TLS) that nodes connect to.
    #[arg(long, default_value = "0.0.0.0:15012")]
    grpc_listen: SocketAddr,
    /// Address of the HTTP status endpoint and dashboard (/ui, /status, /policies, /explain,
    /// /debug/*, /healthz, /readyz); it shows the mesh: keep it on loopback or a trusted network.
    #[arg(long, default_value = "127.0.0.1:15014")]
    http_listen: SocketAddr,
    /// Address of the Prometheus endpoint (/metrics).
    #[arg(long, default_value = "0.0.0.0:15016")]
    metrics_listen: SocketAddr,
    /// A Prometheus server (host:port) that scrapes the nodes (job mycel-node): the dashboard
    /// (/ui on --http-listen) reads traffic from it. Without it, mesh-cp scrapes each connected
    /// node's metrics endpoint itself (up to 256 nodes).
    #[arg(long)]
    prometheus: Option<String>,
    /// A DNS name or IP address nodes use to reach this control plane; repeat for several
    /// [default: localhost, mesh-cp, the host name and this host's addresses].
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Use this root certificate (PEM) instead of the one in the data dir. (In Kubernetes, put
    /// your own root in the mycel-ca Secret, keys ca.crt and ca.key, before the first start.)
    #[arg(long, requires = "ca_key", conflicts_with = "kubernetes")]
    ca_cert: Option<PathBuf>,
    /// The private key (PEM) of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// With --etcd-endpoints: keep the CA in etcd, its private key sealed with this key (a
    /// file of 64 hex digits, `openssl rand -hex 32`; give every replica the same one). When
    /// etcd has none, the leader makes one, unless --ca-cert and --ca-key are given too:
    /// then that root is put in etcd (moving a single control plane's CA to replicas).
    #[arg(long, requires = "etcd_endpoints")]
    ca_encryption_key: Option<PathBuf>,
    /// How often to check the config dir for changes, in seconds.
    #[arg(long, default_value_t = 0.5, value_parser = seconds(HOUR))]
    reload_interval: f64,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a join token for a node, or one for each of several, and print them (each is shown
    /// once; only a hash is kept).
    Create {
        /// The node the token admits (its --node-name). Repeat it to issue tokens for
        /// several nodes at once; each line of the output is then `NODE TOKEN`.
        #[arg(long, required = true)]
        node: Vec<String>,
        #[command(flatten)]
        place: TokenPlace,
        /// How long the token is accepted (45s, 20m, 24h, 30d, ...). The node re-reads its
        /// token file on every connect: write a new token there before this runs out.
        #[arg(long, default_value = "30d", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
    /// Revoke a token by id; nodes using it are disconnected within seconds.
    Revoke {
        id: String,
        #[command(flatten)]
        place: TokenPlace,
    },
    /// List tokens: id, node, creation and expiry times (UTC).
    List {
        #[command(flatten)]
        place: TokenPlace,
    },
}

/// Where the tokens are kept: the data dir of a single control plane, or etcd.
#[derive(clap::Args)]
struct TokenPlace {
    /// mesh-cp's data dir (its --data-dir): where tokens.json is kept.
    #[arg(
        long,
        required_unless_present = "etcd_endpoints",
        conflicts_with = "etcd_endpoints"
    )]
    data_dir: Option<PathBuf>,
    /// With --etcd-endpoints, the tokens are kept in etcd, for every replica.
    #[command(flatten)]
    etcd: store::EtcdArgs,
}

fn main() {
    mesh_daemon::signals::unblock_stop_signals();
    let cli = Cli::parse_for(BINARY);
    mesh_daemon::logging::init(cli.log.log_format);
    let result = match cli.command {
        Command::Serve(args) => mesh_daemon::runtime::block_on(None, serve(*args)),
        Command::Apply(args) => mesh_daemon::runtime::block_on(None, apply(args)),
        Command::Delete(args) => mesh_daemon::runtime::block_on(None, delete(args)),
        Command::Token(cmd) => token(cmd),
        Command::Explain(args) => run_explain(args),
    };
    mesh_daemon::exit::on_error(BINARY.name, result);
}

fn run_explain(args: ExplainArgs) -> anyhow::Result<()> {
    let q = &args.question;
    let (from, to) = q.parse()?;
    let explanation = match &args.config_dir {
        Some(dir) => {
            let config = mesh_model::load_dir(dir)?;
            explain::explain(&config, &from, &to, q.port)?
        }
        None => explain::fetch(&args.cp, &from, &q.to, q.port)?,
    };
    match args.output {
        OutputFormat::Text => print!("{}", explain::render(&explanation)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
    }
    Ok(())
}

fn ensure_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create --data-dir {}", dir.display()))?;
    }
    Ok(())
}

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d = mesh_model::duration::parse(s)?;
    if d.is_zero() {
        return Err("a token that expires at once is of no use".into());
    }
    Ok(d)
}

/// A unix time as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(secs: u64) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| secs.to_string())
}

fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    let place = match &cmd {
        TokenCommand::Create { place, .. }
        | TokenCommand::Revoke { place, .. }
        | TokenCommand::List { place } => place,
    };
    if let Some(dir) = place.data_dir.clone() {
        return token_in_dir(&dir, cmd);
    }
    let args = place.etcd.clone();
    mesh_daemon::runtime::block_on(None, async move {
        let etcd = store::Store::new(&args)?;
        match cmd {
            TokenCommand::Create { node, ttl, .. } => {
                print_tokens(store::tokens::create(&etcd, &node, ttl).await?)
            }
            TokenCommand::Revoke { id, .. } => {
                print_revoked(&store::tokens::revoke(&etcd, &id).await?)
            }
            TokenCommand::List { .. } => print_token_list(&store::tokens::list(&etcd).await?),
        }
        Ok(())
    })
}

fn token_in_dir(data_dir: &std::path::Path, cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create { node, ttl, .. } => {
            ensure_data_dir(data_dir)?;
            print_tokens(tokens::create_many(data_dir, &node, ttl)?);
        }
        TokenCommand::Revoke { id, .. } => print_revoked(&tokens::revoke(data_dir, &id)?),
        TokenCommand::List { .. } => print_token_list(&tokens::list(data_dir)?),
    }
    Ok(())
}

fn print_tokens(made: Vec<(tokens::TokenRecord, String)>) {
    let several = made.len() > 1;
    for (record, token) in made {
        eprintln!(
            "token {} for node {} created, valid until {}; it is not shown again",
            record.id,
            record.node,
            record.expires.map_or_else(|| "-".into(), utc)
        );
        if several {
            println!("{} {token}", record.node);
        } else {
            println!("{token}");
        }
    }
}

fn print_revoked(record: &tokens::TokenRecord) {
    eprintln!("token {} of node {} revoked", record.id, record.node);
}

fn print_token_list(all: &[tokens::TokenRecord]) {
    println!("{:<14} {:<24} {:<21} EXPIRES", "ID", "NODE", "CREATED");
    for t in all {
        let expires = t
            .expires
            .map_or_else(|| "never (made before tokens expired)".into(), utc);
        println!(
            "{:<14} {:<24} {:<21} {expires}",
            t.id,
            t.node,
            utc(t.created)
        );
    }
}

async fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    let files = store::read_inputs(&args.files)?;
    let objects = store::Object::all_of(&files)?;
    if objects.is_empty() {
        bail!("no object in {}", paths(&args.files));
    }
    match &args.target.config_dir {
        Some(dir) => print_dir_report(&mesh_cp::dir_apply::apply(dir, &objects)?),
        None => {
            let store = store::Store::new(&args.target.etcd)?;
            print_report(&store::apply::apply(&store, &objects).await?);
        }
    }
    Ok(())
}

async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let targets: Vec<(&'static str, Option<mesh_model::ObjectKey>)> = if args.files.is_empty() {
        store::named(&args.objects).map_err(anyhow::Error::msg)?
    } else {
        let files = store::read_inputs(&args.files)?;
        store::Object::all_of(&files)?
            .into_iter()
            .map(|o| (o.kind, o.key))
            .collect()
    };
    match &args.target.config_dir {
        Some(dir) => print_dir_report(&mesh_cp::dir_apply::delete(dir, &targets)?),
        None => {
            let store = store::Store::new(&args.target.etcd)?;
            print_report(&store::apply::delete(&store, &targets).await?);
        }
    }
    Ok(())
}

fn print_dir_report(report: &mesh_cp::dir_apply::DirReport) {
    for (object, outcome) in &report.objects {
        println!("{object} {outcome}");
    }
    match &report.written {
        Some(path) => eprintln!(
            "{} written; mesh-cp applies it at its next read of the directory",
            path.display()
        ),
        None => eprintln!("nothing changed"),
    }
}

fn paths(paths: &[PathBuf]) -> String {
    let all: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    all.join(", ")
}

fn print_report(report: &store::apply::Report) {
    for (object, outcome) in &report.objects {
        println!("{object} {outcome}");
    }
    match report.version {
        Some(v) => eprintln!("config version {v} written"),
        None => eprintln!("nothing changed"),
    }
}

/// Where the config comes from, once its first version is read.
enum Origin {
    Dir(PathBuf, Vec<(PathBuf, String)>, Box<mesh_model::Parser>),
    Kubernetes(Box<kubernetes::Cluster>),
    Store(
        Box<store::source::Source>,
        u64,
        u64,
        store::leader::Election,
    ),
}

/// The first config, where the rest will come from, the CA and how nodes authenticate.
async fn prepare(
    args: &ServeArgs,
) -> anyhow::Result<(mesh_model::Config, Origin, ca::Ca, node_auth::NodeAuth)> {
    if !args.etcd.etcd_endpoints.is_empty() {
        return prepare_store(args).await;
    }
    let Some(dir) = &args.config_dir else {
        return prepare_cluster(args).await;
    };
    if !dir.is_dir() {
        bail!("--config-dir {} is not a directory", dir.display());
    }
    let (config, files, parser) = source::initial(dir)
        .context("the config dir is invalid; fix it before starting the control plane")?;
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => ca::Ca::load_or_create(cert, key, false)?,
        _ => ca::Ca::load_or_create(
            &args.data_dir.join("ca.crt"),
            &args.data_dir.join("ca.key"),
            true,
        )?,
    };
    let auth = node_auth::NodeAuth::join_tokens(tokens::TokenStore::new(&args.data_dir));
    Ok((
        config,
        Origin::Dir(dir.clone(), files, Box::new(parser)),
        ca,
        auth,
    ))
}

async fn prepare_store(
    args: &ServeArgs,
) -> anyhow::Result<(mesh_model::Config, Origin, ca::Ca, node_auth::NodeAuth)> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let sealing = match (&args.ca_cert, &args.ca_key, &args.ca_encryption_key) {
        (Some(cert), Some(key), None) => Err(ca::Ca::load_or_create(cert, key, false)?),
        (cert, key, Some(path)) => {
            let import = match (cert, key) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                _ => None,
            };
            let served = args.data_dir.join("ca.crt");
            let known = store::ca::Known {
                import,
                served: served.exists().then(|| read(&served)).transpose()?,
            };
            Ok((store::ca::SealingKey::read(path)?, known))
        }
        _ => bail!(
            "with --etcd-endpoints, give every replica the same CA: --ca-encryption-key (the CA kept in etcd) or --ca-cert and --ca-key"
        ),
    };
    let store = store::Store::new(&args.etcd)?;
    tracing::info!(
        endpoints = store.client.endpoints(),
        prefix = args.etcd.etcd_prefix,
        "reading the mesh's config from etcd"
    );
    let identity = args.pod_name.clone().unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "mesh-cp".into());
        format!("{host}-{}", std::process::id())
    });
    let election =
        store::leader::Election::start(store.clone(), identity, store::leader::Timing::default());
    let leader = election.leader.clone();
    let ca = match sealing {
        Err(ca) => ca,
        Ok((sealing, known)) => {
            let ca = store::ca::load(&store, &sealing, &known, leader.clone()).await?;
            // The root (public) where nodes' --cp-ca is copied from, as in a single control
            // plane's data dir.
            ensure_data_dir(&args.data_dir)?;
            let path = args.data_dir.join("ca.crt");
            mesh_cp::files::replace(
                &path,
                &args.data_dir.join(".ca.crt.tmp"),
                ca.root_pem().as_bytes(),
                0o644,
            )
            .map_err(|(at, e)| anyhow::anyhow!("cannot write {}: {e}", at.display()))?;
            ca
        }
    };
    let epoch = store.epoch_when_answered().await?;
    // Join tokens from the store too: a node authenticates to whichever replica it reaches.
    let (records, revision) = store::when_answered(|| store::tokens::read(&store)).await?;
    let (keep, records) = tokio::sync::watch::channel(records);
    tokio::spawn(store::tokens::follow_tokens(store.clone(), revision, keep));
    let (config, version, source) = store::source::Source::initial(store).await?;
    let auth = node_auth::NodeAuth::join_tokens(tokens::TokenStore::watched(records));
    Ok((
        config,
        Origin::Store(Box::new(source), version, epoch, election),
        ca,
        auth,
    ))
}

async fn prepare_cluster(
    args: &ServeArgs,
) -> anyhow::Result<(mesh_model::Config, Origin, ca::Ca, node_auth::NodeAuth)> {
    let Some((sa_ns, sa_name)) = args.node_service_account.split_once('/') else {
        bail!(
            "--node-service-account {:?} is not NAMESPACE/NAME",
            args.node_service_account
        );
    };
    let identity = args.pod_name.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "mesh-cp".into())
    });
    let options = kubernetes::Options {
        namespace: args.namespace.clone(),
        identity,
        node_service_account: (sa_ns.to_owned(), sa_name.to_owned()),
        retry: kubernetes::watch::Retry::default(),
        timing: kubernetes::leader::Timing::default(),
    };
    // kube's error already names each place it looked; its sources only repeat it.
    let client = ::kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API: {e}"))?;
    tracing::info!(
        namespace = options.namespace,
        identity = options.identity,
        "listing pods, services, endpoint slices, namespaces and Mycel resources; loading the CA"
    );
    let (mut cluster, ca, auth) = kubernetes::Cluster::start(client, &options).await?;
    // Published by the caller; `follow` reads only the first problems and verdicts.
    let config = std::mem::take(&mut cluster.first.config);
    Ok((config, Origin::Kubernetes(Box::new(cluster)), ca, auth))
}

/// How long an orderly stop waits for the nodes' connections to close.
const STOP_WAIT: Duration = Duration::from_secs(5);

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    ensure_data_dir(&args.data_dir)?;
    let (config, origin, ca, auth) = prepare(&args).await?;
    let grpc = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("cannot listen on --grpc-listen {}", args.grpc_listen))?;
    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("cannot listen on --http-listen {}", args.http_listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on --metrics-listen {}", args.metrics_listen))?;

    // In etcd, the version is the store's and the same on every replica; otherwise each
    // run starts above the last.
    let (first, epoch) = match &origin {
        Origin::Store(_, version, epoch, _) => (*version, Some(*epoch)),
        _ => (
            first_version::take(&args.data_dir, std::time::SystemTime::now())?,
            None,
        ),
    };
    match epoch {
        Some(_) => tracing::info!(version = first, "config version in etcd"),
        None => tracing::info!(version = first, "first config version of this run"),
    }
    let (publish, published) = tokio::sync::watch::channel(state::Published::new(first, config));
    let source = match &origin {
        Origin::Dir(..) => "directory",
        Origin::Kubernetes(_) => "kubernetes",
        Origin::Store(..) => "etcd",
    };
    let mut shared = state::Shared::new(
        published,
        auth,
        ca,
        metrics::CpMetrics::new().context("cannot register the metrics")?,
    )
    .with_config_source(source);
    if let Some(epoch) = epoch {
        shared.epoch = epoch;
    }
    match &origin {
        Origin::Store(.., election) => shared.leader = Some(election.leader.clone()),
        Origin::Kubernetes(cluster) => shared.leader = Some(cluster.leader.clone()),
        Origin::Dir(..) => {}
    }
    let shared = Arc::new(shared);
    shared
        .watch_metrics()
        .context("cannot register the metrics")?;
    let names = if args.server_names.is_empty() {
        server::default_server_names(args.grpc_listen)
    } else {
        args.server_names.clone()
    };
    // With etcd, this replica's part in the election, left when it stops.
    let mut election = None;
    match origin {
        Origin::Dir(dir, files, parser) => tokio::spawn(source::watch_dir(
            dir,
            Duration::from_secs_f64(args.reload_interval),
            files,
            *parser,
            publish,
            shared.clone(),
        )),
        Origin::Kubernetes(cluster) => {
            tokio::spawn(kubernetes::follow(*cluster, publish, shared.clone()))
        }
        Origin::Store(source, _, _, elected) => {
            election = Some(elected);
            tokio::spawn(source.follow(publish, shared.clone()))
        }
    };
    let dashboard = Arc::new(mesh_cp::ui::Dashboard::new(
        shared.clone(),
        args.prometheus.clone(),
    ));
    tokio::spawn(status::serve(
        http,
        shared.clone(),
        dashboard,
        names.clone(),
    ));
    tokio::spawn(status::serve_metrics(metrics_listener, shared.clone()));
    let grpc_task = tokio::spawn(server::serve_grpc(grpc, shared.clone(), names));
    let mut signals = mesh_daemon::signals::Signals::new()?;
    {
        let c = shared.config.borrow();
        tracing::info!(
            grpc = %args.grpc_listen, http = %args.http_listen,
            workloads = c.config.workloads.len(), services = c.config.services.len(),
            policies = c.config.policies.len(), trust_domain = c.config.mesh.trust_domain,
            "mesh-cp ready"
        );
    }

    let mut grpc_task = grpc_task;
    tokio::select! {
        () = signals.recv() => {}
        r = &mut grpc_task => return r.context("the gRPC server panicked")?,
    }
    // Nodes keep their last config and certificates and reconnect on their own; each is told
    // the stream ends because of a stop, not a fault.
    tracing::info!("shutting down: closing the nodes' streams");
    shared.stopping.send_replace(true);
    if let Some(election) = election {
        // Another replica leads at once, rather than when this one's lease runs out.
        election.stop().await;
    }
    tokio::select! {
        r = &mut grpc_task => r.context("the gRPC server panicked")??,
        () = tokio::time::sleep(STOP_WAIT) => {
            tracing::warn!("nodes' connections not closed within {}s; stopping anyway", STOP_WAIT.as_secs());
        }
        () = signals.recv() => tracing::info!("second signal: stopping now"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        super::Cli::command_for(super::BINARY).debug_assert();
    }
}
