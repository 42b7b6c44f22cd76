//! A tunnel as a byte stream (`AsyncRead` + `AsyncWrite`), for code that speaks a protocol over
//! it through a library (the HTTP proxy's upstream connections) instead of relaying it with
//! `copy.rs`. The bytes on the wire are the relay's: application data in records of at most
//! [`MAX_PLAINTEXT`], and a shutdown ends this direction with the end-of-stream record, which
//! the destination passes on to its application as a FIN.
//!
//! Writes are gathered until a flush (or a full record) and sealed as one record: an HTTP
//! codec writes a response as several small pieces (a frame's header, its payload, the next
//! frame) and flushes once, and sealing and sending each piece on its own cost a record, an
//! AEAD pass and a syscall apiece. What is buffered stays bounded: one record's plaintext, and
//! the sealed records not yet taken by the socket.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    quic::TunnelStream,
    record::MAX_PLAINTEXT,
    session::{Opening, SessionError},
    Session,
};

/// A tunnel session's one connection as a stream.
pub struct SessionIo {
    session: Box<Session>,
    /// Written and not sealed yet: at most one record's worth.
    plain: Vec<u8>,
    /// Sealed records not written to the socket yet, from `written` on.
    out: Vec<u8>,
    written: usize,
    /// The end-of-stream record is in `out` (or gone): nothing more may be written.
    shut: bool,
}

impl SessionIo {
    pub fn new(session: Box<Session>) -> Self {
        Self {
            session,
            plain: Vec::new(),
            out: Vec::new(),
            written: 0,
            shut: false,
        }
    }

    /// The session, e.g. to see whether its root was withdrawn.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Writes what is sealed; ready once all of it is in the socket.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let tcp = self.session.tcp();
        while self.written < self.out.len() {
            ready!(tcp.poll_write_ready(cx))?;
            match tcp.try_write(&self.out[self.written..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Seals what was written into one record and writes all that is sealed; ready once it
    /// is in the socket.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.plain.is_empty() {
            self.session
                .seal_data(&self.plain, &mut self.out)
                .map_err(io::Error::from)?;
            self.plain.clear();
        }
        self.poll_write_out(cx)
    }
}

impl AsyncRead for SessionIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let received = this.session.received();
            if !received.is_empty() {
                let n = fill(buf, received);
                this.session.consume(n);
                return Poll::Ready(Ok(()));
            }
            match this.session.open_pending() {
                // The peer ended its direction: end of file, once what came before is read.
                Ok(Opening::Ended) if this.session.received().is_empty() => {
                    return Poll::Ready(Ok(()))
                }
                Ok(Opening::Ended | Opening::Opened) => continue,
                Ok(Opening::NeedMore) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
            let tcp = this.session.tcp();
            ready!(tcp.poll_read_ready(cx))?;
            match this.session.read_pending() {
                Ok(0) => return Poll::Ready(Err(SessionError::Truncated.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream was shut down",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Nothing more is taken while sealed records wait for the socket (a slow reader
        // would otherwise have them pile up here), and a full record goes out first.
        if this.written < this.out.len() {
            ready!(this.poll_write_out(cx))?;
        }
        if this.plain.len() >= MAX_PLAINTEXT {
            ready!(this.poll_send(cx))?;
        }
        let n = data.len().min(MAX_PLAINTEXT - this.plain.len());
        this.plain.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            ready!(this.poll_send(cx))?;
            this.session.seal_end(&mut this.out);
            this.shut = true;
        }
        this.poll_write_out(cx)
    }
}

/// Copies as much of `pending` (bytes already in hand) as `buf` has room for; how much.
fn fill(buf: &mut ReadBuf<'_>, pending: &[u8]) -> usize {
    let n = pending.len().min(buf.remaining());
    buf.put_slice(&pending[..n]);
    n
}

/// A QUIC tunnel stream as a stream: what arrived with the header first.
pub struct QuicIo {
    stream: Box<TunnelStream>,
}

impl QuicIo {
    pub fn new(stream: Box<TunnelStream>) -> Self {
        Self { stream }
    }
}

impl AsyncRead for QuicIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let early = &mut this.stream.early;
        if !early.is_empty() {
            let n = fill(buf, early);
            early.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().stream.send), cx, data)
            .map_err(io::Error::from)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().stream.send), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.get_mut().stream.send), cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Bytes written through the stream arrive as the relay would deliver them, both ways;
    /// a shutdown is the end of stream, and records larger than one are split.
    #[tokio::test]
    async fn a_session_stream_carries_bytes_both_ways_and_ends_in_order() {
        let (client, server) = super::super::session::tests::sessions().await;
        let mut a = SessionIo::new(client);
        let mut b = SessionIo::new(server);
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let send = async {
            a.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            a.write_all(&big).await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            back
        };
        let echo = async {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            b.write_all(&got[..18]).await.unwrap();
            b.shutdown().await.unwrap();
            got
        };
        let (back, got) = tokio::join!(send, echo);
        assert_eq!(&got[..18], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(&got[18..], &big[..]);
        assert_eq!(back, b"GET / HTTP/1.1\r\n\r\n");
        // Nothing may follow the end.
        assert!(a.write_all(b"x").await.is_err());
    }

    /// Pieces written before a flush leave as one record: nothing reaches the peer until the
    /// flush, and then all of it at once.
    #[tokio::test]
    async fn small_writes_are_sealed_together_at_the_flush() {
        let (client, server) = super::super::session::tests::sessions().await;
        let mut a = SessionIo::new(client);
        let mut b = SessionIo::new(server);
        for piece in [&b"HEADERS"[..], b" ", b"DATA"] {
            a.write_all(piece).await.unwrap();
        }
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(200), b.read(&mut buf)).await;
        assert!(early.is_err(), "bytes went out before the flush: {early:?}");
        a.flush().await.unwrap();
        let n = b.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HEADERS DATA", "one record, one read");
    }

    /// Toward a peer that reads slowly, what is sealed and waiting for the socket stays
    /// about a record: a write is not taken while records wait.
    #[tokio::test]
    async fn a_slow_reader_does_not_make_the_writer_buffer() {
        let (client, server) = super::super::session::tests::sessions().await;
        let mut a = SessionIo::new(client);
        let mut b = SessionIo::new(server);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            loop {
                tokio::time::sleep(Duration::from_millis(2)).await;
                match b.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        let chunk = vec![7u8; MAX_PLAINTEXT];
        let mut most = 0;
        for _ in 0..400 {
            // A write that cannot go on is given up after a moment, as a caller's select would.
            let _ = tokio::time::timeout(Duration::from_millis(5), async {
                let taken = a.write(&chunk).await?;
                assert!(taken <= chunk.len());
                a.flush().await
            })
            .await;
            most = most.max(a.out.len() - a.written);
        }
        reader.abort();
        assert!(
            most <= 2 * (MAX_PLAINTEXT + 64),
            "{most} bytes sealed and waiting for the socket"
        );
    }
}
