//! The tunnel's record layer on the receiving side (`Rx::open`, what the relay and the
//! header reader run on every byte from the peer): a stream of records sealed with a known
//! key (application data, key updates, session tickets, end of stream, close_notify, and
//! records the peer should not send), cut at fuzzed points and opened as the pieces arrive.
//! What was sent as application data comes out, in order and whole, unless the stream held
//! something the peer must not send, which ends it with an error; nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_fuzz::Input;
use mesh_node::tunnel::{
    record::{ContentType, Opener, Sealer, MAX_PLAINTEXT},
    session::{NextKeys, Rekey, Rx},
};
use rustls::{
    crypto::cipher::{AeadKey, Iv},
    ConnectionTrafficSecrets,
};

fn secrets(key: [u8; 32]) -> ConnectionTrafficSecrets {
    ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from(key),
        iv: Iv::new([7; 12]),
    }
}

/// The next key is a hash of the last: a stand-in for TLS 1.3's key schedule, shared by the
/// sealing side of this harness and the receiver under test.
fn next(key: [u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &key).as_ref());
    out
}

struct Ratchet([u8; 32]);

impl NextKeys for Ratchet {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        Err(rustls::Error::General("the receiver does not send".into()))
    }
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.0 = next(self.0);
        Ok((0, secrets(self.0)))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let server = input.byte() & 1 == 1;
    let mut key = [3u8; 32];
    let mut sealer = Sealer::new(0, &secrets(key)).expect("a sealer");
    let mut wire = Vec::new();
    let mut sent = Vec::new();
    // Whether the stream holds something the receiver must refuse, or ends.
    let (mut bad, mut end) = (false, false);
    for _ in 0..32 {
        if input.0.is_empty() || end {
            break;
        }
        match input.byte() % 10 {
            0..=3 => {
                let len = usize::from(input.u16()) % (MAX_PLAINTEXT + 1);
                let fill = input.byte();
                let payload: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                sealer.seal_to(&payload, ContentType::ApplicationData, &mut wire);
                sent.extend_from_slice(&payload);
                // An empty application-data record is the end of stream.
                end = len == 0;
            }
            4 => {
                sealer.seal_to(
                    &[24, 0, 0, 1, input.byte() & 1],
                    ContentType::Handshake,
                    &mut wire,
                );
                key = next(key);
                sealer = Sealer::new(0, &secrets(key)).expect("a sealer");
            }
            5 => {
                // A session ticket: ignored from a server, refused from a client.
                sealer.seal_to(&[4, 0, 0, 2, 9, 9], ContentType::Handshake, &mut wire);
                bad |= server;
            }
            6 => {
                sealer.seal_to(&[1, 0], ContentType::Alert, &mut wire);
                end = true;
            }
            7 => {
                // A record of any type and content, as a peer might make it.
                let ty = match input.byte() % 3 {
                    0 => ContentType::Alert,
                    1 => ContentType::Handshake,
                    _ => ContentType::ApplicationData,
                };
                let len = usize::from(input.byte());
                let body = input.bytes(len).to_vec();
                let harmless = ty == ContentType::ApplicationData;
                sealer.seal_to(&body, ty, &mut wire);
                if harmless {
                    sent.extend_from_slice(&body);
                    end = body.is_empty();
                } else {
                    // Whatever the receiver makes of it, nothing is checked after it.
                    bad = true;
                }
            }
            8 => {
                // Bytes that are not a sealed record.
                let len = usize::from(input.byte());
                wire.extend_from_slice(input.bytes(len));
                bad = true;
            }
            _ => {
                // One bit flipped in what is already on the wire.
                if !wire.is_empty() {
                    let at = usize::from(input.u16()) % wire.len();
                    wire[at] ^= 1 << (input.byte() % 8);
                    bad = true;
                }
            }
        }
    }
    let opener = Opener::new(0, &secrets([3u8; 32])).expect("an opener");
    let mut rx = Rx::new(opener, server);
    let rekey = Rekey::new(Box::new(Ratchet([3u8; 32])));
    let mut pending: Vec<u8> = Vec::new();
    let mut received: Vec<u8> = Vec::new();
    let mut rest = &wire[..];
    let mut ended = false;
    while !rest.is_empty() && !ended {
        let cut = (usize::from(input.u16()) % 20_000).max(1).min(rest.len());
        pending.extend_from_slice(&rest[..cut]);
        rest = &rest[cut..];
        let mut data = Vec::new();
        match rx.open(&rekey, &mut pending, &mut data) {
            Ok(opened) => {
                for r in &data {
                    received.extend_from_slice(&pending[r.clone()]);
                }
                pending.drain(..opened.consumed);
                ended = opened.ended;
            }
            Err(e) => {
                assert!(bad, "a stream without faults was refused: {e}");
                return;
            }
        }
    }
    if !bad {
        assert!(
            received == sent,
            "sent {} bytes, received {}",
            sent.len(),
            received.len()
        );
    }
});
