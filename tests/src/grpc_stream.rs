//! The server-streaming RPC of the test peers, `/grpclb.test.Stream/Download`,
//! shared by `testpod grpc-server` (tonic), `testpod grpc-load` and the
//! grpcio, grpc-js and grpc-go clients under `peers/`.
//!
//! No protobuf: messages are raw bytes (a pass-through codec on every side),
//! so the other languages need no generated stubs. The request is 12 bytes,
//! three big-endian u32: how many messages, bytes per message, and the pause
//! between messages in milliseconds. Message `i` is `message_bytes` bytes of
//! value `i % 251`, so a client can tell a torn, shifted or reordered
//! message from a whole one.

use anyhow::{bail, ensure, Result};
use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// The full method name, as on the wire.
pub const DOWNLOAD_PATH: &str = "/grpclb.test.Stream/Download";
pub const SERVICE_NAME: &str = "grpclb.test.Stream";

/// Larger streams would only test the client's patience.
const MAX_MESSAGES: u32 = 1 << 16;
/// gRPC clients refuse messages over 4 MiB by default.
const MAX_MESSAGE_BYTES: u32 = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamRequest {
    pub messages: u32,
    pub message_bytes: u32,
    pub interval_ms: u32,
}

impl StreamRequest {
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(12);
        for n in [self.messages, self.message_bytes, self.interval_ms] {
            out.put_u32(n);
        }
        out.into()
    }

    pub fn decode(mut bytes: &[u8]) -> Result<Self> {
        ensure!(
            bytes.len() == 12,
            "a Download request is 12 bytes (three big-endian u32), got {}",
            bytes.len()
        );
        let request = StreamRequest {
            messages: bytes.get_u32(),
            message_bytes: bytes.get_u32(),
            interval_ms: bytes.get_u32(),
        };
        request.check_bounds()?;
        Ok(request)
    }

    /// What the server refuses: streams too long or messages too large.
    pub fn check_bounds(&self) -> Result<()> {
        ensure!(
            self.messages <= MAX_MESSAGES && self.message_bytes <= MAX_MESSAGE_BYTES,
            "at most {MAX_MESSAGES} messages of at most {MAX_MESSAGE_BYTES} bytes, got {self:?}"
        );
        Ok(())
    }

    /// Message `index` of the stream.
    pub fn message(&self, index: u32) -> Bytes {
        vec![fill_byte(index); self.message_bytes as usize].into()
    }

    /// Whether `message` is whole and is message `index` of the stream.
    pub fn check(&self, index: u32, message: &[u8]) -> Result<()> {
        if message.len() != self.message_bytes as usize {
            bail!(
                "message {index} has {} bytes, expected {}",
                message.len(),
                self.message_bytes
            );
        }
        if let Some(at) = message.iter().position(|&b| b != fill_byte(index)) {
            bail!("message {index} has a wrong byte at {at}");
        }
        Ok(())
    }
}

fn fill_byte(index: u32) -> u8 {
    (index % 251) as u8
}

/// Messages as they are: the bytes of a gRPC message are the message.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_survives_encoding() {
        let request = StreamRequest {
            messages: 16,
            message_bytes: 65536,
            interval_ms: 3,
        };
        assert_eq!(StreamRequest::decode(&request.encode()).unwrap(), request);
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let short = StreamRequest::decode(&[0; 11]).unwrap_err().to_string();
        assert!(short.contains("12 bytes"), "{short}");
        let huge = StreamRequest {
            messages: 1,
            message_bytes: u32::MAX,
            interval_ms: 0,
        };
        assert!(StreamRequest::decode(&huge.encode()).is_err());
    }

    #[test]
    fn a_shifted_or_short_message_is_told_apart() {
        let request = StreamRequest {
            messages: 300,
            message_bytes: 8,
            interval_ms: 0,
        };
        assert!(request.check(260, &request.message(260)).is_ok());
        assert!(request.check(7, &request.message(8)).is_err());
        assert!(request.check(7, &request.message(7)[..7]).is_err());
        let mut torn = request.message(7).to_vec();
        torn[5] = 0;
        assert!(request
            .check(7, &torn)
            .unwrap_err()
            .to_string()
            .contains("at 5"));
    }
}
