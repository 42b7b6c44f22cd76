//! The tunnel's framing: one length-delimited protobuf message each way after the handshake
//! (`TunnelRequest` from the client, `TunnelResponse` from the server), then raw bytes.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Far more than a header needs (about 60 bytes); a peer sending more is broken or hostile.
pub const MAX_HEADER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("connection closed before the header")]
    Closed,
    #[error("header length {0} is over the {MAX_HEADER}-byte limit")]
    TooLong(u64),
    #[error("malformed header length")]
    BadLength,
    #[error("undecodable header: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub async fn write<M: Message, W: AsyncWrite + Unpin>(w: &mut W, msg: &M) -> std::io::Result<()> {
    w.write_all(&msg.encode_length_delimited_to_vec()).await?;
    w.flush().await
}

/// Reads exactly one message and nothing after it, so the bytes that follow stay in the stream.
pub async fn read<M: Message + Default, R: AsyncRead + Unpin>(r: &mut R) -> Result<M, HeaderError> {
    let len = read_varint(r).await?;
    if len > MAX_HEADER as u64 {
        return Err(HeaderError::TooLong(len));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => HeaderError::Closed,
        _ => HeaderError::Io(e),
    })?;
    Ok(M::decode(buf.as_slice())?)
}

async fn read_varint<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64, HeaderError> {
    let mut value = 0u64;
    // The limit is 1 KiB, so two varint bytes are enough; a third is already out of range.
    for i in 0..3 {
        let byte = match r.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(HeaderError::Closed)
            }
            Err(e) => return Err(e.into()),
        };
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(HeaderError::BadLength)
}

#[cfg(test)]
mod tests {
    use mesh_api::v1::{tunnel_response::Status, TunnelRequest, TunnelResponse};

    use super::*;

    #[tokio::test]
    async fn round_trip_leaves_the_payload_in_the_stream() {
        let req = TunnelRequest {
            destination_address: vec![10, 0, 0, 1],
            destination_port: 8080,
            source_address: vec![10, 0, 0, 2],
            source_port: 40000,
            connection_id: 7,
        };
        let mut wire = Vec::new();
        write(&mut wire, &req).await.unwrap();
        wire.extend_from_slice(b"payload");
        let mut r = wire.as_slice();
        let got: TunnelRequest = read(&mut r).await.unwrap();
        assert_eq!(got, req);
        assert_eq!(r, b"payload");
    }

    #[tokio::test]
    async fn rejects_truncated_oversized_and_garbage_headers() {
        let resp = TunnelResponse {
            status: Status::Ok as i32,
            reason: String::new(),
        };
        let wire = resp.encode_length_delimited_to_vec();
        let mut short = &wire[..wire.len() - 1];
        assert!(matches!(
            read::<TunnelResponse, _>(&mut short).await,
            Err(HeaderError::Closed)
        ));
        let mut empty: &[u8] = &[];
        assert!(matches!(
            read::<TunnelResponse, _>(&mut empty).await,
            Err(HeaderError::Closed)
        ));
        let mut huge: &[u8] = &[0xff, 0xff, 0x7f];
        assert!(matches!(
            read::<TunnelResponse, _>(&mut huge).await,
            Err(HeaderError::TooLong(_) | HeaderError::BadLength)
        ));
        let mut long: &[u8] = &[0x80, 0x10];
        assert!(matches!(
            read::<TunnelResponse, _>(&mut long).await,
            Err(HeaderError::TooLong(2048))
        ));
        let mut garbage: &[u8] = &[3, 0xff, 0xff, 0xff];
        assert!(matches!(
            read::<TunnelRequest, _>(&mut garbage).await,
            Err(HeaderError::Decode(_))
        ));
    }
}
