//! The access log: one JSON line per connection when it ends, or when it fails to be made,
//! and, on ports that declare HTTP, per request when its response ends (`kind` says which).
//!
//! Each node logs the connections it reports in the metrics (`reporter` says which end it
//! is), so a deny is logged by the node that decided it, with the deciding policy and rule;
//! requests are logged by the source's node, the one that sees them.
//! `--access-log denied` (the default) logs policy denies only; `requests` adds every request;
//! `all` logs every connection and every request; `off` nothing. Lines go to standard output
//! or to `--access-log-file`, apart from the daemon's own log on standard error.

use std::{
    fs::OpenOptions,
    io::{self, LineWriter, Write},
    net::SocketAddr,
    path::Path,
    sync::Mutex,
    time::Duration,
};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Nothing.
    Off,
    /// Connections a policy denied, at connect or later (a policy change closing them).
    Denied,
    /// What `denied` logs, and every request to a port that declares HTTP.
    Requests,
    /// Every connection, every failure to make one, and every request.
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
            Mode::Denied | Mode::Requests => denied,
            Mode::All => true,
        }
    }

    /// Whether requests are logged.
    pub fn wants_requests(&self) -> bool {
        matches!(self.mode, Mode::Requests | Mode::All)
    }

    /// Writes `entry` as one line. A log that cannot be written (a closed pipe, a full disk)
    /// costs the line, never the connection.
    pub fn write(&self, entry: &impl Serialize) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_all(&line);
    }
}

/// Who talked to whom, in every line. Empty strings and absent addresses are unknown.
#[derive(Debug, Serialize)]
pub struct Ends<'a> {
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
}

/// One connection, as logged. Empty strings and absent addresses are unknown.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// RFC 3339, UTC, when the connection ended.
    pub time: String,
    /// `connection`.
    pub kind: &'static str,
    pub reporter: &'a str,
    pub connection_id: u64,
    #[serde(flatten)]
    pub ends: Ends<'a>,
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

/// One request to a port that declares HTTP, as its source's node logs it when the response
/// ends. Empty strings and absent values are unknown; what the client sent is cut to a bound.
#[derive(Debug, Serialize)]
pub struct RequestEntry<'a> {
    /// RFC 3339, UTC, when the response ended (or the request did without one).
    pub time: String,
    /// `request`.
    pub kind: &'static str,
    /// `source`: requests are seen by the source's node.
    pub reporter: &'a str,
    /// The destination is the endpoint of the last try.
    #[serde(flatten)]
    pub ends: Ends<'a>,
    /// The backend Service a ServiceRoute picked; empty without a route.
    pub backend: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    /// Without the query, which often carries tokens.
    pub path: &'a str,
    pub version: &'a str,
    /// The response's status; 0 when there was none (`code` is then `cancelled`).
    pub status: u16,
    /// The status's class (`2xx`), as the metrics count it.
    pub code: &'a str,
    /// Whether the response's body was sent to its end (not when the client went away, or
    /// the endpoint's connection failed, part-way).
    pub complete: bool,
    /// Why, when the mesh answered itself (the `x-mycel-proxy-error` header).
    pub mesh_error: &'a str,
    /// Endpoints tried.
    pub attempts: u32,
    pub response_bytes: u64,
    /// To the response's headers; absent when there were none.
    pub headers_seconds: Option<f64>,
    /// To the end of the response.
    pub duration_seconds: f64,
}

/// `namespace/name`, or empty when the name is unknown.
pub fn named(namespace: &str, name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!("{namespace}/{name}")
    }
}

pub use mesh_daemon::time::rfc3339;

pub fn seconds(d: Duration) -> f64 {
    // Microseconds are enough and keep the lines short.
    (d.as_secs_f64() * 1e6).round() / 1e6
}
