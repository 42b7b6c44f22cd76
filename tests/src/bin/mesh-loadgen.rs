//! The benchmark's application: a server and the load it is measured with, run inside pods.
//! Nothing in it knows about the mesh; with `--tls` it does end-to-end rustls itself (the
//! baseline a mesh is compared with).
//!
//! ```text
//! mesh-loadgen serve --port P [--tls DIR]            sink / echo server (DIR: CA and key made here)
//! mesh-loadgen bulk --addr A --secs S --streams N [--tls DIR]
//! mesh-loadgen rpc --addr A --secs S --rate R [--tls DIR]
//! mesh-loadgen connrate --addr A --secs S --concurrency C [--tls DIR]
//! mesh-loadgen hold --addr A --count N                opens N connections, each answered end to
//!                                                     end, prints "held N", holds them until
//!                                                     stdin closes, then sends 1 KiB on each
//!                                                     and counts those that echo it back
//! ```
//!
//! Each client prints one JSON line. The first byte a client sends picks the server's
//! behaviour: `B` count bytes until EOF and answer the count, `R` echo 1 KiB messages, `C` echo
//! one 1 KiB message and close, `H` answer one byte, then echo until EOF (an idle connection).

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};

const MSG: usize = 1024;
const CHUNK: usize = 64 * 1024;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("mesh-loadgen: error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<()> {
    let mode = args.first().map(String::as_str).unwrap_or("");
    let flag = |name: &str| -> Option<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let num = |name: &str, default: f64| -> Result<f64> {
        flag(name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("{name}: {v:?} is not a number").into())
        })
    };
    let tls = flag("--tls").map(PathBuf::from);
    raise_fd_limit();
    match mode {
        "serve" => serve(num("--port", 0.0)? as u16, tls.as_deref()),
        "bulk" | "rpc" | "connrate" | "hold" => {
            let addr: SocketAddr = flag("--addr")
                .ok_or("--addr is required")?
                .parse()
                .map_err(|_| "--addr is not an address:port")?;
            let client = Client::new(addr, tls.as_deref())?;
            let secs = Duration::from_secs_f64(num("--secs", 5.0)?);
            let out = match mode {
                "bulk" => bulk(&client, secs, num("--streams", 1.0)? as usize)?,
                "rpc" => rpc(&client, secs, num("--rate", 1000.0)?)?,
                "hold" => hold(&client, num("--count", 1000.0)? as usize)?,
                _ => connrate(&client, secs, num("--concurrency", 4.0)? as usize)?,
            };
            println!("{out}");
            Ok(())
        }
        _ => Err(
            "usage: mesh-loadgen serve|bulk|rpc|connrate|hold ... (see the source header)".into(),
        ),
    }
}

// ---- TLS material: a CA and a server certificate made by the server, read by clients ----

fn tls_server_config(dir: &Path) -> Result<Arc<ServerConfig>> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["loadgen.test".to_owned()])?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.der"), ca_cert.der())?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    Ok(Arc::new(config))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Client {
    addr: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl Client {
    fn new(addr: SocketAddr, tls_dir: Option<&Path>) -> Result<Self> {
        let tls = match tls_dir {
            None => None,
            Some(dir) => {
                let mut roots = RootCertStore::empty();
                roots.add(CertificateDer::from(std::fs::read(dir.join("ca.der"))?))?;
                let config = ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(Arc::new(config))
            }
        };
        Ok(Self { addr, tls })
    }

    fn connect(&self, mode: u8) -> Result<Conn> {
        let tcp = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut stream = match &self.tls {
            None => Conn::Plain(tcp),
            Some(config) => {
                let conn = ClientConnection::new(
                    config.clone(),
                    ServerName::try_from("loadgen.test")?.to_owned(),
                )?;
                Conn::Tls(Box::new(StreamOwned::new(conn, tcp)))
            }
        };
        stream.write_all(&[mode])?;
        Ok(stream)
    }
}

/// A client connection, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    /// Ends our side of the stream (TLS: close_notify, then FIN); reading goes on.
    fn finish_writes(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(tcp) => tcp.shutdown(std::net::Shutdown::Write),
            Conn::Tls(tls) => {
                tls.conn.send_close_notify();
                tls.flush()?;
                tls.sock.shutdown(std::net::Shutdown::Write)
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

// ---- server ----

fn serve(port: u16, tls_dir: Option<&Path>) -> Result<()> {
    let tls = tls_dir.map(tls_server_config).transpose()?;
    let listener = TcpListener::bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))))?;
    println!("listening");
    io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        let tls = tls.clone();
        std::thread::spawn(move || {
            let _ = tcp.set_nodelay(true);
            let stream: Box<dyn Stream> = match tls {
                None => Box::new(tcp),
                Some(config) => match ServerConnection::new(config) {
                    Ok(conn) => Box::new(StreamOwned::new(conn, tcp)),
                    Err(_) => return,
                },
            };
            let _ = answer(stream);
        });
    }
    Ok(())
}

fn answer(mut s: Box<dyn Stream>) -> io::Result<()> {
    let mut mode = [0u8];
    s.read_exact(&mut mode)?;
    match mode[0] {
        b'B' => {
            let mut buf = vec![0u8; CHUNK];
            let mut total: u64 = 0;
            loop {
                match s.read(&mut buf)? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            s.write_all(&total.to_be_bytes())?;
            s.flush()
        }
        b'R' => {
            let mut msg = [0u8; MSG];
            loop {
                if read_full(&mut s, &mut msg)? {
                    return Ok(());
                }
                s.write_all(&msg)?;
                s.flush()?;
            }
        }
        b'C' => {
            let mut msg = [0u8; MSG];
            read_full(&mut s, &mut msg)?;
            s.write_all(&msg)?;
            s.flush()
        }
        b'H' => {
            // The answer tells the client the whole path is up (through a mesh: the tunnel
            // is established), so what it then measures is idle connections, not handshakes.
            s.write_all(b"h")?;
            s.flush()?;
            // Then an echo, so that the client can check the connection still carries bytes
            // both ways after a long idle time.
            let mut buf = [0u8; MSG];
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n])?;
                s.flush()?;
            }
        }
        _ => Ok(()),
    }
}

/// Reads exactly `buf.len()` bytes; true on a clean EOF before the first byte.
fn read_full(s: &mut dyn Stream, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(true),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && got == 0 => return Ok(true),
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

// ---- clients ----

/// `streams` connections each send for `secs`; throughput is what the server counted over the
/// time until the last count came back.
fn bulk(client: &Client, secs: Duration, streams: usize) -> Result<serde_json::Value> {
    let start = Instant::now();
    let handles: Vec<_> = (0..streams.max(1))
        .map(|_| {
            let mut s = client.connect(b'B')?;
            Ok(std::thread::spawn(move || -> io::Result<u64> {
                let buf = vec![0x5au8; CHUNK];
                let until = Instant::now() + secs;
                while Instant::now() < until {
                    s.write_all(&buf)?;
                }
                // End of our stream: the count comes back after the server has read it all.
                s.finish_writes()?;
                let mut count = [0u8; 8];
                s.read_exact(&mut count)?;
                Ok(u64::from_be_bytes(count))
            }))
        })
        .collect::<Result<_>>()?;
    let mut bytes = 0u64;
    for h in handles {
        bytes += h.join().map_err(|_| "a bulk stream panicked")??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "bytes": bytes,
        "seconds": elapsed,
        "bytes_per_second": bytes as f64 / elapsed,
    }))
}

/// Opens `count` idle connections, each one answered by the server, says so on stdout, and
/// keeps them until stdin closes (the harness measures memory meanwhile).
fn hold(client: &Client, count: usize) -> Result<serde_json::Value> {
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        let mut c = client.connect(b'H')?;
        c.flush()?;
        let mut answer = [0u8; 1];
        c.read_exact(&mut answer)?;
        if answer != *b"h" {
            return Err(format!("the server answered {answer:?} to an idle connection").into());
        }
        conns.push(c);
    }
    println!("held {}", conns.len());
    io::stdout().flush()?;
    let mut sink = Vec::new();
    io::stdin().read_to_end(&mut sink)?;
    // Every connection must still carry 1 KiB there and back.
    let msg = [0x48u8; MSG];
    let mut answered = 0;
    for c in &mut conns {
        let mut back = [0u8; MSG];
        let ok = c.write_all(&msg).and_then(|()| c.flush()).is_ok()
            && matches!(read_full(c, &mut back), Ok(false))
            && back == msg;
        if ok {
            answered += 1;
        }
    }
    Ok(serde_json::json!({ "held": conns.len(), "answered": answered }))
}

/// Many connections need many descriptors: use what the hard limit allows.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// 1 KiB request/response on one open connection at a fixed rate. Latency counts from the
/// scheduled send time, so a stall is not hidden by the sends it delays.
fn rpc(client: &Client, secs: Duration, rate: f64) -> Result<serde_json::Value> {
    let mut s = client.connect(b'R')?;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let msg = [0x42u8; MSG];
    let mut back = [0u8; MSG];
    let start = Instant::now();
    let mut next = start;
    let mut latencies: Vec<u64> = Vec::new();
    while next < start + secs {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        s.write_all(&msg)?;
        s.flush()?;
        if read_full(&mut s, &mut back)? {
            return Err("the server closed the connection".into());
        }
        latencies.push(next.elapsed().as_micros() as u64);
        next += interval;
    }
    latencies.sort_unstable();
    let q = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    Ok(serde_json::json!({
        "requests": latencies.len(),
        "p50_us": q(0.50),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "max_us": latencies.last().copied().unwrap_or(0),
    }))
}

/// New connections per second: connect, 1 KiB request/response, close, on `concurrency`
/// threads.
fn connrate(client: &Client, secs: Duration, concurrency: usize) -> Result<serde_json::Value> {
    let client = Arc::new(Client {
        addr: client.addr,
        tls: client.tls.clone(),
    });
    let start = Instant::now();
    let handles: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let client = client.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let msg = [0x43u8; MSG];
                let mut back = [0u8; MSG];
                while start.elapsed() < secs {
                    let mut one = || -> Result<()> {
                        let mut s = client.connect(b'C')?;
                        s.write_all(&msg)?;
                        s.flush()?;
                        if read_full(&mut s, &mut back)? {
                            return Err("closed early".into());
                        }
                        Ok(())
                    };
                    match one() {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for h in handles {
        let (o, f) = h.join().map_err(|_| "a connrate thread panicked")?;
        ok += o;
        failed += f;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "connections": ok,
        "failed": failed,
        "seconds": elapsed,
        "per_second": ok as f64 / elapsed,
    }))
}
