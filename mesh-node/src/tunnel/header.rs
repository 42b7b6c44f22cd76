//! The tunnel's framing: one length-delimited protobuf message each way after the handshake
//! (`TunnelRequest` from the client, `TunnelResponse` from the server), then raw bytes. The
//! same on a TLS session and on a QUIC stream.

use prost::Message;

use super::session::{Session, SessionError};

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
    Session(#[from] SessionError),
    #[error("{0}")]
    Stream(#[from] quinn::ReadError),
    #[error("{0}")]
    StreamWrite(#[from] quinn::WriteError),
}

/// The TLS session's error behind `e`, if that is what it is.
pub fn session_error(e: &HeaderError) -> Option<&SessionError> {
    match e {
        HeaderError::Session(s) => Some(s),
        _ => None,
    }
}

/// Sends one message as one record.
pub async fn write<M: Message>(session: &mut Session, msg: &M) -> Result<(), SessionError> {
    session.send(&msg.encode_length_delimited_to_vec()).await
}

/// Reads exactly one message; application bytes that came after it, and the end of the
/// peer's stream if it came too, stay in the session for the relay.
pub async fn read<M: Message + Default>(session: &mut Session) -> Result<M, HeaderError> {
    loop {
        if let Some((msg, used)) = decode(session.received())? {
            session.consume(used);
            return Ok(msg);
        }
        if !session.receive().await? {
            // The header may have come in the same read as the end of stream.
            let (msg, used) = decode(session.received())?.ok_or(HeaderError::Closed)?;
            session.consume(used);
            return Ok(msg);
        }
    }
}

/// Sends one message on a QUIC stream.
pub async fn write_stream<M: Message>(
    send: &mut quinn::SendStream,
    msg: &M,
) -> Result<(), quinn::WriteError> {
    send.write_all(&msg.encode_length_delimited_to_vec()).await
}

/// Reads exactly one message from a QUIC stream; returns it with the application bytes that
/// came after it.
pub async fn read_stream<M: Message + Default>(
    recv: &mut quinn::RecvStream,
) -> Result<(M, Vec<u8>), HeaderError> {
    let mut buf = Vec::new();
    loop {
        if let Some((msg, used)) = decode(&buf)? {
            return Ok((msg, buf.split_off(used)));
        }
        match recv.read_chunk(MAX_HEADER, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => return Err(HeaderError::Closed),
        }
    }
}

/// The message at the start of `buf` and the bytes it took, or `None` if it is not all there.
pub fn decode<M: Message + Default>(buf: &[u8]) -> Result<Option<(M, usize)>, HeaderError> {
    let mut len = 0u64;
    // The limit is 1 KiB, so two varint bytes are enough; a third is already out of range.
    for i in 0..3 {
        let Some(byte) = buf.get(i) else {
            return Ok(None);
        };
        len |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if len > MAX_HEADER as u64 {
                return Err(HeaderError::TooLong(len));
            }
            let start = i + 1;
            let end = start + len as usize;
            return match buf.get(start..end) {
                Some(body) => Ok(Some((M::decode(body)?, end))),
                None => Ok(None),
            };
        }
    }
    Err(HeaderError::BadLength)
}

#[cfg(test)]
mod tests {
    use mesh_api::v1::{tunnel_response::Status, TunnelRequest, TunnelResponse};

    use super::*;

    #[test]
    fn decodes_one_message_and_leaves_what_follows() {
        let req = TunnelRequest {
            destination_address: vec![10, 0, 0, 1],
            destination_port: 8080,
            source_address: vec![10, 0, 0, 2],
            source_port: 40000,
            connection_id: 7,
        };
        let mut wire = req.encode_length_delimited_to_vec();
        let len = wire.len();
        wire.extend_from_slice(b"payload");
        let (got, used) = decode::<TunnelRequest>(&wire).unwrap().unwrap();
        assert_eq!((got, used), (req, len));
        assert!(decode::<TunnelRequest>(&wire[..len - 1]).unwrap().is_none());
        assert!(decode::<TunnelRequest>(&[]).unwrap().is_none());
    }

    #[test]
    fn rejects_oversized_and_garbage_headers() {
        let resp = TunnelResponse {
            status: Status::Ok as i32,
            reason: String::new(),
        };
        assert!(
            decode::<TunnelResponse>(&resp.encode_length_delimited_to_vec())
                .unwrap()
                .is_some()
        );
        assert!(matches!(
            decode::<TunnelResponse>(&[0xff, 0xff, 0x7f]),
            Err(HeaderError::TooLong(_) | HeaderError::BadLength)
        ));
        assert!(matches!(
            decode::<TunnelResponse>(&[0x80, 0x10]),
            Err(HeaderError::TooLong(2048))
        ));
        assert!(matches!(
            decode::<TunnelRequest>(&[3, 0xff, 0xff, 0xff]),
            Err(HeaderError::Decode(_))
        ));
    }
}
