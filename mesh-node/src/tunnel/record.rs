//! TLS 1.3 record protection (RFC 8446 §5.2) for established tunnels.
//!
//! rustls does the handshake; once it is done, the node seals and opens records itself with
//! the traffic secrets rustls hands over (`rustls::kernel`). That lets the relay read straight
//! into record slots and decrypt in place, with no copy in or out of a TLS library's buffers
//! and as many records per system call as the socket has. Key updates are still computed by
//! rustls (see `session.rs`).

use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

/// Record header: type, legacy version, length.
pub const HEADER: usize = 5;
/// The AEAD tag of every suite TLS 1.3 defines here.
pub const TAG: usize = 16;
/// The most plaintext one record may carry.
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// One full record as this side writes it: header, plaintext, inner content type, tag.
pub const FULL_RECORD: usize = HEADER + MAX_PLAINTEXT + 1 + TAG;
/// The most ciphertext a peer may put in one record (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Every protected record carries this outer type.
const APPLICATION_DATA: u8 = 23;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentType {
    Alert = 21,
    Handshake = 22,
    ApplicationData = 23,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the negotiated cipher suite has no record layer here")]
    UnsupportedSuite,
    #[error("a TLS record of type {0} arrived where only protected records may")]
    UnexpectedOuterType(u8),
    #[error("a TLS record of {0} bytes is over the protocol's limit")]
    TooLong(usize),
    #[error("a TLS record failed authentication (corrupted or forged)")]
    Decrypt,
    #[error("a TLS record carries no content type")]
    NoContentType,
    #[error("a TLS record carries unknown content type {0}")]
    UnknownContentType(u8),
    #[error("a TLS record's inner plaintext is {0} bytes, over the protocol's limit")]
    PlaintextTooLong(usize),
}

impl RecordError {
    /// The fatal alert that tells the peer why (RFC 8446 §6.2).
    pub fn alert(&self) -> rustls::AlertDescription {
        use rustls::AlertDescription as A;
        match self {
            RecordError::Decrypt => A::BadRecordMac,
            RecordError::TooLong(_) | RecordError::PlaintextTooLong(_) => A::RecordOverflow,
            RecordError::UnexpectedOuterType(_)
            | RecordError::NoContentType
            | RecordError::UnknownContentType(_) => A::UnexpectedMessage,
            RecordError::UnsupportedSuite => A::InternalError,
        }
    }
}

/// An AEAD key with its per-record nonce base.
struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
}

impl Keys {
    fn new(secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::UnsupportedSuite)?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
        })
    }

    /// The IV with the sequence number XORed into its low 8 bytes (RFC 8446 §5.3).
    fn nonce(&self, seq: u64) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Nonce::assume_unique_for_key(nonce)
    }
}

fn header(len: usize) -> [u8; HEADER] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, hi, lo]
}

/// The length of the complete record of any type at the start of `buf`, if it is all there.
/// A length over the protocol's limit is an error as soon as the header is in, so a peer
/// cannot make this side buffer it first.
pub fn complete_any(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let [_, _, _, hi, lo, ..] = *buf else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_CIPHERTEXT {
        return Err(RecordError::TooLong(len));
    }
    Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
}

/// Protects records this side sends.
pub struct Sealer {
    keys: Keys,
    seq: u64,
}

impl Sealer {
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        Ok(Self {
            keys: Keys::new(secrets)?,
            seq,
        })
    }

    /// Records sealed under the current key.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Seals one record in place. `record` holds [`HEADER`] bytes of room, then `len` bytes of
    /// plaintext (at most [`MAX_PLAINTEXT`]), then room for the content type and the tag.
    /// Returns the record's length on the wire.
    pub fn seal(&mut self, record: &mut [u8], len: usize, ty: ContentType) -> usize {
        debug_assert!(len <= MAX_PLAINTEXT && record.len() >= HEADER + len + 1 + TAG);
        let inner = len + 1;
        let hdr = header(inner + TAG);
        let (head, body) = record.split_at_mut(HEADER);
        head.copy_from_slice(&hdr);
        body[len] = ty as u8;
        let nonce = self.keys.nonce(self.seq);
        // Sealing fails only for inputs over ring's per-call limit (gigabytes), which a record
        // cannot reach.
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(hdr), &mut body[..inner])
            .expect("a TLS record is within the AEAD's input limit");
        body[inner..inner + TAG].copy_from_slice(tag.as_ref());
        self.seq += 1;
        HEADER + inner + TAG
    }

    /// Seals `payload` (at most [`MAX_PLAINTEXT`]) as one record appended to `out`.
    pub fn seal_to(&mut self, payload: &[u8], ty: ContentType, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + HEADER + payload.len() + 1 + TAG, 0);
        out[start + HEADER..start + HEADER + payload.len()].copy_from_slice(payload);
        self.seal(&mut out[start..], payload.len(), ty);
    }
}

/// Opens records the peer sent.
pub struct Opener {
    keys: Keys,
    seq: u64,
}

impl Opener {
    pub fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        Ok(Self {
            keys: Keys::new(secrets)?,
            seq,
        })
    }

    /// The length of the complete record at the start of `buf`, or `None` if more bytes are
    /// needed to hold it.
    pub fn complete(buf: &[u8]) -> Result<Option<usize>, RecordError> {
        let [ty, _, _, hi, lo, ..] = *buf else {
            return Ok(None);
        };
        if ty != APPLICATION_DATA {
            return Err(RecordError::UnexpectedOuterType(ty));
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len > MAX_CIPHERTEXT {
            return Err(RecordError::TooLong(len));
        }
        Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
    }

    /// Decrypts one complete record in place. Returns its content type and where its
    /// plaintext now lies within `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(ContentType, Range<usize>), RecordError> {
        let (head, body) = record.split_at_mut(HEADER);
        let hdr: [u8; HEADER] = head.try_into().map_err(|_| RecordError::Decrypt)?;
        let nonce = self.keys.nonce(self.seq);
        let plain = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(hdr), body)
            .map_err(|_| RecordError::Decrypt)?;
        self.seq += 1;
        // Content, its type and padding: at most 2^14 + 1 bytes (RFC 8446 §5.4).
        if plain.len() > MAX_PLAINTEXT + 1 {
            return Err(RecordError::PlaintextTooLong(plain.len()));
        }
        // The inner type is the last non-zero byte; zeros after it are padding.
        let end = plain
            .iter()
            .rposition(|b| *b != 0)
            .ok_or(RecordError::NoContentType)?;
        let ty = match plain[end] {
            21 => ContentType::Alert,
            22 => ContentType::Handshake,
            23 => ContentType::ApplicationData,
            other => return Err(RecordError::UnknownContentType(other)),
        };
        Ok((ty, HEADER..HEADER + end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from([9u8; 32]),
            iv: rustls::crypto::cipher::Iv::new([3u8; 12]),
        }
    }

    #[test]
    fn sealed_records_open_in_order_and_not_out_of_it() {
        let mut sealer = Sealer::new(0, &secrets()).unwrap();
        let mut wire = Vec::new();
        sealer.seal_to(b"first", ContentType::ApplicationData, &mut wire);
        let first = wire.len();
        sealer.seal_to(&[1, 0], ContentType::Alert, &mut wire);
        assert_eq!(Opener::complete(&wire[..first - 1]).unwrap(), None);
        assert_eq!(Opener::complete(&wire).unwrap(), Some(first));

        let mut opener = Opener::new(0, &secrets()).unwrap();
        let (a, b) = wire.split_at_mut(first);
        let (ty, range) = opener.open(a).unwrap();
        assert_eq!(
            (ty, &a[range]),
            (ContentType::ApplicationData, &b"first"[..])
        );
        let (ty, range) = opener.open(b).unwrap();
        assert_eq!((ty, &b[range]), (ContentType::Alert, &[1u8, 0][..]));

        // The same record again: the sequence number moved on, so it no longer authenticates.
        let mut replay = Vec::new();
        Sealer::new(0, &secrets()).unwrap().seal_to(
            b"first",
            ContentType::ApplicationData,
            &mut replay,
        );
        assert!(matches!(
            opener.open(&mut replay),
            Err(RecordError::Decrypt)
        ));
    }

    #[test]
    fn malformed_records_are_refused() {
        assert!(matches!(
            Opener::complete(&[22, 3, 3, 0, 10]),
            Err(RecordError::UnexpectedOuterType(22))
        ));
        assert!(matches!(
            Opener::complete(&[23, 3, 3, 0xff, 0xff]),
            Err(RecordError::TooLong(65535))
        ));
        let mut wire = Vec::new();
        Sealer::new(0, &secrets())
            .unwrap()
            .seal_to(b"x", ContentType::ApplicationData, &mut wire);
        wire[7] ^= 1;
        assert!(matches!(
            Opener::new(0, &secrets()).unwrap().open(&mut wire),
            Err(RecordError::Decrypt)
        ));
    }

    /// Regression (issue 19): a record may carry 255 bytes of expansion in its ciphertext, but
    /// its inner plaintext (content, type, padding) at most 2^14 + 1 bytes; a peer's padding
    /// took the opener past that.
    #[test]
    fn inner_plaintext_over_the_limit_is_refused() {
        for (padding, ok) in [(0, true), (1, false), (200, false)] {
            let mut sealer = Sealer::new(0, &secrets()).unwrap();
            // A full record, then `padding` zeros after its content type.
            let len = MAX_PLAINTEXT + 1 + padding;
            let mut record = vec![0u8; HEADER + len + TAG];
            record[HEADER + MAX_PLAINTEXT] = ContentType::ApplicationData as u8;
            let hdr = header(len + TAG);
            record[..HEADER].copy_from_slice(&hdr);
            let nonce = sealer.keys.nonce(0);
            let tag = sealer
                .keys
                .key
                .seal_in_place_separate_tag(
                    nonce,
                    Aad::from(hdr),
                    &mut record[HEADER..HEADER + len],
                )
                .unwrap();
            record[HEADER + len..].copy_from_slice(tag.as_ref());
            sealer.seq += 1;
            assert_eq!(Opener::complete(&record).unwrap(), Some(record.len()));
            let opened = Opener::new(0, &secrets()).unwrap().open(&mut record);
            match opened {
                Ok((ty, range)) => {
                    assert!(ok, "padding {padding}: accepted");
                    assert_eq!(
                        (ty, range.len()),
                        (ContentType::ApplicationData, MAX_PLAINTEXT)
                    );
                }
                Err(e) => {
                    assert!(!ok, "padding {padding}: {e}");
                    assert!(matches!(e, RecordError::PlaintextTooLong(_)), "{e}");
                    assert_eq!(e.alert(), rustls::AlertDescription::RecordOverflow);
                }
            }
        }
    }
}
