//! A thin client for the part of etcd's v3 API that Mycel's control plane keeps its state
//! in: reads of a key or a prefix (paged, all at one revision), transactions, watches of a
//! prefix, and leases.
//!
//! Every call has a deadline ([`Options::request_timeout`]), and no answer may be larger
//! than [`MAX_MESSAGE`]: etcd is trusted, but a control plane that hangs or swells because
//! its store misbehaves would take the mesh's changes down with it. Errors say which
//! endpoints were asked and what failed, in one line.

mod client;
pub mod ops;
mod watch;

pub use client::{prefix_end, Client, Options, Tls};
pub use watch::{Change, Watch, WatchBatch};

/// The generated messages and clients (`proto/etcd.proto`).
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

/// The largest answer accepted from etcd. A range is read in pages of [`PAGE`] keys, so an
/// answer is at most a page of values: values of up to 128 KiB keep a page under half of it.
/// A watch answer larger than this ends the watch as a failure other than unavailability:
/// the caller reads the prefix again instead.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Keys per page of a prefix read.
pub const PAGE: i64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--etcd-endpoints: {0}")]
    Endpoint(String),
    #[error("cannot read {path}: {source}")]
    ReadTls {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("etcd at {endpoints} did not answer within {seconds}s ({what})")]
    TimedOut {
        endpoints: String,
        what: &'static str,
        seconds: u64,
    },
    #[error("etcd at {endpoints} failed {what}: {message}")]
    Failed {
        endpoints: String,
        what: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("etcd compacted its history past revision {wanted} (it keeps from {compacted}): read again from the start")]
    Compacted { wanted: i64, compacted: i64 },
    #[error("etcd at {endpoints} ended {what}: {message}")]
    Ended {
        endpoints: String,
        what: &'static str,
        message: String,
    },
}

impl Error {
    /// True when etcd could not be reached or did not answer, as opposed to answering no.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::TimedOut { .. } | Error::Ended { .. } => true,
            Error::Failed { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
            ),
            _ => false,
        }
    }
}
