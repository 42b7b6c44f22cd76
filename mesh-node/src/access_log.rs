//! The access log: one JSON line per connection when it ends, or when it fails to be made.
//!
//! Each node logs the connections it reports in the metrics (`reporter` says which end it
//! is), so a deny is logged by the node that decided it, with the deciding policy and rule.
//! `--access-log denied` (the default) logs policy denies only; `all` logs every connection;
//! `off` nothing. Lines go to standard output or to `--access-log-file`, apart from the
//! daemon's own log on standard error.

use std::{
    fs::OpenOptions,
    io::{self, LineWriter, Write},
    net::SocketAddr,
    path::Path,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Nothing.
    Off,
    /// Connections a policy denied, at connect or later (a policy change closing them).
    Denied,
    /// Every connection, and every failure to make one.
    All,
}

pub struct AccessLog {
    mode: Mode,
    out: Mutex<Box<dyn Write + Send>>,
}

impl AccessLog {
    /// Appends to `file`, or writes to standard output.
    pub fn open(mode: Mode, file: Option<&Path>) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match file {
            Some(path) => Box::new(LineWriter::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            )),
            None => Box::new(LineWriter::new(io::stdout())),
        };
        Ok(Self {
            mode,
            out: Mutex::new(out),
        })
    }

    /// A log that writes nothing (tests of other parts).
    #[cfg(test)]
    pub fn off() -> Self {
        Self {
            mode: Mode::Off,
            out: Mutex::new(Box::new(io::sink())),
        }
    }

    pub fn wants(&self, denied: bool) -> bool {
        match self.mode {
            Mode::Off => false,
            Mode::Denied => denied,
            Mode::All => true,
        }
    }

    /// Writes `entry` as one line. A log that cannot be written (a closed pipe, a full disk)
    /// costs the line, never the connection.
    pub fn write(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_all(&line);
    }
}

/// One connection, as logged. Empty strings and absent addresses are unknown.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// RFC 3339, UTC, when the connection ended.
    pub time: String,
    pub reporter: &'a str,
    pub connection_id: u64,
    /// `namespace/app`: the application (see `metrics::Pair`); `source_pod` is the replica.
    pub source_workload: String,
    pub source_pod: String,
    pub source_identity: &'a str,
    pub source_address: Option<SocketAddr>,
    pub destination_workload: String,
    pub destination_pod: String,
    pub destination_identity: &'a str,
    pub destination_address: Option<SocketAddr>,
    pub destination_service: &'a str,
    pub destination_port: u16,
    /// `tls`, `quic`, `local` (same node, no tunnel), `plaintext`, `passthrough`.
    pub transport: &'a str,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_seconds: f64,
    /// `allowed`, `denied`, or `failed` (not made for a reason other than policy).
    pub verdict: &'a str,
    /// The deciding policy and rule, where this node decided.
    pub policy: &'a str,
    pub rule: &'a str,
    /// Connect attempts the source made (0 in a destination's line).
    pub attempts: u32,
    /// The backend Service a ServiceRoute picked; empty without a route.
    pub backend: &'a str,
    /// `closed` (ended normally), `reset`, `closed_by_policy`, `idle_timeout`,
    /// `max_duration`, or why it was not made (e.g. `connection_limit`, `rate_limited`).
    pub close_reason: &'a str,
    /// What the failure said, for people: the refusal or the error.
    pub detail: &'a str,
}

pub fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn seconds(d: Duration) -> f64 {
    // Microseconds are enough and keep the lines short.
    (d.as_secs_f64() * 1e6).round() / 1e6
}
