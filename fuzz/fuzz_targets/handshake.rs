//! The tunnel's handshake driver (`tunnel/session.rs`) against a stock rustls peer whose
//! records are cut to a fuzzed size, with the bytes toward the driver delivered in fuzzed
//! chunks and, optionally, one of them changed. A clean exchange must complete; a damaged one
//! must complete or fail; none may spin (issue 19: a handshake message split over records
//! made the driver loop without yielding). The clock is paused (see `paused_runtime`): a
//! driver that spins hangs the run, and libFuzzer reports it.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_fuzz::{paused_runtime, pki, Input};
use mesh_node::tunnel::session::{accept_over, connect_over};
use rustls::pki_types::ServerName;
use tokio::io::{duplex, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// How the bytes toward the driver are delivered.
struct Delivery {
    chunks: Vec<usize>,
    /// Offset of the byte to change and the XOR mask.
    flip: Option<(usize, u8)>,
}

/// Copies `from` to `to` in `delivery`'s chunks, changing the chosen byte, until `from` ends.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    delivery: Delivery,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut sent, mut turn) = (0usize, 0usize);
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((at, mask)) = delivery.flip {
            if (sent..sent + n).contains(&at) {
                buf[at - sent] ^= mask;
            }
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let size = delivery.chunks[turn % delivery.chunks.len()].min(rest.len());
            turn += 1;
            if to.write_all(&rest[..size]).await.is_err() {
                return;
            }
            rest = &rest[size..];
            // Let the driver see each chunk on its own.
            tokio::task::yield_now().await;
        }
        sent += n;
    }
    let _ = to.shutdown().await;
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let driver_is_server = input.byte() & 1 == 0;
    // rustls takes fragment sizes from 32 bytes.
    let fragment = match input.byte() {
        0 => None,
        n => Some(31 + usize::from(n)),
    };
    let chunks: Vec<usize> = (0..8).map(|_| usize::from(input.byte()).max(1)).collect();
    let flip = match input.u16() {
        0 => None,
        at => Some((usize::from(at) - 1, input.byte() | 1)),
    };
    let clean = flip.is_none();
    let delivery = Delivery { chunks, flip };
    let pki = pki();
    paused_runtime().block_on(async move {
        // peer <-> (peer_mid | driver_mid) <-> driver, one pump each way.
        let (peer_io, peer_mid) = duplex(64 * 1024);
        let (driver_mid, mut driver_io) = duplex(64 * 1024);
        let (peer_mid_rd, peer_mid_wr) = tokio::io::split(peer_mid);
        let (driver_mid_rd, driver_mid_wr) = tokio::io::split(driver_mid);
        tokio::spawn(pump(peer_mid_rd, driver_mid_wr, delivery));
        tokio::spawn(async move {
            let (mut rd, mut wr) = (driver_mid_rd, peer_mid_wr);
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.shutdown().await;
        });
        let name = ServerName::try_from("tunnel.mycel").expect("a name");
        let peer = if driver_is_server {
            let mut config = (*pki.client).clone();
            config.max_fragment_size = fragment;
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            tokio::spawn(async move {
                if let Ok(mut tls) = connector.connect(name.clone(), peer_io).await {
                    let _ = tls.write_all(b"header").await;
                    let _ = tls.flush().await;
                    let mut one = [0u8; 1];
                    let _ = tls.read(&mut one).await;
                }
            })
        } else {
            let mut config = (*pki.server).clone();
            config.max_fragment_size = fragment;
            let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(peer_io).await {
                    let _ = tls.write_all(b"answer").await;
                    let _ = tls.flush().await;
                    let mut one = [0u8; 1];
                    let _ = tls.read(&mut one).await;
                }
            })
        };
        let driven = async {
            if driver_is_server {
                accept_over(pki.server.clone(), &mut driver_io).await
            } else {
                let name = ServerName::try_from("tunnel.mycel").expect("a name");
                connect_over(pki.client.clone(), name, &mut driver_io).await
            }
        };
        let outcome = tokio::time::timeout(Duration::from_secs(60), driven).await;
        match outcome {
            Ok(Ok((chain, _rest))) => assert!(!chain.is_empty(), "a handshake without a chain"),
            Ok(Err(e)) => assert!(!clean, "a clean handshake failed: {e}"),
            // Both ends waiting on each other after a damaged byte: not a spin.
            Err(_) => assert!(!clean, "a clean handshake did not finish"),
        }
        drop(driver_io);
        peer.abort();
    });
});
