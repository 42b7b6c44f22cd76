//! The tunnel's side of a relay (`proxy/relay.rs` drives both sides): the application's
//! bytes read straight into record slots and sealed in place, records opened in place and
//! their payloads written out with one vectored write; for QUIC, chunks handed to quinn as
//! they are. Nothing is copied in user space.

use std::{
    future::Future,
    io::{self, IoSlice, IoSliceMut},
    ops::Range,
};

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;

use super::{
    quic::TunnelStream,
    record::{ContentType, FULL_RECORD, HEADER, MAX_PLAINTEXT},
    session::{Rekey, Rx, SessionError, Tx},
    Session,
};
use crate::{
    metrics::Flow,
    socket::{pool, shutdown_write, write_all, write_all_vectored},
};

impl Session {
    /// The two directions between `app` and the session, to be run together until both have
    /// ended: `out` counts the application's bytes sent, `back` those it received. Futures,
    /// not one `async fn`: the relay's future is what every open connection's task holds,
    /// and a wrapper would keep its own copy of every reference.
    pub fn copy<'a>(
        &'a mut self,
        app: &'a TcpStream,
        out: &'a Flow,
        back: &'a Flow,
    ) -> (
        impl Future<Output = io::Result<u64>> + 'a,
        impl Future<Output = io::Result<u64>> + 'a,
    ) {
        let (tcp, tx, rx, rekey) = self.parts();
        (
            seal(app, tcp, tx, rekey, out),
            open(tcp, rx, rekey, app, back),
        )
    }
}

impl TunnelStream {
    /// Copies both ways between `app` and the stream until both have ended; what arrived
    /// with the header goes first.
    pub async fn copy(
        &mut self,
        app: &TcpStream,
        out: &Flow,
        back: &Flow,
    ) -> io::Result<(u64, u64)> {
        let early = std::mem::take(&mut self.early);
        tokio::try_join!(
            to_stream(app, &mut self.send, out),
            from_stream(&mut self.recv, early, app, back)
        )
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
