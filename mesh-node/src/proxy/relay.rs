//! Copying between the two halves of a proxied connection.
//!
//! Each direction waits for its source to be readable holding no memory, then borrows a
//! buffer from a pool shared by the process, moves as much as the socket has (many TLS
//! records per system call), and gives the buffer back once the bytes are written: an idle
//! connection holds no buffer. Towards a tunnel, the application's bytes are read straight
//! into record slots and sealed in place; from a tunnel, records are opened in place and
//! their payloads written out with one vectored write. Nothing is copied in user space.

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::{Shutdown, SocketAddr},
    ops::Range,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Flow, Traffic};
use crate::tunnel::{
    quic::TunnelStream,
    record::{ContentType, FULL_RECORD, HEADER, MAX_PLAINTEXT},
    session::{Rekey, Rx, SessionError, Tx},
    Session,
};

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

/// A stream that can be closed with a TCP reset.
pub trait Resettable {
    fn tcp(&self) -> &TcpStream;
}

impl Resettable for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Resettable for Box<Session> {
    fn tcp(&self) -> &TcpStream {
        Session::tcp(self)
    }
}

/// Closes with RST instead of FIN, so the peer sees a failure and not an end of stream.
pub fn reset(stream: impl Resettable) {
    let _ = socket2::SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
    drop(stream);
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
/// connection, or the trust root of its tunnel was withdrawn). Returns the error after
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
                let (tcp, tx, rx, rekey) = session.parts();
                tokio::try_join!(
                    seal(&app, tcp, tx, rekey, out),
                    open(tcp, rx, rekey, &app, back)
                )
            }
            // Boxed: QUIC's copies are the largest futures (a batch of chunks each), and
            // every idle TLS or plain connection would otherwise carry their size.
            Stream::Quic(q) => {
                let early = std::mem::take(&mut q.early);
                Box::pin(async {
                    tokio::try_join!(
                        to_stream(&app, &mut q.send, out),
                        from_stream(&mut q.recv, early, &app, back)
                    )
                })
                .await
            }
        }
    };
    // Closed first: a connection closed before its relay began sends nothing.
    let copied = tokio::select! {
        biased;
        () = closed => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed: a policy change denies this connection, or its tunnel's trust root was withdrawn",
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

/// Plain to a tunnel: read into the plaintext slots of up to [`pool::SLOTS`] records, seal
/// each in place, and write them as one contiguous run.
async fn seal(
    src: &TcpStream,
    dst: &TcpStream,
    tx: &mut Tx,
    rekey: &Rekey,
    counted: &Flow,
) -> io::Result<u64> {
    let mut total = 0;
    let mut control = Vec::new();
    loop {
        src.readable().await?;
        let mut buf = pool::take();
        let read = {
            let mut slots: Vec<IoSliceMut<'_>> = buf
                .chunks_exact_mut(FULL_RECORD)
                .map(|r| IoSliceMut::new(&mut r[HEADER..HEADER + MAX_PLAINTEXT]))
                .collect();
            src.try_read_vectored(&mut slots)
        };
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        control.clear();
        tx.maybe_update_key(rekey, &mut control)?;
        if n == 0 {
            tx.end_of_stream(&mut control);
            write_all(dst, &control).await?;
            return Ok(total);
        }
        if !control.is_empty() {
            write_all(dst, &control).await?;
        }
        let mut end = 0;
        let mut left = n;
        for record in buf.chunks_exact_mut(FULL_RECORD) {
            if left == 0 {
                break;
            }
            let len = left.min(MAX_PLAINTEXT);
            end += tx.seal(record, len, ContentType::ApplicationData);
            left -= len;
        }
        write_all(dst, &buf[..end]).await?;
        total += n as u64;
        counted.add(n);
    }
}

/// A tunnel to plain: read as many records as the socket has, open them in place, and write
/// their payloads with one vectored write. A partial record stays at the buffer's start; bytes
/// after the end of stream (the next connection's header) go back to the session.
async fn open(
    src: &TcpStream,
    rx: &mut Rx,
    rekey: &Rekey,
    dst: &TcpStream,
    counted: &Flow,
) -> io::Result<u64> {
    let mut total = 0;
    // What the header exchange read past the header goes first. Taking the vectors (not
    // just their bytes) frees their capacity: an idle tunnel holds no buffer.
    let early = std::mem::take(&mut rx.plaintext);
    if !early.is_empty() {
        write_all(dst, &early).await?;
        total += early.len() as u64;
        counted.add(early.len());
    }
    drop(early);
    if std::mem::take(&mut rx.ended) {
        // The end of stream came with the header; what follows it stays for the next one.
        shutdown_write(dst)?;
        return Ok(total);
    }
    let pending = std::mem::take(&mut rx.pending);
    let mut held: Option<pool::Buf> = None;
    let mut filled = 0;
    if !pending.is_empty() {
        let mut buf = pool::take();
        filled = pending.len();
        buf[..filled].copy_from_slice(&pending);
        held = Some(buf);
    }
    drop(pending);
    let mut data: Vec<Range<usize>> = Vec::new();
    loop {
        if let Some(buf) = held.as_mut() {
            data.clear();
            let opened = rx.open(rekey, &mut buf[..filled], &mut data)?;
            let mut slices: Vec<IoSlice<'_>> =
                data.iter().map(|r| IoSlice::new(&buf[r.clone()])).collect();
            let written = write_all_vectored(dst, &mut slices).await?;
            total += written as u64;
            counted.add(written);
            if opened.ended {
                shutdown_write(dst)?;
                if !rx.closed {
                    rx.pending = buf[opened.consumed..filled].to_vec();
                }
                return Ok(total);
            }
            buf.copy_within(opened.consumed..filled, 0);
            filled -= opened.consumed;
            if filled == 0 {
                held = None;
            }
        }
        src.readable().await?;
        let buf = held.get_or_insert_with(pool::take);
        match src.try_read(&mut buf[filled..]) {
            Ok(0) => return Err(SessionError::Truncated.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if filled == 0 {
                    held = None;
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Plain to a QUIC stream. Each read goes into a new buffer that quinn takes as it is (no
/// copy into its send buffer). The end of stream is sent as the stream's FIN, and the copy
/// ends once the peer has it all: dropping the last handle of a connection closes it at once.
async fn to_stream(
    src: &TcpStream,
    dst: &mut quinn::SendStream,
    counted: &Flow,
) -> io::Result<u64> {
    /// Below glibc's mmap threshold, so a read costs a heap allocation, not a mapping.
    const CHUNK: usize = 64 * 1024;
    let mut total = 0;
    loop {
        src.readable().await?;
        let mut buf = BytesMut::with_capacity(CHUNK);
        let n = match src.try_read_buf(&mut buf) {
            Ok(0) => {
                dst.finish().map_err(io::Error::other)?;
                dst.stopped().await?;
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        dst.write_chunk(buf.freeze()).await?;
        total += n as u64;
        counted.add(n);
    }
}

/// A QUIC stream to plain: the received chunks, as quinn holds them, with one vectored
/// write. `early` (read with the header) goes first.
async fn from_stream(
    src: &mut quinn::RecvStream,
    early: Vec<u8>,
    dst: &TcpStream,
    counted: &Flow,
) -> io::Result<u64> {
    let mut total = 0;
    if !early.is_empty() {
        write_all(dst, &early).await?;
        total += early.len() as u64;
        counted.add(early.len());
    }
    drop(early);
    let mut chunks: [Bytes; 16] = Default::default();
    loop {
        let Some(n) = src.read_chunks(&mut chunks).await? else {
            shutdown_write(dst)?;
            return Ok(total);
        };
        let mut slices: Vec<IoSlice<'_>> = chunks[..n].iter().map(|c| IoSlice::new(c)).collect();
        let written = write_all_vectored(dst, &mut slices).await?;
        total += written as u64;
        counted.add(written);
        drop(slices);
        // Let go of the chunks now: an idle stream must not hold the last ones it received.
        for c in &mut chunks[..n] {
            *c = Bytes::new();
        }
    }
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(s).shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match dst.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn write_all_vectored(dst: &TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<usize> {
    let total = slices.iter().map(|s| s.len()).sum();
    while !slices.is_empty() {
        match dst.try_write_vectored(slices) {
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Relay buffers, shared by every connection of the process.
mod pool {
    use std::sync::Mutex;

    use crate::tunnel::record::FULL_RECORD;

    /// Records per buffer: 16 full records, about 256 KiB, the most one read or write moves.
    pub const SLOTS: usize = 16;
    const SIZE: usize = SLOTS * FULL_RECORD;
    /// Buffers kept for reuse after a burst; more are freed.
    const KEEP: usize = 32;

    static FREE: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

    /// A buffer on loan; goes back to the pool when dropped.
    pub struct Buf(Option<Box<[u8]>>);

    pub fn take() -> Buf {
        let reused = FREE.lock().unwrap_or_else(|p| p.into_inner()).pop();
        Buf(Some(
            reused.unwrap_or_else(|| vec![0u8; SIZE].into_boxed_slice()),
        ))
    }

    impl Drop for Buf {
        fn drop(&mut self) {
            if let Some(b) = self.0.take() {
                let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
                if free.len() < KEEP {
                    free.push(b);
                }
            }
        }
    }

    impl std::ops::Deref for Buf {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            self.0.as_deref().unwrap_or_default()
        }
    }

    impl std::ops::DerefMut for Buf {
        fn deref_mut(&mut self) -> &mut [u8] {
            self.0.as_deref_mut().unwrap_or_default()
        }
    }
}
