//! mesh-node: Mycel's per-node daemon.

use mesh_node::{
    access_log, admin, capture, cni, control, enroll,
    handoff::{self, gate::Gate, gate::Phase, protocol::Item, sockets::Sockets},
    identity, kubernetes, metrics, node, proxy, workloads,
};

use mesh_daemon::{
    cli::{seconds, Binary, DAY},
    host::{cgroup2_root, check_cgroup2},
};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use tokio::sync::watch;

const BINARY: Binary = Binary {
    name: "mesh-node",
    version: env!("CARGO_PKG_VERSION"),
    about: "Mycel node daemon: captures pod traffic with eBPF into a node proxy",
};

type Cli = mesh_daemon::cli::Cli<Command>;

#[derive(Subcommand)]
enum Command {
    /// Attach the capture programs, enroll this node's workloads and run the proxy.
    ///
    /// Workloads come from the control plane (--cp, --token-file, --cp-ca), which also signs
    /// their certificates; the node keeps its last config and certificates while the control
    /// plane is unreachable. In Kubernetes (--kubernetes), the pods to capture are this
    /// node's pods in the mesh, each captured when the CNI plugin reports its netns. Offline
    /// mode (--workloads) reads them from a local file of `Workload` documents instead,
    /// re-read when it changes (a bad file is reported and ignored, keeping the last good
    /// set); it has no certificates.
    Run(Box<RunArgs>),
    /// Take Mycel's capture off this node: remove the pinned eBPF maps and links (which keep
    /// pods captured while no daemon runs), and any Mycel program left on the cgroup.
    ///
    /// Refused while a mesh-node of this node runs. Afterwards the node's pods connect
    /// directly, outside the mesh, and nothing polices plaintext to them. Running it again
    /// changes nothing.
    Uninstall(UninstallArgs),
    /// Put the CNI plugin in place and chain it after the cluster's network plugin (the
    /// DaemonSet's init container runs this), then exit.
    ///
    /// Copies this binary to BIN_DIR/mycel-cni and adds the plugin at the end of the plugin
    /// list of the first configuration in CONF_DIR (a single-plugin .conf becomes a
    /// .conflist). Running it again changes nothing.
    InstallCni(InstallCniArgs),
}

#[derive(clap::Args)]
struct UninstallArgs {
    /// The node whose pins to remove (`run --node-name`).
    #[arg(long)]
    node_name: String,
    /// The cgroup the daemon attached to (`run --cgroup`) [default: the root of the cgroup2
    /// mount in /proc/mounts].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// The bpffs the pins are in (`run --bpffs`).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

#[derive(clap::Args)]
struct InstallCniArgs {
    /// The node's CNI plugin directory, as mounted in this container.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The node's CNI configuration directory, as mounted in this container.
    #[arg(long)]
    conf_dir: PathBuf,
    /// Where the plugin reaches the daemon: the path of `run --cni-socket` on the host.
    #[arg(long, default_value = "/run/mycel/cni.sock")]
    socket: PathBuf,
    /// Namespaces whose pods start without asking the daemon (so they can start while it
    /// cannot); their meshed pods are captured once running instead. Repeat for several.
    #[arg(long = "exclude-namespace", default_values_t = ["kube-system".to_owned(), "mycel-system".to_owned()])]
    exclude_namespaces: Vec<String>,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["cp", "workloads"])))]
struct RunArgs {
    /// This node's name; only workloads placed on it are enrolled.
    #[arg(long)]
    node_name: String,
    /// Control plane gRPC address, `host:port` or `https://host:port`; several, comma-separated,
    /// for replicas of one control plane (`mesh-cp serve --etcd-endpoints`): one is used at a
    /// time, and when it goes away the node moves to the next at once, resuming from the
    /// config version it holds. A name with several addresses is tried address by address.
    #[arg(long, requires_all = ["token_file", "cp_ca"])]
    cp: Option<String>,
    /// File holding this node's join token (`mesh-cp token create`); re-read on every connect.
    #[arg(long, requires = "cp")]
    token_file: Option<PathBuf>,
    /// PEM root certificate that the control plane's serving certificate chains to (its
    /// data dir's ca.crt).
    #[arg(long, requires = "cp")]
    cp_ca: Option<PathBuf>,
    /// Kubernetes mode: enroll this node's pods that are in the mesh, learned from the API
    /// server (in-cluster config, or KUBECONFIG) and captured when the CNI plugin reports
    /// their netns, before their containers start. Identities, services and policy still come
    /// from --cp.
    #[arg(long, requires = "cp")]
    kubernetes: bool,
    /// Kubernetes mode: the host's /proc, to find the netns of pods that were running before
    /// the daemon started.
    #[arg(long, default_value = "/proc", requires = "kubernetes")]
    host_proc: PathBuf,
    /// Where the pods' network sysctls are written (each from a thread in the pod's netns):
    /// the return routing that lets applications see their clients' addresses turns on
    /// `ipv4/tcp_fwmark_accept` and `ipv{4,6}/fwmark_reflect` there. In a container, whose
    /// /proc/sys is read-only, mount the host's /proc/sys/net writable and name it here.
    #[arg(long, default_value = "/proc/sys/net")]
    net_sysctl_dir: PathBuf,
    /// Kubernetes mode: the Unix socket the CNI plugin reports new pods on.
    #[arg(long, default_value = "/run/mycel/cni.sock", requires = "kubernetes")]
    cni_socket: PathBuf,
    /// Take other nodes' workloads from the control plane on demand, as this node's pods use
    /// them, rather than every workload of the mesh: for meshes of many thousands of
    /// workloads, where the first sync of every node would carry them all. A connection to an
    /// address or Service endpoint this node does not hold waits for the control plane's
    /// answer (up to 2 s) and is refused if none comes, never passed around the mesh.
    #[arg(long, requires = "cp")]
    workloads_on_demand: bool,
    /// Offline mode: YAML file of `Workload` documents (apiVersion mycel.dev/v1alpha1).
    #[arg(long, conflicts_with = "cp")]
    workloads: Option<PathBuf>,
    /// cgroup v2 directory to attach the programs to [default: the root of the cgroup2 mount
    /// in /proc/mounts].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs to pin the capture's maps and links in, under mycel/<node name>/ (a bpffs is
    /// mounted there if there is none, except with --kubernetes: it must be the host's). The
    /// pins keep the node's pods captured while no
    /// daemon runs (their connects are refused, STRICT keeps dropping plaintext) and let the
    /// next daemon take over without a gap; `mesh-node uninstall` removes them.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Address of the admin endpoint (/healthz, /readyz, /debug/*); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_listen: SocketAddr,
    /// Address of the Prometheus endpoint (/metrics), for the node's scraper.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_listen: SocketAddr,
    /// Add the source and destination pods' names to the per-workload-pair metrics. Off by
    /// default: series then grow with the pods, not with the applications.
    #[arg(long)]
    metrics_pod_labels: bool,
    /// What gets a JSON line in the access log: connections (denied ones, or all) and, on
    /// ports that declare HTTP, requests.
    #[arg(long, value_enum, default_value = "denied")]
    access_log: access_log::Mode,
    /// Append the access log to this file instead of standard output.
    #[arg(long)]
    access_log_file: Option<PathBuf>,
    /// Capacity of each original-destination map (concurrent redirected connections).
    #[arg(long, default_value_t = mesh_ebpf_common::ORIG_DST_CAPACITY, value_parser = clap::value_parser!(u32).range(1..))]
    orig_dst_capacity: u32,
    /// Seconds to wait for a TCP connect to a destination outside the mesh, or (at the
    /// destination) to a pod's application. Connections to mesh Services take the timeout of
    /// their TrafficPolicy (`connect.timeout`, 10 s by default).
    #[arg(long, default_value_t = 10.0, value_parser = seconds(DAY))]
    connect_timeout: f64,
    /// Connections to one pod (tunnelled and plaintext) open at once; also the most
    /// connections one pod's application may have open through the proxy. More are refused
    /// (reset), counted in mycel_connections_limited_total and logged every 10 s.
    #[arg(long, default_value_t = proxy::limits::Config::default().connections_per_pod, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_pod: u32,
    /// Connections from one source address to this node's pods open at once.
    #[arg(long, default_value_t = proxy::limits::Config::default().connections_per_source, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_source: u32,
    /// Tunnel handshakes (until the first header arrives) in progress for one pod.
    #[arg(long, default_value_t = proxy::limits::Config::default().handshakes_per_pod, value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes_per_pod: u32,
    /// Tunnel handshakes in progress from one source address (an IPv6 source outside the
    /// mesh counts by its /64). Sources outside the mesh share half of --max-handshakes-per-pod.
    #[arg(long, default_value_t = proxy::limits::Config::default().handshakes_per_source, value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes_per_source: u32,
    /// Tunnel handshakes in progress on the whole node.
    #[arg(long, default_value_t = proxy::limits::Config::default().handshakes_per_node, value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes_per_node: u32,
    /// Seconds to let open connections finish before exiting: on SIGTERM, or once a new
    /// daemon has taken over (then a first SIGTERM does not cut the drain short, a second
    /// does). The node's pods stay captured after the exit (new connects refused) until the
    /// next daemon takes over.
    #[arg(long, default_value_t = 5.0, value_parser = seconds(DAY))]
    drain_timeout: f64,
    /// Offline mode: how often to check the workloads file for changes, in seconds.
    #[arg(long, default_value_t = 0.5, value_parser = seconds(DAY))]
    reload_interval: f64,
    /// Turn on the eBPF programs' debug log (aya-log); costly, for troubleshooting only.
    #[arg(long)]
    ebpf_log: bool,
    /// Threads that run the proxy [default: one per CPU]. Fewer threads wake each other less
    /// (less CPU per request), more serve more connections at once.
    #[arg(long, value_parser = clap::value_parser!(std::num::NonZeroUsize))]
    workers: Option<std::num::NonZeroUsize>,
}

fn main() {
    mesh_daemon::signals::unblock_stop_signals();
    // Installed as the CNI plugin, the binary speaks CNI, not this command line.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if Path::new(&argv0).file_name() == Some(std::ffi::OsStr::new(cni::install::PLUGIN)) {
        cni::plugin::main();
    }
    let cli = Cli::parse_for(BINARY);
    mesh_daemon::logging::init(cli.log.log_format);
    // aya-log forwards the eBPF programs' log records through the `log` facade.
    let _ = tracing_log::LogTracer::init();
    let result = match cli.command {
        Command::Run(args) => mesh_daemon::runtime::block_on(args.workers, run(*args)),
        Command::InstallCni(args) => install_cni(&args),
        Command::Uninstall(args) => uninstall(&args),
    };
    mesh_daemon::exit::on_error(BINARY.name, result);
}

/// Every proxied connection holds two sockets (three with its tunnel's peer on the other
/// side), so the default soft limit of 1024 descriptors caps a node at a few hundred
/// connections. Raise it to the hard limit the operator allows.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let before = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::debug!(
                from = before,
                to = lim.rlim_max,
                "raised the open-file limit"
            );
        } else {
            tracing::warn!(
                limit = before,
                "cannot raise the open-file limit; busy nodes may run out of descriptors"
            );
        }
    }
}

fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => cgroup2_root(Path::new("/proc/mounts"))?,
    };
    let cgroup_root = cgroup2_root(Path::new("/proc/mounts"))?;
    let removed = capture::uninstall(&cgroup, &cgroup_root, &args.bpffs, &args.node_name)?;
    tracing::info!(
        node = %args.node_name,
        maps = removed.maps,
        links = removed.links,
        "capture removed from this node; its pods now connect outside the mesh"
    );
    Ok(())
}

fn install_cni(args: &InstallCniArgs) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("cannot find this binary to copy")?;
    let done = cni::install::install(
        &binary,
        &args.bin_dir,
        &args.conf_dir,
        &args.socket,
        &args.exclude_namespaces,
    )?;
    tracing::info!(
        plugin = %done.binary.display(),
        config = %done.config.display(),
        changed = done.config_changed,
        "CNI plugin installed and chained"
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => cgroup2_root(Path::new("/proc/mounts"))?,
    };
    // Before anything is loaded: a wrong --cgroup says what to name instead.
    check_cgroup2(&cgroup)?;
    // Check the source before touching the kernel: a bad file or address at start is a bad
    // command line.
    let source = match (&args.cp, &args.token_file, &args.cp_ca, &args.workloads) {
        (Some(cp), Some(token), Some(ca), None) => Source::ControlPlane(
            control::CpClient::new(cp, ca, &args.node_name, token)?
                .with_metrics_port(args.metrics_listen.port()),
        ),
        (None, None, None, Some(file)) => {
            let (initial, text) = workloads::load(file, &args.node_name)?;
            Source::File(file.clone(), initial, text)
        }
        _ => bail!("give either --cp, --token-file and --cp-ca, or --workloads"),
    };
    // Kubernetes mode: the pods to capture come from the API and the CNI plugin. Both are set
    // up before the kernel is touched, so a bad socket path or kubeconfig is a start error.
    let client = if args.kubernetes {
        // kube's error already names each place it looked; its sources only repeat it.
        Some(kube::Client::try_default().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot configure the Kubernetes client (in-cluster or KUBECONFIG): {e}"
            )
        })?)
    } else {
        None
    };
    // A daemon running on this node hands its sockets over (listener handoff); one that
    // crashed left nothing to take but the pins.
    let sockets = Arc::new(Sockets::default());
    let handoff_path = capture::handoff_path(&cgroup)?;
    let layout = capture::layout_name(args.orig_dst_capacity)?;
    let takeover = handoff::new::ask(&handoff_path, &sockets, &args.node_name, &layout)
        .await
        .context("cannot take over from the mesh-node running on this node")?;
    if let Some(t) = &takeover {
        tracing::info!(
            old_cgroup = t.old_cgroup,
            "taking over from the mesh-node running on this node"
        );
        for why in &t.refused {
            tracing::warn!(refused = %why, "a socket handed over is not what it was said to be; not using it");
        }
    }
    let local = if let Some(client) = client {
        let pod_metrics = kubernetes::PodMetrics::new().context("cannot create the CNI metrics")?;
        let local = kubernetes::Pods::start(
            client,
            &args.node_name,
            args.host_proc.clone(),
            mesh_kube::Retry::default(),
            pod_metrics.clone(),
        );
        Some((local, pod_metrics))
    } else {
        None
    };
    let admin_listener = listen(&sockets, Item::Admin, args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on --admin-listen {}", args.admin_listen))?;
    // Answering from the start: /readyz says what the daemon is still waiting for.
    let connected = matches!(source, Source::ControlPlane(_));
    let (status_tx, status_rx) = watch::channel(admin::Status {
        connected_mode: connected,
        handoff: if takeover.is_some() {
            admin::HandoffState::TakingOver
        } else {
            admin::HandoffState::None
        },
        ..admin::Status::default()
    });
    let admin = Arc::new(admin::Admin::new(status_rx.clone()));
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin.clone()));
    let metrics_listener = listen(&sockets, Item::Metrics, args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on --metrics-listen {}", args.metrics_listen))?;
    let access_log = access_log::AccessLog::open(args.access_log, args.access_log_file.as_deref())
        .with_context(|| {
            format!(
                "cannot open --access-log-file {}",
                args.access_log_file
                    .as_deref()
                    .unwrap_or(Path::new("-"))
                    .display()
            )
        })?;
    let metrics = Arc::new(metrics::Metrics::new(
        Arc::new(access_log),
        args.metrics_pod_labels,
    )?);

    if let Some((_, pod_metrics)) = &local {
        for c in pod_metrics.collectors() {
            metrics.register(c)?;
        }
    }

    // The connect hooks leave this daemon's own connects alone by its cgroup, so whatever
    // else ran in it would escape capture: refuse to share it.
    let own = capture::OwnCgroup::find()?;
    let others = own.others();
    if !others.is_empty() {
        bail!(
            "other processes share mesh-node's cgroup {} (pids {others:?}); their connects would not be captured: run mesh-node in a cgroup of its own (its container, a systemd service, or `systemd-run --scope`)",
            own.dir.display()
        );
    }
    let capture = Arc::new(capture::Capture::attach(&capture::Options {
        cgroup: cgroup.clone(),
        bpffs: args.bpffs.clone(),
        // In Kubernetes the daemon is in a pod: a bpffs mounted there would go with it.
        mount_bpffs: !args.kubernetes,
        node: args.node_name.clone(),
        proxy_cgroup: own.id,
        orig_dst_capacity: args.orig_dst_capacity,
        handed_lock: sockets.take(&Item::Lock).map(std::fs::File::from),
        draining_daemon: takeover.as_ref().map(|t| t.old_cgroup),
        ebpf_log: args.ebpf_log,
        own_cgroup: Some(own.dir.clone()),
    })?);
    if let Some(lock) = capture.lock_file() {
        sockets.hold(Item::Lock, std::os::fd::AsFd::as_fd(&lock))?;
    }
    // The CNI socket is replaced only now that this daemon owns the node (a daemon that could
    // not take over or claim the cgroup must not take the plugin's socket from the one that
    // runs).
    let local = match local {
        Some((local, pod_metrics)) => {
            let handed = sockets
                .take(&Item::Cni)
                .map(std::os::unix::net::UnixListener::from)
                .and_then(|l| cni::server::adopt(l, &args.cni_socket));
            let cni = match handed {
                Some(l) => l,
                None => cni::server::bind(&args.cni_socket)?,
            };
            sockets.hold(Item::Cni, std::os::fd::AsFd::as_fd(&cni))?;
            Some((local, cni, pod_metrics))
        }
        None => None,
    };
    let mut start_guard = StartGuard(Some(capture.clone()));
    let t = capture.takeover();
    tracing::info!(
        cgroup = %capture.cgroup().display(),
        pins = %capture.pin_dir().display(),
        adopted_maps = t.adopted_maps,
        carried_over = ?t.carried_over,
        links_taken_over = t.links_updated,
        links_attached = t.links_attached,
        inbound_taken_over = t.inbound_updated,
        pods_gone = t.pods_gone,
        "capture programs attached"
    );

    let svids = Arc::new(identity::SvidStore::default());
    // Offline mode keeps the empty directory: every destination is passed through unchanged.
    let (directory_tx, directory_rx) =
        watch::channel(Arc::new(proxy::directory::Directory::default()));
    let limited = proxy::limits::Limits::counter()?;
    metrics.register(Box::new(limited.clone()))?;
    let limits = proxy::limits::Config {
        connections_per_pod: args.max_connections_per_pod,
        connections_per_source: args.max_connections_per_source,
        handshakes_per_pod: args.max_handshakes_per_pod,
        handshakes_per_source: args.max_handshakes_per_source,
        handshakes_per_node: args.max_handshakes_per_node,
    };
    let (local_owner, local_pods) = proxy::local::local_pods();
    let mut shared = proxy::Shared::new(
        capture.clone(),
        &metrics,
        Duration::from_secs_f64(args.connect_timeout),
        directory_rx,
        local_pods,
        Arc::new(proxy::limits::Limits::new(limits, limited)),
    );
    let lookups = args.workloads_on_demand.then(|| {
        let (tx, rx) = tokio::sync::mpsc::channel(control::demand::QUEUE);
        shared.lookups = Some(tx);
        rx
    });
    let shared = Arc::new(shared);
    let (view_tx, view_rx) = watch::channel(Arc::new(control::MeshView::default()));
    let parts = admin::Parts {
        svids: svids.clone(),
        view: view_rx,
        proxy: shared.clone(),
    };
    // The metrics read the same state the admin endpoint shows, when scraped.
    let (figures, status) = (parts.clone(), status_rx.clone());
    metrics.register(Box::new(metrics::collect::NodeCollector::new(move || {
        figures.figures(&status.borrow())
    })?))?;
    admin.attached(parts);
    let metrics_task = tokio::spawn(admin::serve_metrics(metrics_listener, metrics));
    // A daemon taking over accepts on the handed-over listeners only once it is up; the old
    // one accepts on them until then.
    let (accepting_tx, accepting_rx) = watch::channel(takeover.is_none());
    let mut node = node::Node::new(
        &args.node_name,
        enroll::Enroller::new(
            shared.clone(),
            local_owner,
            connected,
            sockets.clone(),
            accepting_rx,
            args.net_sysctl_dir.clone(),
        ),
        &shared,
        svids,
        node::Outputs {
            view: view_tx,
            directory: directory_tx,
            status: status_tx.clone(),
        },
    );

    // Where this daemon is in handing over to the next one.
    let gate = Gate::default();
    node.set_gate(gate.clone());
    tokio::spawn(report_handoff(
        gate.clone(),
        status_tx.clone(),
        capture.clone(),
    ));
    let (handed_tx, handed_rx) = tokio::sync::oneshot::channel();
    let handoff = Handoff {
        path: handoff_path,
        sockets: sockets.clone(),
        gate: gate.clone(),
        me: handoff::old::Identity {
            node: args.node_name.clone(),
            layout: capture.layout().to_owned(),
            proxy_cgroup: own.id,
        },
        done: handed_tx,
    };
    let committed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let taking_over = match takeover {
        // Answer the next daemon once this one has taken over.
        Some(takeover) => Some(tokio::spawn(take_over(TakingOver {
            takeover,
            committed: committed.clone(),
            shared: shared.clone(),
            admin: admin.clone(),
            accepting: accepting_tx,
            capture: capture.clone(),
            status: status_tx.clone(),
            next: handoff,
        }))),
        None => {
            handoff.listen();
            None
        }
    };

    let mut signals = mesh_daemon::signals::Signals::new()?;
    let taken_over = gate.reached(Phase::TakenOver);
    let stop = async {
        tokio::select! {
            () = signals.recv() => {}
            () = taken_over => {}
        }
    };
    let mut node = match source {
        Source::File(file, initial, text) => {
            let mut node = node;
            node.apply_workloads(initial).await?;
            start_guard.disarm();
            tracing::info!(node = %args.node_name, admin = %args.admin_listen, enrolled = node.enrolled(), "mesh-node ready (offline mode)");
            let interval = Duration::from_secs_f64(args.reload_interval);
            node::follow_file(node, &file, text, &args.node_name, interval, stop).await
        }
        Source::ControlPlane(client) => {
            start_guard.disarm();
            let local = local.map(|(local, cni, _)| {
                tokio::spawn(cni::server::serve(cni, local.pods.clone(), gate.clone()));
                tracing::info!(socket = %args.cni_socket.display(), "answering the CNI plugin");
                local
            });
            tracing::info!(node = %args.node_name, admin = %args.admin_listen, cp = args.cp.as_deref().unwrap_or_default(), "mesh-node ready; waiting for the control plane");
            node::follow_control_plane(node, client, local, lookups, stop).await
        }
    };

    let drain = Duration::from_secs_f64(args.drain_timeout);
    // Signalled while a new daemon starts up on this one's sockets: its handoff decides how
    // this one ends (it takes over, or this one stops as usual).
    if gate.pausing() {
        // Idle now: the handoff may go on.
        if gate.phase() == Phase::Pausing {
            gate.set(Phase::Paused);
        }
        tracing::info!("signalled during a handoff; waiting for it to end");
        let _ = tokio::time::timeout(handoff::old::READY_TIMEOUT, gate.resumed()).await;
    }
    if gate.phase() != Phase::TakenOver {
        // A new daemon that says hello from now on is refused.
        gate.set(Phase::Stopping);
    }
    if gate.phase() == Phase::TakenOver {
        // The new daemon accepts on the sockets: stop accepting, close the QUIC connections
        // (the new daemon reads the QUIC sockets next), tell it, then drain.
        let quic_closed = node.hand_over().await;
        admin_task.abort();
        metrics_task.abort();
        // The new daemon owns the cgroup now: if it stops or crashes while this one drains, a
        // daemon started after it must be able to claim the cgroup.
        capture.hand_over_lock();
        // The new daemon has its own descriptors of the listeners; with these gone, a
        // listener it lets go of (it stopped, or crashed) is closed rather than left with a
        // queue nobody accepts from.
        sockets.clear_held();
        let handed = handed_rx.await.ok();
        if let Some(h) = &handed {
            if let Err(e) = h.released(quic_closed).await {
                tracing::warn!(error = %e, "cannot tell the new mesh-node that the sockets are its");
            }
        }
        tracing::info!(quic_closed, "handed over; draining connections");
        // The old pod's deletion (Kubernetes deletes it once the new one is ready) does not
        // cut the drain short; a second signal does.
        let signalled_twice = async {
            signals.recv().await;
            tracing::info!(
                ?drain,
                "handed over and draining; a second signal ends the drain now"
            );
            signals.recv().await;
        };
        tokio::select! {
            () = node.shutdown(drain) => {}
            () = signalled_twice => tracing::info!("signalled again while draining; exiting now"),
        }
        capture.release();
        tracing::info!("drained; bye");
        // The new daemon learns of the exit when this connection closes.
        drop(handed);
        return Ok(());
    }
    tracing::info!("shutting down: no new redirects, draining connections");
    if let Some(task) = taking_over {
        if committed.load(std::sync::atomic::Ordering::Acquire) {
            // The old daemon was told to stop accepting: finish taking over (briefly), then
            // stop as the owner.
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        } else {
            // Not up yet: the old daemon stays in charge (it sees this one go).
            task.abort();
        }
    }
    // The handoff socket goes with the cgroup lock (`CgroupLock`), when the lock is this
    // daemon's: one still taking over leaves the old daemon's alone.
    node.shutdown(drain).await;
    // Connections that outlived the drain still hold the capture; the programs and the cgroup
    // lock are let go here all the same. The pinned links stay: fail closed until the next
    // daemon takes over.
    capture.release();
    tracing::info!(pins = %capture.pin_dir().display(), "stopped; the node's pods stay captured (new connects refused) until a daemon starts again or `mesh-node uninstall` runs");
    Ok(())
}

/// A listener for `item` on `addr`: the one a daemon that handed over passed on, or a new one.
/// Either is held to hand over in turn.
async fn listen(
    sockets: &Sockets,
    item: Item,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    let listener = match sockets.take_listener(item, addr) {
        Some(handed) => {
            handed.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(handed)?
        }
        None => admin::bind(addr).await?,
    };
    sockets.hold(item, std::os::fd::AsFd::as_fd(&listener))?;
    Ok(listener)
}

/// This daemon's side of the next handoff.
struct Handoff {
    path: PathBuf,
    sockets: Arc<Sockets>,
    gate: Gate,
    me: handoff::old::Identity,
    done: tokio::sync::oneshot::Sender<handoff::old::TakenOver>,
}

impl Handoff {
    /// Answers a new daemon that wants to take over, from now on.
    fn listen(self) {
        match handoff::channel::Listener::bind(&self.path) {
            Ok(listener) => {
                tokio::spawn(handoff::old::serve(
                    listener,
                    self.sockets,
                    self.gate,
                    self.me,
                    self.done,
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for a new mesh-node to hand over to; an upgrade will refuse connections while it starts")
            }
        }
    }
}

/// Shows a handoff to the next daemon in /readyz; while one runs, the cgroup lock's file is
/// the new daemon's to remove (this one offered the lock).
async fn report_handoff(
    gate: Gate,
    status: watch::Sender<admin::Status>,
    capture: Arc<capture::Capture>,
) {
    loop {
        gate.left_running().await;
        if gate.phase() == Phase::Stopping {
            return;
        }
        capture.set_lock_handed_over(true);
        status.send_modify(|s| s.handoff = admin::HandoffState::HandingOver);
        gate.resumed().await;
        match gate.phase() {
            Phase::TakenOver => return,
            Phase::Stopping => {
                capture.set_lock_handed_over(false);
                return;
            }
            _ => {}
        }
        capture.set_lock_handed_over(false);
        status.send_modify(|s| s.handoff = admin::HandoffState::None);
    }
}

/// What the takeover task works with.
struct TakingOver {
    takeover: handoff::new::Takeover,
    /// Set once `ready` is about to go: from then on a stop waits for the task.
    committed: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<proxy::Shared>,
    admin: Arc<admin::Admin>,
    accepting: watch::Sender<bool>,
    capture: Arc<capture::Capture>,
    status: watch::Sender<admin::Status>,
    next: Handoff,
}

/// Once this daemon is up on the handed-over sockets: tell the old daemon, move the QUIC
/// endpoints to the sockets it let go of, accept on them, then answer the next daemon. A
/// daemon not up within `READY_WITHIN` gives up and exits, leaving the old one running.
async fn take_over(parts: TakingOver) {
    let TakingOver {
        takeover,
        committed,
        shared,
        admin,
        accepting,
        capture,
        status,
        next,
    } = parts;
    let started = takeover.asked_at;
    while let Err(why) = admin.up_for_takeover() {
        if started.elapsed() > handoff::new::READY_WITHIN {
            eprintln!(
                "mesh-node: error: not up within {:?} on the sockets of the running mesh-node ({why}); leaving it running",
                handoff::new::READY_WITHIN
            );
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old_cgroup = takeover.old_cgroup;
    let old_pid = takeover.old_pid;
    let old_alive = || {
        // SAFETY: kill with signal 0 only checks that the process exists.
        old_pid.is_some_and(|pid| unsafe { libc::kill(pid as libc::pid_t, 0) } == 0)
    };
    // From here a signal waits for this task: the old daemon stops accepting on `ready`.
    committed.store(true, std::sync::atomic::Ordering::Release);
    let released = match takeover.complete().await {
        Ok(r) => Some(r),
        // The old daemon carries on: two would both apply config.
        Err(e @ handoff::new::TakeoverError::Refused(_)) => {
            eprintln!(
                "mesh-node: error: the running mesh-node did not let go ({e}); leaving it running"
            );
            std::process::exit(1);
        }
        // No answer from one that still runs (its pid is known only on the host's pid
        // namespace): it may carry on too.
        Err(e) if old_alive() => {
            eprintln!(
                "mesh-node: error: the running mesh-node did not let go ({e}); leaving it running"
            );
            std::process::exit(1);
        }
        Err(e) => {
            tracing::warn!(error = %e, "the old mesh-node exited during the handoff; taking over");
            None
        }
    };
    // The lock is this daemon's now, its file too.
    capture.set_lock_handed_over(false);
    let quic_moved = next.sockets.rebind_quic();
    // Connections dialled from the ephemeral ports would not follow the endpoints.
    let quic_redialled = shared.quic.close_all(b"the endpoint moved").await;
    let unused = next.sockets.close_untaken();
    // Accepting only now: every relay starts on this daemon's endpoints as they stay. The
    // old daemon stopped accepting a moment ago; the listeners' queues kept what came since.
    let _ = accepting.send(true);
    status.send_modify(|s| s.handoff = admin::HandoffState::None);
    tracing::info!(
        took_ms = started.elapsed().as_millis() as u64,
        quic_moved,
        quic_redialled,
        unused,
        quic_closed_by_old = released.as_ref().map_or(0, |r| r.quic_closed),
        "took over from the previous mesh-node; ready"
    );
    next.listen();
    if let Some(released) = released {
        released.exited().await;
    }
    capture.forget_daemon(old_cgroup);
    tracing::info!("the previous mesh-node has exited");
}

/// Until the daemon is up, a failed start takes back the capture it attached (see
/// `Capture::abandon`); dropped armed on the way out of a failed start.
struct StartGuard(Option<Arc<capture::Capture>>);

impl StartGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(capture) = self.0.take() {
            capture.abandon();
        }
    }
}

enum Source {
    /// The file, what it says for this node, and the text it was read from.
    File(PathBuf, workloads::FileConfig, String),
    ControlPlane(control::CpClient),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command_for(BINARY).debug_assert();
    }
}
