//! Copying between the two halves of a proxied connection.

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{client, server};
use tokio_util::sync::CancellationToken;

/// A stream that can be closed with a TCP reset.
pub trait Resettable: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl Resettable for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Resettable for client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl Resettable for server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Closes with RST instead of FIN, so the peer sees a failure and not an end of stream.
pub fn reset(stream: impl Resettable) {
    let _ = socket2::SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Copies both ways until both sides have ended. A FIN is passed on as a FIN (for TLS: a
/// close_notify, then FIN), so half-closed connections keep working; a reset or error on either
/// side resets both, and so does `closed` firing (a policy change denied the connection).
/// Returns bytes (a → b, b → a), or the error after resetting.
pub async fn relay<A: Resettable, B: Resettable>(
    mut a: A,
    mut b: B,
    closed: Option<&CancellationToken>,
) -> Result<(u64, u64), std::io::Error> {
    let closed = async {
        match closed {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let copied = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut a, &mut b) => copied,
        () = closed => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "closed: a policy change denies this connection",
        )),
    };
    match copied {
        Ok(n) => Ok(n),
        Err(e) => {
            reset(a);
            reset(b);
            Err(e)
        }
    }
}
