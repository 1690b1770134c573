//! Scripted server → client byte streams for the byte-for-byte GOAWAY tests:
//! what a raw HTTP/2 writer sends, where a GOAWAY may legally appear in it,
//! and the check of what a client received against both.

use anyhow::{bail, Result};
use clap::ValueEnum;
use grpclb_common::frame::GOAWAY;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const GOAWAY_TYPE: u8 = 7;
const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 0x4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Script {
    /// SETTINGS, then DATA frames of `frame_bytes` on stream 1.
    Data,
    /// SETTINGS, then per response a HEADERS + 3 CONTINUATION header block
    /// (about 1 KB each) and a DATA frame of `frame_bytes`.
    Continuation,
    /// SETTINGS and the server's own GOAWAY in one write, then DATA frames:
    /// nothing may be injected after the server's GOAWAY.
    ServerGoaway,
    /// A TLS handshake record, then opaque bytes: not HTTP/2, never injected.
    Tls,
}

/// One unit the writer sends; `boundary_after` says whether a GOAWAY may
/// follow it.
pub struct Piece {
    pub bytes: Vec<u8>,
    pub boundary_after: bool,
}

/// The pieces of a script, in order.
pub fn pieces(script: Script, frames: u32, frame_bytes: u32) -> Vec<Piece> {
    let piece = |bytes, boundary_after| Piece {
        bytes,
        boundary_after,
    };
    let mut out = Vec::new();
    match script {
        Script::Tls => {
            // A ClientHello-sized handshake record header, then its body.
            let mut record = vec![0x16, 0x03, 0x01, 0x02, 0x00];
            record.extend(payload(0, 512));
            out.push(piece(record, false));
            for i in 0..frames {
                out.push(piece(payload(i + 1, frame_bytes as usize), false));
            }
        }
        Script::Data | Script::Continuation | Script::ServerGoaway => {
            let settings = frame(SETTINGS, 0, 0, &[]);
            if script == Script::ServerGoaway {
                // In one write, so no GOAWAY can go before the server's own
                // (which would be allowed): last stream 0, NO_ERROR.
                let goaway = frame(GOAWAY_TYPE, 0, 0, &[0; 8]);
                out.push(piece([settings, goaway].concat(), false));
            } else {
                out.push(piece(settings, true));
            }
            for i in 0..frames {
                let stream = 2 * i + 1;
                if script == Script::Continuation {
                    out.push(piece(frame(HEADERS, 0, stream, &payload(i, 1000)), false));
                    for part in 0..3 {
                        let flags = if part == 2 { END_HEADERS } else { 0 };
                        let body = payload(i + part, 1000);
                        out.push(piece(frame(CONTINUATION, flags, stream, &body), part == 2));
                    }
                }
                let data_stream = if script == Script::Continuation {
                    stream
                } else {
                    1
                };
                let body = payload(i, frame_bytes as usize);
                out.push(piece(
                    frame(DATA, 0, data_stream, &body),
                    script != Script::ServerGoaway,
                ));
            }
        }
    }
    out
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut bytes = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    bytes.extend(stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// Bytes that differ per frame and per position, so a shifted or torn
/// stream never compares equal.
fn payload(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (seed as u8).wrapping_mul(31) ^ (j as u8) ^ ((j >> 8) as u8))
        .collect()
}

/// The whole stream a script sends, and the offsets where a GOAWAY may go.
pub fn expected(script: Script, frames: u32, frame_bytes: u32) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = Vec::new();
    let mut allowed = Vec::new();
    for piece in pieces(script, frames, frame_bytes) {
        bytes.extend_from_slice(&piece.bytes);
        if piece.boundary_after {
            allowed.push(bytes.len());
        }
    }
    (bytes, allowed)
}

/// `received` must be `expected`, or `expected` with one GOAWAY at one of
/// the `allowed` offsets; returns that offset.
pub fn verify(expected: &[u8], allowed: &[usize], received: &[u8]) -> Result<Option<usize>> {
    if received == expected {
        return Ok(None);
    }
    let at = expected
        .iter()
        .zip(received)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(received.len()));
    if received.len() != expected.len() + GOAWAY.len() {
        bail!(
            "received {} bytes, expected {} (+{} with a GOAWAY); first difference at offset {at}",
            received.len(),
            expected.len(),
            GOAWAY.len()
        );
    }
    // The GOAWAY went in at or a little before the first difference (its
    // first bytes may equal the frame header it precedes).
    let inserted_at = |i: usize| {
        received[..i] == expected[..i]
            && received[i..i + GOAWAY.len()] == GOAWAY
            && received[i + GOAWAY.len()..] == expected[i..]
    };
    match (at.saturating_sub(GOAWAY.len())..=at).find(|&i| inserted_at(i)) {
        Some(i) if allowed.contains(&i) => Ok(Some(i)),
        Some(i) => bail!("a GOAWAY at offset {i}, which is not a frame boundary where one may go"),
        None => bail!("the streams differ at offset {at}, and not by one inserted GOAWAY"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_goaway_at(bytes: &[u8], at: usize) -> Vec<u8> {
        [&bytes[..at], &GOAWAY[..], &bytes[at..]].concat()
    }

    #[test]
    fn a_goaway_is_accepted_only_at_allowed_boundaries() {
        let (bytes, allowed) = expected(Script::Continuation, 3, 100);
        assert_eq!(verify(&bytes, &allowed, &bytes).unwrap(), None);
        for &at in &allowed {
            assert_eq!(
                verify(&bytes, &allowed, &with_goaway_at(&bytes, at)).unwrap(),
                Some(at)
            );
        }
        // Inside the header block (after HEADERS), and mid-frame.
        let settings_and_headers = 9 + 9 + 1000;
        assert!(verify(
            &bytes,
            &allowed,
            &with_goaway_at(&bytes, settings_and_headers)
        )
        .is_err());
        assert!(verify(&bytes, &allowed, &with_goaway_at(&bytes, 50)).is_err());
        // Before SETTINGS.
        assert!(verify(&bytes, &allowed, &with_goaway_at(&bytes, 0)).is_err());
    }

    #[test]
    fn anything_else_is_an_error() {
        let (bytes, allowed) = expected(Script::Data, 4, 64);
        let mut torn = bytes.clone();
        torn.remove(30);
        assert!(verify(&bytes, &allowed, &torn).is_err());
        let mut changed = bytes.clone();
        changed[40] ^= 1;
        assert!(verify(&bytes, &allowed, &changed).is_err());
        let twice = with_goaway_at(&with_goaway_at(&bytes, allowed[0]), allowed[1] + 17);
        assert!(verify(&bytes, &allowed, &twice).is_err());
    }

    #[test]
    fn nothing_may_follow_a_servers_goaway_or_go_into_tls() {
        let (_, allowed) = expected(Script::ServerGoaway, 4, 64);
        assert!(allowed.is_empty());
        let (_, allowed) = expected(Script::Tls, 4, 64);
        assert!(allowed.is_empty());
    }

    #[test]
    fn data_frames_have_the_requested_size() {
        let (bytes, allowed) = expected(Script::Data, 3, 1 << 20);
        assert_eq!(bytes.len(), 9 + 3 * (9 + (1 << 20)));
        assert_eq!(allowed.len(), 4);
        assert_eq!(&bytes[9..18], &[0x10, 0, 0, DATA, 0, 0, 0, 0, 1]);
    }
}
