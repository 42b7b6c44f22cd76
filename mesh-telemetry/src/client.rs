//! A small blocking HTTP client for the operator's side: `mycel` and `mesh-cp explain --cp`
//! read mesh-cp's status API, a node's admin and metrics endpoints and Prometheus with it.
//!
//! Requests are HTTP/1.0, so that no server answers in chunks, and every answer is bounded in
//! time ([`TIMEOUT`] in all, connecting included) and in size ([`MAX_ANSWER`]): the other end
//! may be a wrong address, or not what it claims.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    time::{Duration, Instant},
};

use serde::de::DeserializeOwned;

/// How long one request may take, from connecting to the last byte of the answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer read: a node's `/metrics` with many workload pairs stays far below.
pub const MAX_ANSWER: usize = 64 << 20;

/// What one request may take: time from connecting to the last byte, and bytes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub time: Duration,
    pub size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            time: TIMEOUT,
            size: MAX_ANSWER,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr} is not a host:port I can resolve: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("no answer from {addr}: {source}")]
    Read { addr: String, source: io::Error },
    #[error("{addr} took more than {seconds}s to answer")]
    Timeout { addr: String, seconds: u64 },
    #[error("{addr} sent more than {bytes} bytes")]
    TooLarge { addr: String, bytes: usize },
    #[error("{addr} did not answer HTTP")]
    NotHttp { addr: String },
    #[error("{addr} closed before the end of its answer's body")]
    Truncated { addr: String },
    #[error("{addr} answered {path} with {status}: {body}")]
    Status {
        addr: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{addr} sent {path} in a form I cannot read: {source}")]
    Json {
        addr: String,
        path: String,
        source: serde_json::Error,
    },
}

/// `GET path` from `addr` (`host:port`): the status code and the body.
pub fn get(addr: &str, path: &str) -> Result<(u16, String), ClientError> {
    get_within(addr, path, Limits::default())
}

/// [`get`] within `limits`.
pub fn get_within(addr: &str, path: &str, limits: Limits) -> Result<(u16, String), ClientError> {
    let deadline = Instant::now() + limits.time;
    let timeout = || ClientError::Timeout {
        addr: addr.to_owned(),
        seconds: limits.time.as_secs(),
    };
    let mut stream = connect(addr, deadline, limits)?;
    let read_err = |source| ClientError::Read {
        addr: addr.to_owned(),
        source,
    };
    // One write: a server that reads one segment and answers must see the whole request.
    let request = format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\nuser-agent: mycel\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(read_err)?;
    let mut answer = Vec::new();
    // Where the head ends and how long the body is, once the head is in.
    let mut head: Option<(usize, Option<usize>)> = None;
    let mut buf = [0u8; 16 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout());
        }
        stream.set_read_timeout(Some(left)).map_err(read_err)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if answer.len() + n > limits.size => {
                return Err(ClientError::TooLarge {
                    addr: addr.to_owned(),
                    bytes: limits.size,
                })
            }
            Ok(n) => {
                // Only the new bytes (and the three before) can complete the head.
                let from = answer.len().saturating_sub(3);
                answer.extend_from_slice(&buf[..n]);
                if head.is_none() {
                    head = find_head(&answer[from..]).map(|end| {
                        let end = from + end;
                        (end, content_length(&answer[..end]))
                    });
                }
                // A server that keeps the connection open after its body has answered.
                if let Some((end, Some(length))) = head {
                    if answer.len() - end >= length {
                        break;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timeout())
            }
            Err(e) => return Err(read_err(e)),
        }
    }
    if let Some((end, Some(length))) = head {
        if answer.len() - end < length {
            return Err(ClientError::Truncated {
                addr: addr.to_owned(),
            });
        }
    }
    parse_answer(&answer).ok_or_else(|| ClientError::NotHttp {
        addr: addr.to_owned(),
    })
}

/// `GET path`, which must answer 200: the body.
pub fn get_ok(addr: &str, path: &str) -> Result<String, ClientError> {
    get_ok_within(addr, path, Limits::default())
}

/// [`get_ok`] within `limits`.
pub fn get_ok_within(addr: &str, path: &str, limits: Limits) -> Result<String, ClientError> {
    match get_within(addr, path, limits)? {
        (200, body) => Ok(body),
        (status, body) => Err(ClientError::Status {
            addr: addr.to_owned(),
            path: path.to_owned(),
            status,
            // One line: the servers answer errors as one line of text.
            body: body.trim().lines().next().unwrap_or_default().to_owned(),
        }),
    }
}

/// `GET path`, which must answer 200 with JSON of type `T`.
pub fn get_json<T: DeserializeOwned>(addr: &str, path: &str) -> Result<T, ClientError> {
    let body = get_ok(addr, path)?;
    serde_json::from_str(&body).map_err(|source| ClientError::Json {
        addr: addr.to_owned(),
        path: path.to_owned(),
        source,
    })
}

/// Where the head in `bytes` ends (the index after its blank line).
fn find_head(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// The `content-length` of a head, if it has one well-formed; the first of several.
fn content_length(head: &[u8]) -> Option<usize> {
    let head = String::from_utf8_lossy(head);
    head.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        let value = value.trim();
        (name.trim().eq_ignore_ascii_case("content-length")
            && !value.is_empty()
            && value.bytes().all(|b| b.is_ascii_digit()))
        .then(|| value.parse().ok())?
    })
}

/// Connects to the first address of `addr` that answers, all before `deadline` (resolving a
/// name takes what the system's resolver takes).
fn connect(addr: &str, deadline: Instant, limits: Limits) -> Result<TcpStream, ClientError> {
    let resolved: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| ClientError::Resolve {
            addr: addr.to_owned(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in resolved {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout {
                addr: addr.to_owned(),
                seconds: limits.time.as_secs(),
            });
        }
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(ClientError::Connect {
        addr: addr.to_owned(),
        source: last,
    })
}

/// The status code and body of an HTTP/1 answer read to its end; the body ends at the head's
/// `content-length`, when it has one.
pub fn parse_answer(answer: &[u8]) -> Option<(u16, String)> {
    let end = find_head(answer)?;
    let head = std::str::from_utf8(&answer[..end]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?.parse().ok()?;
    let body = &answer[end..];
    let body = match content_length(&answer[..end]) {
        Some(length) => &body[..length.min(body.len())],
        None => body,
    };
    Some((code, String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A one-shot server on loopback that answers `answer` to the first request.
    fn serve(answer: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer);
            }
        });
        addr
    }

    #[test]
    fn reads_status_and_body() {
        let addr = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}");
        let v: serde_json::Value = get_json(&addr, "/status").unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn an_error_status_is_one_line_with_the_path() {
        let addr = serve(b"HTTP/1.1 400 Bad Request\r\n\r\nno such workload\nmore\n");
        let e = get_ok(&addr, "/explain?x").unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{addr} answered /explain?x with 400: no such workload")
        );
    }

    #[test]
    fn an_answer_with_its_length_ends_while_the_connection_stays_open() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                // Open until the client has its answer.
                let _ = done_rx.recv_timeout(Duration::from_secs(20));
            }
        });
        let started = Instant::now();
        assert_eq!(get_ok(&addr, "/").unwrap(), "ok");
        assert!(started.elapsed() < TIMEOUT, "waited for the close");
        let _ = done_tx.send(());
    }

    #[test]
    fn a_body_ends_at_its_length_and_a_short_one_is_an_error() {
        let addr = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA");
        assert_eq!(get_ok(&addr, "/").unwrap(), "ok");
        let addr = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\nshort");
        assert!(matches!(
            get(&addr, "/"),
            Err(ClientError::Truncated { .. })
        ));
        let addr = serve(b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nabc");
        assert_eq!(
            get_ok(&addr, "/").unwrap(),
            "abc",
            "a length that is not digits is no length"
        );
    }

    #[test]
    fn what_is_not_http_is_refused() {
        let addr = serve(b"SSH-2.0-OpenSSH\r\n\r\n");
        assert!(matches!(get(&addr, "/"), Err(ClientError::NotHttp { .. })));
        let addr = serve(b"HTTP/1.1 200 OK");
        assert!(matches!(get(&addr, "/"), Err(ClientError::NotHttp { .. })));
    }

    #[test]
    fn nothing_listening_is_a_connect_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = get(&format!("127.0.0.1:{port}"), "/").unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        // No port: refused before any lookup leaves the host.
        assert!(matches!(
            get("127.0.0.1", "/"),
            Err(ClientError::Resolve { .. })
        ));
    }
}
