//! The admin router on a loopback port, driven by raw TCP: the limits hold against clients
//! that do not play by the rules, and the answers stay what the end-to-end tests read.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{
    routes,
    server::{serve, Limits},
    Admin, Status,
};

async fn start(limits: Limits) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (_, status) = watch::channel(Status::default());
    tokio::spawn(serve(
        listener,
        routes::admin(Arc::new(Admin::new(status))),
        limits,
    ));
    addr
}

async fn send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(bytes).await.expect("write");
    tcp
}

/// What the server sends until it closes (a reset after its answer included), or `None` if
/// the connection is still open after `within`.
async fn until_closed(tcp: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

struct Reply {
    code: u16,
    head: String,
    body: String,
}

async fn request(addr: SocketAddr, bytes: &[u8]) -> Reply {
    let mut tcp = send(addr, bytes).await;
    let text = until_closed(&mut tcp, Duration::from_secs(2))
        .await
        .expect("an answer, then the connection closed");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    Reply {
        code,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    let req = format!("GET {path} HTTP/1.1\r\nhost: admin\r\n\r\n");
    request(addr, req.as_bytes()).await
}

#[tokio::test]
async fn answers_stay_what_the_tests_read() {
    let addr = start(Limits::default()).await;
    let healthz = get(addr, "/healthz").await;
    assert_eq!((healthz.code, healthz.body.as_str()), (200, "ok\n"));
    assert!(
        healthz
            .head
            .contains("content-type: text/plain; charset=utf-8"),
        "{}",
        healthz.head
    );
    // One request per connection, as the tests' reader (read to the end) expects.
    assert!(
        healthz.head.contains("connection: close"),
        "{}",
        healthz.head
    );
    let readyz = get(addr, "/readyz").await;
    assert_eq!(
        (readyz.code, readyz.body.as_str()),
        (503, "not ready: the eBPF programs are not attached yet\n")
    );
    for path in ["/debug/config", "/debug/certs", "/debug/connections"] {
        let r = get(addr, path).await;
        assert_eq!(
            (r.code, r.body.as_str()),
            (503, "starting: the eBPF programs are not attached yet\n"),
            "{path}"
        );
    }
    let head = request(addr, b"HEAD /healthz HTTP/1.1\r\nhost: admin\r\n\r\n").await;
    assert_eq!((head.code, head.body.as_str()), (200, ""));
}

#[tokio::test]
async fn an_unknown_path_is_404() {
    let addr = start(Limits::default()).await;
    let r = get(addr, "/debug/nothing").await;
    assert_eq!((r.code, r.body.as_str()), (404, "not found\n"));
}

#[tokio::test]
async fn other_methods_are_405() {
    let addr = start(Limits::default()).await;
    for method in ["POST", "PUT", "DELETE"] {
        let req =
            format!("{method} /healthz HTTP/1.1\r\nhost: admin\r\ncontent-length: 2\r\n\r\n{{}}");
        assert_eq!(request(addr, req.as_bytes()).await.code, 405, "{method}");
    }
}

#[tokio::test]
async fn a_head_over_the_limit_is_431() {
    let limits = Limits::default();
    let addr = start(limits).await;
    // Complete, but longer than allowed (and well within what hyper would take by default).
    let long = format!(
        "GET /healthz HTTP/1.1\r\nhost: admin\r\nx-pad: {}\r\n\r\n",
        "a".repeat(limits.head_bytes)
    );
    assert_eq!(request(addr, long.as_bytes()).await.code, 431);
    // A head that never ends is refused once it is too long, not only at the header timeout.
    let endless = format!("GET /healthz HTTP/1.1\r\nx-pad: {}", "a".repeat(32 * 1024));
    let start = Instant::now();
    assert_eq!(request(addr, endless.as_bytes()).await.code, 431);
    assert!(
        start.elapsed() < limits.header_read,
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_client_that_dribbles_its_request_is_cut_off() {
    let header_read = Duration::from_millis(300);
    let addr = start(Limits {
        header_read,
        ..Limits::default()
    })
    .await;
    let start = Instant::now();
    let mut tcp = send(addr, b"GET /heal").await;
    let closed = until_closed(&mut tcp, header_read + Duration::from_secs(1)).await;
    assert_eq!(closed.as_deref(), Some(""), "after {:?}", start.elapsed());
    assert!(start.elapsed() >= header_read, "{:?}", start.elapsed());
}

#[tokio::test]
async fn a_connection_ends_at_its_deadline() {
    let connection = Duration::from_millis(300);
    let addr = start(Limits {
        header_read: Duration::from_secs(30),
        connection,
        ..Limits::default()
    })
    .await;
    let start = Instant::now();
    let mut tcp = send(addr, b"GET /heal").await;
    let closed = until_closed(&mut tcp, connection + Duration::from_secs(1)).await;
    assert_eq!(closed.as_deref(), Some(""), "after {:?}", start.elapsed());
}

#[tokio::test]
async fn connections_past_the_limit_wait() {
    let addr = start(Limits {
        connections: 1,
        ..Limits::default()
    })
    .await;
    let holder = send(addr, b"").await;
    let mut waiting = send(addr, b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n").await;
    assert_eq!(
        until_closed(&mut waiting, Duration::from_millis(300)).await,
        None,
        "answered while the only slot was taken"
    );
    drop(holder);
    let answer = until_closed(&mut waiting, Duration::from_secs(2)).await;
    assert!(
        answer
            .as_deref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 200")),
        "{answer:?}"
    );
}

#[tokio::test]
async fn garbage_is_400_and_the_server_goes_on() {
    let addr = start(Limits::default()).await;
    for junk in [
        &b"\x00\xff\xfe\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n",
    ] {
        let mut tcp = send(addr, junk).await;
        let answer = until_closed(&mut tcp, Duration::from_secs(2)).await;
        assert!(
            answer
                .as_deref()
                .is_some_and(|a| a.is_empty() || a.starts_with("HTTP/1.1 400")),
            "{junk:?}: {answer:?}"
        );
    }
    assert_eq!(get(addr, "/healthz").await.code, 200);
}

/// An endpoint of `connections` slots, 2 per source under pressure, with two idle
/// connections from 127.0.0.1 accepted and held.
async fn two_held(connections: usize) -> (SocketAddr, [TcpStream; 2]) {
    let addr = start(Limits {
        connections,
        per_source: 2,
        ..Limits::default()
    })
    .await;
    let holders = [send(addr, b"").await, send(addr, b"").await];
    tokio::time::sleep(Duration::from_millis(100)).await;
    (addr, holders)
}

#[tokio::test]
async fn one_source_cannot_take_every_slot() {
    // Two of four slots held by one address: more than half are taken once a third comes.
    let (addr, holders) = two_held(4).await;
    let mut third = send(addr, b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n").await;
    assert_eq!(
        until_closed(&mut third, Duration::from_secs(2))
            .await
            .as_deref(),
        Some(""),
        "a third connection from the holders' address was served"
    );
    // Another address (the scraper's) is still answered.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let mut other = socket.connect(addr).await.expect("connect");
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n")
        .await
        .expect("write");
    let answer = until_closed(&mut other, Duration::from_secs(2)).await;
    assert!(
        answer
            .as_deref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 200")),
        "{answer:?}"
    );
    // Once the holders are gone, their address is served again.
    drop(holders);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(addr, "/healthz").await.code, 200);
}

#[tokio::test]
async fn a_source_may_take_more_while_most_slots_are_free() {
    // Three of eight taken with the request: no pressure, so the shared address is served.
    let (addr, _holders) = two_held(8).await;
    assert_eq!(get(addr, "/healthz").await.code, 200);
}
