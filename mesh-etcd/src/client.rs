//! Connections to etcd, and the unary calls: ranges, transactions, leases.

use std::{future::Future, path::PathBuf, time::Duration};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    pb::{
        kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient, KeyValue,
        LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, RangeRequest, TxnRequest,
        TxnResponse,
    },
    Error, MAX_MESSAGE, PAGE,
};

/// Where etcd is and how to reach it.
#[derive(Debug, Clone)]
pub struct Options {
    /// `http://host:port` or `https://host:port`, one per member; requests go to any that
    /// answers.
    pub endpoints: Vec<String>,
    pub tls: Option<Tls>,
    /// The longest wait for one answer.
    pub request_timeout: Duration,
}

/// TLS to etcd: the CA that signed its serving certificates, and a client certificate if
/// etcd asks for one (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Options {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            tls: None,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A client of one etcd cluster. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct Client {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    pub(crate) watch: WatchClient<Channel>,
    /// The endpoints, as errors name them.
    pub(crate) endpoints: String,
    pub(crate) timeout: Duration,
    /// TLS without a client certificate: an etcd that asks for one closes the connection
    /// after the handshake, and the error should say what is likely missing.
    anonymous_tls: bool,
}

/// The end of the range of keys that start with `prefix`: the prefix with its last byte
/// that is not 0xff incremented, as etcd's range_end wants.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): to the end of the key space.
    vec![0]
}

impl Client {
    /// A client of the members `options` names. Nothing is dialled until the first call:
    /// a control plane starts, and says so, while etcd is away.
    pub fn new(options: &Options) -> Result<Self, Error> {
        if options.endpoints.is_empty() {
            return Err(Error::Endpoint("no endpoint given".into()));
        }
        // The channels' tasks run on the runtime it is made in.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Endpoint(
                "a client must be made inside a tokio runtime".into(),
            ));
        }
        let tls = match &options.tls {
            Some(tls) => Some(tls_config(tls)?),
            None => None,
        };
        let mut endpoints = Vec::with_capacity(options.endpoints.len());
        for url in &options.endpoints {
            let secure = match url.split_once("://") {
                Some(("https", _)) => true,
                Some(("http", _)) => false,
                _ => {
                    return Err(Error::Endpoint(format!(
                        "{url:?} is not http://HOST:PORT or https://HOST:PORT"
                    )))
                }
            };
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::Endpoint(format!("{url:?}: {e}")))?
                .connect_timeout(options.request_timeout)
                .tcp_nodelay(true)
                // A member that went away is noticed between requests too (a watch waits on
                // it for long stretches). Not more often than etcd's default
                // --grpc-keepalive-min-time (5 s) allows: it answers that with GOAWAY.
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(options.request_timeout)
                .keep_alive_while_idle(true);
            match (&tls, secure) {
                (Some(tls), true) => {
                    endpoint = endpoint
                        .tls_config(tls.clone())
                        .map_err(|e| Error::Endpoint(format!("{url:?}: {e}")))?;
                }
                (None, true) => {
                    return Err(Error::Endpoint(format!(
                        "{url:?} is https: give the CA of etcd's certificates (--etcd-ca)"
                    )))
                }
                (Some(_), false) => {
                    return Err(Error::Endpoint(format!(
                        "{url:?} is plain http, but TLS options were given: use https://"
                    )))
                }
                (None, false) => {}
            }
            endpoints.push(endpoint);
        }
        let channel = if endpoints.len() == 1 {
            endpoints.remove(0).connect_lazy()
        } else {
            Channel::balance_list(endpoints.into_iter())
        };
        Ok(Self {
            kv: KvClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            lease: LeaseClient::new(channel.clone()).max_decoding_message_size(64 * 1024),
            watch: WatchClient::new(channel).max_decoding_message_size(MAX_MESSAGE),
            endpoints: options.endpoints.join(","),
            timeout: options.request_timeout,
            anonymous_tls: options.tls.as_ref().is_some_and(|t| t.cert.is_none()),
        })
    }

    /// The endpoints, comma-separated, as errors name them.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Runs `call` under the request timeout, naming `what` in its error.
    pub(crate) async fn call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => Err(self.failed(what, &status)),
            Err(_) => Err(Error::TimedOut {
                endpoints: self.endpoints.clone(),
                what,
                seconds: self.timeout.as_secs().max(1),
            }),
        }
    }

    pub(crate) fn failed(&self, what: &'static str, status: &tonic::Status) -> Error {
        let mut message = one_line(status);
        // A refused handshake or a connection closed right after it reads as a transport
        // failure, in words that vary.
        if self.anonymous_tls && message.contains("transport error") && !message.contains("refused")
        {
            message.push_str(
                " (if etcd asks clients for a certificate, give --etcd-cert and --etcd-key)",
            );
        }
        Error::Failed {
            endpoints: self.endpoints.clone(),
            what,
            code: status.code(),
            message,
        }
    }

    /// One key, as of the latest revision; with the store's revision.
    pub async fn get(&self, key: &[u8]) -> Result<(Option<KeyValue>, i64), Error> {
        let request = RangeRequest {
            key: key.to_vec(),
            ..RangeRequest::default()
        };
        let mut kv = self.kv.clone();
        let answer = self.call("a read", kv.range(request)).await?;
        let revision = answer.header.map_or(0, |h| h.revision);
        Ok((answer.kvs.into_iter().next(), revision))
    }

    /// Every key that starts with `prefix`, in key order, all as of one revision (the
    /// latest, or `revision` if not 0), read a page at a time; with that revision.
    pub async fn get_prefix(
        &self,
        prefix: &[u8],
        revision: i64,
    ) -> Result<(Vec<KeyValue>, i64), Error> {
        let end = prefix_end(prefix);
        let mut from = prefix.to_vec();
        let mut revision = revision;
        let mut all = Vec::new();
        loop {
            let request = RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: PAGE,
                revision,
                ..RangeRequest::default()
            };
            let mut kv = self.kv.clone();
            let answer = self.call("a read", kv.range(request)).await?;
            // The pages after the first are read at the first one's revision.
            if revision == 0 {
                revision = answer.header.as_ref().map_or(0, |h| h.revision);
            }
            let more = answer.more;
            match answer.kvs.last() {
                // The next page starts just after the last key; a page that does not move on
                // (or leaves the range) is no page etcd sends, and would never end.
                Some(last) if more && last.key >= from && last.key < end => {
                    from = last.key.clone();
                    from.push(0);
                }
                Some(_) if more => {
                    return Err(Error::Failed {
                        endpoints: self.endpoints.clone(),
                        what: "a read",
                        code: tonic::Code::Internal,
                        message: "a page of keys out of order".into(),
                    })
                }
                _ => {
                    all.extend(answer.kvs);
                    return Ok((all, revision));
                }
            }
            all.extend(answer.kvs);
        }
    }

    /// A transaction: its comparisons, and what to do when they hold or not.
    pub async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, Error> {
        let mut kv = self.kv.clone();
        self.call("a transaction", kv.txn(request)).await
    }

    /// A lease of `ttl` seconds; its id.
    pub async fn grant(&self, ttl: i64) -> Result<i64, Error> {
        let mut lease = self.lease.clone();
        let answer = self
            .call(
                "a lease grant",
                lease.lease_grant(LeaseGrantRequest { ttl, id: 0 }),
            )
            .await?;
        if !answer.error.is_empty() {
            return Err(Error::Failed {
                endpoints: self.endpoints.clone(),
                what: "a lease grant",
                code: tonic::Code::Unknown,
                message: answer.error,
            });
        }
        Ok(answer.id)
    }

    /// Renews lease `id` once; the seconds it has left (0: it is gone).
    pub async fn keep_alive(&self, id: i64) -> Result<i64, Error> {
        let mut lease = self.lease.clone();
        let request = tokio_stream::once(LeaseKeepAliveRequest { id });
        let mut answers = self
            .call("a lease renewal", lease.lease_keep_alive(request))
            .await?;
        match tokio::time::timeout(self.timeout, answers.message()).await {
            Ok(Ok(Some(answer))) => Ok(answer.ttl),
            Ok(Ok(None)) => Ok(0),
            Ok(Err(status)) => Err(self.failed("a lease renewal", &status)),
            Err(_) => Err(Error::TimedOut {
                endpoints: self.endpoints.clone(),
                what: "a lease renewal",
                seconds: self.timeout.as_secs().max(1),
            }),
        }
    }

    /// Ends lease `id` and the keys attached to it.
    pub async fn revoke(&self, id: i64) -> Result<(), Error> {
        let mut lease = self.lease.clone();
        self.call(
            "a lease revoke",
            lease.lease_revoke(LeaseRevokeRequest { id }),
        )
        .await
        .map(drop)
    }
}

fn tls_config(tls: &Tls) -> Result<ClientTlsConfig, Error> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| Error::ReadTls {
            path: path.clone(),
            source,
        })
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => {
            return Err(Error::Endpoint(
                "a client certificate needs its key, and a key its certificate".into(),
            ))
        }
    }
    Ok(config)
}

/// A status as one line: its message, and the transport's causes each once.
fn one_line(status: &tonic::Status) -> String {
    let mut line = status.message().replace('\n', " ");
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    if line.is_empty() {
        line = format!("{:?}", status.code());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_its_keys_end() {
        assert_eq!(prefix_end(b"/mycel/"), b"/mycel0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[tokio::test]
    async fn endpoints_are_checked_before_anything_is_dialled() {
        let err = |endpoints: &[&str]| {
            Client::new(&Options::new(
                endpoints.iter().map(|s| s.to_string()).collect(),
            ))
            .err()
            .map(|e| e.to_string())
        };
        assert!(err(&[]).unwrap().contains("no endpoint"));
        assert!(err(&["127.0.0.1:2379"]).unwrap().contains("is not http://"));
        assert!(err(&["https://127.0.0.1:2379"])
            .unwrap()
            .contains("--etcd-ca"));
        assert_eq!(err(&["http://127.0.0.1:2379"]), None);
    }
}
