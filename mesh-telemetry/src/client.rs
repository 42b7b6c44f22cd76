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

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr} is not a host:port I can resolve: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("no answer from {addr}: {source}")]
    Read { addr: String, source: io::Error },
    #[error("{addr} took more than {}s to answer", TIMEOUT.as_secs())]
    Timeout { addr: String },
    #[error("{addr} sent more than {} MiB", MAX_ANSWER >> 20)]
    TooLarge { addr: String },
    #[error("{addr} did not answer HTTP")]
    NotHttp { addr: String },
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
    let deadline = Instant::now() + TIMEOUT;
    let mut stream = connect(addr, deadline)?;
    let read_err = |source| ClientError::Read {
        addr: addr.to_owned(),
        source,
    };
    // One write: a server that reads one segment and answers must see the whole request.
    let request = format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\nuser-agent: mycel\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(read_err)?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout {
                addr: addr.to_owned(),
            });
        }
        stream.set_read_timeout(Some(left)).map_err(read_err)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if answer.len() + n > MAX_ANSWER => {
                return Err(ClientError::TooLarge {
                    addr: addr.to_owned(),
                })
            }
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                // A server that keeps the connection open after its body has answered.
                if complete(&answer) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Timeout {
                    addr: addr.to_owned(),
                })
            }
            Err(e) => return Err(read_err(e)),
        }
    }
    parse_answer(&answer).ok_or_else(|| ClientError::NotHttp {
        addr: addr.to_owned(),
    })
}

/// `GET path`, which must answer 200: the body.
pub fn get_ok(addr: &str, path: &str) -> Result<String, ClientError> {
    match get(addr, path)? {
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

/// Whether `answer` holds a head with a `content-length` and that many bytes of body.
fn complete(answer: &[u8]) -> bool {
    let Some(split) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..split]);
    let length = head.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    length.is_some_and(|n| answer.len() - (split + 4) >= n)
}

/// Connects to the first address of `addr` that answers, all before `deadline` (resolving a
/// name takes what the system's resolver takes).
fn connect(addr: &str, deadline: Instant) -> Result<TcpStream, ClientError> {
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

/// The status code and body of an HTTP/1 answer read to its end.
pub fn parse_answer(answer: &[u8]) -> Option<(u16, String)> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..split]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?.parse().ok()?;
    let body = String::from_utf8_lossy(&answer[split + 4..]).into_owned();
    Some((code, body))
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
