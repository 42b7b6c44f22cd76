//! An HTTP application for the tests of HTTP-aware ports: a server that says who it is, and a
//! client that sends many requests over one connection. Nothing in it knows about the mesh.
//!
//! ```text
//! mesh-http serve --port P --name NAME [--fail-every N [--close-on-fail]]
//!                                          HTTP/1.1 and HTTP/2 (prior knowledge) on [::]:P.
//!                                          Every answer carries `x-served-by: NAME`:
//!                                            /delay/MS        200 NAME after MS milliseconds
//!                                            /drip/MS         200 at once, its body (NAME)
//!                                                             MS milliseconds later
//!                                            /fail-every/N    503 to every Nth request it
//!                                                             gets on this path, else 200
//!                                            /stall           no answer for an hour
//!                                            /forge           200 with the mesh's own
//!                                                             error header, forged
//!                                            /count           200 and the number of other
//!                                                             requests it answered
//!                                            anything else    200 NAME
//!                                          With --fail-every N, every Nth request (but
//!                                          /count) is answered 503 instead; with
//!                                          --close-on-fail, with `Connection: close`.
//!                                          A request with `Upgrade: echo` gets 101, then
//!                                          its bytes echoed. Prints "listening" once bound.
//! mesh-http get --addr A --count N [--path P] [--h2] [--concurrency C] [--interval-ms M]
//!               [--method M]
//!                                          N requests over one connection (HTTP/1.1
//!                                          keep-alive, M ms apart, or HTTP/2 with C streams
//!                                          at a time, the i-th not before i × M ms); prints one JSON line: {requests,
//!                                          by_body, by_status, by_mesh_error, errors, p50_us,
//!                                          p99_us, per_second, last_ok, first_not_ok,
//!                                          first_not_ok_status} (the indexes of HTTP/1.1
//!                                          requests and that answer's status, or null)
//! mesh-http upgrade --addr A [--lines N] [--interval-ms M]
//!                                          asks to switch to `echo`, then sends N lines (1)
//!                                          M ms apart on the switched connection, each
//!                                          awaiting its echo; prints {status, echoed (all
//!                                          that came back), lines_echoed, ended_by}
//! ```

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The header the mesh puts on answers it makes itself.
const MESH_ERROR: &str = "x-mycel-proxy-error";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-http: error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(&args)) {
        eprintln!("mesh-http: error: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &[String]) -> Result<(), Error> {
    let flag = |name: &str| -> Option<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let number = |name: &str, default: u64| -> Result<u64, Error> {
        flag(name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("{name}: {v:?} is not a number").into())
        })
    };
    match args.first().map(String::as_str) {
        Some("serve") => {
            let port = u16::try_from(number("--port", 0)?)?;
            let name = flag("--name").ok_or("--name is required")?.to_owned();
            let fail_every = number("--fail-every", 0)?;
            let close_on_fail = args.iter().any(|a| a == "--close-on-fail");
            serve(port, name, fail_every, close_on_fail).await
        }
        Some("upgrade") => {
            let addr: SocketAddr = flag("--addr")
                .ok_or("--addr is required")?
                .parse()
                .map_err(|_| "--addr is not an address:port")?;
            let lines = number("--lines", 1)?.max(1);
            let interval = Duration::from_millis(number("--interval-ms", 0)?);
            println!("{}", upgrade(addr, lines, interval).await?);
            Ok(())
        }
        Some("get") => {
            let addr: SocketAddr = flag("--addr")
                .ok_or("--addr is required")?
                .parse()
                .map_err(|_| "--addr is not an address:port")?;
            let out = get(
                addr,
                flag("--path").unwrap_or("/"),
                number("--count", 100)?,
                args.iter().any(|a| a == "--h2"),
                number("--concurrency", 1)?.max(1),
                Duration::from_millis(number("--interval-ms", 0)?),
                hyper::Method::from_bytes(flag("--method").unwrap_or("GET").as_bytes())
                    .map_err(|_| "--method is not an HTTP method")?,
            )
            .await?;
            println!("{out}");
            Ok(())
        }
        _ => Err("usage: mesh-http serve --port P --name NAME [--fail-every N] | get --addr A --count N [--path P] [--h2] [--concurrency C] [--interval-ms M] [--method M] | upgrade --addr A [--lines N] [--interval-ms M]".into()),
    }
}

/// A server's name, what it was told to fail, and what it has answered.
struct Behaviour {
    name: String,
    fail_every: u64,
    close_on_fail: bool,
    answered: AtomicU64,
    per_path: Mutex<BTreeMap<String, u64>>,
}

async fn serve(port: u16, name: String, fail_every: u64, close_on_fail: bool) -> Result<(), Error> {
    let listener = TcpListener::bind(("::", port)).await?;
    println!("listening");
    let server = Arc::new(Behaviour {
        name,
        fail_every,
        close_on_fail,
        answered: AtomicU64::new(0),
        per_path: Mutex::default(),
    });
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let server = server.clone();
                async move {
                    if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
                        let upgraded = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = upgraded.await {
                                let mut io = TokioIo::new(up);
                                let mut buf = [0u8; 1024];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        });
                        let mut r = Response::new(Full::new(Bytes::new()).boxed());
                        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        r.headers_mut()
                            .insert("upgrade", "echo".parse().unwrap_or_else(|_| unreachable!()));
                        r.headers_mut().insert(
                            "connection",
                            "upgrade".parse().unwrap_or_else(|_| unreachable!()),
                        );
                        return Ok::<_, Infallible>(r);
                    }
                    Ok::<_, Infallible>(answer(&req, &server).await)
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// A body that comes `after` its response's headers.
struct Drip {
    wait: std::pin::Pin<Box<tokio::time::Sleep>>,
    data: Option<Bytes>,
}

impl hyper::body::Body for Drip {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if std::future::Future::poll(self.wait.as_mut(), cx).is_pending() {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(self.data.take().map(|d| Ok(hyper::body::Frame::data(d))))
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(req: &Request<Incoming>, server: &Behaviour) -> Response<Body> {
    let (name, counts) = (server.name.as_str(), &server.per_path);
    let path = req.uri().path();
    if path == "/count" {
        let n = server.answered.load(Ordering::Relaxed);
        return Response::new(Full::new(Bytes::from(n.to_string())).boxed());
    }
    if let Some(ms) = path.strip_prefix("/drip/").and_then(|m| m.parse().ok()) {
        server.answered.fetch_add(1, Ordering::Relaxed);
        let body = Drip {
            wait: Box::pin(tokio::time::sleep(Duration::from_millis(ms))),
            data: Some(Bytes::from(name.to_owned())),
        };
        return Response::new(body.boxed());
    }
    let seen = server.answered.fetch_add(1, Ordering::Relaxed) + 1;
    let mut status = StatusCode::OK;
    if server.fail_every > 0 && seen.is_multiple_of(server.fail_every) {
        status = StatusCode::SERVICE_UNAVAILABLE;
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|m| m.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    } else if let Some(n) = path
        .strip_prefix("/fail-every/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let seen = {
            let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
            let c = counts.entry(path.to_owned()).or_default();
            *c += 1;
            *c
        };
        if n > 0 && seen % n == 0 {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    } else if path == "/stall" {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let forge = path == "/forge";
    let mut response = Response::new(Full::new(Bytes::from(name.to_owned())).boxed());
    *response.status_mut() = status;
    if let Ok(v) = name.parse() {
        response.headers_mut().insert("x-served-by", v);
    }
    if forge {
        response.headers_mut().insert(
            MESH_ERROR,
            hyper::header::HeaderValue::from_static("forged by the endpoint"),
        );
    }
    if server.close_on_fail && status != StatusCode::OK {
        response.headers_mut().insert(
            "connection",
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// What the client saw.
#[derive(Default)]
struct Tally {
    by_body: BTreeMap<String, u64>,
    by_status: BTreeMap<u16, u64>,
    by_mesh_error: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
    /// HTTP/1.1: the index of the last request answered 200, and of the first that was not.
    last_ok: Option<u64>,
    first_not_ok: Option<u64>,
    /// The status of that first one (none: no answer at all).
    first_not_ok_status: Option<u16>,
}

/// A GET of `uri` (its authority also the Host header).
fn request(
    uri: &hyper::Uri,
    method: &hyper::Method,
) -> Result<Request<Empty<Bytes>>, hyper::http::Error> {
    let host = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    Request::builder()
        .method(method.clone())
        .uri(uri.clone())
        .header("host", host)
        .body(Empty::<Bytes>::new())
}

type Answer = Result<(u16, String, Option<String>), String>;

fn record(tally: &Mutex<Tally>, started: Instant, result: Answer) {
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    t.latencies_us
        .push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    match result {
        Ok((status, body, mesh)) => {
            *t.by_status.entry(status).or_default() += 1;
            *t.by_body.entry(body).or_default() += 1;
            if let Some(m) = mesh {
                *t.by_mesh_error.entry(m).or_default() += 1;
            }
        }
        Err(e) => *t.errors.entry(e).or_default() += 1,
    }
}

async fn get(
    addr: SocketAddr,
    path: &str,
    count: u64,
    h2: bool,
    concurrency: u64,
    interval: Duration,
    method: hyper::Method,
) -> Result<serde_json::Value, Error> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let io = TokioIo::new(tcp);
    let began = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let uri: hyper::Uri = format!("http://{addr}{path}").parse()?;
    async fn read(response: Response<Incoming>) -> Answer {
        let status = response.status().as_u16();
        let mesh = response
            .headers()
            .get(MESH_ERROR)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned(), mesh))
    }
    if h2 {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let next = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (mut sender, next, tally, uri, method) = (
                    sender.clone(),
                    next.clone(),
                    tally.clone(),
                    uri.clone(),
                    method.clone(),
                );
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        if !interval.is_zero() {
                            let n = u32::try_from(i).unwrap_or(u32::MAX);
                            tokio::time::sleep_until((began + interval.saturating_mul(n)).into())
                                .await;
                        }
                        let started = Instant::now();
                        let result = match request(&uri, &method) {
                            Ok(req) => match sender.send_request(req).await {
                                Ok(r) => read(r).await,
                                Err(e) => Err(format!("request: {e}")),
                            },
                            Err(e) => Err(format!("request: {e}")),
                        };
                        record(&tally, started, result);
                    }
                })
            })
            .collect();
        for w in workers {
            w.await?;
        }
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        for i in 0..count {
            if i > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            let started = Instant::now();
            let result = match sender.ready().await {
                Ok(()) => match sender.send_request(request(&uri, &method)?).await {
                    Ok(r) => read(r).await,
                    Err(e) => Err(format!("request: {e}")),
                },
                Err(e) => Err(format!("connection: {e}")),
            };
            let failed = result.is_err();
            let ok = matches!(&result, Ok((200, ..)));
            {
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                if ok {
                    t.last_ok = Some(i);
                } else if t.first_not_ok.is_none() {
                    t.first_not_ok = Some(i);
                    t.first_not_ok_status = result.as_ref().ok().map(|r| r.0);
                }
            }
            record(&tally, started, result);
            if failed {
                // HTTP/1.1: a broken connection takes no more requests.
                break;
            }
        }
    }
    let mut t = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    t.latencies_us.sort_unstable();
    let q = |p: f64| -> u64 {
        if t.latencies_us.is_empty() {
            return 0;
        }
        t.latencies_us[((t.latencies_us.len() - 1) as f64 * p).round() as usize]
    };
    Ok(serde_json::json!({
        "requests": t.latencies_us.len(),
        "by_body": t.by_body,
        "by_status": t.by_status,
        "by_mesh_error": t.by_mesh_error,
        "errors": t.errors,
        "p50_us": q(0.5),
        "p99_us": q(0.99),
        "per_second": t.latencies_us.len() as f64 / began.elapsed().as_secs_f64(),
        "last_ok": t.last_ok,
        "first_not_ok": t.first_not_ok,
        "first_not_ok_status": t.first_not_ok_status,
    }))
}

async fn upgrade(
    addr: SocketAddr,
    lines: u64,
    interval: Duration,
) -> Result<serde_json::Value, Error> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn.with_upgrades());
    let req = Request::get(format!("http://{addr}/"))
        .header("host", addr.to_string())
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    if status != 101 {
        return Ok(serde_json::json!({ "status": status, "echoed": "" }));
    }
    let mut io = TokioIo::new(hyper::upgrade::on(response).await?);
    let mut buf = vec![0u8; 64];
    let mut got = Vec::new();
    let mut echoed = 0;
    let mut ended_by = "done".to_owned();
    'lines: for i in 0..lines {
        if i > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        let line = if lines == 1 {
            "hello through the upgrade\n".to_owned()
        } else {
            format!("line {i}\n")
        };
        if let Err(e) = io.write_all(line.as_bytes()).await {
            ended_by = format!("write: {e}");
            break;
        }
        let want = got.len() + line.len();
        while got.len() < want {
            match tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf)).await {
                Ok(Ok(0)) => {
                    ended_by = "closed".to_owned();
                    break 'lines;
                }
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => {
                    ended_by = format!("read: {e}");
                    break 'lines;
                }
                Err(_) => {
                    ended_by = "no echo within 10 s".to_owned();
                    break 'lines;
                }
            }
        }
        echoed += 1;
    }
    Ok(serde_json::json!({
        "status": status,
        "echoed": String::from_utf8_lossy(&got),
        "lines_echoed": echoed,
        "ended_by": ended_by,
    }))
}
