//! Copying between the two halves of a proxied connection: how a relay starts, ends, and is
//! cut short; the plain side's copy. The tunnel's side (records sealed and opened in place,
//! QUIC chunks) is `tunnel/copy.rs`.
//!
//! Each direction waits for its source to be readable holding no memory, then borrows a
//! buffer from a pool shared by the process (`socket/pool.rs`), moves as much as the socket
//! has, and gives the buffer back once the bytes are written: an idle connection holds no
//! buffer.

use std::{io, net::SocketAddr};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Flow, Traffic};
pub use crate::socket::reset;
use crate::socket::{pool, shutdown_write, write_all};
use crate::tunnel::{quic::TunnelStream, session::SessionError, Session};

/// The far side of a relay: a plain TCP connection, a TLS tunnel, or a QUIC tunnel stream.
pub enum Stream {
    Plain(TcpStream),
    Tunnel(Box<Session>),
    Quic(Box<TunnelStream>),
}

impl Stream {
    /// Ends the stream as a failure: a TCP reset (after the TLS alert the error calls for),
    /// or a QUIC stream reset.
    fn abort(self, error: &io::Error) {
        match self {
            Stream::Plain(s) => reset(s),
            Stream::Tunnel(s) => s.abort(SessionError::within(error)),
            Stream::Quic(s) => s.reset(),
        }
    }
}

/// How a relay ended in order.
pub struct Relayed {
    /// Bytes from the application to the other side.
    pub sent: u64,
    /// Bytes from the other side to the application.
    pub received: u64,
    /// The tunnel session, when both directions ended with an end of stream and it can
    /// carry another connection.
    pub session: Option<Box<Session>>,
}

/// The trust root a tunnel's peer chains to was withdrawn (see `tunnel/anchors.rs`).
pub const BY_TRUST: &str = "the trust root of its tunnel's peer was withdrawn";

/// Copies both ways until both sides have ended. A FIN is passed on as a FIN (through a
/// tunnel: as an end-of-stream record), so half-closed connections keep working; a reset or
/// error on either side resets both, and so does `closed` firing (a policy change denied the
/// connection, the trust root of its tunnel was withdrawn, or it expired). Returns the error after
/// resetting.
pub async fn relay(
    app: TcpStream,
    mut other: Stream,
    closed: Option<&CancellationToken>,
    traffic: &Traffic,
) -> Result<Relayed, io::Error> {
    let (out, back) = (&traffic.from_app, &traffic.to_app);
    let closed = async {
        match closed {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let copy = async {
        match &mut other {
            Stream::Plain(b) => tokio::try_join!(plain(&app, b, out), plain(b, &app, back)),
            Stream::Tunnel(session) => {
                let (sealing, opening) = session.copy(&app, out, back);
                tokio::try_join!(sealing, opening)
            }
            // Boxed: QUIC's copies are the largest futures (a batch of chunks each), and
            // every idle TLS or plain connection would otherwise carry their size.
            Stream::Quic(q) => Box::pin(q.copy(&app, out, back)).await,
        }
    };
    // Closed first: a connection closed before its relay began sends nothing.
    let copied = tokio::select! {
        biased;
        () = closed => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed: a policy change denies this connection, its tunnel's trust root was withdrawn, or it expired (idleTimeout, maxConnectionDuration)",
        )),
        copied = copy => copied,
    };
    match copied {
        Ok((sent, received)) => {
            let session = match other {
                Stream::Tunnel(s) if s.reusable() => Some(s),
                // The peer closed the session: answer in kind, then FIN.
                Stream::Tunnel(mut s) => {
                    let _ = s.close().await;
                    None
                }
                Stream::Plain(_) | Stream::Quic(_) => None,
            };
            Ok(Relayed {
                sent,
                received,
                session,
            })
        }
        Err(e) => {
            reset(app);
            other.abort(&e);
            Err(e)
        }
    }
}

/// Logs how a relay that failed ended: a tunnel record that failed authentication is a
/// warning (something on the way tampered with it), anything else a debug line (resets are
/// ordinary).
pub fn log_failure(
    workload: &crate::workloads::WorkloadId,
    peer: Option<SocketAddr>,
    e: &io::Error,
) {
    if SessionError::within(e).is_some_and(SessionError::is_tampering) {
        tracing::warn!(
            %workload, peer = ?peer, error = %e,
            "a tunnel record failed authentication (tampered with or corrupted on the way); both sides reset"
        );
    } else {
        tracing::debug!(%workload, peer = ?peer, error = %e, "relay ended with an error; both sides reset");
    }
}

/// Plain to plain.
async fn plain(src: &TcpStream, dst: &TcpStream, counted: &Flow) -> io::Result<u64> {
    let mut total = 0;
    loop {
        src.readable().await?;
        let mut buf = pool::take();
        let n = match src.try_read(&mut buf) {
            Ok(0) => {
                shutdown_write(dst)?;
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(dst, &buf[..n]).await?;
        total += n as u64;
        counted.add(n);
    }
}
