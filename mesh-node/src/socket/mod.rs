//! What every copy between sockets uses, on the proxy's side and the tunnel's: writes that
//! wait for room without holding a buffer hostage, half-close, reset, and the shared buffer
//! pool (`pool.rs`).

pub mod pool;

use std::{
    io::{self, IoSlice},
    net::Shutdown,
    time::Duration,
};

use tokio::net::TcpStream;

/// Makes `path` ready for a Unix listener to bind: its directory made, and the socket file a
/// previous daemon left there (nobody answers on it) removed.
pub fn clear_unix_path(path: &std::path::Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
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

/// Closes with RST instead of FIN, so the peer sees a failure and not an end of stream.
pub fn reset(stream: impl Resettable) {
    let _ = socket2::SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
    drop(stream);
}

pub fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(s).shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

pub async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match dst.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes every slice; returns how many bytes that was.
pub async fn write_all_vectored(
    dst: &TcpStream,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<usize> {
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
