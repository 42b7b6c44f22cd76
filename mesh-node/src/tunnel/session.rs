//! One TLS 1.3 tunnel connection: rustls's unbuffered state machine for the handshake, then
//! records sealed and opened here (`record.rs`) with the secrets rustls hands over.
//!
//! rustls is fed the handshake one whole record at a time, and only when it has done all it
//! can with the records it holds, so it never consumes bytes past its last handshake record:
//! whatever the peer sent after that (the tunnel header, early application bytes) stays here
//! for the record layer. rustls keeps computing key updates (`rustls::kernel`): a peer's
//! KeyUpdate is followed, and this side updates its own key before the cipher suite's
//! confidentiality limit. Session tickets are not used.
//!
//! One session carries one application connection at a time, and then the next (see
//! `pool.rs`): each direction of a connection ends with an empty application-data record
//! (TLS 1.3 allows them; this is the tunnel's end of stream), and once both directions have
//! ended the session is free for another header. close_notify ends the session itself.

use std::{
    io,
    ops::Range,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use rustls::{
    client::{ClientConnectionData, UnbufferedClientConnection},
    kernel::KernelConnection,
    pki_types::{CertificateDer, ServerName},
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus},
    ClientConfig, ConnectionTrafficSecrets, ServerConfig, SupportedCipherSuite,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use super::record::{self, ContentType, Opener, RecordError, Sealer, MAX_PLAINTEXT};

/// Far more than any handshake flight of the mesh (two short certificate chains), and what a
/// stranger can make one handshake hold.
const MAX_HANDSHAKE_BUFFER: usize = 32 * 1024;
/// TLS handshake message types that may follow the handshake (RFC 8446 §4).
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Record(#[from] RecordError),
    #[error("the peer closed the connection during the TLS handshake")]
    ClosedInHandshake,
    #[error("the peer's handshake is over {MAX_HANDSHAKE_BUFFER} bytes")]
    HandshakeTooLarge,
    #[error("the peer sent application data before the handshake finished")]
    DataInHandshake,
    #[error("cannot encode a handshake message: {0}")]
    Encode(String),
    #[error("the peer sent TLS alert {0}")]
    Alert(String),
    #[error("the peer sent a malformed or unexpected post-handshake message")]
    BadPostHandshake,
    #[error("the peer sent a {0} record with nothing in it")]
    EmptyRecord(&'static str),
    #[error("the peer closed the connection without a TLS close_notify")]
    Truncated,
}

impl SessionError {
    /// The fatal alert this side sends for the error, when it is the peer's fault and the
    /// record layer is this side's (after the handshake; rustls sends its own before).
    pub fn alert(&self) -> Option<rustls::AlertDescription> {
        match self {
            SessionError::Record(e) => Some(e.alert()),
            SessionError::BadPostHandshake | SessionError::EmptyRecord(_) => {
                Some(rustls::AlertDescription::UnexpectedMessage)
            }
            _ => None,
        }
    }

    /// A record that failed authentication: corrupted or forged on the way, never an
    /// orderly close.
    pub fn is_tampering(&self) -> bool {
        matches!(self, SessionError::Record(RecordError::Decrypt))
    }

    /// The session error inside an I/O error from the relay, if that is what it is.
    pub fn within(e: &io::Error) -> Option<&SessionError> {
        e.get_ref()?.downcast_ref::<SessionError>()
    }
}

impl From<SessionError> for io::Error {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Io(e) => e,
            SessionError::Truncated => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Next traffic secrets, computed by rustls's key schedule (`rustls::kernel`).
pub trait NextKeys: Send {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
}

impl<D: Send> NextKeys for KernelConnection<D> {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_tx_secret()
    }
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_rx_secret()
    }
}

/// What both directions of a session share: the key schedule, and the peer's request that
/// this side update its sending key (answered before the next record is sent).
pub struct Rekey {
    keys: Mutex<Box<dyn NextKeys>>,
    peer_asked: AtomicBool,
}

impl Rekey {
    pub fn new(keys: Box<dyn NextKeys>) -> Self {
        Self {
            keys: Mutex::new(keys),
            peer_asked: AtomicBool::new(false),
        }
    }

    fn next(&self, tx: bool) -> Result<(u64, ConnectionTrafficSecrets), SessionError> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        Ok(if tx { keys.next_tx()? } else { keys.next_rx()? })
    }
}

/// The sending direction.
pub struct Tx {
    sealer: Sealer,
    /// Records after which this side moves to a new key.
    rekey_at: u64,
}

impl Tx {
    /// Seals one record in place; see [`Sealer::seal`].
    pub fn seal(&mut self, record: &mut [u8], len: usize, ty: ContentType) -> usize {
        self.sealer.seal(record, len, ty)
    }

    /// Appends a KeyUpdate record to `out` and moves to the next key, when the peer asked for
    /// one or this key is near its limit. Call before sealing application data.
    pub fn maybe_update_key(
        &mut self,
        rekey: &Rekey,
        out: &mut Vec<u8>,
    ) -> Result<(), SessionError> {
        if !rekey.peer_asked.swap(false, Ordering::AcqRel) && self.sealer.seq() < self.rekey_at {
            return Ok(());
        }
        // KeyUpdate, 1-byte body, update_not_requested.
        self.sealer
            .seal_to(&[KEY_UPDATE, 0, 0, 1, 0], ContentType::Handshake, out);
        let (seq, secrets) = rekey.next(true)?;
        self.sealer = Sealer::new(seq, &secrets)?;
        Ok(())
    }

    /// Appends the end of this direction's stream: an empty application-data record.
    pub fn end_of_stream(&mut self, out: &mut Vec<u8>) {
        self.sealer.seal_to(&[], ContentType::ApplicationData, out);
    }

    /// Appends a close_notify alert: the session ends.
    fn close_notify(&mut self, out: &mut Vec<u8>) {
        self.sealer.seal_to(&[1, 0], ContentType::Alert, out);
    }

    fn seal_to(&mut self, payload: &[u8], ty: ContentType, out: &mut Vec<u8>) {
        self.sealer.seal_to(payload, ty, out);
    }
}

/// What opening a run of records produced.
#[derive(Debug, Default)]
pub struct Opened {
    /// Bytes of the input that held complete records.
    pub consumed: usize,
    /// The peer ended its direction of the connection (end of stream or close_notify).
    pub ended: bool,
}

/// The receiving direction.
pub struct Rx {
    opener: Opener,
    /// Bytes read from the socket that are not opened yet (left over from the handshake or
    /// the header exchange; the relay takes them first).
    pub pending: Vec<u8>,
    /// Application bytes opened but not delivered yet (those after the header).
    pub plaintext: Vec<u8>,
    /// The peer sent close_notify: the session carries nothing more.
    pub closed: bool,
    /// The peer ended its direction of the current connection in the records read with the
    /// header (a server that answers and closes at once): the relay passes the end on
    /// after `plaintext` instead of waiting for records that will not come.
    pub ended: bool,
    /// This side is the server: the peer may not send session tickets.
    server: bool,
}

impl Rx {
    /// A receiving direction that opens with `opener`; `server` when this side is the server.
    pub fn new(opener: Opener, server: bool) -> Self {
        Self {
            opener,
            pending: Vec::new(),
            plaintext: Vec::new(),
            closed: false,
            ended: false,
            server,
        }
    }

    /// Opens every complete record at the start of `buf` in place and records where the
    /// application bytes are in `data`. Stops after the end of stream or close_notify.
    pub fn open(
        &mut self,
        rekey: &Rekey,
        buf: &mut [u8],
        data: &mut Vec<Range<usize>>,
    ) -> Result<Opened, SessionError> {
        let mut out = Opened::default();
        while let Some(len) = Opener::complete(&buf[out.consumed..])? {
            let start = out.consumed;
            let record = &mut buf[start..start + len];
            let (ty, range) = self.opener.open(record)?;
            out.consumed += len;
            match ty {
                ContentType::ApplicationData if !range.is_empty() => {
                    data.push(start + range.start..start + range.end);
                }
                ContentType::ApplicationData => {
                    out.ended = true;
                    return Ok(out);
                }
                ContentType::Alert => match record[range] {
                    // close_notify
                    [_, 0] => {
                        self.closed = true;
                        out.ended = true;
                        return Ok(out);
                    }
                    [_, desc] => {
                        return Err(SessionError::Alert(format!(
                            "{:?}",
                            rustls::AlertDescription::from(desc)
                        )))
                    }
                    [] => return Err(SessionError::EmptyRecord("alert")),
                    _ => return Err(SessionError::BadPostHandshake),
                },
                // Zero-length handshake records are forbidden (RFC 8446 §5.1).
                ContentType::Handshake if range.is_empty() => {
                    return Err(SessionError::EmptyRecord("handshake"))
                }
                ContentType::Handshake => self.post_handshake(rekey, &record[range])?,
            }
        }
        Ok(out)
    }

    /// KeyUpdate moves to the peer's next key; a server's session tickets are ignored (this
    /// node does not resume sessions), a client's are refused. Each message must lie within
    /// one record, as rustls sends them, and a KeyUpdate must end its record: what follows it
    /// was sealed under the key it retires (RFC 8446 §5.1), and so at most one per record.
    fn post_handshake(&mut self, rekey: &Rekey, mut msgs: &[u8]) -> Result<(), SessionError> {
        while let [ty, a, b, c, ref rest @ ..] = *msgs {
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            let (body, next) = rest
                .split_at_checked(len)
                .ok_or(SessionError::BadPostHandshake)?;
            match (ty, body) {
                (KEY_UPDATE, [asked @ (0 | 1)]) if next.is_empty() => {
                    let (seq, secrets) = rekey.next(false)?;
                    self.opener = Opener::new(seq, &secrets)?;
                    if *asked == 1 {
                        rekey.peer_asked.store(true, Ordering::Release);
                    }
                }
                (NEW_SESSION_TICKET, _) if !self.server => {}
                _ => return Err(SessionError::BadPostHandshake),
            }
            msgs = next;
        }
        if msgs.is_empty() {
            Ok(())
        } else {
            Err(SessionError::BadPostHandshake)
        }
    }
}

/// What opening the bytes already read gave.
pub(super) enum Opening {
    /// At least one record (application bytes, or only a KeyUpdate).
    Opened,
    /// The peer ended its direction (end of stream or close_notify); what came before it is
    /// in the plaintext.
    Ended,
    /// No complete record: read more.
    NeedMore,
}

/// An established tunnel connection.
pub struct Session {
    tcp: TcpStream,
    tx: Tx,
    rx: Rx,
    rekey: Rekey,
    established: std::time::Instant,
    /// Counts the session among the open tunnels while it lives (see [`Session::track`]).
    tunnel: Option<crate::metrics::OpenTunnel>,
    /// Cancelled when the root the peer's chain ends at is withdrawn (see [`Session::watch`]).
    withdrawn: Option<tokio_util::sync::CancellationToken>,
}

impl Session {
    /// Handshakes as the client of `name` (the verifier has checked the server's identity);
    /// returns the session and the server's verified chain, leaf first, from which the caller
    /// learns the root to watch ([`Session::watch`]). Sessions are boxed: they are moved
    /// between the pool, the header exchange and the relay.
    pub async fn connect(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        tcp: TcpStream,
    ) -> Result<(Box<Self>, Vec<CertificateDer<'static>>), SessionError> {
        let conn = UnbufferedClientConnection::new(config, name)?;
        Self::handshake(conn, tcp).await
    }

    /// Handshakes as the server; returns the session and the client's verified certificate
    /// chain, leaf first. The session does not keep the chain: idle sessions are many, and
    /// the caller needs only the identity and serial it names.
    pub async fn accept(
        config: Arc<ServerConfig>,
        tcp: TcpStream,
    ) -> Result<(Box<Self>, Vec<CertificateDer<'static>>), SessionError> {
        let conn = UnbufferedServerConnection::new(config)?;
        Self::handshake(conn, tcp).await
    }

    async fn handshake<C: Handshake>(
        mut conn: C,
        mut tcp: TcpStream,
    ) -> Result<(Box<Self>, Vec<CertificateDer<'static>>), SessionError> {
        let incoming = drive(&mut conn, &mut tcp).await?;
        let peer_certificates = conn.peer_certificates();
        let rekey_at = match conn.suite() {
            Some(SupportedCipherSuite::Tls13(s)) => s.common.confidentiality_limit,
            _ => return Err(RecordError::UnsupportedSuite.into()),
        }
        // Leave room for the records of one relay batch past the check.
        .saturating_sub(1 << 10);
        let (secrets, keys) = conn.into_kernel()?;
        let session = Box::new(Self {
            tcp,
            tx: Tx {
                sealer: Sealer::new(secrets.tx.0, &secrets.tx.1)?,
                rekey_at,
            },
            rx: Rx {
                opener: Opener::new(secrets.rx.0, &secrets.rx.1)?,
                pending: incoming,
                plaintext: Vec::new(),
                closed: false,
                ended: false,
                server: C::SERVER,
            },
            rekey: Rekey::new(keys),
            established: std::time::Instant::now(),
            tunnel: None,
            withdrawn: None,
        });
        Ok((session, peer_certificates))
    }
}

/// The handshake alone, as the server, over any transport (the fuzz targets drive it in
/// memory): the client's verified chain and the bytes read past the handshake.
pub async fn accept_over<T: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ServerConfig>,
    io: &mut T,
) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), SessionError> {
    let mut conn = UnbufferedServerConnection::new(config)?;
    let rest = drive(&mut conn, io).await?;
    Ok((Handshake::peer_certificates(&conn), rest))
}

/// The handshake alone, as the client of `name`, over any transport: the server's verified
/// chain and the bytes read past the handshake.
pub async fn connect_over<T: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: &mut T,
) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), SessionError> {
    let mut conn = UnbufferedClientConnection::new(config, name)?;
    let rest = drive(&mut conn, io).await?;
    Ok((Handshake::peer_certificates(&conn), rest))
}

/// Runs `conn`'s handshake over `tcp` to its end; returns the bytes read past it.
async fn drive<C: Handshake, T: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut C,
    tcp: &mut T,
) -> Result<Vec<u8>, SessionError> {
    let mut incoming = Vec::with_capacity(4096);
    let mut outgoing = Vec::new();
    let mut encoded = 0;
    // The front of `incoming` that rustls has been given and not discarded yet. rustls
    // keeps a handshake message that spans records there (joined in place, so only rustls
    // can read that part again) and continues from it when given one more record.
    let mut given = 0;
    loop {
        let status = conn.process(&mut incoming[..given]);
        let discard = status.discard;
        let state = match status.state {
            Ok(state) => state,
            Err(e) => {
                send_alert(conn, &mut incoming[..given], tcp).await;
                return Err(e.into());
            }
        };
        let wants_input = match state {
            ConnectionState::EncodeTlsData(mut e) => {
                encode(&mut e, &mut outgoing, &mut encoded)?;
                false
            }
            ConnectionState::TransmitTlsData(t) => {
                tcp.write_all(&outgoing[..encoded]).await?;
                encoded = 0;
                t.done();
                false
            }
            ConnectionState::BlockedHandshake => true,
            // A server may send before the client's Finished arrives; the handshake is
            // over only when rustls says so (below).
            ConnectionState::WriteTraffic(_) => true,
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(SessionError::ClosedInHandshake)
            }
            _ => return Err(SessionError::DataInHandshake),
        };
        incoming.drain(..discard);
        given -= discard;
        if !wants_input {
            continue;
        }
        if !conn.handshaking() {
            // Everything rustls was given belonged to the handshake.
            if given != 0 {
                return Err(SessionError::DataInHandshake);
            }
            break;
        }
        // rustls has done all it can with what it holds: give it exactly one more record,
        // never more, so that it stops at its last handshake record and what follows (the
        // tunnel header, early application bytes) stays here for the record layer. With
        // no whole record here, wait for the peer: every turn of this loop either hands
        // rustls a new record, lets it write, or awaits the socket, so a peer cannot make
        // it spin.
        loop {
            if let Some(len) = record::complete_any(&incoming[given..])? {
                given += len;
                break;
            }
            if incoming.len() >= MAX_HANDSHAKE_BUFFER {
                return Err(SessionError::HandshakeTooLarge);
            }
            // Exactly: doubling would let a handshake hold twice the limit.
            incoming.reserve_exact(4096);
            if tcp.read_buf(&mut incoming).await? == 0 {
                return Err(SessionError::ClosedInHandshake);
            }
        }
    }
    Ok(incoming)
}

impl Session {
    /// Time since the handshake.
    pub fn age(&self) -> std::time::Duration {
        self.established.elapsed()
    }

    /// Counts the session as an open tunnel until it drops, wherever it is then (the pool,
    /// a relay, an error path).
    pub fn track(&mut self, tunnel: crate::metrics::OpenTunnel) {
        self.tunnel = Some(tunnel);
    }

    /// Counts one more connection carried by the session.
    pub fn carry(&self) {
        if let Some(t) = &self.tunnel {
            t.stream();
        }
    }

    /// Ends the session's use when `withdrawn` is cancelled: it takes no more connections,
    /// and the relay carrying one resets it (see [`crate::tunnel::anchors`]).
    pub fn watch(&mut self, withdrawn: tokio_util::sync::CancellationToken) {
        self.withdrawn = Some(withdrawn);
    }

    /// The token set by [`Session::watch`].
    pub fn withdrawn(&self) -> Option<&tokio_util::sync::CancellationToken> {
        self.withdrawn.as_ref()
    }

    /// Whether the session can carry another connection: the peer has not closed it and its
    /// root is still in force.
    pub fn reusable(&self) -> bool {
        !self.rx.closed && !self.withdrawn.as_ref().is_some_and(|w| w.is_cancelled())
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether the peer sent anything on this idle session (its close_notify, an alert, its
    /// FIN) or it broke: such a session takes no more connections. A session at rest has
    /// nothing to read; this asks the kernel, without reading.
    pub fn peer_spoke(&self) -> bool {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        // The socket is non-blocking (tokio's): nothing queued is WouldBlock, not a wait.
        match socket2::SockRef::from(&self.tcp).peek(&mut byte) {
            Ok(_) => true,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }

    /// Drops a session whose peer already ended it (see [`Session::peer_spoke`]) without
    /// writing to it: the peer's socket may be gone, and bytes sent to it would be answered
    /// with a reset. What it sent is read first, since closing with bytes unread resets too.
    pub fn discard(self: Box<Self>) {
        let socket = socket2::SockRef::from(&self.tcp);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        // Bounded: a peer that keeps sending is not waited for.
        for _ in 0..16 {
            match socket.recv(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }

    /// The parts the copy loops (`copy.rs`) drive; each direction is used by one side only.
    pub(super) fn parts(&mut self) -> (&TcpStream, &mut Tx, &mut Rx, &Rekey) {
        (&self.tcp, &mut self.tx, &mut self.rx, &self.rekey)
    }

    /// Application bytes received (by [`Session::receive`]) and not consumed yet.
    pub fn received(&self) -> &[u8] {
        &self.rx.plaintext
    }

    pub fn consume(&mut self, n: usize) {
        self.rx.plaintext.drain(..n.min(self.rx.plaintext.len()));
    }

    /// Sends `bytes` (at most one record's worth) as application data.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        debug_assert!(bytes.len() <= MAX_PLAINTEXT);
        let mut out = Vec::new();
        self.seal_data(bytes, &mut out)?;
        self.tcp.write_all(&out).await?;
        Ok(())
    }

    /// Opens the complete records among the bytes read, without reading: the half of
    /// [`Session::receive`] that callers who poll the socket themselves (`stream_io.rs`) use.
    pub(super) fn open_pending(&mut self) -> Result<Opening, SessionError> {
        let rx = &mut self.rx;
        if rx.ended {
            return Ok(Opening::Ended);
        }
        // Opening works in place, so the pending bytes are taken out while it runs.
        let mut pending = std::mem::take(&mut rx.pending);
        let mut data = Vec::new();
        let opened = rx.open(&self.rekey, &mut pending, &mut data);
        if let Ok(o) = &opened {
            for r in &data {
                rx.plaintext.extend_from_slice(&pending[r.clone()]);
            }
            pending.drain(..o.consumed);
        }
        rx.pending = pending;
        let opened = opened?;
        Ok(if opened.ended {
            rx.ended = true;
            Opening::Ended
        } else if opened.consumed > 0 {
            Opening::Opened
        } else {
            Opening::NeedMore
        })
    }

    /// Reads what the socket has without waiting (`WouldBlock` when nothing).
    pub(super) fn read_pending(&mut self) -> io::Result<usize> {
        self.rx.pending.reserve(16 * 1024);
        self.tcp.try_read_buf(&mut self.rx.pending)
    }

    /// Appends `data` sealed as application data (after a KeyUpdate when one is due).
    pub(super) fn seal_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), SessionError> {
        self.tx.maybe_update_key(&self.rekey, out)?;
        self.tx.seal_to(data, ContentType::ApplicationData, out);
        Ok(())
    }

    /// Appends the end of this direction's stream.
    pub(super) fn seal_end(&mut self, out: &mut Vec<u8>) {
        self.tx.end_of_stream(out);
    }

    /// Reads at least one more record, adding its application bytes to `rx.plaintext`.
    /// Returns false once the peer has ended its stream or closed the session; the bytes
    /// that came before the end are in `rx.plaintext` all the same.
    pub async fn receive(&mut self) -> Result<bool, SessionError> {
        loop {
            match self.open_pending()? {
                Opening::Ended => return Ok(false),
                Opening::Opened => return Ok(true),
                Opening::NeedMore => {}
            }
            self.rx.pending.reserve(4096);
            if self.tcp.read_buf(&mut self.rx.pending).await? == 0 {
                return Err(SessionError::Truncated);
            }
        }
    }

    /// Ends the session on `error`: the fatal alert it calls for, if any (best effort: only
    /// what the socket takes at once), then a TCP reset.
    pub fn abort(mut self: Box<Self>, error: Option<&SessionError>) {
        if let Some(alert) = error.and_then(SessionError::alert) {
            let mut out = Vec::new();
            self.tx
                .seal_to(&[2, u8::from(alert)], ContentType::Alert, &mut out);
            let _ = self.tcp.try_write(&out);
        }
        crate::socket::reset(self);
    }

    /// Sends close_notify, then FIN: the session ends in order.
    pub async fn close(&mut self) -> Result<(), SessionError> {
        let mut out = Vec::new();
        self.tx.close_notify(&mut out);
        self.tcp.write_all(&out).await?;
        self.tcp.shutdown().await?;
        Ok(())
    }

    /// Ends the session in order and waits for the peer to end its side too, discarding what
    /// it sends meanwhile (its close_notify): a socket closed with bytes unread is reset, which
    /// the peer would see as the session cut short.
    pub async fn close_and_drain(&mut self) -> Result<(), SessionError> {
        self.close().await?;
        let mut buf = [0u8; 4096];
        while self.tcp.read(&mut buf).await? > 0 {}
        Ok(())
    }
}

/// Appends the handshake data rustls has ready to `outgoing[..*encoded]`.
fn encode<D>(
    e: &mut rustls::unbuffered::EncodeTlsData<'_, D>,
    outgoing: &mut Vec<u8>,
    encoded: &mut usize,
) -> Result<(), SessionError> {
    loop {
        match e.encode(&mut outgoing[*encoded..]) {
            Ok(n) => {
                *encoded += n;
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                outgoing.resize(*encoded + required_size, 0)
            }
            Err(e) => return Err(SessionError::Encode(e.to_string())),
        }
    }
}

/// Sends the fatal alert rustls queues when it refuses the peer's handshake, so the peer
/// learns why (a bad certificate, an unknown CA) instead of seeing a bare close. Best effort:
/// the alert is one small record, and the caller's timeout bounds the write.
///
/// rustls hands a queued message out before it looks at its input again, so one call
/// yields the alert. It is written here rather than after a second call: that call would
/// parse the input that failed once more (found by the `handshake` fuzz target: rustls then
/// asserts that it never sends two fatal alerts). The connection is abandoned anyway.
async fn send_alert<C: Handshake, T: AsyncWrite + Unpin>(
    conn: &mut C,
    incoming: &mut [u8],
    tcp: &mut T,
) {
    let (mut outgoing, mut encoded) = (Vec::new(), 0);
    if let Ok(ConnectionState::EncodeTlsData(mut e)) = conn.process(incoming).state {
        if encode(&mut e, &mut outgoing, &mut encoded).is_ok() {
            let _ = tcp.write_all(&outgoing[..encoded]).await;
        }
    }
}

/// The parts of rustls's unbuffered client and server connections the handshake uses.
trait Handshake: Send {
    type Data: Send + 'static;
    const SERVER: bool;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    fn peer_certificates(&self) -> Vec<CertificateDer<'static>>;
    fn suite(&self) -> Option<SupportedCipherSuite>;
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Box<dyn NextKeys>), rustls::Error>;
}

macro_rules! handshake_impl {
    ($conn:ty, $data:ty, $server:expr) => {
        impl Handshake for $conn {
            type Data = $data;
            const SERVER: bool = $server;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, $data> {
                self.process_tls_records(incoming)
            }
            fn handshaking(&self) -> bool {
                self.is_handshaking()
            }
            fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
                (**self)
                    .peer_certificates()
                    .map(<[_]>::to_vec)
                    .unwrap_or_default()
            }
            fn suite(&self) -> Option<SupportedCipherSuite> {
                self.negotiated_cipher_suite()
            }
            fn into_kernel(
                self,
            ) -> Result<(rustls::ExtractedSecrets, Box<dyn NextKeys>), rustls::Error> {
                let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
                Ok((secrets, Box::new(kernel)))
            }
        }
    };
}

handshake_impl!(UnbufferedClientConnection, ClientConnectionData, false);
handshake_impl!(UnbufferedServerConnection, ServerConnectionData, true);

impl crate::socket::Resettable for Box<Session> {
    fn tcp(&self) -> &TcpStream {
        Session::tcp(self)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::{
        metrics::Traffic,
        proxy::relay::{relay, Stream},
        tunnel::tls::{
            client_config, server_config,
            tests::{ca, svid, trust, A, B},
        },
    };

    fn configs() -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let ca = ca();
        let t = trust(&ca);
        let client = client_config(svid(&ca, A, -60, 3600), &t, B.parse().unwrap()).unwrap();
        let server = server_config(svid(&ca, B, -60, 3600), &t).unwrap();
        (Arc::new(client), Arc::new(server))
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Runs `test` on a runtime of its own in another thread and fails if it has not finished
    /// within a minute: a handshake driver that spins never yields, so a test of one would
    /// otherwise hang instead of failing.
    fn without_stalling<F>(test: impl FnOnce() -> F + Send + 'static)
    where
        F: std::future::Future<Output = ()>,
    {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(test());
            let _ = done.send(());
        });
        match finished.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the test failed"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("the runtime stalled: a handshake driver stopped yielding")
            }
        }
    }

    /// Awaits `handshake` for a while, checking that other tasks still run meanwhile (the
    /// runtime has one thread), and that the handshake is still waiting for its peer.
    async fn stays_waiting<T>(handshake: &mut tokio::task::JoinHandle<T>) {
        for _ in 0..5 {
            tokio::select! {
                _ = &mut *handshake => panic!("the handshake ended on a partial message"),
                () = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            }
        }
    }

    /// Regression (issue 19): nine bytes, a record that holds the start of a ClientHello
    /// spanning records, made the server's driver hand rustls the same record forever.
    #[test]
    fn a_client_hello_cut_short_does_not_stall_the_server() {
        without_stalling(|| async {
            let (_, server_config) = configs();
            let (mut client_tcp, server_tcp) = pair().await;
            let mut server = tokio::spawn(Session::accept(server_config, server_tcp));
            client_tcp
                .write_all(&[0x16, 3, 1, 0, 4, 1, 0, 1, 0])
                .await
                .unwrap();
            stays_waiting(&mut server).await;
            drop(client_tcp);
            let Err(err) = server.await.unwrap() else {
                panic!("a handshake completed on nine bytes");
            };
            assert!(
                matches!(err, SessionError::ClosedInHandshake),
                "{err}: the peer's close should end the handshake"
            );
        });
    }

    /// Regression (issue 19): the client's driver had the same loop; a ServerHello that
    /// spans records stalled it too.
    #[test]
    fn a_server_hello_cut_short_does_not_stall_the_client() {
        without_stalling(|| async {
            let (client_config, _) = configs();
            let (client_tcp, mut server_tcp) = pair().await;
            let name = ServerName::try_from("tunnel.mycel").unwrap();
            let mut client = tokio::spawn(Session::connect(client_config, name, client_tcp));
            // The ClientHello, then a record with the first four bytes of a ServerHello.
            let mut hello = [0u8; 5];
            server_tcp.read_exact(&mut hello).await.unwrap();
            let mut rest = vec![0u8; usize::from(u16::from_be_bytes([hello[3], hello[4]]))];
            server_tcp.read_exact(&mut rest).await.unwrap();
            server_tcp
                .write_all(&[0x16, 3, 3, 0, 4, 2, 0, 1, 0])
                .await
                .unwrap();
            stays_waiting(&mut client).await;
            drop(server_tcp);
            assert!(client.await.unwrap().is_err(), "a handshake on four bytes");
        });
    }

    /// Regression (issue 19): stock rustls peers that cut every record to 64 bytes (a
    /// handshake message spans many records, both ways) complete their handshake with a
    /// session and exchange data.
    #[test]
    fn handshakes_in_64_byte_records_complete_both_ways() {
        without_stalling(|| async {
            let (client_config, server_config) = configs();
            let name = ServerName::try_from("tunnel.mycel").unwrap();

            // A stock client against the session's server side.
            let mut small = (*client_config).clone();
            small.max_fragment_size = Some(64);
            let (client_tcp, server_tcp) = pair().await;
            let server = tokio::spawn(async move {
                let (mut session, _) = Session::accept(server_config.clone(), server_tcp)
                    .await
                    .unwrap();
                while session.received().len() < 5 {
                    assert!(session.receive().await.unwrap());
                }
                session.send(b"pong!").await.unwrap();
                (session.received().to_vec(), server_config)
            });
            let connector = tokio_rustls::TlsConnector::from(Arc::new(small));
            let mut tls = connector.connect(name.clone(), client_tcp).await.unwrap();
            tls.write_all(b"ping!").await.unwrap();
            let mut back = [0u8; 5];
            tls.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"pong!");
            let (got, server_config) = server.await.unwrap();
            assert_eq!(got, b"ping!");

            // The session's client side against a stock server.
            let mut small = (*server_config).clone();
            small.max_fragment_size = Some(64);
            let (client_tcp, server_tcp) = pair().await;
            let server = tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(small));
                let mut tls = acceptor.accept(server_tcp).await.unwrap();
                let mut buf = [0u8; 5];
                tls.read_exact(&mut buf).await.unwrap();
                tls.write_all(b"pong!").await.unwrap();
                tls.flush().await.unwrap();
                buf
            });
            let (mut session, _) = Session::connect(client_config, name, client_tcp)
                .await
                .unwrap();
            session.send(b"ping!").await.unwrap();
            while session.received().len() < 5 {
                assert!(session.receive().await.unwrap());
            }
            assert_eq!(session.received(), b"pong!");
            assert_eq!(&server.await.unwrap(), b"ping!");
        });
    }

    /// A refused handshake tells the peer why: rustls's fatal alert reaches a stock client.
    #[test]
    fn a_refused_handshake_sends_its_alert() {
        without_stalling(|| async {
            let mesh = ca();
            let server_config = server_config(svid(&mesh, B, -60, 3600), &trust(&mesh)).unwrap();
            // The client trusts the server, but presents a certificate of another CA.
            let other = ca();
            let client = client_config(
                svid(&other, A, -60, 3600),
                &trust(&mesh),
                B.parse().unwrap(),
            )
            .unwrap();
            let (client_tcp, server_tcp) = pair().await;
            let server = tokio::spawn(Session::accept(Arc::new(server_config), server_tcp));
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let name = ServerName::try_from("tunnel.mycel").unwrap();
            // TLS 1.3: the client is done once it has sent its Finished; the server's verdict
            // on its certificate arrives after.
            let mut tls = connector.connect(name, client_tcp).await.unwrap();
            let mut buf = [0u8; 1];
            let err = tls.read(&mut buf).await.unwrap_err();
            assert!(
                err.to_string().contains("received fatal alert"),
                "the client saw {err}, not the server's alert"
            );
            assert!(server.await.unwrap().is_err());
        });
    }

    /// A stock rustls client talks to a session relaying to an echo application: bytes in
    /// many record sizes, a key update the client asks both sides to make, and close_notify
    /// each way.
    #[tokio::test]
    async fn a_relayed_session_interoperates_with_stock_rustls() {
        let (client_config, server_config) = configs();
        let (client_tcp, server_tcp) = pair().await;
        let (app_proxy_side, mut app) = pair().await;
        let echo = tokio::spawn(async move {
            let mut buf = vec![0u8; 70_000];
            loop {
                let n = app.read(&mut buf).await.unwrap();
                if n == 0 {
                    app.shutdown().await.unwrap();
                    return;
                }
                app.write_all(&buf[..n]).await.unwrap();
            }
        });
        let server = tokio::spawn(async move {
            let (mut session, chain) = Session::accept(server_config, server_tcp).await.unwrap();
            assert_eq!(
                crate::tunnel::tls::peer_identity(Some(&chain))
                    .unwrap()
                    .to_string(),
                A
            );
            // The first bytes arrive before the relay starts, as the tunnel header does.
            while session.received().len() < 5 {
                assert!(session.receive().await.unwrap());
            }
            assert_eq!(&session.received()[..5], b"hello");
            session.consume(5);
            relay(
                app_proxy_side,
                Stream::Tunnel(session),
                None,
                &Traffic::default(),
            )
            .await
        });
        let connector = tokio_rustls::TlsConnector::from(client_config);
        let name = ServerName::try_from("tunnel.mycel").unwrap();
        let mut tls = connector.connect(name, client_tcp).await.unwrap();
        tls.write_all(b"hello").await.unwrap();
        let data = pattern(3 << 20);
        let (mut rd, mut wr) = tokio::io::split(tls);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(100_003) {
                wr.write_all(chunk).await.unwrap();
            }
            wr
        });
        let mut back = vec![0u8; data.len()];
        rd.read_exact(&mut back).await.unwrap();
        assert!(back == data, "the echoed bytes differ");
        let wr = writer.await.unwrap();
        let mut tls = rd.unsplit(wr);
        // A KeyUpdate that asks the session to update its sending key too.
        tls.get_mut().1.refresh_traffic_keys().unwrap();
        tls.write_all(b"after the key update").await.unwrap();
        let mut buf = [0u8; 20];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"after the key update");
        tls.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let done = server.await.unwrap().unwrap();
        assert_eq!(
            (done.sent, done.received),
            (data.len() as u64 + 20, data.len() as u64 + 20)
        );
        assert!(done.session.is_none(), "the client closed the session");
        echo.await.unwrap();
    }

    /// A session client against a stock rustls server, and a peer that drops the TCP
    /// connection without close_notify: the relay reports a truncation, not an end of stream.
    #[tokio::test]
    async fn a_session_client_talks_to_stock_rustls_and_refuses_truncation() {
        let (client_config, server_config) = configs();
        let (client_tcp, server_tcp) = pair().await;
        let server = tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
            let mut tls = acceptor.accept(server_tcp).await.unwrap();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(b"pong and more").await.unwrap();
            tls.flush().await.unwrap();
            // Gone without close_notify.
            drop(tls);
        });
        let name = ServerName::try_from("tunnel.mycel").unwrap();
        let (mut session, _) = Session::connect(client_config, name, client_tcp)
            .await
            .unwrap();
        session.send(b"ping").await.unwrap();
        while session.received().len() < 4 {
            assert!(session.receive().await.unwrap());
        }
        assert_eq!(&session.received()[..4], b"pong");
        session.consume(4);
        let (app_proxy_side, mut app) = pair().await;
        let relayed = tokio::spawn(async move {
            let traffic = Traffic::default();
            relay(app_proxy_side, Stream::Tunnel(session), None, &traffic).await
        });
        let mut got = Vec::new();
        let _ = app.read_to_end(&mut got).await;
        assert_eq!(got, b" and more");
        let Err(err) = relayed.await.unwrap() else {
            panic!("a truncated session relayed to its end");
        };
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        server.await.unwrap();
    }

    /// Two connections, one after the other, over one session between two relays: each
    /// direction ends with an end-of-stream record and the session comes back from both.
    #[tokio::test]
    async fn a_session_carries_one_connection_after_another() {
        use mesh_api::v1::{TunnelRequest, TunnelResponse};

        use crate::tunnel::header;

        let (client_config, server_config) = configs();
        let (client_tcp, server_tcp) = pair().await;
        let server = tokio::spawn(async move {
            let (mut session, _) = Session::accept(server_config, server_tcp).await.unwrap();
            for round in 0..2u64 {
                let req: TunnelRequest = header::read(&mut session).await.unwrap();
                assert_eq!(req.connection_id, round);
                header::write(&mut session, &TunnelResponse::default())
                    .await
                    .unwrap();
                let (proxy_side, mut app) = pair().await;
                let echo = tokio::spawn(async move {
                    let mut got = Vec::new();
                    app.read_to_end(&mut got).await.unwrap();
                    app.write_all(&got).await.unwrap();
                });
                let done = relay(
                    proxy_side,
                    Stream::Tunnel(session),
                    None,
                    &Traffic::default(),
                )
                .await
                .unwrap();
                echo.await.unwrap();
                session = done.session.expect("the session comes back");
            }
        });
        let name = ServerName::try_from("tunnel.mycel").unwrap();
        let (mut session, _) = Session::connect(client_config, name, client_tcp)
            .await
            .unwrap();
        for round in 0..2u64 {
            let req = TunnelRequest {
                connection_id: round,
                ..Default::default()
            };
            header::write(&mut session, &req).await.unwrap();
            let _: TunnelResponse = header::read(&mut session).await.unwrap();
            let (proxy_side, mut app) = pair().await;
            let data = pattern(200_000 + round as usize);
            let sent = data.clone();
            let app_side = tokio::spawn(async move {
                app.write_all(&sent).await.unwrap();
                app.shutdown().await.unwrap();
                let mut back = Vec::new();
                app.read_to_end(&mut back).await.unwrap();
                back
            });
            let done = relay(
                proxy_side,
                Stream::Tunnel(session),
                None,
                &Traffic::default(),
            )
            .await
            .unwrap();
            assert!(
                app_side.await.unwrap() == data,
                "round {round}: echo differs"
            );
            assert_eq!(
                (done.sent, done.received),
                (data.len() as u64, data.len() as u64)
            );
            session = done.session.expect("the session comes back");
        }
        server.await.unwrap();
    }

    /// The source's end of the trust watch (the destination's is in proxy/inbound.rs): a
    /// session whose server chains to a root the bundle no longer holds leaves the pool and
    /// resets the connection it carries.
    #[tokio::test]
    async fn a_session_to_a_withdrawn_root_carries_nothing_more() {
        use crate::tunnel::{anchors::Anchors, pool, tls::anchor_id, TlsConfigs};
        let ca = ca();
        let t = trust(&ca);
        let client_config =
            Arc::new(client_config(svid(&ca, A, -60, 3600), &t, B.parse().unwrap()).unwrap());
        let server_config = Arc::new(server_config(svid(&ca, B, -60, 3600), &t).unwrap());
        let tls = TlsConfigs::new(t, Arc::new(crate::identity::SvidStore::default()));
        let anchors = Anchors::default();
        anchors.keep_only([anchor_id(&ca.root)].into());
        let connect = || async {
            let (client_tcp, server_tcp) = pair().await;
            let name = ServerName::try_from("tunnel.mycel").unwrap();
            let (client, server) = tokio::join!(
                Session::connect(client_config.clone(), name, client_tcp),
                Session::accept(server_config.clone(), server_tcp)
            );
            let (mut session, chain) = client.unwrap();
            session.watch(anchors.watch_chain(&chain, &tls));
            (session, server.unwrap().0)
        };
        let key = pool::Key {
            source: crate::workloads::WorkloadId::new("default", "a"),
            source_serial: "1".into(),
            destination: "127.0.0.1:15008".parse().unwrap(),
            identity: B.parse().unwrap(),
            trust: tls.trust_fingerprint(),
        };
        let pool = pool::Pool::default();

        let (idle, _idle_server) = connect().await;
        assert!(idle.reusable());
        pool.put(key.clone(), idle);
        let (busy, mut server) = connect().await;
        let withdrawn = busy.withdrawn().cloned().expect("watched");
        let (proxy_side, mut app) = pair().await;
        let relayed = tokio::spawn(async move {
            relay(
                proxy_side,
                Stream::Tunnel(busy),
                Some(&withdrawn),
                &Traffic::default(),
            )
            .await
        });
        app.write_all(b"before").await.unwrap();
        while server.received().len() < 6 {
            assert!(server.receive().await.unwrap());
        }

        anchors.keep_only(std::collections::HashSet::new());
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), relayed).await;
        assert!(
            ended
                .expect("the relay outlived its root")
                .unwrap()
                .is_err(),
            "a relay whose root was withdrawn ends as a failure"
        );
        assert!(pool.take(&key).is_none(), "a pooled session was reused");
        let (late, _late_server) = connect().await;
        assert!(
            !late.reusable(),
            "a handshake that completes after the withdrawal"
        );
    }

    /// A connected client and server session.
    pub(in crate::tunnel) async fn sessions() -> (Box<Session>, Box<Session>) {
        let (client_config, server_config) = configs();
        let (client_tcp, server_tcp) = pair().await;
        let name = ServerName::try_from("tunnel.mycel").unwrap();
        let (client, server) = tokio::join!(
            Session::connect(client_config, name, client_tcp),
            Session::accept(server_config, server_tcp)
        );
        (client.unwrap().0, server.unwrap().0)
    }

    /// An idle session the peer ended (close_notify, FIN) says so without a read, and is
    /// dropped without a reset: what the peer sent is consumed first.
    #[tokio::test]
    async fn an_idle_session_the_peer_ended_is_seen_and_dropped_quietly() {
        let (client, mut server) = sessions().await;
        assert!(
            !client.peer_spoke(),
            "a session at rest has nothing to read"
        );
        let server_port = server.tcp.local_addr().unwrap();
        server.close().await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !client.peer_spoke() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "close_notify never seen"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        client.discard();
        // The server sees an orderly end: EOF, not a reset.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), server.tcp.read(&mut buf))
            .await
            .expect("the client's end")
            .unwrap_or_else(|e| panic!("{server_port}: {e}"));
        assert_eq!(n, 0);
    }

    /// Seals `payload` as one record of type `ty` from `from` and sends it raw.
    async fn send_record(from: &mut Session, ty: ContentType, payload: &[u8]) {
        let mut out = Vec::new();
        from.tx.seal_to(payload, ty, &mut out);
        from.tcp.write_all(&out).await.unwrap();
    }

    /// Regression (issue 19): what rustls refuses and the record layer let through. Each
    /// case ends the receiving session with the error, and the peer gets the alert.
    #[tokio::test]
    async fn post_handshake_messages_are_held_to_the_protocol() {
        const NST: &[u8] = &[NEW_SESSION_TICKET, 0, 0, 0];
        let key_update = [KEY_UPDATE, 0, 0, 1, 0];
        let cases: [(&str, ContentType, Vec<u8>); 5] = [
            (
                "a KeyUpdate that is not last in its record",
                ContentType::Handshake,
                [&key_update[..], NST].concat(),
            ),
            (
                "two KeyUpdates in one record",
                ContentType::Handshake,
                [key_update, key_update].concat(),
            ),
            (
                "an empty handshake record",
                ContentType::Handshake,
                Vec::new(),
            ),
            ("an empty alert record", ContentType::Alert, Vec::new()),
            (
                "a session ticket from the client",
                ContentType::Handshake,
                NST.to_vec(),
            ),
        ];
        for (what, ty, payload) in cases {
            let (mut client, mut server) = sessions().await;
            send_record(&mut client, ty, &payload).await;
            let err = server.receive().await.expect_err(what);
            let alert = err
                .alert()
                .unwrap_or_else(|| panic!("{what}: {err} has no alert"));
            assert_eq!(
                alert,
                rustls::AlertDescription::UnexpectedMessage,
                "{what}: {err}"
            );
            server.abort(Some(&err));
            let seen = client.receive().await.expect_err("the peer's alert");
            assert!(
                matches!(&seen, SessionError::Alert(a) if a == "UnexpectedMessage"),
                "{what}: the peer saw {seen}"
            );
        }
        // A server's session ticket is ignored, and a KeyUpdate alone in its record followed.
        let (mut client, mut server) = sessions().await;
        send_record(&mut server, ContentType::Handshake, NST).await;
        send_record(&mut server, ContentType::Handshake, &key_update).await;
        server.tx.sealer = {
            let (seq, secrets) = server.rekey.next(true).unwrap();
            Sealer::new(seq, &secrets).unwrap()
        };
        server.send(b"after").await.unwrap();
        while client.received().len() < 5 {
            assert!(client.receive().await.unwrap());
        }
        assert_eq!(client.received(), b"after");
    }

    /// Regression (issue 19): a record that fails authentication is an error that says so
    /// (the caller logs it as tampering), and the peer gets bad_record_mac.
    #[tokio::test]
    async fn a_forged_record_is_tampering_and_answered_with_an_alert() {
        let (mut client, server) = sessions().await;
        let mut out = Vec::new();
        client
            .tx
            .seal_to(b"hello", ContentType::ApplicationData, &mut out);
        let last = out.len() - 1;
        out[last] ^= 0x40;
        client.tcp.write_all(&out).await.unwrap();
        let mut server = server;
        let err = server.receive().await.expect_err("a forged record");
        assert!(err.is_tampering(), "{err}");
        server.abort(Some(&err));
        let seen = client.receive().await.expect_err("the alert");
        assert!(
            matches!(&seen, SessionError::Alert(a) if a == "BadRecordMac"),
            "{seen}"
        );
    }

    /// Regression (issue 19): a server that answers and closes at once (a greeting, an error
    /// page) has its answer header, its bytes and its end of stream arrive in one read. The
    /// header reader took that for a close and the client got a reset instead of the bytes;
    /// now the client gets every byte and the session carries the next connection.
    #[tokio::test]
    async fn an_answer_with_its_data_and_end_in_one_read_is_delivered() {
        use mesh_api::v1::{TunnelRequest, TunnelResponse};
        use prost::Message as _;

        use crate::tunnel::header;

        let (client_config, server_config) = configs();
        let (client_tcp, server_tcp) = pair().await;
        let greeting = b"220 mail.example ESMTP ready\r\n";
        let server = tokio::spawn(async move {
            let (mut session, _) = Session::accept(server_config, server_tcp).await.unwrap();
            for _ in 0..2 {
                let _: TunnelRequest = header::read(&mut session).await.unwrap();
                // Answer, greeting and end of stream as one write.
                let mut out = Vec::new();
                let answer = TunnelResponse::default().encode_length_delimited_to_vec();
                session
                    .tx
                    .seal_to(&answer, ContentType::ApplicationData, &mut out);
                session
                    .tx
                    .seal_to(greeting, ContentType::ApplicationData, &mut out);
                session.tx.end_of_stream(&mut out);
                session.tcp.write_all(&out).await.unwrap();
                // The client's end of its direction.
                assert!(!session.receive().await.unwrap());
                assert!(session.received().is_empty());
                session.rx.ended = false;
            }
        });
        let name = ServerName::try_from("tunnel.mycel").unwrap();
        let (mut session, _) = Session::connect(client_config, name, client_tcp)
            .await
            .unwrap();
        for round in 0..2 {
            header::write(&mut session, &TunnelRequest::default())
                .await
                .unwrap();
            // Let the whole answer arrive before reading any of it.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let _: TunnelResponse = header::read(&mut session)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let (proxy_side, mut app) = pair().await;
            let app_side = tokio::spawn(async move {
                let mut got = Vec::new();
                app.read_to_end(&mut got).await.unwrap();
                app.shutdown().await.unwrap();
                got
            });
            let done = relay(
                proxy_side,
                Stream::Tunnel(session),
                None,
                &Traffic::default(),
            )
            .await
            .unwrap();
            assert_eq!(app_side.await.unwrap(), greeting, "round {round}");
            session = done.session.expect("the session comes back");
        }
        server.await.unwrap();
    }
}
