//! Tunnels between nodes: how many are open, how many connections (streams) each one
//! carried before it closed, and what became of every tunnel asked for (`mycel_tunnels_total`).
//!
//! A tunnel is one TLS session (which carries its connections one after another) or one QUIC
//! connection (which carries them side by side, a stream each). Both ends count: `out` at the
//! node that opened it, `in` at the node it was opened to. A stream is one connection's header
//! exchange, whatever the destination answered, so a refused connection counts too.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use mesh_model::Transport;

use super::{MetricsError, PREFIX};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Out,
    In,
}

/// Every child of the families, in the order of their index.
const CHILDREN: [(Direction, Transport); 4] = [
    (Direction::Out, Transport::Tls),
    (Direction::Out, Transport::Quic),
    (Direction::In, Transport::Tls),
    (Direction::In, Transport::Quic),
];

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }
}

/// What became of a tunnel, or of a connection on one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A connection this node sent through a tunnel, answered OK (on a new or reused one).
    OutOpened,
    /// Of those, the ones on a session or QUIC connection that was there already.
    OutReused,
    /// A tunnel to an endpoint that could not be made or was refused.
    OutFailed,
    /// A tunnelled connection this node's pod admitted.
    InAccepted,
    /// A tunnel, or a connection on one, this node's pod refused: limits, handshake, header,
    /// identity or policy.
    InRefused,
    /// A QUIC connection this node opened.
    QuicOutOpened,
    /// A QUIC connection another node opened to this node's pods.
    QuicInAccepted,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::OutOpened,
        Outcome::OutReused,
        Outcome::OutFailed,
        Outcome::InAccepted,
        Outcome::InRefused,
        Outcome::QuicOutOpened,
        Outcome::QuicInAccepted,
    ];

    /// `direction` and `outcome`.
    fn labels(self) -> [&'static str; 2] {
        match self {
            Outcome::OutOpened => ["out", "opened"],
            Outcome::OutReused => ["out", "reused"],
            Outcome::OutFailed => ["out", "failed"],
            Outcome::InAccepted => ["in", "accepted"],
            Outcome::InRefused => ["in", "refused"],
            Outcome::QuicOutOpened => ["quic_out", "opened"],
            Outcome::QuicInAccepted => ["quic_in", "accepted"],
        }
    }
}

/// The tunnel families, and their children made once.
pub struct TunnelMetrics {
    /// Indexed as [`CHILDREN`] is.
    open: [IntGauge; 4],
    streams: [Histogram; 4],
    /// Indexed as [`Outcome::ALL`] is.
    outcomes: [IntCounter; 7],
}

impl TunnelMetrics {
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        let labels = ["direction", "transport"];
        let open = IntGaugeVec::new(
            Opts::new(
                format!("{PREFIX}_tunnels_open"),
                "Tunnels open now, by direction (out: this node opened it) and transport (tls: \
                 a session, quic: a connection).",
            ),
            &labels,
        )?;
        let streams = HistogramVec::new(
            HistogramOpts::new(
                format!("{PREFIX}_tunnel_streams"),
                "Connections each tunnel carried (one after another on a TLS session, side by \
                 side on a QUIC connection), observed when the tunnel closes.",
            )
            .buckets(vec![0.0, 1.0, 2.0, 5.0, 10.0, 25.0, 100.0, 1000.0, 10000.0]),
            &labels,
        )?;
        let outcomes = IntCounterVec::new(
            Opts::new(
                format!("{PREFIX}_tunnels_total"),
                "Tunnels by direction and outcome: out (opened, reused, failed), in \
                 (accepted, refused), QUIC connections (out, in).",
            ),
            &["direction", "outcome"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(streams.clone()))?;
        registry.register(Box::new(outcomes.clone()))?;
        let child = |i: usize| {
            let (direction, transport) = CHILDREN[i];
            [direction.as_str().to_owned(), transport.to_string()]
        };
        Ok(Self {
            open: std::array::from_fn(|i| open.with_label_values(&child(i))),
            streams: std::array::from_fn(|i| streams.with_label_values(&child(i))),
            outcomes: Outcome::ALL.map(|o| outcomes.with_label_values(&o.labels())),
        })
    }

    /// The position of (`direction`, `kind`) in [`CHILDREN`].
    fn index(direction: Direction, transport: Transport) -> usize {
        match (direction, transport) {
            (Direction::Out, Transport::Tls) => 0,
            (Direction::Out, Transport::Quic) => 1,
            (Direction::In, Transport::Tls) => 2,
            (Direction::In, Transport::Quic) => 3,
        }
    }

    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].inc();
    }

    /// A tunnel that has just been established: open until the returned value drops.
    pub fn opened(&self, direction: Direction, transport: Transport) -> OpenTunnel {
        let i = Self::index(direction, transport);
        self.open[i].inc();
        OpenTunnel {
            open: self.open[i].clone(),
            streams: self.streams[i].clone(),
            carried: AtomicU64::new(0),
        }
    }
}

/// One established tunnel, held by whatever owns the tunnel (the TLS session, the QUIC
/// connection's use count, the task that serves an inbound tunnel).
pub struct OpenTunnel {
    open: IntGauge,
    streams: Histogram,
    carried: AtomicU64,
}

impl OpenTunnel {
    /// One more connection on the tunnel.
    pub fn stream(&self) {
        self.carried.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.open.dec();
        self.streams
            .observe(self.carried.load(Ordering::Relaxed) as f64);
    }
}

impl std::fmt::Debug for OpenTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenTunnel")
            .field("carried", &self.carried.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (value of the gauge, histogram count, histogram sum) of one child.
    fn read(registry: &Registry, direction: &str, transport: &str) -> (f64, u64, f64) {
        let families = registry.gather();
        let find = |name: &str| {
            families
                .iter()
                .filter(|f| f.name() == name)
                .flat_map(|f| f.get_metric().iter())
                .find(|m| {
                    let l = m.get_label();
                    l.iter()
                        .any(|l| l.name() == "direction" && l.value() == direction)
                        && l.iter()
                            .any(|l| l.name() == "transport" && l.value() == transport)
                })
                .cloned()
        };
        let open = find("mycel_tunnels_open").expect("open child");
        let streams = find("mycel_tunnel_streams").expect("streams child");
        let h = streams.get_histogram();
        (
            open.get_gauge().get_value(),
            h.get_sample_count(),
            h.get_sample_sum(),
        )
    }

    #[test]
    fn each_child_is_at_its_index() {
        for (i, (direction, transport)) in CHILDREN.into_iter().enumerate() {
            assert_eq!(TunnelMetrics::index(direction, transport), i);
        }
    }

    #[test]
    fn a_tunnel_is_open_until_dropped_then_observes_its_streams() {
        let registry = Registry::new();
        let m = TunnelMetrics::register(&registry).unwrap();
        let a = m.opened(Direction::Out, Transport::Tls);
        let b = m.opened(Direction::Out, Transport::Tls);
        let c = m.opened(Direction::In, Transport::Quic);
        for _ in 0..3 {
            a.stream();
        }
        c.stream();
        assert_eq!(read(&registry, "out", "tls"), (2.0, 0, 0.0));
        drop(a);
        assert_eq!(read(&registry, "out", "tls"), (1.0, 1, 3.0));
        drop(b);
        assert_eq!(read(&registry, "out", "tls"), (0.0, 2, 3.0));
        assert_eq!(read(&registry, "in", "quic"), (1.0, 0, 0.0));
        drop(c);
        assert_eq!(read(&registry, "in", "quic"), (0.0, 1, 1.0));
        // Each child has its own labels.
        assert_eq!(read(&registry, "out", "quic"), (0.0, 0, 0.0));
        assert_eq!(read(&registry, "in", "tls"), (0.0, 0, 0.0));
    }
}
